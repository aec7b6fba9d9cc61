"""Evaluation: the statistics on hand-made inputs, and `rlhf eval` end to end on small runs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, refused, run_cli
from rlhf import report
from rlhf.text.encoding import icl_prompts


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
    # the tiny recipe's scorers are columns: gold and its two halves
    assert "| gold | correctness | style |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary)
    assert names == ["base ICL 2-shot", str(runs / "sft"), str(tmp_path / "ppo"), "base"]
    first = summary[names[0]]
    assert first["win_rate_vs_first"] == 0.5 and first["kl"] is None
    for s in summary.values():
        assert s["responses"] == 12 and 0 <= s["gold"] <= 1 and s["reward_ci95"][0] <= s["reward"] <= s["reward_ci95"][1]
    assert summary[str(runs / "sft")]["kl"] is not None and summary[str(tmp_path / "ppo")]["kl"] is not None
    records = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 4 * 12 and {"prompt", "response", "reward", "gold", "kl", "length", "eos", "correctness",
                                       "style"} <= set(records[0])
    for r in records:  # gold is half correctness, half style
        assert r["gold"] == pytest.approx(0.5 * r["correctness"] + 0.5 * r["style"])
    for s in summary.values():
        assert s["gold"] == pytest.approx(0.5 * s["correctness"] + 0.5 * s["style"])
        assert s["style_ci95"][0] <= s["style"] <= s["style_ci95"][1]
    assert (out / "summary.md").read_text().count("\n|") >= 5
    for png in ("rewards.png", "ppo_curves_2.png", "proxy_vs_gold_2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "eval" and m["parents"]["rm"] == str(runs / "rm")


def test_eval_refuses_a_reward_model_as_policy(parents, tmp_path):
    recipe, runs = parents
    refused("eval", "--recipe", str(recipe), "--policy", str(runs / "rm"), "--out", str(tmp_path / "e"),
            expect="not a policy")
    assert not (tmp_path / "e").exists()


def _records(out):
    return [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]


def test_eval_on_one_base_gives_the_numbers_of_separate_copies(parents, ppo_run, tmp_path, monkeypatch):
    """Rows that share the reward model's base are adapters on one copy of it: the base is loaded once instead of
    once per model, and every response, reward and gold score is what separate copies give."""
    from rlhf.models import modeling
    from rlhf.config import load_recipe
    from stages import evaluate

    recipe_path, runs = parents
    recipe = load_recipe(recipe_path, ["eval.limit=8", "eval.max_new_tokens=16", "eval.icl_shots=1"])
    loads = []
    original = modeling.load_base
    monkeypatch.setattr(modeling, "load_base", lambda *a, **k: loads.append(1) or original(*a, **k))
    results = {}
    for share in (True, False):
        loads.clear()
        evaluate.main(recipe, policies=["base", str(runs / "sft"), str(ppo_run[0])], reward=str(runs / "rm"),
                      out=tmp_path / str(share), share_base=share)
        results[share] = (_records(tmp_path / str(share)), len(loads))
    (shared, shared_loads), (separate, separate_loads) = results[True], results[False]
    assert shared_loads == 1 and separate_loads == 7  # reward, ICL base, base; sft + its base; ppo + its sft's base
    assert len(shared) == len(separate) == 4 * 8
    for a, b in zip(shared, separate):
        assert (a["policy"], a["response"], a["gold"], a["length"]) == (b["policy"], b["response"], b["gold"],
                                                                        b["length"])
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)
        # PPO's run records eager attention (the CPU's faster kernel for its loop); its own copy loads with it
        assert (a["kl"] is None) == (b["kl"] is None) and (a["kl"] is None or a["kl"] == pytest.approx(b["kl"],
                                                                                                     abs=1e-4))


def test_every_command_runs_its_models_where_it_placed_them(parents, ppo_run, tmp_path, monkeypatch):
    """Every model a command generates with, scores with or reads log-probs from went through ``modeling.place``
    with the process's accelerator: a command that loaded a model some other way (and so left it on the CPU of a
    GPU machine) fails here. And every command generates through the engine (``rollout.decode``): PPO's rollout
    and held-out evaluation, eval and sample; Hugging Face ``generate`` raises."""
    from click.testing import CliRunner

    from rlhf.engine import rollout
    from rlhf.feedback import rewards
    from rlhf.models import methods, modeling, one_base
    from rlhf.cli import cli

    recipe_path, runs = parents
    placed = set()
    place = modeling.place

    def spy(model, device):
        if device is not None:
            assert torch.device(device) == modeling.accelerator()
            placed.add(id(methods.unwrap(model)))
        return place(model, device)

    def root(model):
        owner = getattr(model, "owner", None) or model.__dict__.get("_owner")
        return methods.unwrap(owner.model if isinstance(owner, one_base.OneBase) else model)

    used = []

    def checked(fn):
        def wrapper(model, *a, **k):
            used.append(fn.__name__)
            assert id(root(model)) in placed, f"{fn.__name__} got a model that was never placed"
            return fn(model, *a, **k)
        return wrapper

    def elsewhere(*args, **kwargs):
        raise AssertionError("generated outside the engine (Hugging Face generate)")

    from transformers.generation.utils import GenerationMixin

    monkeypatch.setattr(GenerationMixin, "generate", elsewhere)  # every command generates through rollout.decode
    monkeypatch.setattr(modeling, "place", spy)
    for module, name in ((rollout, "generate"), (rollout, "decode"), (rollout, "response_logprobs"),
                         (rewards, "score_sequences")):
        monkeypatch.setattr(module, name, checked(getattr(module, name)))
    runner = CliRunner()
    prompts = str(ROOT / "data" / "tiny" / "heldout_prompts.jsonl")
    for args in (["eval", "--recipe", str(recipe_path), "--policy", str(runs / "sft"), "--policy", str(ppo_run[0]),
                  "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8", "--out", str(tmp_path / "eval")],
                 ["sample", str(runs / "sft"), "--prompts", prompts, "--limit", "2", "--max-new-tokens", "8"],
                 ["sample", f"base:{ROOT / 'data' / 'tiny-base'}", "--prompts", prompts, "--limit", "2",
                  "--max-new-tokens", "8"],
                 ["rm", "score", "--reward", str(runs / "rm"), "--data",
                  str(ROOT / "data" / "tiny" / "heldout_preference.jsonl")],
                 ["ppo", "--recipe", str(recipe_path), "--out", str(tmp_path / "ppo"), "--set", "ppo.max_steps=1",
                  "--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=4", "--set", "ppo.micro_batch_size=4",
                  "--set", "ppo.max_new_tokens=6", "--set", "ppo.eval_every=1", "--set", "ppo.eval_samples=2"]):
        result = runner.invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    assert {"generate", "decode", "response_logprobs", "score_sequences"} <= set(used)


def test_place_moves_every_loader_s_model_to_the_device_it_is_given(parents):
    from rlhf.models import modeling
    from rlhf.config import ModelConfig

    _, runs = parents
    meta = torch.device("meta")  # a device no loader would pick by itself
    base = modeling.load_base(ModelConfig(base=str(ROOT / "data" / "tiny-base")), device=meta)
    policy, _ = modeling.load_policy(runs / "sft", device=meta)
    reward, _ = modeling.load_reward(runs / "rm", device=meta)
    for model in (base, policy, reward):
        assert {p.device for p in model.parameters()} == {meta}
    assert modeling.place(base, None) is base  # None: left where it is, for a trainer to place


def test_a_reward_model_that_scores_nan_stops_eval_with_one_line_naming_the_row(parents, tmp_path, monkeypatch):
    from rlhf.feedback import rewards
    from rlhf.config import load_recipe
    from rlhf.errors import UserError
    from stages import evaluate

    recipe_path, runs = parents
    recipe = load_recipe(recipe_path, ["eval.limit=4", "eval.max_new_tokens=8", "eval.icl_shots=0"])
    original = rewards.score_sequences

    def nan_on_the_third(*a, **k):
        scores = original(*a, **k)
        scores[2] = float("nan")
        return scores

    monkeypatch.setattr(rewards, "score_sequences", nan_on_the_third)
    with pytest.raises(UserError, match=r"eval: the reward model scored response 3 of .*sft \(prompt '.*'\) as nan"):
        evaluate.main(recipe, policies=[str(runs / "sft")], reward=str(runs / "rm"), out=tmp_path / "e")
    assert not (tmp_path / "e" / "report.md").exists()
