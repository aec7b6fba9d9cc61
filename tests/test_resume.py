"""Stopped runs resume exactly: each stage is first preempted (SIGTERM or SIGINT at a random moment: it finishes
the step, writes a resume checkpoint whatever save_every says, and exits 128 + the signal with one line on how to
resume), then killed with SIGKILL at a random moment after a newer checkpoint, resumed with --resume each time, and
must end with the same weights, bit for bit, as an uninterrupted run."""

from __future__ import annotations

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FLAT_WHEN_EVEN, ROOT, ran, refused, run_cli

ARGS = {
    "sft": ["sft.max_steps=8", "sft.save_every=2", "sft.eval_fraction=0", "sft.logging_every=1"],
    "rm": ["rm.max_steps=8", "rm.save_every=2", "rm.stats_samples=64", "rm.logging_every=1",
           "data.eval_preference=null", "rm.eval_fraction=0"],
    "ppo": ["ppo.max_steps=6", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
            "ppo.max_new_tokens=12", "ppo.save_every=2", "ppo.eval_every=0",
            "ppo.mixed_precision=no"],  # fp32 pinned here; the bf16 case is ppo-grpo
    "dpo": ["dpo.max_steps=8", "dpo.save_every=2", "dpo.batch_size=8", "dpo.logging_every=1",
            "data.eval_preference=null", "dpo.eval_fraction=0"],
    # critic-free: 2 prompts x 4 responses a step, the KL as a loss term; CISPO's objective against a scorer whose
    # flat groups are refilled (DAPO's dynamic sampling; the scorer is added by the test); in bf16 autocast
    "ppo-grpo": ["ppo.max_steps=6", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                 "ppo.max_new_tokens=12", "ppo.save_every=1", "ppo.eval_every=0", "ppo.advantage=grpo",
                 "ppo.samples_per_prompt=4", "ppo.policy_loss=cispo",
                 "ppo.missing_eos_penalty=null", "ppo.drop_flat_groups=true", "ppo.mixed_precision=bf16"],
    # the shared critic (a value head on the policy's hidden state, values from the sampling pass), in bf16
    "ppo-shared": ["ppo.max_steps=6", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                   "ppo.max_new_tokens=12", "ppo.save_every=2", "ppo.eval_every=0", "ppo.critic=shared",
                   "ppo.mixed_precision=bf16"],
    # multi-turn episodes with the calculator (the tool_policy fixture's recipe: its policy calls add), in fp32
    "ppo-agent": ["ppo.max_steps=4", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
                  "ppo.save_every=1"],
}
FILES = {"sft": ["adapter_model.safetensors"], "rm": ["adapter_model.safetensors"],
         "ppo": ["adapter_model.safetensors", "value/adapter_model.safetensors", "value/value_head.safetensors"],
         "ppo-grpo": ["adapter_model.safetensors"],
         "ppo-shared": ["adapter_model.safetensors", "value/value_head.safetensors"],
         "dpo": ["adapter_model.safetensors"],
         "ppo-agent": ["model.safetensors", "value/model.safetensors"]}  # the fully tuned parent's copies


def _argv(stage, recipe, out, extra=(), policy=None):
    sets = [x for kv in ARGS[stage] for x in ("--set", kv)] + (["--policy", str(policy)] if policy else [])
    if stage == "ppo-grpo":  # the scorer that makes groups flat, written next to the recipe
        (Path(recipe).parent / "flat.py").write_text(FLAT_WHEN_EVEN)
        sets += ["--set", f"ppo.reward={{{Path(recipe).parent / 'flat.py'}:flat_when_even: 1.0}}"]
    return [sys.executable, "-m", "rlhf.cli", stage.split("-")[0], "--recipe", str(recipe), "--out", str(out), *sets, *extra]


def _checkpoints(work: Path) -> list[str]:
    if not work.is_dir():
        return []
    return sorted(p.name for p in work.iterdir() if p.name.startswith(("checkpoint-", "step_"))
                  and ((p / "trainer_state.json").is_file() or (p / "state.json").is_file()))


def _kill_after_a_checkpoint(argv, work: Path, rng: random.Random, seen: list[str]) -> bool:
    """Start the run, wait for a checkpoint newer than ``seen``, SIGKILL it a random moment later. Returns whether
    the process was killed (rather than finishing first)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _checkpoints(work) == seen:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _started(argv, staging: Path, log: Path) -> subprocess.Popen:
    """Start the run and return once it has logged its first step (or ended)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    metrics, deadline = staging / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.05)
    return proc


def _preempt(argv, staging: Path, work: Path, rng: random.Random, sig: int, log: Path) -> bool:
    """Send ``sig`` a random moment into training; check the graceful stop (exit 128 + sig, one error line with
    the command to resume, a resume checkpoint at the step it names). Returns whether it stopped (rather than
    finishing)."""
    proc = _started(argv, staging, log)
    time.sleep(rng.uniform(0.0, 0.5))
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=300)
    err = log.read_text()
    if proc.returncode == 0:
        return False
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert proc.returncode == 128 + sig and "Traceback" not in err, err
    assert len(lines) == 1 and "--resume`" in lines[0] and signal.Signals(sig).name in lines[0], err
    step = int(re.search(r"after step (\d+) of", lines[0]).group(1))
    assert any(int(re.split(r"[-_]", c)[-1]) == step for c in _checkpoints(work)), (step, _checkpoints(work))
    return True


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "ppo-grpo", "ppo-shared", "ppo-agent", "dpo"])
def test_stopped_run_resumes_bit_identically(stage, request, tmp_path):
    recipe, policy = request.getfixturevalue("tool_policy") if stage == "ppo-agent" else (
        request.getfixturevalue("parents")[0], None)
    rng = random.Random(f"{stage}-kill")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    argv = functools.partial(_argv, stage, recipe, policy=policy)
    ran(*argv(straight)[3:])  # the uninterrupted run in this process: the same weights either way
    if stage.startswith("ppo") and not json.loads((straight / "manifest.json").read_text())["repeatable"]:
        pytest.skip(f"{stage}: its passes do not give the same bits twice on this CPU in the precision it pins "
                    "(manifest 'repeatable' false; mixed_precision auto runs fp32 there): nothing to resume exactly")

    work = tmp_path / ".resumed.work"
    sig = signal.SIGINT if stage in ("rm", "ppo-grpo") else signal.SIGTERM
    assert _preempt(argv(resumed), tmp_path / ".resumed.partial", work, rng, sig, tmp_path / "log"), \
        "the run finished before the signal"
    # resumed, then killed after a newer checkpoint when there is one to come (the signal may have come late)
    _kill_after_a_checkpoint(argv(resumed, ("--resume",)), work, rng, _checkpoints(work))
    if resumed.exists():  # the kill came after the run had published its output, or none came: complete
        assert json.loads((resumed / "manifest.json").read_text())["status"] == "complete"
    else:
        run_cli(*argv(resumed, ("--resume",))[3:])

    for name in FILES[stage]:
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        different = [k for k in a if not (a[k] == b[k]).all()]
        assert not different, f"{name}: {len(different)} tensors differ after resume, e.g. {different[0]}"
    steps = [json.loads(x).get("step") for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    straight_steps = [json.loads(x).get("step") for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert steps == straight_steps, "metrics.jsonl holds each step once, as an uninterrupted run's does"
    assert json.loads((resumed / "manifest.json").read_text())["resumed"] is True
    assert not work.exists() and not (tmp_path / ".resumed.partial").exists()
    if stage == "ppo-agent":  # multi-turn episodes were played (and resumed)
        rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
        assert max(r["agent/turns"] for r in rows) > 1 and rows[0]["agent/calls"] > 0
    if stage == "ppo-grpo":
        assert not (resumed / "value").exists()
        assert sum(json.loads(x)["objective/resampled"] for x in (straight / "metrics.jsonl").read_text()
                   .splitlines()) > 0, "no flat group was refilled: dynamic sampling was not resumed"


def test_resume_refusals(tiny_recipe, tmp_path):
    out = tmp_path / "runs" / "tiny" / "sft"
    refused("sft", "--recipe", str(tiny_recipe), "--resume", expect="nothing to resume")
    # leftovers of an interrupted run are neither silently continued nor silently deleted
    (out.parent / ".sft.partial").mkdir(parents=True)
    refused("sft", "--recipe", str(tiny_recipe), "--set", "sft.max_steps=1", expect="--resume")
    assert (out.parent / ".sft.partial").exists()
    run_cli("sft", "--recipe", str(tiny_recipe), "--set", "sft.max_steps=1", "--overwrite")
    refused("sft", "--recipe", str(tiny_recipe), "--resume", expect="already holds a finished run")


def test_a_second_signal_stops_at_once(tiny_recipe, tmp_path):
    """Two SIGTERMs: the second ends the process without waiting for the step (exit 143), and the run stays
    resumable or restartable (nothing published)."""
    out = tmp_path / "sft"
    argv = [sys.executable, "-m", "rlhf.cli", "sft", "--recipe", str(tiny_recipe), "--out", str(out),
            "--set", "sft.max_steps=200", "--set", "sft.logging_every=1", "--set", "sft.eval_fraction=0"]
    proc = _started(argv, tmp_path / ".sft.partial", tmp_path / "log")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = (tmp_path / "log").read_text()
    assert proc.returncode == 143 and "SIGTERM again: stopping now" in err, err
    assert not out.exists()
    # the lock died with the process (its file may remain): the next command is not refused for it
    run_cli(*argv[3:], "--set", "sft.max_steps=1", "--overwrite")
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_one_writer_per_run_directory(tiny_recipe, tmp_path):
    """A second command on the same --out, while the first is alive, names the first one's pid; the first runs
    on to a complete run."""
    out = tmp_path / "sft"
    argv = [sys.executable, "-m", "rlhf.cli", "sft", "--recipe", str(tiny_recipe), "--out", str(out),
            "--set", "sft.max_steps=30", "--set", "sft.logging_every=1", "--set", "sft.eval_fraction=0"]
    first = _started(argv, tmp_path / ".sft.partial", tmp_path / "log")
    second = run_cli(*argv[3:], check=False)
    assert second.returncode == 2 and f"another process (pid {first.pid}) is writing this run" in second.stderr
    assert first.wait(timeout=300) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    assert not (tmp_path / ".sft.lock").exists()
