"""People's rankings of candidate responses: the durable store the labelling page writes, and annotator agreement.

A submission is one JSON line appended to the answers file with a single ``write`` under an exclusive ``flock``
and then ``fsync``'d, before the page is told it is saved: a killed server loses nothing it confirmed. The
"already answered?" check and the append happen under that one lock, so several servers over one file (one per
annotator, or the same annotator twice by mistake) never record an item twice. Each line is the candidate row
(``rlhf sample -k K``) plus

    "ranking": [place of each response, 0 best, equal = tie]   (ranked rows only)
    "label": {"by": "human", "annotator": ..., "time": ..., "status": "ranked" | "skipped" | "unacceptable",
              "item": index of the row in the candidates file, "item_sha": digest of its prompt and responses}

which the reward model reads as the ``responses`` ranking format; skipped and "all unacceptable" rows are
recorded but carry no comparison, so the reader leaves them out (and counts them).

The store keeps what it has read in memory and reads only the bytes appended since (by this or any other
server), so a request costs the same at 20 answers and at 200,000. A last line cut short by a crash or a full
disk is not a row; the next append moves it to ``<file>.torn`` (nothing is deleted) and starts on a fresh line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import threading
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

from rlhf.errors import UserError

STATUSES = ("ranked", "skipped", "unacceptable")


def item_sha(row: dict) -> str:
    """A short digest of a candidate row's prompt and responses: a ranking is only ever applied to what was shown."""
    blob = json.dumps([row.get("prompt"), row.get("responses")], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def answer_key(row) -> tuple[str, tuple[int, str]]:
    """(annotator, (item, item_sha)) of one answer row of the page; ValueError saying what is wrong otherwise."""
    label = row.get("label") if isinstance(row, dict) else None
    if not isinstance(label, dict) or ("item" not in label and "item_sha" not in label):
        raise ValueError("not an answer of the labelling page (no label.item and label.item_sha)")
    item, sha, annotator = label.get("item"), label.get("item_sha"), label.get("annotator")
    if isinstance(item, bool) or not isinstance(item, int) or item < 0:
        raise ValueError(f"label.item must be a candidate's index, got {item!r}")
    if not isinstance(sha, str):
        raise ValueError("not an answer of the labelling page (no label.item_sha)")
    if not isinstance(annotator, str):
        raise ValueError("label.annotator must be a name")
    return annotator, (item, sha)


def check_ranking(ranking, k: int) -> list[int]:
    """A submitted ranking of ``k`` responses: one non-negative integer place each, not all equal."""
    if not isinstance(ranking, list) or len(ranking) != k:
        raise ValueError(f"a ranking needs one place for each of the {k} responses")
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 or p >= k for p in ranking):
        raise ValueError(f"places must be whole numbers from 0 to {k - 1}")
    if len(set(ranking)) < 2:
        raise ValueError("every response has the same place: that is 'all unacceptable' or a skip, not a ranking")
    return ranking


class AlreadyAnswered(ValueError):
    pass


class LabelStore:
    """The answers file of one candidates file, and what it says so far (who answered what)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._mutex = threading.Lock()  # this process's threads; other processes meet at the flock
        self._reset(None)

    generation = 0  # bumped when the file is read again from the start (replaced or cut): readers of ``log`` restart

    def _reset(self, identity) -> None:
        self.generation += 1
        self.log: list[tuple[str, tuple[int, str], str]] = []  # (annotator, (item, item_sha), status), file order
        self._identity = identity  # (device, inode) of the file read: a replaced file is read again from the start
        self._offset = 0  # bytes of complete lines already folded in
        self._lines = 0
        self._by: dict[str, set[tuple[int, str]]] = {}
        self.bytes_read = 0  # what reconciling has read in all (each byte of the file once, unless it was replaced)
        self.unreadable: list[int] = []  # line numbers of complete lines that are not answers of the page

    # -- reading ----------------------------------------------------------------------------------------------

    def _fold(self, fd: int, strict: bool) -> None:
        """Fold the complete lines appended since the last call into the state (caller holds the flock)."""
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != self._identity or st.st_size < self._offset:
            self._reset((st.st_dev, st.st_ino))
        if st.st_size == self._offset:
            return
        data = os.pread(fd, st.st_size - self._offset, self._offset)
        self.bytes_read += len(data)
        end = data.rfind(b"\n") + 1  # an unterminated tail is a torn line (or nothing yet): not folded
        for raw in data[:end].split(b"\n")[:-1]:
            self._lines += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                annotator, key = answer_key(row)
            except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                why = "not a JSON row" if not isinstance(e, ValueError) or isinstance(
                    e, (json.JSONDecodeError, UnicodeDecodeError)) else str(e)
                if strict:
                    raise UserError(f"{self.path}:{self._lines}: {why}; --out must be an answers file of the "
                                    f"labelling page") from None
                if self._lines not in self.unreadable:
                    self.unreadable.append(self._lines)
                    print(f"label: {self.path}:{self._lines}: {why} (left out)", file=sys.stderr, flush=True)
                continue
            self._by.setdefault(annotator, set()).add(key)
            self.log.append((annotator, key, row["label"].get("status")))
        self._offset += end

    def refresh(self, strict: bool = False) -> None:
        """Catch up with the file (appends by any server since the last look): reads only the new bytes."""
        with self._mutex:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                self._reset(None)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._fold(fd, strict)
            finally:
                os.close(fd)  # closing releases the lock

    def done_by(self, annotator: str) -> set[tuple[int, str]]:
        """The (item, item_sha) pairs this annotator has answered (ranked, skipped or unacceptable)."""
        self.refresh()
        return set(self._by.get(annotator, ()))

    def rows(self, numbered: bool = False) -> list:
        """Every complete row of the file (a last line cut short by a crash is not a row); ``numbered``: as
        (line number, row) pairs."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            data = f.read()
        lines = data.split(b"\n")
        for n, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                if n == len(lines):  # the unterminated last line
                    continue
                raise UserError(f"{self.path}:{n}: not a JSON row") from None
            out.append((n, row) if numbered else row)
        return out

    # -- writing ----------------------------------------------------------------------------------------------

    def append(self, row: dict, once_for: tuple[str, tuple[int, str]] | None = None) -> None:
        """Append one row durably: one write under an exclusive lock, then fsync. ``once_for`` = (annotator,
        (item, item_sha)): under the same lock, refuse (AlreadyAnswered) if that annotator has answered it."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        with self._mutex:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._fold(fd, strict=False)
                if once_for and once_for[1] in self._by.get(once_for[0], ()):
                    raise AlreadyAnswered(f"item {once_for[1][0]} is already answered by {once_for[0]}")
                self._set_aside_torn_tail(fd)
                written = os.write(fd, line)
                if written != len(line):  # a full disk: undo the partial line rather than leave it
                    os.ftruncate(fd, self._offset)
                    raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
                self._fold(fd, strict=False)
            finally:
                os.close(fd)

    def _set_aside_torn_tail(self, fd: int) -> None:
        """A last line without its newline (a crash or a full disk mid-write) would glue onto the next answer:
        move it to ``<file>.torn`` and cut it off, so the answer starts on a fresh line."""
        size = os.fstat(fd).st_size
        if size == self._offset:
            return
        torn = os.pread(fd, size - self._offset, self._offset)
        aside = self.path.with_name(self.path.name + ".torn")
        with open(aside, "ab") as f:
            f.write(torn + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(fd, self._offset)
        print(f"label: {self.path}: a torn last line ({len(torn)} bytes) moved to {aside}", file=sys.stderr,
              flush=True)

    def record(self, candidate: dict, item: int, annotator: str, status: str, ranking: list[int] | None,
               suggestion: dict | None = None) -> dict:
        """Build and append the row of one answer, unless this annotator has answered this item (AlreadyAnswered);
        returns it. ``suggestion``: the ranking the page showed beside the responses, kept in the label."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        row = {k: v for k, v in candidate.items() if k not in ("ranking", "ranks", "label", "label_scores")}
        if status == "ranked":
            row["ranking"] = check_ranking(ranking, len(candidate["responses"]))
        sha = item_sha(candidate)
        row["label"] = {"by": "human", "annotator": annotator, "status": status, "item": item, "item_sha": sha,
                        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        **({"suggestion": suggestion} if suggestion is not None else {})}
        self.append(row, once_for=(annotator, (item, sha)))
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
    (against everyone else); and, where the page showed a suggestion, each annotator's agreement with it
    (``with_suggestion``). Skipped and unacceptable answers take no part."""
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

    # against the suggestion the page showed (label serve --suggest): how far each annotator followed it
    suggested: dict[str, dict] = {}
    for r in rows:
        label = r.get("label") if isinstance(r.get("label"), dict) else {}
        shown = label.get("suggestion") if isinstance(label.get("suggestion"), dict) else None
        places = shown.get("ranking") if shown else None
        if label.get("status", "ranked") != "ranked" or "ranking" not in r or not isinstance(places, list) \
                or len(places) != len(r["ranking"]) or any(p is None for p in places):
            continue
        agree, both = pair_agreement(r["ranking"], places)
        tau = kendall_tau_b(r["ranking"], places)
        bucket = suggested.setdefault(label.get("annotator", "?"), {"agree": 0, "pairs": 0, "taus": []})
        bucket["agree"] += agree
        bucket["pairs"] += both
        if tau is not None:
            bucket["taus"].append(tau)

    annotators = sorted({a for rankings in by_item.values() for a in rankings})
    return {"items": len(by_item), "items_ranked_by_several": shared, "annotators": annotators,
            "overall": summary(totals), "per_annotator": {a: summary(per[a]) for a in sorted(per)},
            **({"with_suggestion": {a: summary(suggested[a]) for a in sorted(suggested)}} if suggested else {})}
