"""Many processes: launching a stage under ``accelerate launch``, and what the stages need to agree across ranks.

A stage runs the same way in one process or in many. ``rlhf <stage> --num-processes N`` (or
``--accelerate-config FILE``) re-runs the same command under ``accelerate launch``; ``accelerate launch -m
rlhf.cli <stage> ...`` works directly too. Inside, every process holds a full copy of the data order and of the
recipe; the trainer stages let transformers' Trainer (through accelerate) split batches and all-reduce
gradients, the PPO stage does both itself with the helpers below. Only the main process writes.

On a machine without a GPU, accelerate's ``--cpu`` flag starts ONE process whatever ``--num_processes`` says;
``--multi_gpu`` with ``ACCELERATE_USE_CPU`` starts the requested number of CPU processes talking over gloo.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from rlhf.errors import UserError

LAUNCHED = "RLHF_LAUNCHED"
"""set in the environment of processes started by ``launch``, so that they do not launch again"""


def state():
    """accelerate's process state (created on first use; one per process)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def in_launcher() -> bool:
    """Whether this process was started by a distributed launcher (accelerate launch, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return state().num_processes if in_launcher() else 1


def rank() -> int:
    return state().process_index if in_launcher() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


def device() -> torch.device:
    """The device of this process: its GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        return state().device
    return torch.device("cpu")


def kind() -> str:
    """How the processes share the work, as accelerate names it: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED."""
    if not in_launcher():
        return "NO"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # a trainer's Accelerator knows about FSDP / DeepSpeed; the bare state not
        return AcceleratorState().distributed_type.value
    return state().distributed_type.value


def sharding() -> str | None:
    """"deepspeed" or "fsdp" when the launcher asked for sharded parameters, else None."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def warn_unsharded(stage: str) -> None:
    """accelerate applies FSDP and DeepSpeed only on GPUs (and other accelerators); CPU processes given such a
    config train as plain data parallel. Say so rather than let a user believe the model is sharded."""
    if sharding() and not torch.cuda.is_available() and is_main():
        print(f"{stage}: warning: the accelerate config asks for {sharding()}, which accelerate applies only on "
              "GPUs; these CPU processes run plain data parallel (every process holds the whole model)",
              file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Reductions (identity in one process)
# ---------------------------------------------------------------------------------------------------------------

def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``x`` over all processes (a new tensor; ``x`` is left alone)."""
    if world_size() == 1:
        return x
    out = x.detach().to(device(), copy=True)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
    return out.to(x.device)


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Each number averaged over all processes (every process passes the same keys)."""
    if world_size() == 1 or not values:
        return values
    keys = sorted(values)
    total = all_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device()))
    return {k: v / world_size() for k, v in zip(keys, total.tolist())}


def any_failed(failed: bool) -> bool:
    """Whether any process reports a failure (every process must call this at the same point); lets the others
    stop with the main process instead of waiting for it forever."""
    if world_size() == 1:
        return failed
    return bool(all_sum(torch.tensor([1.0 if failed else 0.0], device=device())).item() > 0)


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all processes, in one flat buffer (a parameter without a gradient
    contributes zeros). The losses are normalised by the global token count, so the sum is the global mean."""
    if world_size() == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


# ---------------------------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------------------------

def launch_command(argv: list[str], num_processes: int | None, config_file: str | None) -> list[str]:
    """The ``accelerate launch`` command (an argument list, never a shell string) that runs ``rlhf <argv>``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        if not Path(config_file).is_file():
            raise UserError(f"--accelerate-config: {config_file}: no such file")
        cmd += ["--config_file", config_file]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
        if not config_file and num_processes > 1:
            cmd += ["--multi_gpu"]  # on a CPU machine too: with ACCELERATE_USE_CPU it starts gloo processes
        if not config_file:
            cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not torch.cuda.is_available():
            threads = max(1, (os.cpu_count() or 1) // num_processes)
            cmd += ["--num_cpu_threads_per_process", str(threads)]
    return cmd + ["-m", "rlhf.cli", *argv]


def strip_launch_options(argv: list[str]) -> list[str]:
    """``argv`` without ``--num-processes``/``--accelerate-config`` (and their values)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--num-processes", "--accelerate-config"):
            skip = True
            continue
        if arg.startswith(("--num-processes=", "--accelerate-config=")):
            continue
        out.append(arg)
    return out


def launch(argv: list[str], num_processes: int | None, config_file: str | None) -> int:
    """Run ``rlhf <argv>`` under ``accelerate launch``; returns its exit code."""
    env = dict(os.environ, **{LAUNCHED: "1"})
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = launch_command(strip_launch_options(argv), num_processes, config_file)
    return subprocess.call(cmd, env=env)

