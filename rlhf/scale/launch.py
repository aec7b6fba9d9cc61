"""Launching: ``rlhf <stage> --num-processes N`` (or ``--accelerate-config FILE``) re-runs the same command under
``accelerate launch`` and reports how it ended, once, for every process.

The processes find what the launcher asked of them through ``rlhf.scale.distributed`` (ranks, sharding, the folder where
a process that stops on a user error leaves its line: ``distributed.report_error``); this module is the launching
command's side: the launcher's command line, a check of the config file before anything starts, and the reading
of how the processes ended (a user error, a process that died, or a bug).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from rlhf.scale.distributed import COMMAND, CONFIG, ERRORS, LAUNCHED, TERMINAL
from rlhf.errors import UserError


def launch_command(argv: list[str], num_processes: int | None, config_file: str | None) -> list[str]:
    """The ``accelerate launch`` command (an argument list, never a shell string) that runs ``rlhf <argv>``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        check_config(config_file)
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


def check_config(config_file: str) -> None:
    """An ``--accelerate-config`` file accelerate can launch with, or a one-line error naming it (and the line,
    for YAML that does not parse): a mapping of accelerate's settings (an empty file, a list or a number is not),
    with a ``distributed_type`` accelerate knows, that accelerate's own reader takes."""
    import yaml
    from accelerate.utils import DistributedType

    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"--accelerate-config: {config_file}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{config_file}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                        f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file}: cannot read it ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{config_file}: an accelerate config is a mapping of settings (distributed_type, "
                        f"num_processes, ...), not {'an empty file' if data is None else type(data).__name__}; "
                        "see recipes/accelerate/")
    known = [t.value for t in DistributedType]
    if "distributed_type" in data and data["distributed_type"] not in known:
        raise UserError(f"{config_file}: distributed_type {data['distributed_type']!r} is not one accelerate knows "
                        f"({', '.join(known)})")
    import dataclasses
    import typing

    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    for field in dataclasses.fields(ClusterConfig):  # accelerate's launcher trusts these types, and fails deep in
        kinds = [k for k in (typing.get_args(field.type) or (field.type,)) if k in (int, bool, str, dict, list)]
        value = data.get(field.name)
        if value is None or not kinds:
            continue
        if not any(isinstance(value, k) and not (k is int and isinstance(value, bool)) for k in kinds) or (
                field.name in ("num_processes", "num_machines") and isinstance(value, int) and value < 1) or (
                field.name == "machine_rank" and isinstance(value, int) and value < 0):
            want = {int: "a whole number", bool: "true or false", str: "text", dict: "a mapping", list: "a list"}
            raise UserError(f"{config_file}: {field.name} must be {' or '.join(want[k] for k in kinds)}"
                            f"{' of at least 1' if field.name in ('num_processes', 'num_machines') else ''}, got "
                            f"{value!r}")
    try:
        load_config_from_file(str(path))
    except Exception as e:  # noqa: BLE001 - whatever accelerate's reader refuses, in one line naming the file
        text = str(e).strip()
        raise UserError(f"{config_file}: accelerate cannot read it ({type(e).__name__}: "
                        f"{text.splitlines()[0][:200] if text else ''})") from None


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


_HELD = re.compile(rb"^(\[rank\d+\]:|[IWEF]\d{4} \d\d:\d\d:\d\d)")
"""lines of a launched run that are tracebacks and the launcher's log (``launch`` holds them back)"""


def _root_cause(text: str) -> tuple[int, int] | None:
    """(rank, exit code) of the first process that failed, from torch's launcher report ("Root Cause (first
    observed failure)"); a negative exit code is the signal that killed it. None when there is no such report."""
    found = re.search(r"Root Cause \(first observed failure\):(.*?)(?:={5,}|$)", text, re.S)
    if not found:
        return None
    rank_, code = (re.search(pattern, found.group(1)) for pattern in (r"rank\s*:\s*(\d+)", r"exitcode\s*:\s*(-?\d+)"))
    return (int(rank_.group(1)), int(code.group(1))) if rank_ and code else None


def _ended(errors: Path) -> tuple[list[int], dict[int, int]]:
    """The processes that started and never ended as Python ends (killed mid-run), and the exit status of those
    that did (``distributed.mark_started``, ``mark_ended``)."""
    started = {int(f.name[8:]) for f in errors.glob("started-*")}
    ended = {}
    for f in errors.glob("exited-*"):
        try:
            ended[int(f.name[7:])] = int(f.read_text() or 0)
        except ValueError:
            ended[int(f.name[7:])] = 1
    return sorted(started - set(ended)), ended


def _death(errors: Path, held: bytes, code: int, command: str) -> tuple[str, int] | None:
    """The line and exit code for a launched run one of whose processes died mid-run (killed by a signal, or gone
    without Python seeing it end), with what there is to resume from; None when none did. A process that ended
    as Python ends and crashed after, tearing down, did not die mid-run (``launch`` says so apart)."""
    import signal

    root = _root_cause(held.decode(errors="replace"))
    gone, _ = _ended(errors)
    if not (code and gone):  # every process ended as Python ends it: no death mid-run
        return None
    who = root[0] if root is not None and root[0] in gone else gone[0]
    signum = -root[1] if root is not None and root[0] == who and root[1] < 0 else None
    stage, final = (errors / "run").read_text().split("\n", 1) if (errors / "run").is_file() else (None, None)
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else None
    how = (f"was killed by {name}" + (" (the kernel's out-of-memory killer sends it: watch the processes' memory)"
                                      if signum == signal.SIGKILL else "")) if name else "ended without a word"
    line = f"{stage or 'rlhf'}: process {who} of the run {how}, and the others stopped with it"
    resume = command if "--resume" in command.split() else command + " --resume"
    if final is not None:
        from rlhf.runs import lineage

        status = lineage.status(Path(final))
        if status == "resumable":
            line += f"; its newest resume checkpoint is kept: continue with `{resume}`"
        elif status == "interrupted":
            line += ("; it had saved no resume checkpoint yet (a stage's save_every sets how often), so it starts "
                     f"again with `{command.replace(' --resume', '')} --overwrite`")
    else:
        line += "; nothing was written: run it again"
    return line, 128 + signum if signum else 1


def launch(argv: list[str], num_processes: int | None, config_file: str | None) -> int:
    """Run ``rlhf <argv>`` under ``accelerate launch``; returns its exit code. The processes' stderr passes
    through as it comes, except tracebacks and the launcher's own log, which are held back: when one of the
    processes stops on a user error (``report_error``) its line is printed once and its exit code returned (2,
    or 128 + a signal); when one died (killed by a signal, ``_death``: the others then fail in their collectives)
    one line says which, by what, and how to go on from the resume checkpoint the run kept, and the exit code is
    128 + the signal; otherwise (a bug) what was held back is shown. SIGINT reaches the processes from the
    terminal; a SIGTERM sent to this command is passed on to the launcher, which passes it on to them (both stop
    gracefully: ``rlhf.runs.preempt``)."""
    import shlex
    import shutil
    import signal
    import tempfile

    errors = Path(tempfile.mkdtemp(prefix="rlhf-errors-"))
    command = shlex.join(["rlhf", *argv])
    env = dict(os.environ, **{LAUNCHED: "1", ERRORS: str(errors), COMMAND: command})
    if config_file:
        env[CONFIG] = config_file
    if sys.stderr.isatty():
        env[TERMINAL] = "1"
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = launch_command(strip_launch_options(argv), num_processes, config_file)
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    handlers = (signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM)))
    held, pending, traceback = [], b"", False
    try:
        while chunk := os.read(proc.stderr.fileno(), 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                traceback = traceback or line.startswith(b"Traceback (most recent call last):")
                if traceback or _HELD.match(line):
                    held.append(line)
                else:
                    sys.stderr.buffer.write(line + b"\n")
            if b"\r" in pending and not traceback:  # a progress bar redrawn in place: shown as it comes
                sys.stderr.buffer.write(pending)
                pending = b""
            sys.stderr.buffer.flush()
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    held.append(pending)
    death = _death(errors, b"\n".join(held), code, command)
    ended = _ended(errors)[1]
    reported = [f.read_text().split("\n", 1) for f in sorted((f for f in errors.iterdir() if f.name.isdigit()),
                                                              key=lambda f: int(f.name))]
    shutil.rmtree(errors, ignore_errors=True)
    if death is not None:
        print(f"error: {death[0]}", file=sys.stderr)
        return death[1]
    if code and reported:
        for line in dict.fromkeys(message for _, message in reported):  # each different line once
            print(f"error: {line}", file=sys.stderr)
        return int(reported[0][0])
    if code and ended and all(status == 0 for status in ended.values()):
        # every process finished its work and said so; one crashed as the interpreter tore down (a library's
        # thread): the command did what it was asked, and says what happened
        root = _root_cause(b"\n".join(held).decode(errors="replace"))
        print("warning: a process crashed while exiting, after the command had finished on every process"
              + (f" (process {root[0]}, exit code {root[1]})" if root else "") + "; its output is complete",
              file=sys.stderr)
        return 0
    sys.stderr.buffer.write(b"\n".join(held).rstrip(b"\n") + (b"\n" if any(held) else b""))
    sys.stderr.buffer.flush()
    return code
