"""Label: rank each prompt's candidate responses (``rlhf sample --num-samples K``) with a scorer or a reward model.

The middle of InstructGPT's reward-model step, done by a machine: a scorer (``rlhf/scorers.py``: the tiny world's
gold scorer plays a simulated annotator) or a reward-model run (AI feedback, RLAIF) scores every candidate, and
the scores order them. A person ranking by hand writes the same kind of row:

    {...the candidate row..., "ranking": [place of each response: 0 best, equal = tie],
     "label": {"by": ..., "noise": ..., "seed": ...}, "label_scores": [the labeller's score of each response]}

which the reward model reads as the ``responses`` ranking format. ``noise`` (for experiments only) adds Gaussian
noise of that standard deviation, in the labeller's units, to each score before ordering: a simulated annotator
who sometimes disagrees with the scorer. A prompt is left out (and counted) when the labeller does not apply to
one of its responses, or when every response scores the same (a ranking with no comparison teaches nothing).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Callable

from rlhf import formats, modeling, scorers
from rlhf.errors import UserError


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense places by descending score: the best is 0 and equal scores share a place."""
    place = {v: i for i, v in enumerate(sorted(set(scores), reverse=True))}
    return [place[v] for v in scores]


def reward_model_labeller(run_dir: str) -> Callable[[list, list], list]:
    """A reward-model run as a labeller: its score of each response (None for one longer than its rm.max_length,
    which it never learnt to read)."""
    model, tokenizer = modeling.load_reward(run_dir)
    max_length = modeling.read_manifest(run_dir)["recipe"]["rm"]["max_length"]

    def score(prompts: list[list[dict]], responses: list[str]) -> list[float | None]:
        seqs = [sum(modeling.encode_exchange(tokenizer, p, [{"role": "assistant", "content": r}]), [])
                for p, r in zip(prompts, responses)]
        fits = [i for i, s in enumerate(seqs) if len(s) <= max_length]
        out: list[float | None] = [None] * len(seqs)
        if fits:
            values = modeling.score_sequences(model, [seqs[i] for i in fits], tokenizer.pad_token_id).tolist()
            for i, v in zip(fits, values):
                out[i] = v
        return out

    return score


def labeller(by: str) -> Callable[[list, list], list]:
    """``--by``: a reward-model run directory, or a scorer spec (built-in name, module:function, file.py:function)."""
    if Path(by).is_dir():
        return reward_model_labeller(by)
    return scorers.load(by, "--by")


def main(candidates: str, by: str, out: str, noise: float = 0.0, seed: int = 0, overwrite: bool = False) -> dict:
    """Rank every prompt's candidates and write the rankings; returns what was written and left out."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise UserError(f"{target}: exists (--overwrite replaces it)")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    if noise < 0:
        raise UserError(f"--noise must not be negative, got {noise}")
    rows = formats.load(candidates, "candidates").rows
    score = labeller(by)
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [text for r in rows for text in r["responses"]]
    values = score(prompts, responses)
    if len(values) != len(responses):  # a reward model always answers in full; a scorer is checked by scorers
        raise UserError(f"--by {by}: {len(values)} scores for {len(responses)} responses")

    rng = random.Random(seed)
    written = not_applicable = all_tied = comparisons = 0
    tmp = target.with_name(target.name + ".tmp")
    start = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            mine = values[start:start + len(r["responses"])]
            start += len(r["responses"])
            if any(v is None for v in mine):
                not_applicable += 1
                continue
            noisy = [v + rng.gauss(0.0, noise) if noise else v for v in mine]
            # identical responses are one response: they share a place (the noise could split them otherwise)
            first = {}
            for i, text in enumerate(r["responses"]):
                noisy[i] = noisy[first.setdefault(text, i)]
            ranking = ranks_from_scores(noisy)
            if len(set(ranking)) < 2:
                all_tied += 1
                continue
            row = {k: v for k, v in r["row"].items() if k not in ("ranking", "ranks", "label", "label_scores")}
            row.update({"ranking": ranking, "label": {"by": by, "noise": noise, "seed": seed},
                        "label_scores": mine})
            f.write(json.dumps(row) + "\n")
            written += 1
            places = list(dict(zip(r["responses"], ranking)).values())  # identical responses count once
            comparisons += sum(1 for a in places for b in places if a < b)
    if not written:
        tmp.unlink()
        raise UserError(f"{candidates}: no prompt could be ranked ({not_applicable} where --by {by} does not apply "
                        f"to every response, {all_tied} where every response scored the same)")
    os.replace(tmp, target)
    stats = {"prompts": len(rows), "written": written, "not_applicable": not_applicable, "all_tied": all_tied,
             "comparisons": comparisons}
    if not_applicable or all_tied:
        print(f"label: left out {not_applicable + all_tied} of {len(rows)} prompts ({not_applicable} where the "
              f"labeller does not apply to every response, {all_tied} where every response scored the same)",
              file=sys.stderr)
    return stats
