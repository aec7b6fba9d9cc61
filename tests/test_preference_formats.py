"""Preference pairs: every style users have, margins, and an error naming file and line for each bad row."""

from __future__ import annotations

import json

import pytest

from rlhf.text import formats
from rlhf.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier (make test-fast)

U = {"role": "user", "content": "What is 2 + 3?"}
C = {"role": "assistant", "content": "The answer is 5."}
R = {"role": "assistant", "content": "maybe 6."}
EXPECTED = {"prompt": [U], "chosen": [C], "rejected": [R]}


def _load(tmp_path, rows, **kw):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return formats.load(str(p), "preference", **kw), p


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "maybe 6."},
    {"prompt": [U], "chosen": [C], "rejected": [R]},
    {"chosen": [U, C], "rejected": [U, R]},
    {"chosen": "\n\nHuman: What is 2 + 3?\n\nAssistant: The answer is 5.",
     "rejected": "\n\nHuman: What is 2 + 3?\n\nAssistant: maybe 6."},
    {"instruction": "What is 2 + 3?", "input": "", "chosen": "The answer is 5.", "rejected": "maybe 6."},
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}],
     "chosen": {"from": "gpt", "value": "The answer is 5."}, "rejected": {"from": "gpt", "value": "maybe 6."}},
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}],
     "chosen": "The answer is 5.", "rejected": "maybe 6."},
], ids=["prompt_strings", "prompt_messages", "implicit_messages", "implicit_hh", "alpaca", "sharegpt",
        "sharegpt_strings"])
def test_each_style_becomes_the_same_pair(tmp_path, row):
    loaded, _ = _load(tmp_path, [row])
    assert loaded.rows == [EXPECTED]


def test_hh_multi_turn_splits_at_the_last_shared_assistant_turn(tmp_path):
    ctx = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: What is 2 + 3?\n\nAssistant:"
    loaded, _ = _load(tmp_path, [{"chosen": ctx + " The answer is 5.", "rejected": ctx + " maybe 6."}])
    (pair,) = loaded.rows
    assert pair["prompt"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, U]
    assert pair["chosen"] == [C] and pair["rejected"] == [R]


def test_margin_is_kept(tmp_path):
    loaded, _ = _load(tmp_path, [{"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "maybe 6.",
                                  "margin": 2}])
    assert loaded.rows[0]["margin"] == 2.0


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}', "chosen and rejected are identical"),
    ('{"prompt": "p", "chosen": "", "rejected": "b"}', "empty response"),
    ('{"prompt": "p", "chosen": "a"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": 1, "rejected": "b"}', "must be a string or a list of messages"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}', "field 'margin' must be a number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": true}', "field 'margin' must be a number"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"', "invalid JSON"),
])
def test_bad_pairs_name_file_and_line(tmp_path, line, message):
    good = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "maybe 6."}
    with pytest.raises(UserError) as e:
        _load(tmp_path, [good, line])
    assert ":2: " in str(e.value) and message in str(e.value) and "pairs.jsonl" in str(e.value)


@pytest.mark.parametrize("row,message", [
    ({"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: a"}, "identical"),
    ({"chosen": "just text", "rejected": "other text"}, "not a dialogue"),
    ({"chosen": [U, C], "rejected": [{"role": "user", "content": "other"}, R]}, "do not share a prompt"),
    ({"chosen": [U, C], "rejected": "\n\nHuman: x\n\nAssistant: a"}, "both be strings or both be message lists"),
])
def test_bad_implicit_prompt_pairs(tmp_path, row, message):
    with pytest.raises(UserError, match=message):
        _load(tmp_path, [row])


def test_drop_mode_counts_bad_pairs(tmp_path):
    good = {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "maybe 6."}
    loaded, _ = _load(tmp_path, [good, {"prompt": "p", "chosen": "x", "rejected": "x"}, good], on_bad_row="drop")
    assert len(loaded.rows) == 2 and loaded.dropped == 1
