"""The non-finite guard: NaN/inf losses, gradients or rewards skip the update, are counted, and stop the run after
the recipe's limit with a message naming the step; non-finite weights are never saved."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import write_recipe
from rlhf.ppo import ppo_models
from rlhf.config import load_recipe
from rlhf.errors import TrainingStopped


def _sft_with_nan_losses(tmp_path, monkeypatch, bad_steps, extra=()):
    import trl

    from stages import sft

    calls = {"n": 0}
    original = trl.SFTTrainer.compute_loss

    def compute_loss(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] in bad_steps:
            return out * float("nan") if not isinstance(out, tuple) else (out[0] * float("nan"), *out[1:])
        return out

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", compute_loss)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs")),
                         ["sft.max_steps=5", "sft.eval_fraction=0", "sft.logging_every=1", *extra])
    return sft.main(recipe), tmp_path / "runs" / "tiny" / "sft"


def test_sft_skips_nan_steps_and_finishes(tmp_path, monkeypatch):
    manifest, out = _sft_with_nan_losses(tmp_path, monkeypatch, bad_steps={2, 3})
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if "train/nonfinite_skipped" in r]
    assert [r["step"] for r in skipped] == [2, 3] and skipped[-1]["train/nonfinite_skipped"] == 2
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(out / "adapter_model.safetensors").values())


def test_sft_stops_after_the_limit(tmp_path, monkeypatch):
    with pytest.raises(TrainingStopped, match=r"sft: stopped at step 2: 2 updates in a row"):
        _sft_with_nan_losses(tmp_path, monkeypatch, bad_steps=set(range(1, 100)), extra=["sft.max_nonfinite=2"])
    assert not (tmp_path / "runs" / "tiny" / "sft").exists()


def test_ppo_stops_on_nan_rewards(parents, tmp_path, monkeypatch):
    from stages import ppo

    recipe_path, _ = parents
    monkeypatch.setattr(ppo_models.SharedBase, "scores",
                        lambda self, ids, mask: torch.full((ids.shape[0],), float("nan")))
    recipe = load_recipe(recipe_path, ["ppo.max_steps=5", "ppo.batch_size=8", "ppo.mini_batch_size=8",
                                       "ppo.micro_batch_size=8", "ppo.max_new_tokens=8", "ppo.eval_every=0",
                                       "ppo.max_nonfinite=2"])
    with pytest.raises(TrainingStopped, match=r"ppo: stopped at step 2: 2 steps in a row"):
        ppo.main(recipe, out=tmp_path / "ppo")
    assert not (tmp_path / "ppo").exists()
