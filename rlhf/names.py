"""How the project reads a name a user gives it, in one place and without torch: a local path or a hub id, which
files are data, and which dtype a name means.
"""

from __future__ import annotations

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


def torch_dtype(name: str):
    """The torch dtype a name means (``DTYPE_NAMES``; "auto" stays the string transformers reads)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[name]
