"""People's rankings of candidate responses: the durable store the labelling page writes, and annotator agreement.

A submission is one JSON line appended to the rankings file with a single ``write`` under an exclusive
``flock`` and then ``fsync``'d, before the page is told it is saved: a killed server loses nothing it confirmed,
and several servers (one per annotator) can append to one file at once without interleaving. Each line is the
candidate row (``rlhf sample -k K``) plus

    "ranking": [place of each response, 0 best, equal = tie]   (ranked rows only)
    "label": {"by": "human", "annotator": ..., "time": ..., "status": "ranked" | "skipped" | "unacceptable",
              "item": index of the row in the candidates file, "item_sha": digest of its prompt and responses}

which the reward model reads as the ``responses`` ranking format; skipped and "all unacceptable" rows are
recorded but carry no comparison, so the reader leaves them out (and counts them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

from rlhf.errors import UserError

STATUSES = ("ranked", "skipped", "unacceptable")


def item_sha(row: dict) -> str:
    """A short digest of a candidate row's prompt and responses: a ranking is only ever applied to what was shown."""
    blob = json.dumps([row.get("prompt"), row.get("responses")], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def answered(rows: list[dict], annotator: str | None = None) -> set[tuple[int, str]]:
    """The (item, item_sha) pairs of the page's rows answered by ``annotator`` (by anyone when None)."""
    return {(r["label"]["item"], r["label"]["item_sha"]) for r in rows
            if isinstance(r.get("label"), dict) and "item" in r["label"]
            and (annotator is None or r["label"].get("annotator") == annotator)}


def check_ranking(ranking, k: int) -> list[int]:
    """A submitted ranking of ``k`` responses: one non-negative integer place each, not all equal."""
    if not isinstance(ranking, list) or len(ranking) != k:
        raise ValueError(f"a ranking needs one place for each of the {k} responses")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 or p >= k for p in ranking):
        raise ValueError(f"places must be whole numbers from 0 to {k - 1}")
    if len(set(ranking)) < 2:
        raise ValueError("every response has the same place: that is 'all unacceptable' or a skip, not a ranking")
    return ranking


@dataclass
class LabelStore:
    """The rankings file of one candidates file."""

    path: Path

    def append(self, row: dict) -> None:
        """Append one row durably (one write under an exclusive lock, then fsync)."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                written = os.write(fd, line)
                if written != len(line):  # a full disk: undo the partial line rather than leave it
                    os.ftruncate(fd, os.lseek(fd, 0, os.SEEK_END) - written)
                    raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def rows(self) -> list[dict]:
        """Every complete row (a last line cut short by a crash mid-write is not a row)."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            try:
                data = f.read()
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        for n, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                out.append(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError):
                if n == data.count(b"\n") + 1:  # the unterminated last line
                    continue
                raise UserError(f"{self.path}:{n}: not a JSON row") from None
        return out

    def done_by(self, annotator: str) -> set[tuple[int, str]]:
        """The (item, item_sha) pairs this annotator has answered (ranked, skipped or unacceptable)."""
        return answered(self.rows(), annotator)

    def record(self, candidate: dict, item: int, annotator: str, status: str, ranking: list[int] | None) -> dict:
        """Build and append the row of one answer; returns it."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        row = {k: v for k, v in candidate.items() if k not in ("ranking", "ranks", "label", "label_scores")}
        if status == "ranked":
            row["ranking"] = check_ranking(ranking, len(candidate["responses"]))
        row["label"] = {"by": "human", "annotator": annotator, "status": status, "item": item,
                        "item_sha": item_sha(candidate),
                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.append(row)
        return row


# ---------------------------------------------------------------------------------------------------------------
# Agreement between annotators
# ---------------------------------------------------------------------------------------------------------------

def kendall_tau_b(a: list[int], b: list[int]) -> float | None:
    """Kendall's tau-b between two rankings of the same responses (ties allowed): (concordant - discordant) /
    sqrt((n0 - ties in a) * (n0 - ties in b)); None when either ranking ties everything."""
    concordant = discordant = ties_a = ties_b = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0:
            ties_a += 1
        if db == 0:
            ties_b += 1
        if da and db:
            concordant += (da > 0) == (db > 0)
            discordant += (da > 0) != (db > 0)
    n0 = len(a) * (len(a) - 1) // 2
    denominator = ((n0 - ties_a) * (n0 - ties_b)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def pair_agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """Of the response pairs both rankings order (neither ties), how many they order the same way: (agree, both)."""
    agree = both = 0
    for i, j in combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da and db:
            both += 1
            agree += (da > 0) == (db > 0)
    return agree, both


def agreement(rows: list[dict]) -> dict:
    """How far annotators agree on the items several of them ranked: pairwise agreement (the share of response
    pairs both annotators order that they order alike) and mean Kendall's tau-b, overall and per annotator
    (against everyone else). Skipped and unacceptable answers take no part."""
    by_item: dict[tuple, dict[str, list[int]]] = {}
    for r in rows:
        label = r.get("label") if isinstance(r.get("label"), dict) else {}
        if label.get("status", "ranked") != "ranked" or "ranking" not in r:
            continue
        key = (label.get("item"), label.get("item_sha")) if "item_sha" in label else (
            json.dumps([r.get("prompt"), r.get("responses")], sort_keys=True),)
        by_item.setdefault(key, {})[label.get("annotator", "?")] = r["ranking"]  # an annotator's last answer

    totals = {"agree": 0, "pairs": 0, "taus": []}
    per: dict[str, dict] = {}
    shared = 0
    for rankings in by_item.values():
        if len(rankings) < 2:
            continue
        shared += 1
        for (x, a), (y, b) in combinations(sorted(rankings.items()), 2):
            agree, both = pair_agreement(a, b)
            tau = kendall_tau_b(a, b)
            for bucket in (totals, per.setdefault(x, {"agree": 0, "pairs": 0, "taus": []}),
                           per.setdefault(y, {"agree": 0, "pairs": 0, "taus": []})):
                bucket["agree"] += agree
                bucket["pairs"] += both
                if tau is not None:
                    bucket["taus"].append(tau)

    def summary(bucket: dict) -> dict:
        return {"pairwise_agreement": bucket["agree"] / bucket["pairs"] if bucket["pairs"] else None,
                "kendall_tau": sum(bucket["taus"]) / len(bucket["taus"]) if bucket["taus"] else None,
                "comparisons": bucket["pairs"], "rankings_compared": len(bucket["taus"])}

    annotators = sorted({a for rankings in by_item.values() for a in rankings})
    return {"items": len(by_item), "items_ranked_by_several": shared, "annotators": annotators,
            "overall": summary(totals), "per_annotator": {a: summary(per[a]) for a in sorted(per)}}
