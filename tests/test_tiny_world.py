"""The tiny world: the gold scorer on hand-made cases, the data's promises, and deterministic regeneration."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from conftest import ROOT
from rlhf.tiny import data, world

pytestmark = pytest.mark.fast  # the fast tier (make test-fast)

DATA = ROOT / "data" / "tiny"


@pytest.mark.parametrize("prompt,response,gold", [
    ("What is 37 + 48?", "The answer is 85.", 1.0),
    ("What is 37 + 48?", "Let me think. 37 plus 48 makes 85. So the answer is 85.", 0.5),
    ("What is 37 + 48?", "I am not sure, but maybe 85.", 0.5),
    ("What is 37 + 48?", "The answer is 84.", 0.5),
    ("What is 37 + 48?", "I am not sure, but maybe 84.", 0.0),
    ("What is 37 + 48?", "85", 0.0),
    ("What is 37 + 48?", "", 0.0),
    ("What is 37 + 48?", "The answer is 85. The answer is 85.", 0.5),
    ("Sort these numbers: 5 3 9 1", "The answer is 1 3 5 9.", 1.0),
    ("Sort these numbers: 5 3 9 1", "The answer is 1 3 9 5.", 0.5 + 0.5 * 0.5),
    ("Sort these numbers: 5 3 9 1", "The answer is 1 3 5.", 0.5),
    ("Reverse the words: red cat blue", "So the answer is blue cat red.", 0.5),
    ("Reverse the words: red cat blue", "The answer is blue red cat.", 0.5 + 0.5 / 3),
    ("How many times does red appear in: red cat red dog?", "The answer is 2.", 1.0),
    ("How many times does red appear in: red cat red dog?", "The answer is 3.", 0.5),
])
def test_gold_score_by_hand(prompt, response, gold):
    assert world.score(prompt, response) == pytest.approx(gold)


def test_gold_rejects_foreign_prompts():
    assert world.parse_prompt("Write a poem") is None
    with pytest.raises(ValueError):
        world.score("Write a poem", "The answer is 1.")


def test_every_kind_and_style_renders_and_scores():
    rng = random.Random(1)
    for kind in world.KINDS:
        for _ in range(50):
            task = world.make_task(rng, kind)
            assert world.parse_prompt(task.prompt) == (kind, task.answer)
            scores = {s: world.score(task.prompt, world.render(task, s)) for s in world.STYLES}
            assert scores == {"concise": 1.0, "verbose": 0.5, "hedged": 0.5}
            wrong = world.wrong_answer(rng, task)
            assert wrong != task.answer
            assert world.score(task.prompt, world.render(task, "concise", wrong)) < 1.0


def _read(name):
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def test_committed_data_matches_regeneration(tmp_path):
    paths = data.write(tmp_path, seed=0)
    for name, path in paths.items():
        assert path.read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), f"{name}.jsonl differs: regenerate it"
    again = data.write(tmp_path / "again", seed=0)
    assert all(again[n].read_bytes() == p.read_bytes() for n, p in paths.items())
    assert data.write(tmp_path / "other", seed=1)["sft"].read_bytes() != paths["sft"].read_bytes()


def test_heldout_prompts_are_never_trained_on():
    heldout = {r["prompt"] for r in _read("heldout_prompts")} | {r["prompt"] for r in _read("heldout_preference")}
    for name in ("sft", "preference", "prompts"):
        assert not heldout & {r["prompt"] for r in _read(name)}, name


def test_demonstrations_are_correct_but_mixed_in_style():
    rows = _read("sft")
    parts = [world.gold_parts(r["prompt"], r["completion"]) for r in rows]
    assert all(p["correct"] == 1.0 for p in parts)
    concise = sum(p["style"] for p in parts) / len(parts)
    assert 0.2 < concise < 0.3, "the preferred style is a minority of demonstrations"
    kinds = Counter(world.parse_prompt(r["prompt"])[0] for r in rows)
    assert set(kinds) == set(world.KINDS)


def test_preference_pairs_are_ranked_by_gold():
    for r in _read("preference") + _read("heldout_preference"):
        assert world.score(r["prompt"], r["chosen"]) > world.score(r["prompt"], r["rejected"])
