"""Many processes: what the stages need to agree across ranks, FSDP2 sharding, and what a launched process tells
the command that launched it.

A stage runs the same way in one process or in many. ``rlhf <stage> --num-processes N`` (or
``--accelerate-config FILE``) re-runs the same command under ``accelerate launch`` (``rlhf.scale.launch``);
``accelerate launch -m rlhf.cli <stage> ...`` works directly too. Inside, every process holds a full copy of the data order and of the
recipe; the trainer stages let transformers' Trainer (through accelerate) split batches and all-reduce
gradients, the PPO stage does both itself with the helpers below. Only the main process writes.

On a machine without a GPU, accelerate's ``--cpu`` flag starts ONE process whatever ``--num_processes`` says;
``--multi_gpu`` with ``ACCELERATE_USE_CPU`` starts the requested number of CPU processes talking over gloo.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf.errors import UserError

LAUNCHED = "RLHF_LAUNCHED"
"""set in the environment of processes started by ``launch``, so that they do not launch again"""
ERRORS = "RLHF_ERRORS_DIR"
"""set by ``launch`` for the processes it starts: the folder where a process that stops on a user error leaves its
line (``report_error``), which the launching command prints once, with its exit code"""
CONFIG = "RLHF_ACCELERATE_CONFIG"
"""set by ``launch`` to the ``--accelerate-config`` file, so that the processes' messages can name it"""
COMMAND = "RLHF_COMMAND"
"""set by ``launch`` to the command as the user typed it, launch options included: what the processes' manifest
records and their resume hint repeats (their own command line has the launch options taken out)"""
TERMINAL = "RLHF_STDERR_TERMINAL"
"""set by ``launch`` when its own stderr is a terminal (the processes' stderr is a pipe through it)"""


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
    """How the processes share the work, as accelerate names it: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED (a
    trainer's; PPO's own loop shards with ``shard``, and its run says FSDP from the shards it counted)."""
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


def config_name() -> str:
    """"the accelerate config FILE" (the launched command's ``--accelerate-config``), or without the file when it
    is not known (a process started by ``accelerate launch`` directly)."""
    return "the accelerate config" + (f" {os.environ[CONFIG]}" if os.environ.get(CONFIG) else "")


def prepare_sharding(stage: str) -> None:
    """Before a trainer stage loads its model, on CPU processes. accelerate applies DeepSpeed only on GPUs (and
    other accelerators): CPU processes given such a config train as plain data parallel, and this says so rather
    than let a user believe the model is sharded. FSDP2 does shard CPU processes (``shard_on_cpu``), with every
    process loading the whole model first: transformers' RAM-efficient loading would leave it on the meta device
    in all but the first, which the trainer then moves before accelerate hands out the weights."""
    if torch.cuda.is_available():
        return
    if sharding() == "fsdp":
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    if sharding() == "deepspeed" and is_main():
        print(f"{stage}: warning: {config_name()} asks for deepspeed, which runs only on GPUs; these CPU "
              "processes run plain data parallel (every process holds the whole model)", file=sys.stderr)


def shard_on_cpu(trainer, stage: str):
    """Shard a trainer's model over CPU processes launched with an FSDP config. accelerate turns FSDP on only for
    GPUs and other accelerators and would run CPU processes as plain data parallel; torch's FSDP2
    (``fully_shard``) works on a CPU device mesh over gloo, so this switches the trainer's accelerator to FSDP with
    the plugin the config describes before it prepares the model. From there accelerate's own FSDP2 code runs,
    the same that runs on GPUs: every parameter becomes a DTensor of which each process holds its shard. Returns
    None where it does not (only FSDP version 2, on CPU processes, with more than one of them), else a callback
    whose ``shards`` holds what ``record_shards`` counted when training began (for the run's manifest)."""
    if sharding() != "fsdp" or torch.cuda.is_available() or world_size() < 2:
        return None
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set from the config
    if plugin.fsdp_version != 2:
        raise UserError(f"{stage}: {config_name()} asks for FSDP version {plugin.fsdp_version}; on CPU "
                        "processes only FSDP2 shards (fsdp_config: fsdp_version: 2, as recipes/accelerate/fsdp.yaml)")
    from accelerate import PartialState

    from transformers import TrainerCallback

    state = trainer.accelerator.state
    state.distributed_type, state.fsdp_plugin = DistributedType.FSDP, plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate's own FSDP setup does
    trainer.is_fsdp_enabled = True

    class _CountShards(TrainerCallback):
        shards: dict | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.shards = record_shards(model)

    counter = _CountShards()
    trainer.add_callback(counter)
    if is_main():
        print(f"{stage}: FSDP2 over {world_size()} CPU processes (gloo): each holds a shard of every parameter",
              file=sys.stderr)
    return counter


_MESH = None
"""the device mesh of every process, made by the first ``shard``"""


def loader(from_main: bool):
    """``load(cls, path, **kwargs)``: ``cls.from_pretrained(path, **kwargs)``; with ``from_main`` (a model about
    to be sharded with ``shard(..., from_main=True)``) only on the main process, the others building the same
    model from its configuration with every parameter on the meta device (no memory; buffers such as rotary
    tables are real), to receive their shards from the main process. accelerate's RAM-efficient loading does the
    same for the trainers on GPUs."""
    def load(cls, path: str, **kwargs):
        if not from_main or is_main() or world_size() == 1:
            return cls.from_pretrained(path, **kwargs)
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        config_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "num_labels") if k in kwargs}
        config = AutoConfig.from_pretrained(path, **config_kwargs)
        with init_empty_weights():
            model = cls.from_config(config, dtype=kwargs.get("dtype"), trust_remote_code=kwargs.get(
                "trust_remote_code", False), **({"attn_implementation": kwargs["attn_implementation"]}
                                                if kwargs.get("attn_implementation") else {}))
        model.tie_weights()  # as loading ties them (a tied head is one parameter, sharded once)
        return model
    return load


def shard(models: list[torch.nn.Module], from_main: bool = False) -> None:
    """FSDP2 over every process for models our own loop trains (PPO's full fine-tuning), the way accelerate's FSDP2
    wraps a trainer's model: each decoder layer (the model's ``_no_split_modules``) one unit, the rest (embeddings,
    final norm, head) the root's. Every parameter becomes a DTensor of which each process holds a shard; a
    forward through the root gathers one unit at a time and frees it again, a backward reduce-scatters each unit's
    gradients. The loop's losses are normalised by the whole batch over every process, so the gradients are
    summed (not averaged) over processes, as ``all_reduce_grads`` sums them for data parallel. On a CPU the
    mesh is gloo's, which has no pre-multiplied sum: plain sums are asked for. ``from_main``: only the main
    process holds the weights (``loader``); the others' meta parameters are given memory for their shards
    alone, filled from the main process's copy, one tensor at a time (``_fill_from_main``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    global _MESH
    if _MESH is None:
        _MESH = init_device_mesh(device().type, (world_size(),))
    mesh = _MESH
    for model in models:
        whole = model.state_dict() if from_main and is_main() else None
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if from_main else {}
        layers = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in layers:
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)
        if from_main:
            _fill_from_main(model, whole, buffers)


def _fill_from_main(model: torch.nn.Module, whole: dict | None, buffers: dict) -> None:
    """Every process's shard of ``model``'s state from the main process's whole tensors (``whole``, None on the
    others): each sharded tensor scattered from the main process (``distribute_tensor``'s source rank), each whole
    one broadcast. On the other processes the meta parameters first get memory for their shards (``to_empty``)
    and the buffers their values back (``to_empty`` leaves them uninitialised)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not is_main():
        model.to_empty(device=device())
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and not buffers[name].is_meta:
                    b.copy_(buffers[name])
    seen: set[int] = set()
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            if id(value) in seen:  # a tied weight: filled once
                continue
            seen.add(id(value))
            if isinstance(value, DTensor):
                source = (whole[name].to(device(), value.dtype) if whole is not None
                          else torch.empty(value.shape, dtype=value.dtype, device=device()))
                value.copy_(distribute_tensor(source, value.device_mesh, value.placements, src_data_rank=0))
            else:
                source = whole[name].to(device(), value.dtype) if whole is not None else torch.empty_like(value)
                torch.distributed.broadcast(source, src=0)
                value.copy_(source)


def whole(x: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (a DTensor) gathered whole on every process (collective), any other as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def local(x: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a DTensor), any other as it is."""
    from torch.distributed.tensor import DTensor

    return x.to_local() if isinstance(x, DTensor) else x


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` split as the DTensor ``like`` is (this process's shard of it, as a DTensor); ``full`` itself when
    ``like`` is not sharded. Every process passes the same ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)


def resident_memory() -> tuple[float, float]:
    """This process's resident memory in MB, now and at its peak so far (Linux's VmRSS and VmHWM); zeros where
    /proc does not say."""
    mine = [0.0, 0.0]
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            for i, key in enumerate(("VmRSS:", "VmHWM:")):
                if line.startswith(key):
                    mine[i] = int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return mine[0], mine[1]


def record_shards(*models: torch.nn.Module) -> dict:
    """Count the parameters each process holds of ``models`` (a DTensor's local shard, or the whole tensor), all of
    them and the trained ones, against the whole models', and each process's peak resident memory so far (what
    loading and sharding took); every process takes part. The run's manifest reports it as ``shards``."""
    params = list({id(p): p for model in models for p in model.parameters()}.values())  # a tied weight once
    held_here = [local(p).numel() for p in params]
    held = by_process([sum(held_here), sum(n for n, p in zip(held_here, params) if p.requires_grad),
                       resident_memory()[1]])
    return {"parameters": sum(p.numel() for p in params),
            "trained": sum(p.numel() for p in params if p.requires_grad),
            "held_by_process": [int(row[0]) for row in held],
            "trained_held_by_process": [int(row[1]) for row in held],
            "loaded_peak_rss_mb": [round(row[2], 1) for row in held]}


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every sharded tensor (an FSDP2 DTensor) gathered whole, a tied weight under its
    first name only (as ``save_pretrained`` writes it); every process must call it (the gathering is
    collective)."""
    out, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = whole(value.detach())
    return out


@contextmanager
def gathered(model: torch.nn.Module):
    """Every parameter of an FSDP2-sharded ``model`` whole while inside, for passes that do not enter through the
    root's forward (a score head read off the backbone); nothing for an unsharded model. Every process must enter
    and run the same passes (gathering is collective)."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is FSDP2-sharded: it or one of its modules is an FSDP unit. (Not whether its first
    parameter is a DTensor: after a forward without a backward, an evaluation, the root unit keeps its
    parameters gathered as plain tensors, as FSDP2 does for the root, and such a check said "not sharded" on one
    process: the trainer's save then wrote nothing.)"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


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


def by_process(values: list[float]) -> list[list[float]]:
    """Every process's ``values`` (the same count on each), one row per process in rank order; every process
    takes part."""
    table = torch.zeros(world_size(), len(values), dtype=torch.float64)
    table[rank()] = torch.tensor(values, dtype=torch.float64)
    return all_sum(table).tolist()


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
    from torch.distributed.tensor import DTensor

    params = [p for p in params if not isinstance(p, DTensor)]  # FSDP2's shards: reduce-scattered in the backward
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
# Inside a launched process (the launching command is rlhf/scale/launch.py)
# ---------------------------------------------------------------------------------------------------------------

def stderr_is_terminal() -> bool:
    """Whether this process's stderr ends on a terminal: its own, or the launching command's (``launch`` passes
    the processes' stderr through a pipe)."""
    return sys.stderr.isatty() or os.environ.get(TERMINAL) == "1"


def report_error(message: str, code: int) -> bool:
    """In a process ``launch`` started: leave the error line and exit code for the launching command to print
    once (not once per process, followed by the launcher's traceback of a failed child). Returns whether it did;
    if not, the caller prints the line itself."""
    where = os.environ.get(ERRORS)
    if not where or not in_launcher():
        return False
    try:
        (Path(where) / os.environ.get("RANK", "0")).write_text(f"{code}\n{message}")
    except OSError:
        return False
    return True


def _leave(name: str, text: str = "") -> None:
    """In a process ``launch`` started: leave a file for the launching command in its folder."""
    where = os.environ.get(ERRORS)
    if where and in_launcher():
        try:
            (Path(where) / name).write_text(text)
        except OSError:
            pass


def mark_started() -> None:
    """In a process ``launch`` started: say it started (``mark_ended`` says how it ended). A process that started
    and never ended was killed mid-run (``launch`` says so)."""
    _leave(f"started-{os.environ.get('RANK', '0')}")


def mark_ended(code) -> None:
    """In a process ``launch`` started, as Python ends it (success, an error, a graceful stop): its exit status.
    What happens after (a library's thread crashing while the interpreter tears down) is not the run's."""
    _leave(f"exited-{os.environ.get('RANK', '0')}", str(code if isinstance(code, int) else (0 if code is None else 1)))


def shut_down() -> None:
    """After a command that succeeded on every process: leave the process group together (a barrier, then
    ``destroy_process_group``), so that no process exits while another's communication threads still talk to
    it (gloo's threads then abort the exiting process: 'terminate called without an active exception')."""
    if in_launcher() and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def note_run(stage: str, final: Path) -> None:
    """In a process ``launch`` started: the run directory the command writes, so that the launching command can
    say, if a process dies, whether there is a resume checkpoint to continue from."""
    _leave("run", f"{stage}\n{Path(final).resolve()}")


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted", "Socket Timeout")
"""what gloo and NCCL say when another process of the run died under a collective"""


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of a launched run went away."""
    if not in_launcher() or not os.environ.get(ERRORS):
        return False
    network = getattr(torch.distributed, "DistNetworkError", ())
    return isinstance(error, network) or (isinstance(error, RuntimeError) and any(x in str(error) for x in LOST_PEER))
