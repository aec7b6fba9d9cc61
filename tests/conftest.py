"""Shared fixtures: the repository root, the real CLI in a subprocess, and small recipes on the tiny world."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
# the suite's own cache of machine measurements (mixed_precision: auto's bf16 speed, rlhf/ppo/precision.py): measured
# once by the first PPO run, so every test (and every process it starts) decides the same way, and the user's
# cache is left alone
os.environ.setdefault("RLHF_CACHE_DIR", tempfile.mkdtemp(prefix="rlhf-test-cache-"))


def run_cli(*args: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``rlhf ARGS`` exactly as a user would (new process, real entry point)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran(*args: str) -> str:
    """``rlhf ARGS`` in this process through click (no new interpreter), which must succeed; returns its stdout.
    For tests about what a command leaves behind rather than about the process itself."""
    from click.testing import CliRunner

    from rlhf.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"rlhf {' '.join(args)} exited {result.exit_code}\n{result.output}"
    return result.stdout


def refused(*args: str, expect: str = "", lines_before: bool = False) -> str:
    """``rlhf ARGS`` refused as a user sees it: exit code 2, no traceback, one line ``error: ...`` holding
    ``expect`` (after any progress the command printed first, with ``lines_before``); returns that line. Runs in this process through click (the same command objects, error handler and
    exit code, without a new interpreter's ~8 s of imports); tests/test_bad_inputs.py keeps a few refusals as real
    processes for the path from the entry point to the exit status."""
    import traceback

    from click.testing import CliRunner

    from rlhf.cli import cli

    result = CliRunner().invoke(cli, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"rlhf {' '.join(args)} raised:\n" + "".join(
            traceback.format_exception(result.exception)))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, f"rlhf {' '.join(args)} exited {result.exit_code}\n{result.output}"
    assert lines and lines[-1].startswith("error: ") and expect in lines[-1], result.stderr
    assert lines_before or len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


FLAT_WHEN_EVEN = """import re

def flat_when_even(prompts, responses):
    # a prompt whose last number is even (or that has none) gives a flat group; the others score each
    # response's length (rarely all equal)
    return [0.0 if int((re.findall(r"\\d+", p[-1]["content"]) or ["0"])[-1]) % 2 == 0 else len(r) / 100
            for p, r in zip(prompts, responses)]
"""
"""A scorer file for DAPO's dynamic sampling: which groups are flat depends on the prompts alone, whatever
process samples them (tests write it next to their run and name it in ``ppo.reward``)."""


def write_recipe(path: Path, template: Path = TINY, **sections) -> Path:
    """The tiny recipe (or ``template``) with some sections replaced or extended (``sft={"max_steps": 3}``)."""
    recipe = yaml.safe_load(template.read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    for key in ("sft", "preference", "prompts", "eval_prompts"):
        if isinstance(recipe["data"].get(key), str) and not Path(recipe["data"][key]).is_absolute():
            recipe["data"][key] = str(ROOT / recipe["data"][key])
    recipe["model"]["base"] = str(ROOT / recipe["model"]["base"]) if not Path(
        recipe["model"]["base"]).is_absolute() else recipe["model"]["base"]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe(tmp_path):
    """A copy of the tiny recipe with absolute paths and its run_dir under tmp_path."""
    return write_recipe(tmp_path / "tiny.yaml", run_dir=str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def parents(tmp_path_factory):
    """Briefly trained SFT and RM runs on the tiny base (shared by the PPO and eval tests)."""
    d = tmp_path_factory.mktemp("parents")
    recipe = write_recipe(d / "tiny.yaml", run_dir=str(d / "runs"), logging={"report_to": ["tensorboard"]})
    sft = run_cli("sft", "--recipe", str(recipe), "--set", "sft.max_steps=30")
    (d / "sft.stderr").write_text(sft.stderr)  # what a log (piped output) got: test_ecosystem reads it
    run_cli("rm", "--recipe", str(recipe), "--set", "rm.max_steps=30", "--set", "rm.stats_samples=200")
    return recipe, d / "runs" / "tiny"


@pytest.fixture(scope="session")
def tool_policy(tmp_path_factory):
    """A policy that calls the calculator: the tiny base fully fine-tuned for 60 steps on the demonstrations of
    data/tiny/sft_tools.jsonl that call it. At temperature 1 about a third of its episodes call ``add`` (well formed
    or not), so PPO with ``tiny:calculator`` plays multi-turn episodes. Returns the agent recipe (PPO settings for
    short multi-turn steps) and the SFT run."""
    d = tmp_path_factory.mktemp("tool_policy")
    calls = d / "calls.jsonl"
    with open(ROOT / "data" / "tiny" / "sft_tools.jsonl") as f:
        calls.write_text("".join(line for line in f if '"tool_calls"' in line))
    recipe = write_recipe(d / "agent.yaml", template=ROOT / "recipes" / "tiny-agent.yaml", run_dir=str(d / "runs"),
                          data={"sft": str(calls)},
                          sft={"max_steps": 60, "batch_size": 16, "lr": 1e-3, "max_length": 200, "eval_fraction": 0},
                          ppo={"max_new_tokens": 80, "max_turns": 2, "max_episode_tokens": 200, "eval_every": 0,
                               "mixed_precision": "no"})
    run_cli("sft", "--recipe", str(recipe), "--set", "adapter.method=full", "--out", str(d / "sft"))
    return recipe, d / "sft"


@pytest.fixture(scope="session")
def ppo_run(parents):
    """A short PPO run on the parents (tensorboard on, progress bars forced), and its CLI result."""
    recipe, runs = parents
    proc = run_cli("ppo", "--recipe", str(recipe), "--set", "ppo.max_steps=3", "--set", "ppo.batch_size=8",
                   "--set", "ppo.mini_batch_size=8", "--set", "ppo.micro_batch_size=8",
                   "--set", "ppo.max_new_tokens=16", "--set", "ppo.eval_every=1", "--set", "ppo.eval_samples=4",
                   "--set", "logging.progress=on")
    return runs / "ppo", proc
