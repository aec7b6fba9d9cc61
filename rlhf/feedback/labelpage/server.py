"""The labelling page's server: ``LabelApp`` (the candidates, the rankings store, one annotator; every answer
checked before it is kept) and ``make_server`` (a threading HTTP server for the page in this folder: every request
carries the access token, every failure is an answer with a message). ``rlhf label serve`` (``stages/label.py``)
starts it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from rlhf.text import formats
from rlhf.errors import UserError
from rlhf.feedback.labelpage.store import AlreadyAnswered, LabelStore, item_sha

MAX_BODY = 16 * 1024
"""bytes a request body may hold (an answer is a few dozen)"""

PAGE = Path(__file__).resolve().parent
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
    """What the page talks to: the candidates, the store, one annotator; every answer checked before it is kept.

    Without ``overlap`` the annotator goes through every prompt in file order. With ``overlap`` N, each prompt is
    wanted from N annotators: the annotator's queue is the prompts they have not answered that fewer than N have
    ranked or found all unacceptable (a skip is no answer: it leaves the prompt to others), least covered first (ties in an order of this annotator's own, so that annotators working at once start on
    different prompts), and it ends when every prompt has its N answers. With ``suggest`` (a scorer or reward-model
    spec) the page shows its scores and ranking beside the responses, and each answer records what was shown."""

    def __init__(self, candidates: str, out: str, annotator: str, overlap: int | None = None,
                 suggest: str | None = None):
        from rlhf.feedback import scorers

        self.annotator = _check_annotator(annotator)
        if overlap is not None and overlap < 1:
            raise UserError(f"--overlap must be 1 or more, got {overlap}")
        self.overlap = overlap
        self.suggest = suggest
        self.suggester = scorers.load(suggest, "--suggest") if suggest else None
        self._suggestions: dict[int, dict | None] = {}
        self.suggestion_failures = 0
        """prompts the suggester failed on (each shown without a suggestion; counted in every state)"""
        target = Path(out)
        if target.resolve() == Path(candidates).resolve() or (
                target.exists() and Path(candidates).exists() and os.path.samefile(target, candidates)):
            raise UserError(f"--out {out}: that is the candidates file; answers go to a file of their own")
        loaded = formats.load(candidates, "candidates").rows
        self.items = [r["row"] for r in loaded]
        self.prompts = [r["prompt"] for r in loaded]
        self.shas = [item_sha(row) for row in self.items]
        # a row whose responses are all the same text has nothing to rank: never served, counted
        self.rankable = [i for i, r in enumerate(loaded) if len(set(map(formats.response_key, r["responses"]))) >= 2]
        self.tools = [r["tools"] for r in loaded]
        self.unrankable = len(self.items) - len(self.rankable)
        self.store = LabelStore(target)
        self.store.refresh(strict=True)  # an existing --out must be an answers file of the page, line by line
        self.lock = threading.Lock()  # one answer at a time per server (servers share the file through flock)
        self._valid = {(i, self.shas[i]) for i in self.rankable}
        self._generation = None
        # this annotator's order among equally covered prompts: a hash of (annotator, item), fixed across restarts
        self._tie = {i: hashlib.sha256(f"{self.annotator}\0{i}".encode()).hexdigest() for i in self.rankable}

    def _catch_up(self) -> None:
        """Fold the answers appended since the last request into this page's counts: work in proportion to what
        is new, not to what the file holds."""
        self.store.refresh()
        if self._generation != self.store.generation:  # first call, or the file was replaced: count again
            self._generation, self._seen, self._cursor = self.store.generation, 0, 0
            self._mine: set[tuple[int, str]] = set()
            self._everyone: set[tuple[int, str]] = set()
            self._coverage: Counter = Counter()
        for annotator, key, status in self.store.log[self._seen:]:
            if key in self._valid:
                self._everyone.add(key)
                if status != "skipped":  # a skip is no answer: the prompt stays in the others' queues
                    self._coverage[key] += 1  # an annotator answers an item once (LabelStore.append's once_for)
                if annotator == self.annotator:
                    self._mine.add(key)
        self._seen = len(self.store.log)
        while self._cursor < len(self.rankable) and (
                self.rankable[self._cursor], self.shas[self.rankable[self._cursor]]) in self._mine:
            self._cursor += 1  # answers only accumulate, so the first unanswered item never moves back

    def _queue(self) -> tuple[int | None, int]:
        """The prompt to show this annotator next (class docstring; None when their queue is empty) and how many
        their queue holds."""
        if self.overlap is None:
            left = len(self.rankable) - len(self._mine)
            return (self.rankable[self._cursor] if self._cursor < len(self.rankable) else None), left
        waiting = [i for i in self.rankable if (key := (i, self.shas[i])) not in self._mine
                   and self._coverage[key] < self.overlap]
        return min(waiting, key=lambda i: (self._coverage[(i, self.shas[i])], self._tie[i]), default=None), len(waiting)

    def state(self) -> dict:
        with self.lock:
            self._catch_up()
            next_index, left = self._queue()
            answered, answered_all = len(self._mine), len(self._everyone)
            complete = None if self.overlap is None else sum(
                self._coverage[(i, self.shas[i])] >= self.overlap for i in self.rankable)
        item = None if next_index is None else {
            "index": next_index, "sha": self.shas[next_index], "prompt": self.prompts[next_index],
            "responses": self.items[next_index]["responses"]}
        if item is not None and self.suggester is not None and self.suggestion(next_index) is not None:
            item["suggestion"] = self.suggestion(next_index)
        return {"total": len(self.rankable), "answered": answered, "answered_all": answered_all,
                "annotator": self.annotator, "item": item, "left": left, "overlap": self.overlap,
                "complete": complete,
                **({"suggestion_failures": self.suggestion_failures} if self.suggester is not None else {})}

    def suggestion(self, index: int) -> dict | None:
        """The suggester's scores of a prompt's responses and the places they give (0 best; None where it does not
        apply), computed once per prompt. Suggestions are advice: a suggester that fails on a prompt (an error, a
        judge whose question is too long) leaves that prompt without one, says so on the terminal and is counted
        (``suggestion_failures``); the page goes on."""
        from rlhf.feedback import scorers

        if index not in self._suggestions:
            responses = self.items[index]["responses"]
            try:
                scores = scorers.candidate_scores(self.suggester, self.prompts[index], responses, self.tools[index])
                self._suggestions[index] = {"by": self.suggest, "scores": scores,
                                            "ranking": formats.ranks_from_scores(scores)}
            except Exception as e:  # noqa: BLE001 - a suggester's failure must not take the page down
                self._suggestions[index] = None
                self.suggestion_failures += 1
                print(f"label: --suggest {self.suggest} failed on item {index} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); shown without a suggestion", file=sys.stderr,
                      flush=True)
        return self._suggestions[index]

    def answer(self, body: dict) -> dict:
        """Keep one answer (ValueError: refused, nothing written)."""
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        item = body.get("item")
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(self.items):
            raise ValueError(f"unknown item {item!r}")
        if body.get("item_sha") != self.shas[item]:
            raise ValueError(f"item {item} is not the prompt the page showed (the candidates file changed?)")
        if len(set(map(formats.response_key, self.items[item]["responses"]))) < 2:
            raise ValueError(f"item {item} has nothing to rank (one distinct response)")
        suggestion = self.suggestion(item) if self.suggester is not None else None  # what the page showed
        with self.lock:  # the check and the append happen under the file's lock (LabelStore.append)
            self.store.record(self.items[item], item, self.annotator, body.get("status"), body.get("ranking"),
                              suggestion)
        return self.state()


def read_json_body(headers, stream) -> tuple[tuple[int, dict] | None, object]:
    """A request's JSON body, or why it is refused as ``(status, {"error": ...})``. The length is checked before a
    byte of the body is read: a missing, negative or oversized one would otherwise read until the client closes."""
    given = headers.get("Content-Length")
    if given is None:
        return (411, {"error": "a Content-Length is required"}), None
    if not given.strip().isdigit():
        return (400, {"error": f"bad Content-Length {given[:20]!r}"}), None
    length = int(given)
    if length > MAX_BODY:
        return (413, {"error": f"request body over {MAX_BODY} bytes"}), None
    if headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
        return (415, {"error": "expected application/json"}), None
    try:
        return None, json.loads(stream.read(length))
    except (ValueError, RecursionError):  # bad JSON or UTF-8, a number over Python's digit limit, nesting
        return (400, {"error": "the body is not JSON"}), None


class Handler(BaseHTTPRequestHandler):
    """A request to the page: every one must carry the server's access token (``make_server``)."""

    app: LabelApp
    token: str
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
        if hmac.compare_digest(given.encode(), self.token.encode()):
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
            return self._json(200, self.app.state())
        if path not in ASSETS:
            return self._json(404, {"error": f"no such page {path}"})
        name, content_type = ASSETS[path]
        body = (PAGE / name).read_bytes()
        if name == "index.html":  # the assets are fetched with the token too
            for asset in ("app.js", "app.css"):
                body = body.replace(f'"{asset}"'.encode(), f'"{asset}?token={self.token}"'.encode())
        self._send(200, body, content_type)

    def do_POST(self):
        if not self._authorised():
            return
        if urlsplit(self.path).path != "/api/answer":
            return self._json(404, {"error": "no such endpoint"})
        refused, body = read_json_body(self.headers, self.rfile)
        if refused:
            return self._json(*refused)
        try:
            state = self.app.answer(body)
        except AlreadyAnswered as e:
            return self._json(409, {"error": str(e)})
        except ValueError as e:
            return self._json(400, {"error": str(e)})
        print(f"label: saved item {body['item']} ({body['status']}) by {self.app.annotator}: "
              f"{state['answered']}/{state['total']}", file=sys.stderr, flush=True)
        self._json(200, state)


def make_server(app: LabelApp, host: str, port: int, token: str):
    """A threading HTTP server for the page; every request must carry ``token`` (query or X-Label-Token)."""
    handler = type("Handler", (Handler,), {"app": app, "token": token})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
