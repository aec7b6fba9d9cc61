"""Rankings of K responses to one prompt, and the InstructGPT reward-model loss over them.

A ranking is given as ``ranks``: ``ranks[i]`` is the place of response ``i`` (0 = best); equal ranks are a tie and
give no comparison. Ouyang et al. 2022 (section 3.5) train on all C(K, 2) comparisons of a prompt as ONE batch
element: K forward passes, and the loss

    loss = -1 / P * sum over pairs (w better than l) of log sigmoid(r_w - r_l)

averaged over prompts (P: the prompt's comparisons, C(K, 2) without ties), because shuffling the comparisons as
independent examples overfit after one pass. With K = 2 it is the pairwise Bradley-Terry loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """Every (better, worse) pair of response indices of one ranking; ties give none."""
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def ranking_loss(scores: torch.Tensor, rankings: list[list[int]]) -> torch.Tensor:
    """The InstructGPT loss of a batch: ``scores`` holds the rewards of every response of every prompt, flat and
    in order (``[sum of K]``); ``rankings`` each prompt's ranks. Each prompt weighs the same whatever its K."""
    losses, start = [], 0
    for ranks in rankings:
        pairs = ranking_pairs(ranks)
        if not pairs:
            raise ValueError(f"a ranking with no comparison (every response tied): {ranks}")
        r = scores[start:start + len(ranks)]
        better = torch.tensor([w for w, _ in pairs], device=scores.device)
        worse = torch.tensor([l for _, l in pairs], device=scores.device)
        losses.append(-F.logsigmoid(r[better] - r[worse]).mean())
        start += len(ranks)
    if start != len(scores):
        raise ValueError(f"{len(scores)} scores for rankings of {start} responses")
    return torch.stack(losses).mean()


def ranking_accuracy(scores: torch.Tensor, rankings: list[list[int]]) -> dict[str, float]:
    """Held-out measures of a reward model on rankings: the share of all comparisons it orders right (a tie in
    score counts half) and how often its top-scored response is one of the best-ranked."""
    right = total = top1 = 0.0
    start = 0
    for ranks in rankings:
        r = scores[start:start + len(ranks)].tolist()
        for w, l in ranking_pairs(ranks):
            right += 1.0 if r[w] > r[l] else 0.5 if r[w] == r[l] else 0.0
            total += 1
        top1 += ranks[max(range(len(r)), key=r.__getitem__)] == min(ranks)
        start += len(ranks)
    return {"pair_accuracy": right / total if total else float("nan"), "top1_accuracy": top1 / len(rankings)}
