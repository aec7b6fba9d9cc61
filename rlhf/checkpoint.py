"""Run directories: where a stage writes, how it writes atomically, and what its manifest records.

A stage never writes into its final directory. It builds the output in a staging directory beside it
(``.<name>.partial-<pid>``), fsyncs every file, writes ``manifest.json`` last with ``status: complete``, and then
renames the staging directory into place. A crash leaves at most a staging directory, never a final directory
that looks complete. An existing finished run is replaced only with ``--overwrite``, and even then the old one is
moved aside first and deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rlhf.errors import UserError

# The command line that started this process, as the user typed it (set by the CLI; manifests record it).
COMMAND: str | None = None

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "rlhf")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object a line to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")


class Run:
    """One stage's output directory, built in a staging directory and published by ``finish``."""

    def __init__(self, final: Path, stage: str, overwrite: bool = False):
        self.final = Path(final)
        self.stage = stage
        self.started = now()
        self.t0 = time.time()
        if self.final.exists():
            if not self.final.is_dir():
                raise UserError(f"{self.final}: exists and is not a directory")
            if any(self.final.iterdir()) and not overwrite:
                raise UserError(f"{self.final}: already holds a run; pass --overwrite to replace it "
                                "(or --out to write elsewhere)")
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = parent / f".{self.final.name}.partial-{os.getpid()}"
            if self.staging.exists():
                shutil.rmtree(self.staging)
            self.staging.mkdir()
        except OSError as e:
            raise UserError(f"{parent}: cannot create the run directory ({e.strerror})") from None
        self.work = parent / f".{self.final.name}.work"
        """scratch space for the trainer (resume checkpoints); removed when the run finishes"""
        self.metrics = MetricsLog(self.staging / "metrics.jsonl")

    def finish(self, manifest: dict) -> dict:
        """Write the manifest, fsync everything, and move the staging directory into place; returns the manifest."""
        manifest = {"stage": self.stage, "status": "complete", **manifest, "started": self.started,
                    "finished": now(), "seconds": round(time.time() - self.t0, 2), "versions": versions(),
                    "command": COMMAND or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        write_json(self.staging / "manifest.json", manifest)
        _fsync_tree(self.staging)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return manifest

    def abandon(self) -> None:
        """Remove the staging directory after a failure (the final directory is untouched)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # any failure, Ctrl-C included: nothing half-written is left behind
            self.abandon()
