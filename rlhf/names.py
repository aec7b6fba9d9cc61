"""How the project reads a name a user gives it, in one place and without torch: a local path or a hub id, which
files are data, which dtype a name means, one run however it is spelt; and where measurements of this machine are
kept (``cache_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
"""the data files every loader reads (a folder: every such file in it)"""

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
"""``model.dtype`` and ``--dtype`` values; "auto": the checkpoint's own"""


def is_local(value: str | Path) -> bool:
    """Whether a model or data source is a path on this machine rather than a hub id: it exists, has a data-file
    suffix, is written as a path (``/``, ``./``, ``../``, ``~``), or has more than one ``/`` (a hub id is
    ``owner/name``). A path that does not exist is still a path: the caller says it is missing."""
    text = str(value)
    return (Path(text).expanduser().exists() or text.endswith(DATA_SUFFIXES)
            or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1)


def cache_dir() -> Path:
    """Where measurements of this machine are kept: ``$RLHF_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlhf``, else
    ``~/.cache/rlhf``."""
    if os.environ.get("RLHF_CACHE_DIR"):
        return Path(os.environ["RLHF_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf"


def run_name(spec: str) -> str:
    """A policy named the way the project records it: a run directory's path written plainly (``runs/sft/``,
    ``./runs/sft`` and ``runs//sft`` are all ``runs/sft``), ``base:PATH`` with its path written so too; anything
    else as it is. One run under two spellings is then one policy (in ``rlhf sample``'s rows and a reward model's
    ``data.policies``)."""
    import os

    if not isinstance(spec, str) or not spec:
        return spec
    if spec.startswith("base:"):
        return "base:" + (os.path.normpath(spec[5:]) if spec[5:] else "")
    return os.path.normpath(spec)


def torch_dtype(name: str):
    """The torch dtype a name means (``DTYPE_NAMES``; "auto" stays the string transformers reads)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]
