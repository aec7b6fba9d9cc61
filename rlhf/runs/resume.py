"""Resume checkpoints written by our own loops (PPO): tensors in safetensors, the rest in JSON, no pickle.

Each checkpoint is a ``step_<N>`` folder in the run's work directory (``rundir.Run.work``), written under a
temporary name and renamed when complete, so the newest complete one is always readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from rlhf.runs.rundir import fsync_dir, fsync_tree


def optimizer_state(optimizer) -> tuple[dict, dict]:
    """An optimizer's state as flat tensors plus JSON-able metadata (param groups and which keys exist). The state
    of sharded parameters (FSDP2's DTensors) is gathered whole: every process calls this, and the checkpoint is
    the same whatever the number of processes."""
    from rlhf.scale.distributed import whole

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = whole(value.detach()).clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors: dict, meta: dict) -> None:
    """The state ``optimizer_state`` wrote; a sharded parameter's state is split as the parameter is."""
    from rlhf.scale.distributed import shard_like

    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's indices
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            like = params[int(idx)]
            state.setdefault(int(idx), {})[key] = shard_like(value, like) if value.shape == like.shape else value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict, dict]:
    """torch, python and numpy RNG states (tensors, JSON)."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    return ({"rng.torch": torch.get_rng_state()},
            {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]})


def set_rng_state(tensors: dict, meta: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["rng.torch"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_state(work: Path, step: int, tensors: dict, meta: dict, keep: int) -> Path:
    """Write ``work/step_N`` atomically (temporary directory, fsync, rename; complete only once renamed) and prune
    all but the newest ``keep``."""
    from safetensors.torch import save_file

    work.mkdir(parents=True, exist_ok=True)
    final = work / f"step_{step:06d}"
    tmp = work / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}))
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(work)
    for old in sorted(work.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def newest(work: Path) -> Path | None:
    """The newest complete ``work/step_N`` (a step directory appears only once whole: ``save_state``), or None."""
    done = sorted(work.glob("step_*")) if work.is_dir() else []
    return done[-1] if done else None


def latest_meta(work: Path) -> dict | None:
    """The metadata of the newest complete ``work/step_N`` (without its tensors), or None."""
    step_dir = newest(work)
    return json.loads((step_dir / "state.json").read_text()) if step_dir else None


def latest_state(work: Path) -> tuple[int, dict, dict] | None:
    """The newest complete ``work/step_N``: (step, tensors, metadata), or None."""
    from safetensors.torch import load_file

    step_dir = newest(work)
    if step_dir is None:
        return None
    meta = json.loads((step_dir / "state.json").read_text())
    return meta["step"], load_file(str(step_dir / "state.safetensors")), meta
