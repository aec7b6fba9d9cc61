"""Scorers: loading by built-in name, module reference and file path; every way a reference or a scorer can be
wrong, as a one-line error naming the scorer (and the row); the weighted reward PPO optimises."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from rlhf.feedback import scorers
from rlhf.ppo import ppo_math
from rlhf.config import load_recipe
from rlhf.errors import UserError

pytestmark = pytest.mark.fast

ADD = [{"role": "user", "content": "What is 2 + 3?"}]
SORT = [{"role": "user", "content": "Sort these numbers: 3 1 2"}]
FOREIGN = [{"role": "user", "content": "Write a haiku about the sea."}]

USER_SCORERS = '''
calls = []

def length_penalty(prompts, responses):
    return [-len(r) / 10 for r in responses]

def half(prompts, responses):
    return [0.5] * len(responses)

class Counted:
    made = 0

    def __init__(self):
        Counted.made += 1

    def __call__(self, prompts, responses):
        return [1.0 if "yes" in r else None for r in responses]

def boom(prompts, responses):
    for r in responses:
        if r == "bad":
            raise ValueError("cannot parse")
    return [0.0] * len(responses)

def words(prompts, responses):
    return ["high" for _ in responses]

def short(prompts, responses):
    return [1.0]

def nan(prompts, responses):
    return [float("nan")] * len(responses)

def numpyish(prompts, responses):
    return [torch.tensor(0.25)] * len(responses)

import torch
NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A scorer module importable by name (my_scorers) and loadable by path (its file)."""
    path = tmp_path / "my_scorers.py"
    path.write_text(USER_SCORERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("my_scorers", None)


def test_builtin_scorers_by_name():
    gold, correct, style = scorers.load_all(["gold", "correctness", "style"], "eval.scorers")
    prompts = [ADD, ADD, SORT, FOREIGN]
    responses = ["The answer is 5.", "Let me think. So the answer is 5.", "maybe 1 3 2", "The answer is 5."]
    assert correct(prompts, responses) == [1.0, 1.0, pytest.approx(1 / 3), None]
    assert style(prompts, responses) == [1.0, 0.0, 0.0, None]
    assert gold(prompts, responses) == [1.0, 0.5, pytest.approx(1 / 6), None]  # None: "does not apply"
    assert [s.name for s in (gold, correct, style)] == ["gold", "correctness", "style"]


def test_user_scorers_by_module_by_file_and_with_a_label(user_module):
    by_module = scorers.load("my_scorers:length_penalty")
    by_file = scorers.load(f"{user_module}:length_penalty")
    labelled = scorers.load("brevity=my_scorers:length_penalty")
    assert by_module.name == by_file.name == "length_penalty" and labelled.name == "brevity"
    for s in (by_module, by_file, labelled):
        assert s([ADD, ADD], ["abcde", "ab"]) == [-0.5, -0.2]
    counted = scorers.load("my_scorers:Counted")  # a class: instantiated once, its instance is the scorer
    assert counted([ADD, ADD], ["yes", "no"]) == [1.0, None] and counted.fn.made == 1
    assert scorers.load("my_scorers:numpyish")([ADD], ["x"]) == [0.25]  # a 0-d tensor counts as a number


@pytest.mark.parametrize("spec,message", [
    ("nonexistent_module_xyz:f", "scorer module nonexistent_module_xyz not found"),
    ("missing_dir/scorer.py:f", "scorer file missing_dir/scorer.py not found"),
    ("my_scorers:absent", "my_scorers has no 'absent'"),
    ("my_scorers:NOT_CALLABLE", "is a int, not callable"),
    ("gld", "unknown scorer 'gld' (did you mean 'gold'?)"),
    ("my_scorers:", "must be package.module:function"),
    ("reward=my_scorers:half", "may not be named 'reward'"),
])
def test_bad_references(user_module, spec, message):
    with pytest.raises(UserError, match="^ppo.reward: .*" + re.escape(message)):
        scorers.load(spec, "ppo.reward")


def test_two_scorers_with_one_name(user_module):
    with pytest.raises(UserError, match="two scorers are named 'half'"):
        scorers.load_all(["my_scorers:half", f"{user_module}:half"], "eval.scorers")


def test_a_scorer_that_raises_names_itself_and_the_row(user_module):
    boom = scorers.load("my_scorers:boom")
    with pytest.raises(UserError) as e:
        boom([ADD, SORT, ADD], ["fine", "bad", "fine"])
    assert str(e.value) == ("scorer boom (my_scorers:boom) raised ValueError: cannot parse on row 2 "
                            "(prompt 'Sort these numbers: 3 1 2', response 'bad')")


@pytest.mark.parametrize("fn,message", [
    ("words", "returned 'high' for row 1 (prompt 'What is 2 + 3?'): not a number or None"),
    ("short", "returned 1 values for 2 responses"),
    ("nan", "returned nan for row 1"),
])
def test_a_scorer_that_returns_the_wrong_thing(user_module, fn, message):
    with pytest.raises(UserError, match=re.escape(message)):
        scorers.load(f"my_scorers:{fn}")([ADD, ADD], ["a", "b"])


def test_weighted_score_by_hand():
    rm = torch.tensor([1.0, -2.0, 0.5])
    gold = torch.tensor([1.0, 0.0, 0.5])
    # 1.0 * rm + 4.0 * gold
    assert torch.equal(ppo_math.weighted_score([(rm, 1.0), (gold, 4.0)]), torch.tensor([5.0, -2.0, 2.5]))
    assert torch.equal(ppo_math.weighted_score([(gold, 4.0)]), torch.tensor([4.0, 0.0, 2.0]))
    assert ppo_math.weighted_score([(rm, 1.0)]) is not rm and torch.equal(ppo_math.weighted_score([(rm, 1.0)]), rm)
    # a NaN reward-model score stays NaN, for PPO's non-finite guard to see
    assert ppo_math.weighted_score([(torch.tensor([float("nan")]), 1.0), (torch.tensor([1.0]), 1.0)]).isnan().all()


def test_reward_terms_from_the_recipe(tmp_path, user_module):
    recipe = load_recipe(None, ["ppo.reward={reward_model: 1.0, gold: 4.0, 'my_scorers:half': 0.0}"])
    weight, terms = scorers.reward_terms(recipe.ppo.reward, "ppo.reward")
    assert weight == 1.0 and [(s.name, w) for s, w in terms] == [("gold", 4.0)]  # weight 0: left out
    assert scorers.reward_terms(load_recipe(None, ["ppo.reward={gold: 1}"]).ppo.reward, "ppo.reward")[0] == 0.0
    with pytest.raises(UserError, match="ppo.reward needs a term with a non-zero weight"):
        load_recipe(None, ["ppo.reward={reward_model: 0}"])
    with pytest.raises(UserError, match="ppo.reward must be a mapping of names to numbers, got"):
        load_recipe(None, ["ppo.reward={gold: high}"])
    with pytest.raises(UserError, match="eval.scorers must be a list of a string"):
        load_recipe(None, ["eval.scorers=gold"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_label_refuses_a_reward_model_that_scores_non_finite(tmp_path, monkeypatch, bad):
    """`rlhf label --by MODEL_DIR` with a model that returns NaN/inf: one line naming the model and the row, no
    rankings in arbitrary order."""
    from rlhf.errors import UserError
    from stages import label

    candidates = tmp_path / "c.jsonl"
    candidates.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "responses": ["a b", "c d"]}) + "\n"
                                  for i in range(3)))
    from rlhf.feedback import rewards

    (tmp_path / "rm").mkdir()
    monkeypatch.setattr(rewards, "load", lambda spec: lambda prompts, responses: [0.5, 0.1, 0.2, bad, 0.3, 0.4])
    with pytest.raises(UserError, match=rf"scorer rm \(.*rm\) returned {bad} for row 4 \(prompt 'What is 1 \+ 1\?'\)"):
        label.main(str(candidates), str(tmp_path / "rm"), str(tmp_path / "r.jsonl"))
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "r.jsonl.tmp").exists()
