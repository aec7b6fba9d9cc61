"""Graceful preemption: SIGTERM (SLURM, Kubernetes, spot instances) or SIGINT (Ctrl-C) during training.

The first signal only sets a flag; the training loop checks it at the end of every step (``requested()``, agreed
by all processes, so they stop at the same step), writes a resume checkpoint whatever ``save_every`` says, and
raises ``Preempted``: one line on how to resume, exit status 128 + the signal (143 for SIGTERM, 130 for SIGINT).
A second signal ends the process at once (the newest resume checkpoint is what ``--resume`` continues from, as
after a kill). Handlers are installed only while a run directory is open (``rlhf.runs.rundir.Run``), and only in the
main thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from rlhf.scale import distributed
from rlhf.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: int | None = None
_stage = "rlhf"


class Preempted(UserError):
    """Training stopped at a step boundary on a signal, with a resume checkpoint written."""

    says_how_to_resume = True  # the run directory adds no line of its own (rlhf.runs.rundir.Run.abandon)

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _handler(signum, frame) -> None:
    global _received
    if _received is not None:  # the second signal: no more waiting
        print(f"{_stage}: {signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    _received = signum
    if os.environ.get("RANK", "0") == "0":  # every process got it; the first one says so
        print(f"{_stage}: {signal.Signals(signum).name}: finishing this step, then saving a resume checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


class handlers:
    """Context manager: the preemption handlers while a stage's run is open (the previous ones after)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.previous: dict = {}

    def __enter__(self):
        global _received, _stage
        _received, _stage = None, self.stage
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, _handler)
        return self

    def __exit__(self, *exc) -> None:
        global _received
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        _received = None


def requested() -> bool:
    """Whether any process has received a stop signal. Every process must call this at the same point (one
    small all-reduce when there are several)."""
    return distributed.any_failed(_received is not None)


def stop(stage: str, step: int, total: int, command: str) -> Preempted:
    """The exception that ends a preempted stage after ``step`` of ``total`` steps, its checkpoint written: the
    message says how to continue (``command``: the run's command line, ``Run.command``)."""
    signum = _received if _received is not None else signal.SIGTERM
    if "--resume" not in command.split():
        command += " --resume"
    return Preempted(f"{stage}: stopped by {signal.Signals(signum).name} after step {step} of {total}; a resume "
                     f"checkpoint is saved: continue with `{command}`", signum)
