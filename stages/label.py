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
import math
import os
import random
import sys
import threading
from pathlib import Path
from typing import Callable

from rlhf import external_rm, formats, scorers
from rlhf.errors import UserError
from rlhf.formats import duplicates


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Dense places by descending score: the best is 0 and equal scores share a place."""
    place = {v: i for i, v in enumerate(sorted(set(scores), reverse=True))}
    return [place[v] for v in scores]


def labeller(by: str) -> Callable[[list, list], list]:
    """``--by``: a reward model (a run directory of this project, a model directory, or ``rm:`` and a hub id), or
    a scorer spec (built-in name, module:function, file.py:function)."""
    if Path(by).expanduser().is_dir():
        return external_rm.scorer_for(by)
    return scorers.load(by, "--by")


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
    score = labeller(by)
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [text for r in rows for text in r["responses"]]
    values = score(prompts, responses)
    if len(values) != len(responses):  # a reward model always answers in full; a scorer is checked by scorers
        raise UserError(f"--by {by}: {len(values)} scores for {len(responses)} responses")
    scorers.require_finite(values, f"--by {by}", prompts, f" of {candidates}")

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
            places = list(dict(zip(r["responses"], ranking)).values())  # identical responses count once
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


# ---------------------------------------------------------------------------------------------------------------
# The labelling page: people rank the candidates in a browser (`rlhf label serve`)
# ---------------------------------------------------------------------------------------------------------------

MAX_BODY = 16 * 1024
"""bytes a request body may hold (an answer is a few dozen)"""

PAGE = Path(__file__).resolve().parents[1] / "rlhf" / "labelpage"
ASSETS = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
HEADERS = {
    # nothing but our own script and style; model output is text, and even injected markup could load nothing
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _check_annotator(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise UserError(f"--annotator must be 1-64 letters, digits or . _ - @, got {name!r}")
    return name


class LabelApp:
    """What the page talks to: the candidates, the store, one annotator; every answer checked before it is kept."""

    def __init__(self, candidates: str, out: str, annotator: str):
        from rlhf.labelstore import LabelStore, item_sha

        self.annotator = _check_annotator(annotator)
        target = Path(out)
        if target.resolve() == Path(candidates).resolve() or (
                target.exists() and Path(candidates).exists() and os.path.samefile(target, candidates)):
            raise UserError(f"--out {out}: that is the candidates file; answers go to a file of their own")
        loaded = formats.load(candidates, "candidates").rows
        self.items = [r["row"] for r in loaded]
        self.prompts = [r["prompt"] for r in loaded]
        self.shas = [item_sha(row) for row in self.items]
        # a row whose responses are all the same text has nothing to rank: never served, counted
        self.rankable = [i for i, r in enumerate(loaded) if len(set(r["responses"])) >= 2]
        self.unrankable = len(self.items) - len(self.rankable)
        self.store = LabelStore(target)
        self.store.refresh(strict=True)  # an existing --out must be an answers file of the page, line by line
        self.lock = threading.Lock()  # one answer at a time per server (servers share the file through flock)
        self._valid = {(i, self.shas[i]) for i in self.rankable}
        self._generation = None

    def _catch_up(self) -> None:
        """Fold the answers appended since the last request into this page's counts: work in proportion to what
        is new, not to what the file holds."""
        self.store.refresh()
        if self._generation != self.store.generation:  # first call, or the file was replaced: count again
            self._generation, self._seen, self._cursor = self.store.generation, 0, 0
            self._mine: set[tuple[int, str]] = set()
            self._everyone: set[tuple[int, str]] = set()
        for annotator, key in self.store.log[self._seen:]:
            if key in self._valid:
                self._everyone.add(key)
                if annotator == self.annotator:
                    self._mine.add(key)
        self._seen = len(self.store.log)
        while self._cursor < len(self.rankable) and (
                self.rankable[self._cursor], self.shas[self.rankable[self._cursor]]) in self._mine:
            self._cursor += 1  # answers only accumulate, so the first unanswered item never moves back

    def state(self) -> dict:
        with self.lock:
            self._catch_up()
            next_index = self.rankable[self._cursor] if self._cursor < len(self.rankable) else None
            answered, answered_all = len(self._mine), len(self._everyone)
        item = None if next_index is None else {
            "index": next_index, "sha": self.shas[next_index], "prompt": self.prompts[next_index],
            "responses": self.items[next_index]["responses"]}
        return {"total": len(self.rankable), "answered": answered, "answered_all": answered_all,
                "annotator": self.annotator, "item": item}

    def answer(self, body: dict) -> dict:
        """Keep one answer (ValueError: refused, nothing written)."""
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        item = body.get("item")
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(self.items):
            raise ValueError(f"unknown item {item!r}")
        if body.get("item_sha") != self.shas[item]:
            raise ValueError(f"item {item} is not the prompt the page showed (the candidates file changed?)")
        if len(set(self.items[item]["responses"])) < 2:
            raise ValueError(f"item {item} has nothing to rank (one distinct response)")
        with self.lock:  # the check and the append happen under the file's lock (LabelStore.append)
            self.store.record(self.items[item], item, self.annotator, body.get("status"), body.get("ranking"))
        return self.state()


def make_server(app: LabelApp, host: str, port: int, token: str):
    """A threading HTTP server for the page; every request must carry ``token`` (query or X-Label-Token)."""
    import hmac
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rlhf.labelstore import AlreadyAnswered
    from urllib.parse import parse_qs, urlsplit

    class Handler(BaseHTTPRequestHandler):
        server_version = "rlhf-label"
        sys_version = ""

        def log_message(self, *args):  # the terminal shows saves, not every request
            pass

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, data: dict) -> None:
            self._send(code, json.dumps(data).encode("utf-8"), "application/json")

        def _authorised(self) -> bool:
            given = self.headers.get("X-Label-Token") or parse_qs(urlsplit(self.path).query).get("token", [""])[0]
            if hmac.compare_digest(given.encode(), token.encode()):
                return True
            self._json(401, {"error": "missing or wrong access token (open the URL the server printed)"})
            return False

        def handle_one_request(self):
            """Every failure inside a request is an answer with a message, never a dropped connection."""
            try:
                super().handle_one_request()
            except (ConnectionError, TimeoutError):
                raise
            except Exception as e:  # noqa: BLE001 - the page must stay up; the terminal gets one line
                print(f"label: request failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                try:
                    self._json(500, {"error": f"the server failed on this request ({type(e).__name__}: {e})"})
                except OSError:
                    pass

        def do_GET(self):
            if not self._authorised():
                return
            path = urlsplit(self.path).path
            if path == "/api/next":
                return self._json(200, app.state())
            if path not in ASSETS:
                return self._json(404, {"error": f"no such page {path}"})
            name, content_type = ASSETS[path]
            body = (PAGE / name).read_bytes()
            if name == "index.html":  # the assets are fetched with the token too
                for asset in ("app.js", "app.css"):
                    body = body.replace(f'"{asset}"'.encode(), f'"{asset}?token={token}"'.encode())
            self._send(200, body, content_type)

        def do_POST(self):
            if not self._authorised():
                return
            if urlsplit(self.path).path != "/api/answer":
                return self._json(404, {"error": "no such endpoint"})
            # the length is checked before a byte of the body is read: a missing, negative or oversized one would
            # otherwise read until the client closes
            given = self.headers.get("Content-Length")
            if given is None:
                return self._json(411, {"error": "a Content-Length is required"})
            if not given.strip().isdigit():
                return self._json(400, {"error": f"bad Content-Length {given[:20]!r}"})
            length = int(given)
            if length > MAX_BODY:
                return self._json(413, {"error": f"request body over {MAX_BODY} bytes"})
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                return self._json(415, {"error": "expected application/json"})
            try:
                body = json.loads(self.rfile.read(length))
            except (ValueError, RecursionError):  # bad JSON or UTF-8, a number over Python's digit limit, nesting
                return self._json(400, {"error": "the body is not JSON"})
            try:
                state = app.answer(body)
            except AlreadyAnswered as e:
                return self._json(409, {"error": str(e)})
            except ValueError as e:
                return self._json(400, {"error": str(e)})
            print(f"label: saved item {body['item']} ({body['status']}) by {app.annotator}: "
                  f"{state['answered']}/{state['total']}", file=sys.stderr, flush=True)
            self._json(200, state)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(candidates: str, out: str, annotator: str, host: str = "127.0.0.1", port: int = 8765,
          echo=print) -> None:
    """Serve the labelling page until interrupted."""
    import secrets

    target = Path(out)
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    app = LabelApp(candidates, out, annotator)
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
    """``labelstore.agreement`` of a rankings file."""
    from rlhf.labelstore import LabelStore, agreement, answer_key

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
