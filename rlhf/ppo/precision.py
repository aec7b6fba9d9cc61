"""The precision PPO's forward and backward passes run in, and whether they repeat bit for bit.

``ppo.mixed_precision: auto`` takes two measured facts of the machine:

- **speed**: bf16 autocast only where bf16 matrix products are at least ``BF16_MIN_SPEEDUP`` times faster than
  fp32 here. No CPU flag tells (AVX512-BF16 without AMX measured 0.55x on one CPU and 2.1-2.3x on another), and a
  measurement taken while the CPU is busy with other work can come out anywhere from 0.8x to 5.6x, so the first
  measurement on a machine is kept (``cached_speedup``: one file per user, keyed by CPU, torch and thread count)
  and every later run decides the same way.
- **repeatability**: a run resumes bit for bit only if each pass gives the same bits every time it runs on the
  same inputs. ``repeats`` runs a pass twice, with the memory it could read uninitialised filled first with NaN
  and then with ones, and compares every output bit for bit; "auto" keeps bf16 only where PPO's own pass (the
  policy sampling, its forward and backward: ``rlhf.ppo.ppo_update.probe_pass``) repeats. On one Xeon with AMX two
  identical bf16 runs differed from the first sampled step while fp32 runs were identical; this check is what
  makes "auto" fall back to fp32 there.

A pass that differs only between processes (and repeats within one) is not caught; none is known.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from rlhf import names
from rlhf.scale import distributed

BF16_MIN_SPEEDUP = 1.3
"""``mixed_precision: auto`` picks bf16 on a CPU only where bf16 products measured at least this much faster"""


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of a forward pass on ``device`` (a no-op when ``dtype`` is None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------

def bf16_speedup(device: torch.device, width: int) -> float | None:
    """How many times faster bf16 matrix products are than fp32 on ``device``, measured here on products of the
    model's width (capped at 1024) and ~512 tokens; None on a GPU (not measured: bf16 is fast wherever supported).

    A CPU flag does not tell: with AMX, or AVX512-BF16 on some CPUs, bf16 products were 4x fp32 at the tiny model's
    shapes; on a CPU with AVX512-BF16 but no AMX they were 0.55x (docs/ppo.md, "Precision"). Takes 10 ms at the
    tiny model's width, ~0.3 s at 1024 on two cores. Draws its operands from its own generator: the global RNG is
    left as it was.
    """
    if device.type != "cpu":
        return None
    n = max(64, min(int(width), 1024))
    gen = torch.Generator().manual_seed(0)
    operands = {dtype: (torch.randn(512, n, generator=gen).to(dtype), torch.randn(3 * n, n, generator=gen).to(dtype))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(operands, float("inf"))
    for x, w in operands.values():
        nn.functional.linear(x, w)  # warm-up
    for _ in range(6):  # the two kinds in turn, so that a burst of load from elsewhere slows both alike
        for dtype, (x, w) in operands.items():
            t0 = time.perf_counter()
            for _ in range(2):
                nn.functional.linear(x, w)
            best[dtype] = min(best[dtype], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def machine_key(width: int) -> str:
    """What a speed measurement depends on: the CPU (model name and its bf16 flags), torch, the thread count and
    the product width measured."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu = info.get("model name", cpu)
        flags = sorted(f for f in info.get("flags", "").split() if "bf16" in f or f.startswith("amx"))
    except OSError:
        pass
    n = max(64, min(int(width), 1024))
    return f"{cpu} [{' '.join(flags) or 'no bf16 flags'}] torch {torch.__version__}, {torch.get_num_threads()} " \
           f"threads, width {n}"


def cached_speedup(device: torch.device, width: int) -> tuple[float | None, str | None]:
    """``bf16_speedup`` as first measured on this machine (``names.cache_dir()/precision.json``), measuring and keeping
    it when there is none, and when it was measured: ``(speedup, iso date)``; ``(None, None)`` on a GPU. A cache
    that cannot be read or written is measured around, never an error."""
    if device.type != "cpu":
        return None, None
    path, key = names.cache_dir() / "precision.json", machine_key(width)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    kept = entry.get("bf16_speedup") if isinstance(entry, dict) else None
    if isinstance(kept, (int, float)) and not isinstance(kept, bool) and math.isfinite(kept) and kept > 0:
        return float(kept), entry.get("measured")  # anything else (NaN, Infinity, 0, text) is measured again
    speedup = round(bf16_speedup(device, width), 3)  # as kept: the first run decides as every later one
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    if distributed.is_main():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}),
                                       key: {"bf16_speedup": speedup, "measured": stamp}}, indent=2) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass
    return speedup, stamp


def autocast_dtype(setting: str, quantized_or_low: bool, device: torch.device, width: int
                   ) -> tuple[torch.dtype | None, float | None]:
    """The autocast dtype for ``ppo.mixed_precision`` before the repeatability check (None: none), and the bf16
    speed-up "auto" decided by. "auto" means bf16 for a plain fp32 base on a GPU with bf16, or on a CPU where bf16
    products measured (``cached_speedup``, averaged over all processes) at least ``BF16_MIN_SPEEDUP`` times faster
    than fp32; an already low-precision or quantized base (``quantized_or_low``) runs as it is."""
    if setting == "bf16":
        return torch.bfloat16, None
    if setting == "no" or quantized_or_low:
        return None, None
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else None), None
    # every process takes the same decision: the measurement averaged over all of them
    speedup = distributed.all_mean({"bf16_speedup": cached_speedup(device, width)[0]})["bf16_speedup"]
    return (torch.bfloat16 if speedup >= BF16_MIN_SPEEDUP else None), speedup


# ---------------------------------------------------------------------------------------------------------------
# Repeatability
# ---------------------------------------------------------------------------------------------------------------

def scribble(value: float, device: torch.device) -> None:
    """Fill memory the allocator is about to hand out again with ``value``: blocks of every power of two from 32
    bytes to 32 MiB (several of each small size, as small blocks come from per-size free lists that other
    allocations draw on too), written and freed, so that a kernel reading memory it never wrote reads ``value``."""
    blocks = [torch.full((1 << k,), value, dtype=torch.bfloat16, device=device)
              for k in range(4, 25) for _ in range(8 if k <= 16 else 2 if k <= 20 else 1)]
    for b in blocks:
        b.add_(0)  # written for certain, not left to a lazy zero page
    del blocks


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (NaN equal to the same NaN, -0.0 unequal to 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def repeats(run_once: Callable[[], Sequence[torch.Tensor]], device: torch.device) -> bool:
    """Whether ``run_once`` gives the same bits twice: once after memory is filled with NaN, once after it is
    filled with ones (``scribble``). Every process's answer is combined: False when any process differs."""
    outputs = []
    for value in (float("nan"), 1.0):
        scribble(value, device)
        outputs.append([t.detach().clone() for t in run_once()])
    ok = len(outputs[0]) == len(outputs[1]) and all(same_bits(a, b) for a, b in zip(*outputs))
    return distributed.all_sum(torch.tensor(0.0 if ok else 1.0)).item() == 0.0
