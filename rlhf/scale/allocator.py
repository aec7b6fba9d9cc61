"""The memory allocator the training commands run on.

PyTorch on a CPU allocates and frees many tensors of a few MB every step. glibc's malloc serves them from a heap
that fragments (its mmap threshold rises after the first large free), so the process keeps hundreds of MB it no
longer uses, and fresh pages are faulted in over and over. tcmalloc (gperftools) reuses those blocks: PPO on the
tiny model at batch 64 peaked at 784 MB instead of 1161 MB, and ran a little faster (README, "Performance").

tcmalloc must be loaded before the process starts, so ``rlhf sft|rm|ppo|eval`` re-executes itself once with
``LD_PRELOAD`` naming it when the system has it (Debian/Ubuntu ``libtcmalloc-minimal4``, conda ``gperftools``).
``RLHF_ALLOCATOR=system`` turns this off; ``RLHF_ALLOCATOR=/path/to/lib.so`` preloads that library instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rlhf.errors import UserError

ENV = "RLHF_ALLOCATOR"
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(dirs: tuple[str, ...] = _DIRS) -> str | None:
    """The path of a tcmalloc shared library on this system (the active conda environment first), or None."""
    search = ([str(Path(os.environ["CONDA_PREFIX"]) / "lib")] if os.environ.get("CONDA_PREFIX") else []) + list(dirs)
    for folder in search:
        for name in _NAMES:
            path = Path(folder) / name
            if path.is_file():
                return str(path)
    return None


def preload_env(env: dict[str, str], found: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so that the allocator ``ENV`` asks for is preloaded ("auto", the
    default: tcmalloc when ``found``), or None when this process should simply go on: nothing to preload, not
    Linux, turned off, or already preloaded (as after the re-execution)."""
    choice = env.get(ENV, "auto")
    if choice == "system" or sys.platform != "linux":
        return None
    if choice != "auto" and not Path(choice).is_file():
        raise UserError(f"{ENV}={choice}: no such file (auto, system, or the path of an allocator library)")
    library = found if choice == "auto" else choice
    preloaded = [x for x in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if x]
    if library is None or library in preloaded or (choice == "auto" and any("tcmalloc" in x for x in preloaded)):
        return None
    return {**env, "LD_PRELOAD": ":".join([library, *preloaded]), ENV: library,
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}  # no stderr report of every large block


def reexec_with_preload(argv: list[str]) -> None:
    """Replace this process by ``python -m rlhf.cli ARGV`` with the allocator preloaded, when there is one to
    preload (returns otherwise)."""
    env = preload_env(dict(os.environ), find_tcmalloc())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "rlhf.cli", *argv], env)


def current() -> str:
    """The allocator this process runs on: "tcmalloc", "jemalloc" or "system" (read from its own mappings)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"
