"""SFT really improves the model: on held-out prompts, greedy answers of the default recipe's SFT policy score
clearly higher on the gold scorer than the base model's (which never saw the chat format)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli, write_recipe
from rlhf import formats, modeling, rollout
from rlhf.config import ModelConfig
from rlhf.tiny import world


@pytest.fixture(scope="module")
def default_sft(tmp_path_factory):
    """The default tiny recipe's SFT stage, run once through the CLI."""
    d = tmp_path_factory.mktemp("default")
    recipe = write_recipe(d / "tiny.yaml", run_dir=str(d / "runs"))
    run_cli("sft", "--recipe", str(recipe))
    return d / "runs" / "tiny" / "sft"


def _gold(model, tokenizer, prompts):
    gens = rollout.generate(model, tokenizer, prompts, max_new_tokens=64)
    texts = [p[-1]["content"] for p in prompts]
    parts = [world.gold_parts(p, r) for p, r in zip(texts, gens.texts)]
    return {
        "gold": sum(world.score(p, r) for p, r in zip(texts, gens.texts)) / len(texts),
        "correct": sum(x["correct"] for x in parts) / len(parts),
        "concise": sum(x["style"] for x in parts) / len(parts),
        "eos_rate": sum(gens.stopped) / len(gens.stopped),
    }


def test_sft_beats_the_base_on_gold(default_sft):
    prompts = formats.load(str(ROOT / "data" / "tiny" / "heldout_prompts.jsonl"), "prompts").rows
    cfg = ModelConfig(base=str(ROOT / "data" / "tiny-base"))
    base = _gold(modeling.load_base(cfg).eval(), modeling.load_tokenizer(cfg), prompts)
    sft = _gold(*modeling.load_policy(default_sft), prompts)
    print(json.dumps({"base": base, "sft": sft}))
    assert sft["eos_rate"] > 0.95, "SFT teaches the model to stop"
    assert sft["correct"] > 0.35
    assert sft["gold"] >= base["gold"] + 0.15 and sft["gold"] >= 3 * base["gold"]
    # demonstrations mix styles, so imitation does not settle the preference: room left for RM + PPO
    assert sft["concise"] < 0.6


def test_default_run_manifest(default_sft):
    m = json.loads((default_sft / "manifest.json").read_text())
    assert m["metrics"]["eval_loss"] < 1.0 and m["metrics"]["steps"] > 100
