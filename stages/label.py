"""Label: rank each prompt's candidate responses (``rlhf sample --num-samples K``) with a scorer, a reward model or
an LLM judge.

The middle of InstructGPT's reward-model step, done by a machine: a scorer (``rlhf/feedback/scorers.py``: the tiny
world's gold scorer plays a simulated annotator) or a reward model (``rlhf/feedback/rewards.py``) scores every
candidate, and the scores order them; an LLM judge (``judge:MODEL``, ``rlhf/feedback/judge.py``: AI feedback, RLAIF)
compares each prompt's candidates pair by pair, in both orders, and a candidate's score is its mean probability of
beating the others.
A person ranking by hand writes the same kind of row:

    {...the candidate row..., "ranking": [place of each response: 0 best, equal = tie],
     "label": {"by": ..., "noise": ..., "seed": ...}, "label_scores": [the labeller's score of each response]}

which the reward model reads as the ``responses`` ranking format. ``noise`` (for experiments only) adds Gaussian
noise of that standard deviation, in the labeller's units, to each score before ordering: a simulated annotator
who sometimes disagrees with the scorer. A prompt is left out (and counted) when the labeller does not apply to
one of its responses, or when every response scores the same (a ranking with no comparison teaches nothing).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

from rlhf.feedback import scorers
from rlhf.text import formats
from rlhf.errors import UserError
from rlhf.text.formats import duplicates, ranks_from_scores, response_key
from rlhf.feedback.labelpage.server import LabelApp, make_server


def main(candidates: str, by: str, out: str, noise: float = 0.0, seed: int = 0, overwrite: bool = False) -> dict:
    """Rank every prompt's candidates and write the rankings; returns what was written and left out."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise UserError(f"{target}: exists (--overwrite replaces it)")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    if not (math.isfinite(noise) and noise >= 0):
        raise UserError(f"--noise must be a finite number, 0 or more, got {noise}")
    rows = formats.load(candidates, "candidates").rows
    values = label_scores(rows, by, candidates)
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
            for i, first in enumerate(duplicates(r["responses"])):
                if first is not None:
                    noisy[i] = noisy[first]
            ranking = ranks_from_scores(noisy)
            if len(set(ranking)) < 2:
                all_tied += 1
                continue
            row = {k: v for k, v in r["row"].items() if k not in ("ranking", "ranks", "label", "label_scores")}
            row.update({"ranking": ranking, "label": {"by": by, "noise": noise, "seed": seed},
                        "label_scores": mine})
            f.write(json.dumps(row) + "\n")
            written += 1
            # identical responses count once
            places = list(dict(zip(map(response_key, r["responses"]), ranking)).values())
            comparisons += sum(1 for a in places for b in places if a < b)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes it
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


def label_scores(rows: list[dict], by: str, candidates: str) -> list[float | None]:
    """The labeller's score of every candidate response, prompt after prompt (None where it does not apply). ``by``
    is a scorer spec, a reward model (``rlhf.feedback.rewards``) or a judge (``rlhf.feedback.judge``), which
    compares each prompt's candidates pair by pair. Of an episode (``rlhf sample --env``) a reward model scores the
    whole of it, rendered with its tools, as it trained; scorers and judges read its last answer."""
    from rlhf.feedback import rewards

    score = scorers.load(by, "--by")
    rank = getattr(score.fn, "rank", None)
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    if isinstance(score.fn, rewards.RewardModel) and any(isinstance(x, list) for r in rows for x in r["responses"]):
        return [v for r in rows for v in scorers.candidate_scores(score, r["prompt"], r["responses"], r["tools"])]
    if rank is None:
        return score(prompts, [text for r in rows for text in r["texts"]])
    values = [v for r in rows for v in rank(r["prompt"], [t.strip() for t in r["texts"]])]
    scorers.require_finite(values, f"--by {by}", prompts, f" of {candidates}")
    return values


def serve(candidates: str, out: str, annotator: str, host: str = "127.0.0.1", port: int = 8765,
          overlap: int | None = None, suggest: str | None = None, echo=print) -> None:
    """Serve the labelling page until interrupted (``overlap`` and ``suggest``: ``LabelApp``'s)."""
    import secrets

    target = Path(out)
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    app = LabelApp(candidates, out, annotator, overlap, suggest)
    token = secrets.token_urlsafe(18)
    try:
        server = make_server(app, host, port, token)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port") from None
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    state = app.state()
    echo(f"label: {state['answered']} of {state['total']} prompts answered by {annotator}; rankings -> {out}")
    if app.unrankable:
        echo(f"label: {app.unrankable} prompts left out: one distinct response, nothing to rank")
    echo(f"http://{shown}:{server.server_address[1]}/?token={token}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def agreement_report(rankings: str) -> dict:
    """``labelpage.store.agreement`` of a rankings file."""
    from rlhf.feedback.labelpage.store import LabelStore, agreement, answer_key

    if not Path(rankings).is_file():
        raise UserError(f"{rankings}: file not found")
    rows = LabelStore(Path(rankings)).rows(numbered=True)
    for n, row in rows:
        where = f"{rankings}:{n}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: a row must be a JSON object")
        label = row.get("label", {})
        if not isinstance(label, dict):
            raise UserError(f"{where}: label must be an object")
        if "item_sha" in label:
            try:
                answer_key(row)
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
        if "ranking" in row and label.get("status", "ranked") == "ranked":
            ranking, responses = row["ranking"], row.get("responses")
            if not isinstance(responses, list) or not isinstance(ranking, list) or len(ranking) != len(responses) \
                    or any(isinstance(p, bool) or not isinstance(p, int) for p in ranking):
                raise UserError(f"{where}: ranking must be a list of whole-number places, one per response")
    return agreement([row for _, row in rows])
