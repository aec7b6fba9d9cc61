"""The labelling page's storage and server without a browser: durable appends from several processes, answers
checked before anything is written, the access token on every request, bounded bodies, annotator agreement."""

from __future__ import annotations

import json
import multiprocessing
import threading
import urllib.error
import urllib.request

import pytest

from rlhf import formats
from rlhf.labelstore import LabelStore, agreement, check_ranking, item_sha, kendall_tau_b, pair_agreement
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
        store.record(CANDIDATES[i % 4], i % 4, annotator, "ranked", [0, 1, 2])


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
    app = stage.LabelApp(str(write_candidates(tmp_path)), str(tmp_path / "rankings.jsonl"), "alice")
    srv = stage.make_server(app, "127.0.0.1", 0, "sekret")
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
    assert call(url + "/api/answer", raw=b"x" * (stage.MAX_BODY + 1))[0] == 413
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
