"""The labelling page's storage and server without a browser: durable appends from several processes, answers
checked before anything is written, the access token on every request, bounded bodies, annotator agreement."""

from __future__ import annotations

import json
import multiprocessing
import threading
import urllib.error
import urllib.request

import pytest

from rlhf.text import formats
from rlhf.feedback.labelpage import server as page
from rlhf.feedback.labelpage.store import LabelStore, agreement, check_ranking, item_sha, kendall_tau_b, pair_agreement
from stages import label as stage

pytestmark = pytest.mark.fast

CANDIDATES = [
    {"prompt": f"What is {i} + {i}?", "responses": [f"The answer is {2 * i}.", "maybe 7.", "I do not know."],
     "run": "runs/x/sft", "seed": 0}
    for i in range(4)
]


def write_candidates(tmp_path):
    p = tmp_path / "candidates.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in CANDIDATES))
    return p


def _append_many(path, annotator, n):
    store = LabelStore(path)
    for i in range(n):
        candidate = {"prompt": f"What is {i} + 1?", "responses": [f"The answer is {i + 1}.", "maybe 7."]}
        store.record(candidate, i, annotator, "ranked", [0, 1])


def test_concurrent_appends_from_two_annotators_interleave_whole_lines(tmp_path):
    path = tmp_path / "rankings.jsonl"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_append_many, args=(path, name, 300)) for name in ("alice", "bob")]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 601
    rows = [json.loads(line) for line in lines[:-1]]
    assert sorted(r["label"]["annotator"] for r in rows) == ["alice"] * 300 + ["bob"] * 300


def test_a_line_cut_by_a_crash_is_not_a_row_and_done_is_per_annotator(tmp_path):
    store = LabelStore(tmp_path / "r.jsonl")
    store.record(CANDIDATES[0], 0, "alice", "ranked", [1, 0, 2])
    store.record(CANDIDATES[1], 1, "alice", "skipped", None)
    store.record(CANDIDATES[0], 0, "bob", "unacceptable", None)
    with open(store.path, "ab") as f:
        f.write(b'{"prompt": "cut sh')
    assert len(store.rows()) == 3
    assert store.done_by("alice") == {(0, item_sha(CANDIDATES[0])), (1, item_sha(CANDIDATES[1]))}
    assert store.done_by("bob") == {(0, item_sha(CANDIDATES[0]))}


def test_the_page_output_is_what_the_reward_model_reads(tmp_path):
    store = LabelStore(tmp_path / "r.jsonl")
    store.record(CANDIDATES[0], 0, "alice", "ranked", [1, 0, 2])
    store.record(CANDIDATES[1], 1, "alice", "skipped", None)
    store.record(CANDIDATES[2], 2, "alice", "unacceptable", None)
    store.record(CANDIDATES[3], 3, "alice", "ranked", [0, 1, 1])
    loaded = formats.load(str(store.path), "ranking")
    assert loaded.formats == ["responses"] and loaded.skipped == 2 and len(loaded.rows) == 2
    assert loaded.rows[0]["ranks"] == [1, 0, 2] and loaded.rows[1]["ranks"] == [0, 1, 1]
    assert loaded.summary()["rows_skipped"] == 2


@pytest.mark.parametrize("ranking, message", [
    ([0, 1], "one place for each of the 3"), ([0, 1, 3], "from 0 to 2"), ([0, 1, -1], "from 0 to 2"),
    ([0, True, 2], "whole numbers"), ([1, 1, 1], "same place"), ("0 1 2", "one place for each"),
])
def test_malformed_rankings_are_refused(ranking, message):
    with pytest.raises(ValueError, match=message):
        check_ranking(ranking, 3)


def test_agreement_by_hand():
    # three responses: pairs (0,1), (0,2), (1,2)
    assert pair_agreement([0, 1, 2], [0, 2, 1]) == (2, 3)
    assert kendall_tau_b([0, 1, 2], [0, 1, 2]) == 1.0
    assert kendall_tau_b([0, 1, 2], [2, 1, 0]) == -1.0
    assert kendall_tau_b([0, 1, 2], [0, 2, 1]) == pytest.approx(1 / 3)  # (2 - 1) / 3
    assert kendall_tau_b([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / (2 * 3) ** 0.5)  # ties in a: (2 - 0) / sqrt(2*3)
    assert kendall_tau_b([0, 0, 0], [0, 1, 2]) is None

    def row(item, who, ranking):
        return {"ranking": ranking, "label": {"annotator": who, "status": "ranked", "item": item, "item_sha": "s"}}

    rows = [row(0, "alice", [0, 1, 2]), row(0, "bob", [0, 2, 1]), row(0, "carol", [0, 1, 2]),
            row(1, "alice", [0, 1, 2]), row(1, "bob", [2, 1, 0]),
            row(2, "alice", [1, 0, 2]),  # ranked by one annotator only
            {"ranking": [0, 1, 2], "label": {"annotator": "bob", "status": "skipped", "item": 2, "item_sha": "s"}}]
    got = agreement(rows)
    assert (got["items"], got["items_ranked_by_several"], got["annotators"]) == (3, 2, ["alice", "bob", "carol"])
    # item 0: alice-bob 2/3, alice-carol 3/3, bob-carol 2/3; item 1: alice-bob 0/3
    assert got["overall"]["pairwise_agreement"] == pytest.approx(7 / 12)
    assert got["overall"]["kendall_tau"] == pytest.approx((1 / 3 + 1 + 1 / 3 - 1) / 4)
    assert got["per_annotator"]["alice"]["pairwise_agreement"] == pytest.approx(5 / 9)
    assert got["per_annotator"]["carol"]["pairwise_agreement"] == pytest.approx(5 / 6)
    assert got["per_annotator"]["bob"]["kendall_tau"] == pytest.approx((1 / 3 + 1 / 3 - 1) / 3)


@pytest.fixture
def server(tmp_path):
    app = page.LabelApp(str(write_candidates(tmp_path)), str(tmp_path / "rankings.jsonl"), "alice")
    srv = page.make_server(app, "127.0.0.1", 0, "sekret")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", app, tmp_path / "rankings.jsonl"
    srv.shutdown()
    srv.server_close()


def call(url, body=None, token="sekret", content_type="application/json", raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if data else {})
    if token is not None:
        request.add_header("X-Label-Token", token)
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_request_needs_the_token(server):
    url, _, _ = server
    for path in ("/", "/app.js", "/api/next"):
        assert call(url + path, token=None)[0] == 401
        assert call(url + path, token="wrong")[0] == 401
    assert call(url + "/api/answer", {"item": 0}, token=None)[0] == 401
    status, state = call(url + "/api/next?token=sekret", token=None)  # the URL's query works too
    assert status == 200 and state["item"]["index"] == 0 and state["total"] == 4
    with urllib.request.urlopen(url + "/?token=sekret") as r:
        page = r.read().decode()
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert 'src="app.js?token=sekret"' in page


def test_bad_answers_change_nothing(server):
    url, app, out = server
    sha = app.shas[0]
    for body, code, message in [
        ({"item": 7, "item_sha": sha, "status": "ranked", "ranking": [0, 1, 2]}, 400, "unknown item 7"),
        ({"item": "0", "item_sha": sha, "status": "ranked", "ranking": [0, 1, 2]}, 400, "unknown item"),
        ({"item": 0, "item_sha": "0000", "status": "ranked", "ranking": [0, 1, 2]}, 400, "not the prompt"),
        ({"item": 0, "item_sha": sha, "status": "ranked", "ranking": [0, 1]}, 400, "one place for each"),
        ({"item": 0, "item_sha": sha, "status": "ranked", "ranking": [0, 0, 0]}, 400, "same place"),
        ({"item": 0, "item_sha": sha, "status": "liked"}, 400, "status must be one of"),
        ([1, 2], 400, "expected a JSON object"),
    ]:
        got = call(url + "/api/answer", body)
        assert got[0] == code and message in got[1]["error"], got
    assert call(url + "/api/answer", raw=b"{not json")[1]["error"] == "the body is not JSON"
    assert call(url + "/api/answer", raw=b"x" * (page.MAX_BODY + 1))[0] == 413
    assert call(url + "/api/answer", {"item": 0}, content_type="text/plain")[0] == 415
    assert not out.exists()

    status, state = call(url + "/api/answer", {"item": 0, "item_sha": sha, "status": "ranked",
                                               "ranking": [1, 0, 2]})
    assert status == 200 and state["answered"] == 1 and state["item"]["index"] == 1
    assert call(url + "/api/answer", {"item": 0, "item_sha": sha, "status": "skipped"})[1]["error"] == (
        "item 0 is already answered by alice")
    status, state = call(url + "/api/answer", {"item": 1, "item_sha": app.shas[1], "status": "skipped"})
    assert state["item"]["index"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"]["status"] for r in rows] == ["ranked", "skipped"] and rows[0]["ranking"] == [1, 0, 2]
    assert rows[0]["run"] == "runs/x/sft" and rows[0]["label"]["annotator"] == "alice"


def test_agreement_command(tmp_path):
    from click.testing import CliRunner

    from rlhf.cli import cli

    store = LabelStore(tmp_path / "r.jsonl")
    store.record(CANDIDATES[0], 0, "alice", "ranked", [0, 1, 2])
    store.record(CANDIDATES[0], 0, "bob", "ranked", [0, 2, 1])
    result = CliRunner().invoke(cli, ["label", "agreement", str(store.path)])
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    assert got["overall"]["pairwise_agreement"] == pytest.approx(2 / 3)
    assert got["per_annotator"]["bob"]["kendall_tau"] == pytest.approx(1 / 3)


def test_a_suggestion_is_shown_recorded_and_measured_against(tmp_path):
    """``label serve --suggest SPEC``: each prompt's responses come with the scorer's scores and the ranking they
    give, the answer records what was shown, and agreement reports each annotator against it."""
    (tmp_path / "longest.py").write_text("def score(prompts, responses):\n"
                                         "    return [float(len(r)) for r in responses]\n")
    spec = f"{tmp_path / 'longest.py'}:score"
    app = page.LabelApp(str(write_candidates(tmp_path)), str(tmp_path / "r.jsonl"), "alice", suggest=spec)
    item = app.state()["item"]
    lengths = [float(len(r)) for r in item["responses"]]
    assert item["suggestion"] == {"by": spec, "scores": lengths, "ranking": [0, 2, 1]}  # the answer is longest
    app.answer({"item": item["index"], "item_sha": item["sha"], "status": "ranked", "ranking": [1, 2, 0]})
    item = app.state()["item"]
    app.answer({"item": item["index"], "item_sha": item["sha"], "status": "ranked", "ranking": [0, 1, 2]})
    rows = app.store.rows()
    assert [r["label"]["suggestion"]["ranking"] for r in rows] == [[0, 2, 1], [0, 2, 1]]
    report = agreement(rows)["with_suggestion"]["alice"]
    assert report["comparisons"] == 6 and report["pairwise_agreement"] == pytest.approx(4 / 6)  # 2 of 3 each
    plain = page.LabelApp(str(write_candidates(tmp_path)), str(tmp_path / "plain.jsonl"), "bob")
    assert "suggestion" not in plain.state()["item"]  # off by default: a shown ranking anchors people


def test_overlap_queues(tmp_path):
    """``--overlap N``: a prompt leaves everyone's queue once N annotators answered it; least covered first. A skip
    is no answer: the prompt stays in the others' queues (it was counted as covered, so nobody was shown it)."""
    out, candidates = str(tmp_path / "r.jsonl"), str(write_candidates(tmp_path))
    alice, bob, carol = (page.LabelApp(candidates, out, name, overlap=1) for name in ("alice", "bob", "carol"))
    first = alice.state()["item"]
    alice.answer({"item": first["index"], "item_sha": first["sha"], "status": "ranked", "ranking": [0, 1, 2]})
    seen = set()
    while (item := bob.state()["item"]) is not None:
        bob.answer({"item": item["index"], "item_sha": item["sha"], "status": "skipped"})
        seen.add(item["index"])
    assert seen == {0, 1, 2, 3} - {first["index"]}
    assert bob.state()["left"] == 0 and alice.state()["complete"] == 1  # bob's skips cover nothing
    assert alice.state()["left"] == 3  # what bob skipped is still wanted, from alice too
    answered = set()
    while (item := carol.state()["item"]) is not None:
        carol.answer({"item": item["index"], "item_sha": item["sha"], "status": "unacceptable"})
        answered.add(item["index"])
    assert answered == seen and alice.state()["item"] is None and alice.state()["complete"] == 4


def test_a_suggester_that_fails_on_one_prompt_leaves_it_without_a_suggestion(tmp_path):
    """A suggester that raises on one prompt (a judge whose question is too long, a bug in a scorer file): that
    prompt is shown and answered without a suggestion, the failure is counted, and the page goes on (every
    request was a 500 from then on)."""
    (tmp_path / "picky.py").write_text("def score(prompts, responses):\n"
                                       "    if '1 + 1' in prompts[0][-1]['content']:\n"
                                       "        raise ValueError('too long for the judge')\n"
                                       "    return [float(len(r)) for r in responses]\n")
    app = page.LabelApp(str(write_candidates(tmp_path)), str(tmp_path / "r.jsonl"), "alice",
                        suggest=f"{tmp_path / 'picky.py'}:score")
    shown = []
    while (state := app.state())["item"] is not None:
        item = state["item"]
        shown.append("suggestion" in item)
        app.answer({"item": item["index"], "item_sha": item["sha"], "status": "ranked", "ranking": [0, 1, 2]})
    assert shown == [True, False, True, True] and app.state()["suggestion_failures"] == 1
    rows = app.store.rows()
    assert len(rows) == 4 and "suggestion" not in rows[1]["label"] and "suggestion" in rows[2]["label"]


# ---------------------------------------------------------------------------------------------------------------
# Faults and load: a torn tail, two servers over one file, requests that must not drop the connection
# ---------------------------------------------------------------------------------------------------------------

def test_a_torn_tail_is_set_aside_and_the_next_answer_starts_on_a_fresh_line(server):
    url, app, out = server
    assert call(url + "/api/answer", {"item": 0, "item_sha": app.shas[0], "status": "skipped"})[0] == 200
    with open(out, "ab") as f:  # power lost mid-write: half an answer, no newline
        f.write(b'{"prompt": "What is 1 + 1?", "responses": ["The ans')
    status, state = call(url + "/api/next")
    assert status == 200 and state["answered"] == 1 and state["item"]["index"] == 1
    status, state = call(url + "/api/answer", {"item": 1, "item_sha": app.shas[1], "status": "ranked",
                                               "ranking": [0, 1, 2]})
    assert status == 200 and state["answered"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # every line parses: nothing glued
    assert [r["label"]["item"] for r in rows] == [0, 1]
    assert (out.parent / "rankings.jsonl.torn").read_bytes() == b'{"prompt": "What is 1 + 1?", "responses": ["The ans\n'
    assert call(url + "/api/answer", {"item": 2, "item_sha": app.shas[2], "status": "skipped"})[0] == 200
    assert len(out.read_text().splitlines()) == 3


def _serve_in_a_process(candidates, out, port_queue, go, results):
    app = page.LabelApp(str(candidates), str(out), "alice")
    srv = page.make_server(app, "127.0.0.1", 0, "sekret")
    port_queue.put(srv.server_address[1])
    srv.serve_forever()


def test_the_same_annotator_on_two_servers_answers_each_item_once(tmp_path):
    """Two server processes (their own memory and locks) over one answers file, racing on every item."""
    candidates = tmp_path / "candidates.jsonl"
    rows = [{"prompt": f"What is {i} + 2?", "responses": [f"The answer is {i + 2}.", "maybe 7."]} for i in range(12)]
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    ctx = multiprocessing.get_context("fork")
    ports = ctx.Queue()
    servers = [ctx.Process(target=_serve_in_a_process, args=(candidates, out, ports, None, None), daemon=True)
               for _ in range(2)]
    for s in servers:
        s.start()
    try:
        urls = [f"http://127.0.0.1:{ports.get(timeout=60)}" for _ in servers]
        shas = [item_sha(r) for r in rows]
        codes: list[int] = []
        for i in range(len(rows)):
            barrier = threading.Barrier(2)

            def post(u, i=i, barrier=barrier):
                barrier.wait()
                codes.append(call(u + "/api/answer", {"item": i, "item_sha": shas[i], "status": "ranked",
                                                      "ranking": [0, 1]})[0])

            threads = [threading.Thread(target=post, args=(u,)) for u in urls]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert sorted(codes) == [200] * len(rows) + [409] * len(rows)
        answered = [json.loads(line)["label"]["item"] for line in out.read_text().splitlines()]
        assert sorted(answered) == list(range(len(rows)))
        for u in urls:  # both servers see all of it
            assert call(u + "/api/next")[1] == {"total": 12, "answered": 12, "answered_all": 12,
                                                 "annotator": "alice", "item": None, "left": 0, "overlap": None,
                                                 "complete": None}
    finally:
        for s in servers:
            s.terminate()
            s.join()


def _raw_post(url, headers: dict, body: bytes = b""):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("POST", "/api/answer", skip_accept_encoding=True)
    for k, v in {"X-Label-Token": "sekret", "Content-Type": "application/json", **headers}.items():
        conn.putheader(k, v)
    conn.endheaders()
    if body:
        conn.send(body)
    response = conn.getresponse()  # answered while the connection is still open: nothing waits for the client
    got = response.status, json.loads(response.read())
    conn.close()
    return got


def test_a_missing_negative_or_bad_content_length_is_refused_before_reading(server):
    url, _, out = server
    assert _raw_post(url, {"Content-Length": "-1"}, b"x" * 100_000)[0] == 400
    assert _raw_post(url, {"Content-Length": "12abc"}, b"{}")[0] == 400
    assert _raw_post(url, {"Content-Length": str(10 ** 30)})[0] == 413
    assert _raw_post(url, {})[0] == 411
    assert not out.exists()


def test_bodies_that_break_the_parser_get_a_400_and_failures_a_500_never_a_dropped_connection(server, monkeypatch):
    url, app, out = server
    for raw in (b"[" * 15_000, b"1" * 5_000, b'{"item": ' + b"9" * 5_000 + b"}", b"\xff\xfe{}", b'"\\ud800"'):
        status, got = call(url + "/api/answer", raw=raw)
        assert (status, got["error"]) in ((400, "the body is not JSON"), (400, "expected a JSON object")), raw[:20]
    monkeypatch.setattr(app, "state", lambda: 1 / 0)
    status, got = call(url + "/api/next")
    assert status == 500 and "ZeroDivisionError" in got["error"]
    assert not out.exists()


def test_a_request_reads_only_what_was_appended_since_the_last(server):
    """The store keeps its state in memory: every byte of the answers file is read once, whatever the requests."""
    url, app, out = server
    for i in range(4):
        call(url + "/api/next")
        call(url + "/api/answer", {"item": i, "item_sha": app.shas[i], "status": "skipped"})
        call(url + "/api/next")
    other = LabelStore(out)  # another server appends too
    other.record(CANDIDATES[0], 0, "bob", "skipped", None)
    assert call(url + "/api/next")[1]["answered_all"] == 4
    assert app.store.bytes_read == out.stat().st_size


def test_out_must_be_an_answers_file_and_not_the_candidates(tmp_path):
    candidates = write_candidates(tmp_path)
    with pytest.raises(stage.UserError, match="that is the candidates file"):
        page.LabelApp(str(candidates), str(candidates), "alice")
    with pytest.raises(stage.UserError, match="that is the candidates file"):
        page.LabelApp(str(candidates), str(tmp_path / "." / "candidates.jsonl"), "alice")
    machine = tmp_path / "machine.jsonl"  # a file rlhf label --by wrote: rankings, not answers of the page
    machine.write_text(json.dumps({**CANDIDATES[0], "ranking": [0, 1, 2], "label": {"by": "gold"}}) + "\n")
    with pytest.raises(stage.UserError, match=r"machine.jsonl:1: not an answer of the labelling page"):
        page.LabelApp(str(candidates), str(machine), "alice")
    for label, message in [({"by": "human", "annotator": "a", "item": 0}, r"not an answer of the labelling page \(no label.item_sha\)"),
                           ({"by": "human", "annotator": "a", "item": [0], "item_sha": "s"}, "label.item must be"),
                           ({"by": "human", "item": 0, "item_sha": "s"}, "label.annotator")]:
        edited = tmp_path / "edited.jsonl"
        good = {**CANDIDATES[1], "label": {"by": "human", "annotator": "a", "item": 1, "item_sha": "s"}}
        edited.write_text(json.dumps(good) + "\n" + json.dumps({**CANDIDATES[0], "label": label}) + "\n")
        with pytest.raises(stage.UserError, match=f"edited.jsonl:2: {message}"):
            page.LabelApp(str(candidates), str(edited), "alice")


def test_a_row_with_one_distinct_response_is_never_served(tmp_path):
    candidates = tmp_path / "c.jsonl"
    rows = [{"prompt": "a?", "responses": ["same", "same"]}, {"prompt": "b?", "responses": ["x", "y"]},
            {"prompt": "c?", "responses": ["only one"]}]
    candidates.write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = page.LabelApp(str(candidates), str(tmp_path / "a.jsonl"), "alice")
    assert app.unrankable == 2 and app.state()["total"] == 1 and app.state()["item"]["index"] == 1
    with pytest.raises(ValueError, match="nothing to rank"):
        app.answer({"item": 0, "item_sha": app.shas[0], "status": "skipped"})


@pytest.mark.parametrize("row, message", [
    ({**CANDIDATES[0], "ranking": "0 1 2", "label": {"annotator": "a"}}, "ranking must be a list"),
    ({**CANDIDATES[0], "ranking": [0, 1], "label": {"annotator": "a"}}, "ranking must be a list"),
    ({**CANDIDATES[0], "ranking": [0, 1, 2], "label": {"annotator": "a", "item": [0], "item_sha": "s"}},
     "label.item must be"),
    ({**CANDIDATES[0], "ranking": [0, 1, 2], "label": "alice"}, "label must be an object"),
])
def test_agreement_on_hand_edited_rows_is_one_line(tmp_path, row, message):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(stage.UserError, match=f"r.jsonl:1: {message}"):
        stage.agreement_report(str(path))
