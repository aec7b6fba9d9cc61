"""What the pipeline hands to the rest of a user's stack: merged exports, tracker logs, curves, model cards,
lineage (`rlhf info`), the run list (`rlhf runs`) and progress bars."""

from __future__ import annotations

import json

import torch

from conftest import refused, run_cli
from rlhf.engine import rollout
from rlhf.feedback import rewards
from rlhf.models import modeling
from rlhf.text import encoding, formats

PNG = b"\x89PNG\r\n\x1a\n"


def _prompts(n=16):
    from conftest import ROOT

    return formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:n]


def test_merged_policy_export_loads_without_peft_and_generates_the_same(ppo_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = ppo_run
    out = tmp_path / "export"
    proc = run_cli("export", str(run), "--merge", "--out", str(out))
    assert str(out) in proc.stdout
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    assert (out / "generation_config.json").is_file()
    info = json.loads((out / "export.json").read_text())
    assert info["merged"] and info["source"] == str(run) and info["max_logit_difference_after_merge"] < 1e-3

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(merged, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter_model, adapter_tokenizer = modeling.load_policy(run)
    prompts = _prompts()
    ours = rollout.generate(merged, tokenizer, prompts, max_new_tokens=24)
    theirs = rollout.generate(adapter_model, adapter_tokenizer, prompts, max_new_tokens=24)
    assert ours.texts == theirs.texts


def test_reward_model_export_scores_the_same(parents, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, runs = parents
    out = tmp_path / "rm-export"
    run_cli("export", str(runs / "rm"), "--merge", "--out", str(out))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter_model, adapter_tokenizer = modeling.load_reward(runs / "rm")
    convs = encoding.with_responses(_prompts(8), ["The answer is 4.", "Let me think. It is 5."] * 4)
    torch.testing.assert_close(rewards.score_conversations(merged, tokenizer, convs),
                               rewards.score_conversations(adapter_model, adapter_tokenizer, convs),
                               atol=1e-4, rtol=1e-4)


def test_export_refuses_to_overwrite_or_to_export_a_non_run(parents, tmp_path):
    _, runs = parents
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused("export", str(runs / "sft"), "--merge", "--out", str(out), expect="--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    refused("export", str(tmp_path), "--out", str(tmp_path / "x"), expect="not a run directory")


def test_tensorboard_events_hold_the_metric_names(parents, ppo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, runs = parents
    expected = {"sft": {"train/loss", "eval/loss"}, "rm": {"train/loss", "eval/accuracy"},
                "ppo": {"objective/score", "objective/kl", "ppo/kl_coef", "eval/gold"}}
    for stage, names in expected.items():
        events = list((runs / stage / "logs").rglob("events.out.tfevents.*"))
        assert events, stage
        tags = set()
        for path in events:
            acc = EventAccumulator(str(path))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert names <= tags, (stage, sorted(tags))


def test_each_stage_writes_curves_and_a_model_card(parents, ppo_run):
    _, runs = parents
    sft_manifest = json.loads((runs / "sft" / "manifest.json").read_text())
    for stage in ("sft", "rm", "ppo"):
        assert (runs / stage / "curves.png").read_bytes()[:8] == PNG, stage
        card = (runs / stage / "README.md").read_text()
        manifest = json.loads((runs / stage / "manifest.json").read_text())
        assert f"base model: `{manifest['base']}`" in card and "method: `lora`" in card
        assert f"rlhf {stage} --recipe" in card and "## Metrics" in card
    sft_card = (runs / "sft" / "README.md").read_text()
    assert sft_manifest["data"]["sft"]["files"][0]["sha256"] in sft_card
    assert "rm: `" in (runs / "ppo" / "README.md").read_text()  # PPO's card names its parents


def test_info_shows_the_lineage_and_runs_lists_status(parents, ppo_run, tmp_path):
    _, runs = parents
    info = run_cli("info", str(runs / "ppo")).stdout
    lines = info.splitlines()
    assert lines[0].startswith("base ") and "tiny-base" in lines[0]
    order = [i for i, line in enumerate(lines) for stage in ("sft", "rm", "ppo") if line.strip().endswith(f"[{stage}]")]
    assert len(order) == 3 and order == sorted(order)
    assert "held-out pair accuracy" in info and "method lora" in info

    # a resumable and an interrupted leftover beside the finished runs
    root = runs.parent
    (root / "other" / ".ppo.partial").mkdir(parents=True)
    (root / "other" / ".ppo.work" / "state_000002").mkdir(parents=True)
    (root / "other" / ".sft.partial").mkdir(parents=True)
    try:
        listing = run_cli("runs", str(root)).stdout
    finally:
        import shutil

        shutil.rmtree(root / "other")
    status = {line.split()[0]: line for line in listing.splitlines()}
    assert "complete" in status[str(runs / "sft")] and "held-out loss" in status[str(runs / "sft")]
    assert "resumable" in status[str(root / "other" / "ppo")]
    assert "interrupted" in status[str(root / "other" / "sft")]


def test_info_and_runs_survive_damaged_manifests(tmp_path):
    """Manifests that are a list, binary, or hold text where numbers go: `rlhf runs` lists the others and marks the
    unreadable ones damaged, `rlhf info` shows what it can or says in one line that there is no run (each was a
    traceback)."""
    from conftest import ran

    cases = {"list": b"[1, 2]", "binary": bytes(range(128, 256)),
             "text-numbers": json.dumps({"stage": "sft", "status": "complete", "metrics": {"eval_loss": "abc"},
                                         "adapter": {"method": "lora", "parameters": {"trainable": "many"}},
                                         "finished": 5, "seconds": "x", "parents": "runs/sft", "base": 3}).encode(),
             "odd-ppo": json.dumps({"stage": "ppo", "status": "complete", "parents": {"sft": ["list"], "rm": 5},
                                    "metrics": {"objective/score": 1.5, "eval/gold": "x"},
                                    "bf16_speedup": "fast", "repeatable": "yes"}).encode(),
             "good": json.dumps({"stage": "rm", "status": "complete", "metrics": {"eval_accuracy": 0.9},
                                 "data": {"policies": [1, 2]}}).encode()}
    for name, content in cases.items():
        (tmp_path / "r" / name).mkdir(parents=True)
        (tmp_path / "r" / name / "manifest.json").write_bytes(content)
    status = {line.split()[0]: line for line in ran("runs", str(tmp_path)).splitlines()}
    assert len(status) == 5 and "damaged" in status[str(tmp_path / "r" / "list")]
    assert "damaged" in status[str(tmp_path / "r" / "binary")]
    assert "held-out pair accuracy 0.9" in status[str(tmp_path / "r" / "good")]
    for name in ("list", "binary"):
        refused("info", str(tmp_path / "r" / name), expect="not a run directory (no readable manifest.json)")
    assert "method lora; finished 5" in ran("info", str(tmp_path / "r" / "text-numbers"))
    assert "reward-model score 1.5; fp32, repeatability not checked" in ran("info",
                                                                                    str(tmp_path / "r" / "odd-ppo"))


def test_progress_bars_on_a_terminal_and_lines_in_logs(parents, ppo_run):
    _, proc = ppo_run
    assert "ppo: 100%" in proc.stderr and "ppo: step 1/3" not in proc.stderr  # logging.progress=on: a bar
    recipe, _ = parents
    sft = json.loads((recipe.parent / "runs" / "tiny" / "sft" / "manifest.json").read_text())
    assert sft["recipe"]["logging"]["progress"] == "auto"
    log = (recipe.parent / "sft.stderr").read_text()  # piped output (a log) with progress auto: lines, not bars
    steps = sorted({line.split()[2] for line in log.splitlines() if line.startswith("sft: step ")})
    assert steps == ["10/30", "20/30", "30/30"], log  # a line every logging_every=10 steps
    assert "\r" not in log and "it/s]" not in log and "%|" not in log, log  # and no bar


def test_a_manifest_never_holds_numbers_json_cannot_read(tmp_path):
    """NaN and infinity (a kept speed-up, a metric) are written as null: Python wrote `Infinity`, which most JSON
    readers refuse."""
    from rlhf.runs.rundir import write_json

    write_json(tmp_path / "m.json", {"bf16_speedup": float("inf"), "metrics": {"loss": float("nan"), "ok": 1.5},
                                     "list": [float("-inf"), 2]})
    text = (tmp_path / "m.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"bf16_speedup": None, "metrics": {"loss": None, "ok": 1.5}, "list": [None, 2]}


def test_sample_refuses_a_limit_below_one():
    """`--limit -15` kept prompts from the front without a word (a slice from the end)."""
    from click.testing import CliRunner

    from rlhf.cli import cli

    result = CliRunner().invoke(cli, ["sample", "runs/x", "--prompts", "p.jsonl", "--limit", "-15"])
    assert result.exit_code == 2 and "Invalid value for '--limit'" in result.output, result.output
