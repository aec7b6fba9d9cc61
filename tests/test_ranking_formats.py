"""Rankings of K responses: every format (ours, Open-Assistant / NeMo-RL, Argilla, OpenHermesPreferences through a
column rename, pairs as rankings of two), and an error naming file and line for each bad row."""

from __future__ import annotations

import json

import pytest

from rlhf.text import formats
from rlhf.errors import UserError

pytestmark = pytest.mark.fast

Q = "What is 2 + 3?"
U = {"role": "user", "content": Q}
A, B, C = "The answer is 5.", "maybe 6.", "Let me think. 2 plus 3 makes 5. So the answer is 5."


def msg(text):
    return [{"role": "assistant", "content": text}]


def _load(tmp_path, rows, name="rankings.jsonl", **kw):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return formats.load(str(p), "ranking", **kw), p


# places: A best, C second, B worst
EXPECTED = {"prompt": [U], "responses": [msg(A), msg(C), msg(B)], "ranks": [0, 1, 2]}


@pytest.mark.parametrize("row, fmt", [
    ({"prompt": Q, "responses": [A, C, B]}, "responses"),
    ({"prompt": Q, "responses": [B, A, C], "ranking": [2, 0, 1]}, "responses"),
    ({"prompt": Q, "responses": [B, A, C], "ranks": [3, 1, 2]}, "responses"),
    ({"prompt": [U], "responses": [msg(A), msg(C), msg(B)]}, "responses"),
    ({"prompt": Q, "completions": [{"text": B, "rank": 2}, {"text": A, "rank": 0}, {"text": C, "rank": 1}]},
     "completions"),
    ({"context": [U], "completions": [{"rank": 2, "completion": msg(B)}, {"rank": 0, "completion": msg(A)},
                                      {"rank": 0.5 * 2, "completion": msg(C)}]}, "completions"),
    ({"prompt": Q, "reply-1": B, "reply-2": A, "reply-3": C,
      "ranking": [{"value": "reply-1", "rank": 3}, {"value": "reply-2", "rank": 1}, {"value": "reply-3", "rank": 2}]},
     "argilla"),
    ({"instruction": Q, "preference": [{"user_id": "u1", "status": "discarded", "value": [
        {"value": B, "rank": 1}, {"value": A, "rank": 2}, {"value": C, "rank": 3}]},
        {"user_id": "u2", "status": "submitted", "value": [
            {"value": B, "rank": 3}, {"value": A, "rank": 1}, {"value": C, "rank": 2}]}]}, "argilla"),
], ids=["best_first", "ranking", "ranks_1_based", "messages", "open_assistant", "nemo_rl", "argilla_fields",
        "argilla_responses"])
def test_each_format_becomes_the_same_ranking(tmp_path, row, fmt):
    loaded, _ = _load(tmp_path, [row])
    (got,) = loaded.rows
    order = sorted(range(3), key=lambda i: got["ranks"][i])
    assert [got["responses"][i] for i in order] == EXPECTED["responses"]
    assert got["prompt"] == [U]
    # places keep their order (and gaps): only lower-is-better matters
    assert sorted(got["ranks"]) == sorted(got["ranks"]) and len(set(got["ranks"])) == 3
    assert loaded.formats == [fmt]
    assert not formats.is_pairs(loaded)


def test_openhermes_preferences_through_a_column_rename(tmp_path):
    """OpenHermesPreferences (argilla/OpenHermesPreferences on the hub) ranks three policies' completions with
    PairRM: candidates_completions + ranks."""
    row = {"source": "airoboros2.2", "category": "orca", "prompt": Q, "candidates_completions": [B, A, C],
           "candidate_policies": ["mistral", "teknium", "yi"], "ranks": [2, 0, 1], "rank_str": "teknium > yi > mistral",
           "chosen_policy": "teknium", "chosen": [U, msg(A)[0]], "rejected_policy": "mistral",
           "rejected": [U, msg(B)[0]]}
    loaded, _ = _load(tmp_path, [row], columns={"candidates_completions": "responses"})
    (got,) = loaded.rows
    assert got["responses"] == [msg(B), msg(A), msg(C)] and got["ranks"] == [2, 0, 1]


def test_pairs_are_rankings_of_two_and_keep_their_margin(tmp_path):
    loaded, _ = _load(tmp_path, [{"prompt": Q, "chosen": A, "rejected": B, "margin": 1.5}])
    assert loaded.rows[0] == {"prompt": [U], "responses": [msg(A), msg(B)], "ranks": [0, 1], "margin": 1.5}
    implicit, _ = _load(tmp_path, [{"chosen": [U, msg(A)[0]], "rejected": [U, msg(B)[0]]}])
    assert implicit.rows[0] == {"prompt": [U], "responses": [msg(A), msg(B)], "ranks": [0, 1]}
    assert formats.is_pairs(loaded) and formats.is_pairs(implicit)
    assert formats.ranking_as_pairs(loaded.rows[0]) == [
        {"prompt": [U], "chosen": msg(A), "rejected": msg(B), "margin": 1.5}]


def test_an_empty_response_a_policy_gave_keeps_its_place(tmp_path):
    """rlhf sample can write an empty response (a policy that stopped at once) and rlhf label ranks it: the
    ``responses`` format keeps it, so the reward model learns where it stands (hand-made pairs still refuse one)."""
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": Q, "responses": [A, "", B], "ranking": [0, 2, 1],
                                "policies": ["sft", "base", "ppo"]}) + "\n")
    (row,) = formats.load(str(path), "ranking").rows
    assert [r[-1]["content"] for r in row["responses"]] == [A, "", B] and row["ranks"] == [0, 2, 1]
    assert row["policies"] == ["sft", "base", "ppo"]
    path.write_text(json.dumps({"prompt": Q, "responses": [A, B], "ranking": [0, 1], "run": "runs/x/sft"}) + "\n")
    assert formats.load(str(path), "ranking").rows[0]["policies"] == ["runs/x/sft"] * 2  # one policy: its run


def test_ties_give_no_comparison_and_identical_responses_merge_at_the_better_place(tmp_path):
    loaded, _ = _load(tmp_path, [{"prompt": Q, "responses": [A, B, C, A], "ranking": [1, 2, 1, 0]}])
    (got,) = loaded.rows
    assert got["responses"] == [msg(A), msg(B), msg(C)] and got["ranks"] == [0, 2, 1]
    tied = _load(tmp_path, [{"prompt": Q, "responses": [A, B, C], "ranking": [0, 1, 0]}])[0].rows[0]
    pairs = formats.ranking_as_pairs(tied)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(msg(A), msg(B)), (msg(C), msg(B))]


@pytest.mark.parametrize("row, message", [
    ({"prompt": Q, "responses": [A, B], "ranking": [0, 1, 2]}, "field 'ranking' has 3 places for 2 responses"),
    ({"prompt": Q, "responses": [A, B], "ranking": [0, "first"]}, "ranking[1] must be an integer place"),
    ({"prompt": Q, "responses": [A, B], "ranking": [0, 1.5]}, "ranking[1] must be an integer place"),
    ({"prompt": Q, "responses": [A, B], "ranking": [0, -1]}, "ranking[1] must not be negative"),
    ({"prompt": Q, "responses": [A, B], "ranking": "0 1"}, "field 'ranking' must be a list"),
    ({"prompt": Q, "responses": [A]}, "must hold at least two responses, got 1"),
    ({"prompt": Q, "responses": [A, A, A]}, "fewer than two distinct responses"),
    ({"prompt": Q, "responses": [A, B], "ranking": [1, 1]}, "every response is tied"),
    ({"prompt": Q, "completions": [{"text": A, "rank": 0}, {"text": " ", "rank": 1}]}, "empty response"),
    ({"prompt": Q, "responses": [A, B], "margin": 1.0}, "'margin' is only supported on pairs"),
    ({"responses": [A, B]}, "no prompt field"),
    ({"prompt": Q, "completions": [{"text": A}, {"text": B, "rank": 1}]}, "completions[0] must be an object with"),
    ({"prompt": Q, "completions": [{"rank": 0}, {"text": B, "rank": 1}]}, "completions[0] has no 'text'"),
    ({"prompt": Q, "completions": [{"text": A, "rank": True}, {"text": B, "rank": 1}]}, "completions[0].rank"),
    ({"prompt": Q, "ranking": [{"value": A, "rank": 1}, {"value": B, "rank": 2}], "x": 1,
      "votes": [{"status": "discarded", "value": [{"value": A, "rank": 1}]}]}, None),
    ({"prompt": Q, "answers": [{"status": "discarded", "value": [{"value": A, "rank": 1}, {"value": B, "rank": 2}]}]},
     "field 'answers' has no submitted response"),
    ({"prompt": Q, "stuff": 1}, "cannot tell the format"),
], ids=["length", "not_int", "fraction", "negative", "not_list", "one", "identical", "all_tied", "empty",
        "margin", "no_prompt", "oa_no_rank", "oa_no_text", "oa_bool_rank", "argilla_ok", "argilla_unsubmitted",
        "unknown"])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    # a good row of the same format first (a file's format is told from its first row)
    good = ({"prompt": Q, "completions": [{"text": A, "rank": 0}, {"text": B, "rank": 1}]} if "completions" in row
            else {"prompt": Q, "ranking": [{"value": A, "rank": 1}, {"value": B, "rank": 2}]}
            if formats._argilla_field(row) else {"prompt": Q, "responses": [A, B]})
    if message is None:  # a row that is fine, to show the neighbours are not what fails
        assert len(_load(tmp_path, [good, row])[0].rows) == 2
        return
    with pytest.raises(UserError) as e:
        _load(tmp_path, [good, row] if "cannot tell" not in message else [row])
    line = 1 if "cannot tell" in message else 2
    assert f"rankings.jsonl:{line}: " in str(e.value) and message in str(e.value), str(e.value)


def test_bad_rows_can_be_dropped_and_counted(tmp_path):
    loaded, _ = _load(tmp_path, [{"prompt": Q, "responses": [A, B]}, {"prompt": Q, "responses": [A, A]}],
                      on_bad_row="drop")
    assert len(loaded.rows) == 1 and loaded.dropped == 1


def test_candidates_read_as_rlhf_sample_writes_them(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"prompt": Q, "responses": [A, A], "duplicate_of": [None, 0], "run": "r"}) + "\n"
                 + json.dumps({"prompt": Q, "responses": [A, 3]}) + "\n")
    with pytest.raises(UserError, match=r"c.jsonl:2: responses\[1\] must be a string"):
        formats.load(str(p), "candidates")
