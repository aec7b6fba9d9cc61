"""PPO with an environment, through the real CLI: an environment file written as for TRL's GRPO
``environment_factory`` runs unchanged (reset with the row, tools from its methods, get_reward a reward term of its
own), every step says what the episodes did, the manifest records the environment and its limits, and in fp32
the first ratio is 1 (the engine's log-probs are the update's)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, ran, refused
from rlhf.tiny.environments import schemas

TRL_ENV = '''
class AddEnv:
    """Written as for TRL: one instance per episode, reset with the dataset row, tools with hints and docstrings."""

    def reset(self, **kwargs):
        self.prompt = kwargs["prompt"][-1]["content"]
        self.calls = 0
        return " (a calculator is at hand)"

    def add(self, a: int, b: int) -> int:
        """Add two numbers.

        Args:
            a: The first number.
            b: The second number.
        """
        self.calls += 1
        return a + b

    def get_reward(self) -> float:
        return 1.0 if self.prompt else 0.0  # reset saw the row's prompt; read after the episode
'''


def test_an_environment_written_for_trl_runs_through_ppo(parents, tmp_path):
    recipe, _ = parents
    (tmp_path / "add_env.py").write_text(TRL_ENV)
    out = tmp_path / "ppo"
    sets = ["ppo.max_steps=2", "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.micro_batch_size=2",
            "ppo.max_new_tokens=16", "ppo.eval_every=2", "ppo.eval_samples=2", "ppo.mixed_precision=no",
            f"ppo.environment={tmp_path / 'add_env.py'}:AddEnv", "ppo.max_turns=2", "ppo.max_episode_tokens=48",
            "ppo.reward={gold: 1.0}"]
    ran("ppo", "--recipe", str(recipe), "--out", str(out), *[x for kv in sets for x in ("--set", kv)])
    m = json.loads((out / "manifest.json").read_text())
    assert m["environment"] == {"spec": f"{tmp_path / 'add_env.py'}:AddEnv", "tools": ["add"], "owns_reward": True,
                                "max_turns": 2, "max_episode_tokens": 48, "max_new_tokens_per_turn": 16,
                                "tool_timeout": 5.0, "max_tool_output": 1000, "turn_rewards": False,
                                "turn_gamma": 1.0}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["objective/scorer/AddEnv"] == 1.0  # get_reward, after reset(**row) saw the prompt
        assert r["objective/score_total"] == pytest.approx(r["objective/scorer/gold"] + 1.0)
        assert 1 <= r["agent/turns"] <= 2 and r["agent/calls"] >= 0
        assert sum(r[f"agent/ended_{why}"] for why in ("answered", "cut", "max_turns", "max_tokens")) == \
            pytest.approx(1.0)
    assert rows[0]["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert "eval/turns" in rows[-1] and "eval/gold" in rows[-1]


def test_a_bad_environment_is_refused_before_any_model_loads(parents, tmp_path):
    recipe, _ = parents
    (tmp_path / "no_tools.py").write_text("class Env:\n    def reset(self, **row):\n        pass\n")
    line = refused("ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"),
                   "--set", f"ppo.environment={tmp_path / 'no_tools.py'}:Env")
    assert "ppo.environment: environment" in line and "has no tools" in line
    refused("ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"), "--set", "ppo.environment=calculator",
            expect="unknown environment 'calculator'")
    assert not (tmp_path / "ppo").exists()


def test_the_instructgpt_loop_runs_on_episodes(parents, tmp_path):
    """Sample K episodes with the calculator, rank them, train the reward model on them and evaluate with the
    environment, all through the CLI: the candidates hold whole episodes with the tools, the rankings keep them,
    the reward model reads them rendered with the tools, and eval reports turns, calls and correctness by kind."""
    recipe, runs = parents
    candidates, ranked = tmp_path / "candidates.jsonl", tmp_path / "ranked.jsonl"
    ran("sample", str(runs / "sft"), "--prompts", str(ROOT / "data/tiny/prompts.jsonl"), "--limit", "12", "-k", "3",
        "--env", "tiny:calculator", "--max-new-tokens", "24", "--out", str(candidates))
    rows = [json.loads(x) for x in candidates.read_text().splitlines()]
    assert len(rows) == 12 and all(r["env"] == "tiny:calculator" and len(r["responses"]) == 3 for r in rows)
    assert rows[0]["tools"] == schemas()
    for r in rows:
        for episode, record in zip(r["responses"], r["episodes"]):
            assert episode[-1]["role"] == "assistant" and record["turns"] == sum(
                m["role"] == "assistant" for m in episode)
    ran("label", str(candidates), "--by", "gold", "--out", str(ranked))
    labelled = [json.loads(x) for x in ranked.read_text().splitlines()]
    assert labelled and all(r["tools"] == schemas() and isinstance(r["responses"][0], list) for r in labelled)

    ran("rm", "--recipe", str(recipe), "--out", str(tmp_path / "rm"), "--set", f"data.preference={ranked}",
        "--set", "data.eval_preference=null", "--set", "rm.max_steps=2", "--set", "rm.max_length=400",
        "--set", "rm.stats_samples=20")
    data = json.loads((tmp_path / "rm" / "manifest.json").read_text())["data"]
    assert data["unit"] == "rankings" and data["rows_too_long"] == 0
    assert data["train_rows"] + data["eval_rows"] == len(labelled)

    ran("eval", "--recipe", str(recipe), "--policy", str(runs / "sft"), "--reward", str(tmp_path / "rm"),
        "--env", "tiny:calculator", "--scorer", "correctness", "--scorer", "correct_add", "--scorer", "correct_sort",
        "--set", "eval.limit=8", "--set", "eval.icl_shots=0", "--set", "eval.max_new_tokens=24",
        "--out", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())[str(runs / "sft")]
    assert summary["turns"] >= 1 and summary["calls"] >= 0 and "correct_add" in summary
    records = [json.loads(x) for x in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
    assert all(r["episode"][-1]["content"].strip() == r["response"] for r in records)
    assert all((r["correct_add"] is None) == (not r["prompt"].startswith("What is")) for r in records)
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["environment"]["spec"] == "tiny:calculator"
