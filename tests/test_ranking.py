"""The InstructGPT ranking loss on hand-worked scores: K = 2 is the pairwise loss, a K = 3 case by hand, ties."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.feedback.ranking import ranking_accuracy, ranking_loss, ranking_pairs

pytestmark = pytest.mark.fast


def softplus(x: float) -> float:
    """log(1 + e^x): the loss of one comparison with score difference d is -log sigmoid(d) = softplus(-d)."""
    return math.log1p(math.exp(x))


def test_pairs_follow_the_ranks_and_ties_give_none():
    assert ranking_pairs([0, 1, 2]) == [(0, 1), (0, 2), (1, 2)]
    assert ranking_pairs([2, 0, 1]) == [(1, 0), (1, 2), (2, 0)]
    assert ranking_pairs([0, 1, 1]) == [(0, 1), (0, 2)]  # responses 1 and 2 tie


def test_k2_is_the_pairwise_loss():
    scores = torch.tensor([1.5, -0.5])
    expected = -torch.nn.functional.logsigmoid(scores[0] - scores[1])
    assert ranking_loss(scores, [[0, 1]]).item() == pytest.approx(expected.item())
    assert ranking_loss(scores, [[0, 1]]).item() == pytest.approx(softplus(-2.0))


def test_k3_by_hand():
    # responses scored 2, 0, 1, ranked best = response 0, then 2, then 1: pairs (0,2) d=1, (0,1) d=2, (2,1) d=1
    scores = torch.tensor([2.0, 0.0, 1.0])
    expected = (softplus(-1.0) + softplus(-2.0) + softplus(-1.0)) / 3
    assert ranking_loss(scores, [[0, 2, 1]]).item() == pytest.approx(expected)


def test_ties_and_prompts_of_different_k_weigh_the_same():
    scores = torch.tensor([1.0, 0.0, 0.0, 3.0, 1.0])  # a K=3 prompt with a tie, then a K=2 prompt
    first = (softplus(-1.0) + softplus(-1.0)) / 2  # pairs (0,1), (0,2); 1 and 2 tie
    second = softplus(-2.0)
    assert ranking_loss(scores, [[0, 1, 1], [0, 1]]).item() == pytest.approx((first + second) / 2)


def test_the_loss_has_gradients_and_refuses_mismatches():
    scores = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    ranking_loss(scores, [[0, 1, 2]]).backward()
    # d/dr of mean(-log sigmoid(r_w - r_l)) at 0: each pair pushes the better up by 0.5/3 and the worse down
    assert scores.grad.tolist() == pytest.approx([-1 / 3, 0.0, 1 / 3])
    with pytest.raises(ValueError, match="every response tied"):
        ranking_loss(torch.zeros(2), [[0, 0]])
    with pytest.raises(ValueError, match="3 scores for rankings of 2 responses"):
        ranking_loss(torch.zeros(3), [[0, 1]])


def test_accuracy_over_all_pairs_and_top1():
    scores = torch.tensor([2.0, 0.0, 1.0, 0.0, 5.0])
    acc = ranking_accuracy(scores, [[0, 2, 1], [0, 1]])  # first: all 3 pairs right; second: wrong
    assert acc == {"pair_accuracy": 3 / 4, "top1_accuracy": 1 / 2}
