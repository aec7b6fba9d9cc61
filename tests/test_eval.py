"""Evaluation: the statistics on hand-made inputs, and `rlhf eval` end to end on small runs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from rlhf import report
from stages.evaluate import icl_prompts


def test_win_rate_counts_ties_half():
    assert report.win_rate([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 4.0, 0.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert report.win_rate([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        report.win_rate([1.0], [1.0, 2.0])


def test_bootstrap_interval():
    assert report.bootstrap_ci([2.0] * 10) == (2.0, 2.0)
    lo, hi = report.bootstrap_ci([0.0, 1.0] * 50, resamples=4000, seed=1)
    # mean 0.5, standard error sqrt(0.25 / 100) = 0.05: the 95% interval is about 0.5 -+ 0.098
    assert lo == pytest.approx(0.402, abs=0.02) and hi == pytest.approx(0.598, abs=0.02)
    assert report.bootstrap_ci([0.0, 1.0] * 50, seed=1) == report.bootstrap_ci([0.0, 1.0] * 50, seed=1)
    assert report.bootstrap_ci([5.0]) == (5.0, 5.0)


def test_sequence_kl_sums_real_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    torch.testing.assert_close(report.sequence_kl(logp, ref, mask), torch.tensor([0.5 - 1.0 + 0.0, 0.5 + 0.0]))


def test_icl_prompts_prepend_demonstrations():
    demos = [{"prompt": [{"role": "user", "content": f"q{i}"}],
              "completion": [{"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    (out,) = icl_prompts([[{"role": "user", "content": "Q"}]], demos, shots=2, seed=0)
    assert len(out) == 5 and out[-1] == {"role": "user", "content": "Q"}
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant", "user"]


def test_eval_cli_report(parents, tmp_path):
    recipe, runs = parents
    run_cli("ppo", "--recipe", str(recipe), "--set", "ppo.max_steps=2", "--set", "ppo.batch_size=8",
            "--set", "ppo.mini_batch_size=8", "--set", "ppo.micro_batch_size=8", "--set", "ppo.max_new_tokens=16",
            "--set", "ppo.eval_every=1", "--set", "ppo.eval_samples=4", "--out", str(tmp_path / "ppo"))
    out = tmp_path / "eval"
    proc = run_cli("eval", "--recipe", str(recipe), "--policy", str(runs / "sft"), "--policy", str(tmp_path / "ppo"),
                   "--policy", "base", "--samples", "2", "--icl-shots", "2", "--set", "eval.limit=6",
                   "--set", "eval.max_new_tokens=16", "--out", str(out))
    assert "| policy |" in proc.stdout and "win rate" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary)
    assert names == ["base ICL 2-shot", str(runs / "sft"), str(tmp_path / "ppo"), "base"]
    first = summary[names[0]]
    assert first["win_rate_vs_first"] == 0.5 and first["kl"] is None
    for s in summary.values():
        assert s["responses"] == 12 and 0 <= s["gold"] <= 1 and s["reward_ci95"][0] <= s["reward"] <= s["reward_ci95"][1]
    assert summary[str(runs / "sft")]["kl"] is not None and summary[str(tmp_path / "ppo")]["kl"] is not None
    records = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 12 and {"prompt", "response", "reward", "gold", "kl", "length", "eos"} <= set(records[0])
    assert (out / "summary.md").read_text().count("\n|") >= 5
    for png in ("rewards.png", "ppo_curves_2.png", "proxy_vs_gold_2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "eval" and m["parents"]["rm"] == str(runs / "rm")


def test_eval_refuses_a_reward_model_as_policy(parents, tmp_path):
    recipe, runs = parents
    proc = run_cli("eval", "--recipe", str(recipe), "--policy", str(runs / "rm"), "--out", str(tmp_path / "e"),
                   check=False)
    assert proc.returncode == 2 and "not a policy" in proc.stderr and not (tmp_path / "e").exists()
