"""Run directories: where a stage writes, how it writes atomically, and what its manifest records.

A stage never writes into its final directory. It builds the output in a staging directory beside it
(``.<name>.partial``), fsyncs every file, writes ``manifest.json`` last with ``status: complete``, and then
renames the staging directory into place. A crash leaves at most a staging directory, never a final directory
that looks complete. An existing finished run is replaced only with ``--overwrite``, and even then the old one is
moved aside first and deleted only after the new one is in place.

Resume checkpoints (what a loop needs to continue: optimizer, RNG, data position) are ``rlhf.runs.resume``; they live in
the run's ``work`` directory.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from rlhf.errors import TrainingStopped, UserError
from rlhf.runs.manifest import Manifest
from rlhf.scale import allocator, distributed

PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "rlhf")


def memory_by_process() -> dict[str, list[float]]:
    """Each process's resident memory in MB, now and at its peak (Linux's VmRSS and VmHWM); every process takes
    part. Empty where /proc does not say."""
    table = distributed.by_process(list(distributed.resident_memory()))
    if not any(any(row) for row in table):
        return {}
    return {"rss_mb": [round(row[0], 1) for row in table], "peak_rss_mb": [round(row[1], 1) for row in table]}


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


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        fsync_dir(d)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(value):
    """``value`` with every NaN or infinity replaced by None: JSON has no such numbers, and a manifest holding
    them (Python writes ``NaN``, ``Infinity``) is unreadable to most readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file; a non-finite number
    is written as null (``json_safe``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(data), f, indent=2, default=str, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_jsonl(path: Path, rows) -> None:
    """Write JSON lines the same way (a temporary file beside ``path``, fsync'd, renamed over it): an interrupted
    write leaves the old file, never half a new one. A filesystem failure is a one-line error naming the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


class MetricsLog:
    """Appends one JSON object a line to ``metrics.jsonl``, and passes the numbers on to the run's trackers.
    Only an enabled log writes (the main process's, when there are many)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers: list = []

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self.trackers:
            values = {k: v for k, v in row.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self.trackers:
                tracker.log(values, step=row.get("step"))


def start_trackers(report_to: list[str], run_name: str, logging_dir: Path, config: dict) -> list:
    """accelerate's trackers for ``logging.report_to`` (tensorboard, wandb, ...), started, with the resolved recipe
    stored as their configuration. Files they write locally go under ``logging_dir``."""
    if not report_to:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config)
    trackers = []
    for name in report_to:
        cls = LOGGER_TYPE_TO_CLASS[name]
        if getattr(cls, "requires_logging_directory", False):
            tracker = cls(run_name, str(logging_dir))
        elif name == "wandb":
            tracker = cls(run_name, dir=str(logging_dir))  # WANDB_MODE=offline keeps it on this machine
        else:
            tracker = cls(run_name)
        logging_dir.mkdir(parents=True, exist_ok=True)
        try:
            tracker.start()
        except ImportError as e:
            raise UserError(f"logging.report_to: {name} needs the {e.name or name} package "
                            f"(pip install {e.name or name})") from None
        tracker.store_init_configuration(flat)
        trackers.append(tracker)
    return trackers


class Run:
    """One stage's output directory, built in a staging directory and published by ``finish``.

    Beside the final directory ``<out>`` live, while the stage runs, ``.<out>.partial`` (the output being built:
    metrics.jsonl, and at the end the weights and manifest) and ``.<out>.work`` (resume checkpoints). A killed run
    leaves both; ``resume=True`` continues from them. Without it, leftovers of an interrupted run are an error
    unless ``overwrite`` discards them, so resumable work is never deleted by accident.
    """

    def __init__(self, final: Path, stage: str, overwrite: bool = False, resume: bool = False,
                 command: str | None = None):
        self.final = Path(final)
        self.stage = stage
        self.command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        """the command line that started the run, as the user typed it (the CLI passes it; manifests record it)"""
        self.started = now()
        self.t0 = time.time()
        self.resumed = resume
        self.main = distributed.is_main()
        """whether this process writes (with many processes only the main one does)"""
        parent = self.final.parent
        self.staging = parent / f".{self.final.name}.partial"
        self.work = parent / f".{self.final.name}.work"
        """scratch space for resume checkpoints; removed when the run finishes"""
        if self.main:
            distributed.note_run(stage, self.final)  # launched: where the launching command looks for a checkpoint
        self.lock = RunLock(parent / f".{self.final.name}.lock") if self.main else None
        """one writer per run directory: held by the main process from here until the run is published or
        abandoned (the kernel drops it when the process dies, however it dies)"""
        busy = self.lock.acquire() if self.lock is not None else None
        if distributed.any_failed(busy is not None):
            raise UserError(f"{self.final}: another process {f'(pid {busy}) ' if busy else ''}is writing this run; "
                            "wait for it to end or write elsewhere with --out")
        try:
            self._check_and_prepare(overwrite, resume)
        except BaseException:
            self._release()
            raise

    def _check_and_prepare(self, overwrite: bool, resume: bool) -> None:
        parent = self.final.parent
        # every process checks (they see the same files and raise the same error), then only the main one writes
        if self.final.exists():
            if not self.final.is_dir():
                raise UserError(f"{self.final}: exists and is not a directory")
            if any(self.final.iterdir()) and not overwrite:
                raise UserError(f"{self.final}: already holds a {'finished ' if resume else ''}run; pass --overwrite "
                                "to replace it (or --out to write elsewhere)")
        if resume and not self.staging.is_dir():
            raise UserError(f"{self.final}: nothing to resume (no interrupted run at {self.staging})")
        if not resume and (self.staging.exists() or self.work.exists()) and not overwrite:
            raise UserError(f"{self.final}: an interrupted run is at {self.staging}; pass --resume to "
                            "continue it or --overwrite to start over")
        distributed.barrier()
        error = None
        if self.main:
            try:
                parent.mkdir(parents=True, exist_ok=True)
                if not resume:
                    shutil.rmtree(self.staging, ignore_errors=True)
                    shutil.rmtree(self.work, ignore_errors=True)
                    self.staging.mkdir()
                probe = self.staging / ".write-test"
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                error = UserError(f"{parent}: cannot write the run directory ({e.strerror})")
        if distributed.any_failed(error is not None):
            raise error or UserError(f"{parent}: the main process could not write the run directory")
        self.metrics = MetricsLog(self.staging / "metrics.jsonl", enabled=self.main)

    def track(self, recipe) -> None:
        """Start the recipe's trackers (``logging.report_to``); they log to ``<run>/logs/`` and receive every
        row written to metrics.jsonl."""
        if not self.main:
            return
        self.metrics.trackers = start_trackers(recipe.logging.report_to, f"{recipe.name}-{self.stage}",
                                               self.staging / "logs", recipe.to_dict())

    def _close_trackers(self) -> None:
        for tracker in self.metrics.trackers:
            tracker.finish()
        self.metrics.trackers = []

    def metrics_lines(self) -> int:
        """Lines in metrics.jsonl now (recorded with each resume checkpoint)."""
        path = self.metrics.path
        return len(path.read_text().splitlines()) if path.is_file() else 0

    def truncate_metrics(self, lines: int) -> list[dict]:
        """Keep the first ``lines`` lines of metrics.jsonl (those written before the resumed checkpoint)."""
        path = self.metrics.path
        rows = [json.loads(x) for x in path.read_text().splitlines()[:lines]] if path.is_file() else []
        if not self.main:  # the others read the same first lines; only the main process rewrites the file
            return rows
        tmp = path.with_name(".metrics.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
        return rows

    @contextmanager
    def saving(self):
        """Wrap a save: a failure of the filesystem (disk full, permissions) becomes a one-line error, and the
        previous output, if any, stays as it was (nothing has been moved yet). Yields whether this process is the
        one that writes (saves that gather sharded weights run on every process and write on the main one)."""
        try:
            yield self.main
        except OSError as e:
            raise UserError(f"{self.final}: cannot save the run ({e.strerror or e}); the previous output, if any, "
                            "is untouched") from None

    def finish(self, manifest: Manifest, files: list[str | tuple[str, ...]] = ()) -> dict:
        """Write the manifest, with what the run itself knows, fsync everything, and move the staging directory
        into place; returns the manifest as written. ``files``: what the stage promises its run holds (paths in the
        run; a tuple: one of these), each checked to be there and not empty before anything is published, and
        listed in the manifest with its size."""
        written = {**manifest.to_json(self.stage), "started": self.started, "finished": now(),
                   "seconds": round(time.time() - self.t0, 2), "resumed": self.resumed,
                   "world_size": distributed.world_size(),
                   "distributed": "FSDP" if manifest.shards else distributed.kind(),  # our loop's own FSDP2 too
                   **({"shards": manifest.shards} if manifest.shards else {}),
                   "memory_by_process": memory_by_process(), "versions": versions(),
                   "allocator": allocator.current(), "command": self.command}
        error = None
        if self.main:
            try:
                written["files"] = self.promised(files)
                from rlhf.runs import provenance

                written["resolved"] = provenance.record(manifest.base, manifest.parents)
                self._publish(written)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other processes know
                error = e
        if distributed.any_failed(error is not None):  # every process returns once the run is in place
            raise error or UserError(f"{self.final}: the main process could not save the run")
        return written

    def promised(self, files: list[str | tuple[str, ...]]) -> dict[str, int]:
        """The size of each promised file in the staging directory (``finish``); a missing or empty one stops the
        run before it is marked complete, so a run directory never looks finished without its weights."""
        sizes, missing = {}, []
        for entry in files:
            names = (entry,) if isinstance(entry, str) else tuple(entry)
            found = [n for n in names if (self.staging / n).is_file() and (self.staging / n).stat().st_size > 0]
            if not found:
                missing.append(" or ".join(names))
            sizes.update({n: (self.staging / n).stat().st_size for n in found})
        if missing:
            raise TrainingStopped(
                f"{self.stage}: the run wrote no {', '.join(missing)}, which it must hold; it is not marked complete "
                f"and {self.final} is left as it was (this is a bug: please report it with the command)")
        return sizes

    def _publish(self, manifest: dict) -> None:
        self._close_trackers()
        with self.saving():
            from rlhf import report
            from rlhf.runs import lineage

            report.plot_training_curves(self.staging, self.stage)
            (self.staging / "README.md").write_text(lineage.model_card(manifest), encoding="utf-8")
            write_json(self.staging / "manifest.json", manifest)
            fsync_tree(self.staging)
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def abandon(self, quiet: bool = False) -> None:
        """After a failure: keep what ``--resume`` needs when a resume checkpoint exists, else remove it all (the
        final directory is never touched). ``quiet``: the error itself says how to resume (a preemption)."""
        self._close_trackers()
        if not self.main:
            return
        if self.work.is_dir() and any(self.work.iterdir()):
            if not quiet:
                print(f"{self.stage}: the run stopped; continue it with --resume", file=sys.stderr)
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:  # any failure, Ctrl-C included: nothing half-written is published
                self.abandon(quiet=getattr(exc, "says_how_to_resume", False))  # rlhf.runs.preempt.Preempted
        finally:
            self._release()


class RunLock:
    """An exclusive ``flock`` on a small file beside the run directory, holding the writer's pid. Non-blocking:
    ``acquire`` returns None when it holds the lock, else the pid of the process that does (0 when unknown).
    The file is removed on release; an acquirer checks that the file it locked is still the one at the path."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> int | None:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None  # the run directory cannot be written at all: Run reports that, in its own words
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = int(os.read(fd, 32).decode() or 0)
                except (OSError, ValueError):
                    holder = 0
                os.close(fd)
                return holder
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and removed it between our open and our lock: again
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return None
        return 0

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None
