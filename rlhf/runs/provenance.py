"""Where a run's base model and parent runs are, and whether they are still the ones it was trained from.

A run names its base and parents as they were typed (``data/tiny-base``, ``runs/tiny/sft``): relative to the
directory the command ran in. Read later from another directory, or from a checkout whose base was rebuilt, the
same words name another model, or nothing. So ``Run.finish`` also records, under ``resolved``, where each one
was (an absolute path) and what it was:

    "resolved": {"base": {"typed": "data/tiny-base", "path": "/abs/data/tiny-base", "fingerprint": "sha256:..."},
                 "parents": {"sft": {"typed": "runs/tiny/sft", "path": "/abs/runs/tiny/sft",
                                     "manifest_sha256": "..."}, ...}}

The base's fingerprint is a sha256 of its ``config.json`` and weight files (names and bytes; each file's digest is
kept in the cache directory, keyed by its path, size, modification time and inode, so a base is read once per
machine and change). A parent run is identified by its manifest's bytes (which hold its start and end times).
A hub id is recorded with the revision (commit) the local hub cache holds for it, when it holds one.

Reading a run (``modeling.read_run``) finds its base at the recorded path, else as typed from the current
directory, and refuses one whose fingerprint differs, naming both; a parent is found the same way and refused
when its manifest changed (retrained or replaced). ``rlhf --allow-changed-base`` (the environment variable
``RLHF_ALLOW_CHANGED_BASE=1``) loads them anyway, with a warning. Runs from before this record load as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from rlhf.errors import UserError
from rlhf.names import is_local

ALLOW_ENV = "RLHF_ALLOW_CHANGED_BASE"
"""set to 1 (``rlhf --allow-changed-base``): load a base or parent that changed since the run, with a warning"""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def allowed() -> bool:
    return os.environ.get(ALLOW_ENV) == "1"


# ---------------------------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------------------------

def _cache_path() -> Path:
    from rlhf.names import cache_dir

    return cache_dir() / "fingerprints.json"


def _file_digest(path: Path, known: dict, fresh: dict) -> str:
    """sha256 of one file's bytes, from ``known`` when its path, size, modification time and inode are the same."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    digest = known.get(key)
    if not isinstance(digest, str):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        digest = fresh[key] = h.hexdigest()
    return digest


def model_files(path: Path) -> list[Path]:
    """The files that make a model directory the model it is: its config and its weights (and their index)."""
    return sorted(f for f in Path(path).iterdir() if f.is_file() and (
        f.name == "config.json" or f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")))


def fingerprint(path: str | Path) -> str | None:
    """``sha256:<hex>`` of a local model directory's config and weights (module docstring); None for a path that
    is not a directory holding weights. Reads each file once per machine and change (a cache that cannot be read
    or written is computed around, never an error)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    files = model_files(path)
    if not any(f.suffix in WEIGHT_SUFFIXES for f in files):
        return None
    cache = _cache_path()
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    fresh: dict[str, str] = {}
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_digest(f, known, fresh).encode() + b"\n")
    if fresh:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**known, **fresh}, indent=0) + "\n")
            os.replace(tmp, cache)
        except OSError:
            pass
    return "sha256:" + h.hexdigest()


def hub_revision(model_id: str) -> str | None:
    """The commit of ``model_id`` that the local hub cache holds (its ``config.json``'s snapshot), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # noqa: BLE001 - no hub library, a malformed id: nothing to record
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[-2] if len(parts) >= 2 and parts[-3:-2] == ("snapshots",) else None


def manifest_sha256(run_dir: str | Path) -> str | None:
    """sha256 of a run's manifest.json (its identity: the manifest holds the run's start and end times)."""
    try:
        return hashlib.sha256((Path(run_dir) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Recording (Run.finish)
# ---------------------------------------------------------------------------------------------------------------

def base_record(base: str) -> dict:
    """Where ``base`` is and what it is (module docstring)."""
    if is_local(base):
        path = Path(base).expanduser()
        return {"typed": base, "path": str(path.resolve()), "fingerprint": fingerprint(path)}
    return {"typed": base, "path": None, "revision": hub_revision(base)}


def parent_record(typed) -> dict | None:
    """Where a parent run is and which run it is; None for what is not a run directory (``base``, a row name)."""
    if not isinstance(typed, str) or not (Path(typed).expanduser() / "manifest.json").is_file():
        return None
    path = Path(typed).expanduser()
    return {"typed": typed, "path": str(path.resolve()), "manifest_sha256": manifest_sha256(path)}


def record(base: str | None, parents: dict | None) -> dict:
    """The manifest's ``resolved`` section for a run's ``base`` and ``parents`` (each parent a path, a list of
    paths, or None)."""
    out: dict = {"base": base_record(base) if isinstance(base, str) and base else None, "parents": {}}
    for role, value in (parents or {}).items():
        if isinstance(value, list):
            out["parents"][role] = [parent_record(v) for v in value]
        elif value is not None:
            out["parents"][role] = parent_record(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Checking (reading a run)
# ---------------------------------------------------------------------------------------------------------------

_WARNED: set[str] = set()


def _recorded(manifest: dict, role: str | None = None):
    """The manifest's ``resolved`` record of its base (``role`` None) or of its parents of ``role``; None for a
    manifest without one (from before it, or hand-edited)."""
    resolved = manifest.get("resolved") if isinstance(manifest.get("resolved"), dict) else {}
    if role is None:
        return resolved.get("base")
    parents = resolved.get("parents") if isinstance(resolved.get("parents"), dict) else {}
    return parents.get(role)


def _parents(manifest: dict) -> dict:
    return manifest.get("parents") if isinstance(manifest.get("parents"), dict) else {}


def revision_of(manifest: dict) -> str | None:
    """The hub commit a run recorded for a base that is a hub id, or None."""
    rec = _recorded(manifest)
    return rec.get("revision") if isinstance(rec, dict) else None


def _changed(message: str) -> None:
    if not allowed():
        raise UserError(f"{message}; rlhf --allow-changed-base ... loads it anyway")
    if message not in _WARNED:  # a run is read more than once by one command
        _WARNED.add(message)
        print(f"warning: {message}; loading it anyway (--allow-changed-base)", file=sys.stderr)


def base_of(manifest: dict, run_dir: str | Path) -> str:
    """Where to load a finished run's base from: the recorded path, else the base as typed (from the current
    directory), refusing a base whose fingerprint is not the recorded one, or none at all (module docstring).
    A run without the record (from before it) gives its base as typed; a hub id, its id."""
    typed, rec = manifest.get("base"), _recorded(manifest)
    if not isinstance(rec, dict) or not rec.get("path") or not isinstance(typed, str):
        return typed
    recorded, want = rec["path"], rec.get("fingerprint")
    candidates = list(dict.fromkeys(p for p in (recorded, typed) if p and Path(p).expanduser().is_dir()))
    if not candidates:
        raise UserError(f"{run_dir}: its base {typed!r} is not there any more (it was at {recorded}); put it back, "
                        "or run from the directory it is relative to")
    if want is None:
        return candidates[0]
    found = {}
    for candidate in candidates:
        found[candidate] = fingerprint(candidate)
        if found[candidate] == want:
            return candidate
    where = candidates[0]
    _changed(f"{run_dir}: its base changed since it was trained: {where} is {_short(found[where])}, the run was "
             f"trained on {recorded} at {_short(want)}")
    return where


def parent_of(manifest: dict, run_dir: str | Path, role: str) -> Path | None:
    """A finished run's parent run of ``role`` (``sft``, ``rm``), found where it was recorded (else as typed),
    refused when it is not the run it was (its manifest changed: retrained or replaced); None when it has
    none."""
    typed, rec = _parents(manifest).get(role), _recorded(manifest, role)
    if not isinstance(typed, str) or not typed:
        return None
    if not isinstance(rec, dict) or not rec.get("path"):
        return Path(typed)
    candidates = [p for p in dict.fromkeys((rec["path"], typed)) if (Path(p).expanduser() / "manifest.json").is_file()]
    if not candidates:
        raise UserError(f"{run_dir}: its {role} run {typed!r} is not there any more (it was at {rec['path']})")
    want = rec.get("manifest_sha256")
    for candidate in candidates:
        if want is None or manifest_sha256(candidate) == want:
            return Path(candidate)
    _changed(f"{run_dir}: its {role} run {candidates[0]} is not the run it was trained from (retrained or "
             "replaced since)")
    return Path(candidates[0])


def where(manifest: dict, role: str) -> list[str]:
    """Where each of a run's parents of ``role`` is to be found, unchecked (for showing lineage): the recorded
    path when it is there, else the path as typed."""
    typed, rec = _parents(manifest).get(role), _recorded(manifest, role)
    typed, rec = (typed, rec) if isinstance(typed, list) else ([typed], [rec])
    out = []
    for value, r in zip(typed, rec if isinstance(rec, list) and len(rec) == len(typed) else [None] * len(typed)):
        if isinstance(r, dict) and isinstance(r.get("path"), str) and (Path(r["path"]) / "manifest.json").is_file():
            out.append(r["path"])
        elif isinstance(value, str) and value:
            out.append(value)
    return out


def _short(digest: str | None) -> str:
    return "an unknown model" if not digest else f"fingerprint {digest.split(':')[-1][:12]}"
