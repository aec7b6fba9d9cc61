"""SFT and prompt data: every format, every source kind, and an error naming file and line for each bad row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rlhf.text import formats
from rlhf.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier (make test-fast)

USER = {"role": "user", "content": "What is 2 + 3?"}
ANSWER = {"role": "assistant", "content": "The answer is 5."}
EXPECTED = {"prompt": [USER], "completion": [ANSWER]}
GOOD_ROWS = {
    "messages": {"messages": [USER, ANSWER]},
    "instruction": {"instruction": "What is 2 + 3?", "output": "The answer is 5."},
    "conversations": {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
    "prompt": {"prompt": "What is 2 + 3?", "completion": "The answer is 5."},
}


def jsonl(tmp_path: Path, rows, name="d.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2 + 3?", "completion": "The answer is 5."},
    {"prompt": [USER], "completion": [ANSWER]},
    {"messages": [USER, ANSWER]},
    {"instruction": "What is 2 + 3?", "input": "", "output": "The answer is 5."},
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}, {"from": "gpt", "value": "The answer is 5."}]},
], ids=["prompt_completion", "pc_messages", "messages", "alpaca", "sharegpt"])
def test_each_sft_format_becomes_the_same_example(tmp_path, row):
    loaded = formats.load(str(jsonl(tmp_path, [row])), "sft")
    assert loaded.rows == [EXPECTED]
    assert loaded.read == 1 and loaded.dropped == 0


def test_alpaca_input_system_and_history():
    row = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "Be brief.",
           "history": [["hi", "hello"]]}
    ex = formats.sft_alpaca(row)
    assert ex["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                            {"role": "assistant", "content": "hello"},
                            {"role": "user", "content": "Translate\n\nchat"}]
    assert ex["completion"] == [{"role": "assistant", "content": "cat"}]


def test_multi_turn_messages_train_on_the_last_reply():
    msgs = [{"role": "system", "content": "s"}, USER, ANSWER, {"role": "user", "content": "And 3 + 4?"},
            {"role": "assistant", "content": "7"}]
    ex = formats.sft_messages({"messages": msgs})
    assert ex["prompt"] == msgs[:-1] and ex["completion"] == [msgs[-1]]


def test_format_can_be_forced_and_columns_renamed(tmp_path):
    p = jsonl(tmp_path, [{"question": "What is 2 + 3?", "answer": "The answer is 5."}])
    loaded = formats.load(str(p), "sft", fmt="prompt_completion", columns={"question": "prompt", "answer": "completion"})
    assert loaded.rows == [EXPECTED]


def test_json_csv_parquet_and_folders(tmp_path):
    row = {"prompt": "What is 2 + 3?", "completion": "The answer is 5."}
    (tmp_path / "a.json").write_text(json.dumps([row, row]))
    with open(tmp_path / "b.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerow(row)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "c.parquet")
    for name, n in (("a.json", 2), ("b.csv", 1), ("c.parquet", 1)):
        assert formats.load(str(tmp_path / name), "sft").rows == [EXPECTED] * n
    folder = formats.load(str(tmp_path), "sft")
    assert len(folder.rows) == 4 and len(folder.files) == 3
    assert all(len(f["sha256"]) == 64 for f in folder.files)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "x", "completion": ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "x"}', "missing field 'completion'"),
    ('{"prompt": "x", "completion": ""}', "empty response"),
    ('{"prompt": "x", "completion": "   "}', "empty response"),
    ('{"prompt": 3, "completion": "y"}', "field 'prompt' must be a string or a list of messages"),
    ('{"prompt": "", "completion": "y"}', "field 'prompt' is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "must end with an assistant message"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "unknown role"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "'role' and 'content'"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}', "empty response"),
    ('{"instruction": "x", "output": ""}', "empty response"),
    ('{"instruction": "x", "output": 5}', "field 'output' must be a string"),
    ('{"instruction": "x", "output": "y", "history": [["a"]]}', "history[0]"),
    ('{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}', "unknown speaker"),
    ('{"conversations": []}', "non-empty list"),
    ('{"text": "x"}', "missing field 'prompt'"),
])
def test_each_bad_row_names_file_and_line(tmp_path, line, message):
    # the first row of a file sets its format: start with a good row of the bad row's format
    good = next((row for key, row in GOOD_ROWS.items() if key in line), GOOD_ROWS["prompt"])
    p = jsonl(tmp_path, [good, line, good])
    with pytest.raises(UserError) as e:
        formats.load(str(p), "sft")
    assert str(e.value).startswith(f"{p}:2: ") and message in str(e.value)


def test_undetectable_format(tmp_path):
    p = jsonl(tmp_path, [{"text": "x"}])
    with pytest.raises(UserError, match=rf"{p}:1: cannot tell the format .*data.sft_format"):
        formats.load(str(p), "sft")


def test_non_utf8_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(UserError, match=rf"{p}:2: not valid UTF-8"):
        formats.load(str(p), "sft")


def test_drop_mode_counts_bad_rows(tmp_path):
    good = {"prompt": "What is 2 + 3?", "completion": "The answer is 5."}
    p = jsonl(tmp_path, [good, "{oops", {"prompt": "x", "completion": ""}, good])
    loaded = formats.load(str(p), "sft", on_bad_row="drop")
    assert len(loaded.rows) == 2 and loaded.dropped == 2 and loaded.read == 4
    assert loaded.summary()["rows_dropped"] == 2 and loaded.drop_examples[0].startswith(f"{p}:2:")


def test_empty_missing_and_all_bad_sources(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        formats.load(str(empty), "sft")
    with pytest.raises(UserError, match="file not found"):
        formats.load(str(tmp_path / "missing.jsonl"), "sft")
    bad = jsonl(tmp_path, ["{x", "{y"], "bad.jsonl")
    with pytest.raises(UserError, match="every row was dropped"):
        formats.load(str(bad), "sft", on_bad_row="drop")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unsupported file type"):
        formats.load(str(tmp_path / "x.txt"), "sft")
    (tmp_path / "j.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError, match=r"j.json:2: invalid JSON"):
        formats.load(str(tmp_path / "j.json"), "sft")


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2 + 3?"},
    {"messages": [USER]},
    {"messages": [USER, ANSWER]},
    {"instruction": "What is 2 + 3?"},
    {"conversations": [{"from": "human", "value": "What is 2 + 3?"}]},
])
def test_prompt_formats(tmp_path, row):
    assert formats.load(str(jsonl(tmp_path, [row])), "prompts").rows == [[USER]]


def test_bad_prompt_row(tmp_path):
    p = jsonl(tmp_path, [{"prompt": "ok"}, {"question": "no"}])
    with pytest.raises(UserError, match=rf"{p}:2: no prompt field"):
        formats.load(str(p), "prompts")


def test_hub_source_goes_through_datasets(monkeypatch):
    import datasets

    seen = {}

    def fake_load_dataset(name, split):
        seen.update(name=name, split=split)
        return [{"instruction": "What is 2 + 3?", "output": "The answer is 5."}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = formats.load("someone/alpaca-like", "sft", split="train[:10]")
    assert seen == {"name": "someone/alpaca-like", "split": "train[:10]"}
    assert loaded.rows == [EXPECTED] and loaded.files[0]["hub"]


@pytest.mark.fast
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_accepted(tmp_path, suffix):
    """Windows tools and spreadsheet exports start UTF-8 files with a BOM; the rows read as without it."""
    rows = [{"prompt": "What is 1 + 1?", "completion": "The answer is 2."},
            {"prompt": "What is 2 + 2?", "completion": "The answer is 4."}]
    text = {".jsonl": "".join(json.dumps(r) + "\n" for r in rows), ".json": json.dumps(rows),
            ".csv": "prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows)}[suffix]
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert formats.load(str(bom), "sft").rows == formats.load(str(plain), "sft").rows
    assert len(formats.load(str(bom), "sft").rows) == 2


@pytest.mark.fast
def test_a_recipe_with_a_byte_order_mark_loads(tmp_path):
    from rlhf.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("sft:\n  lr: 1.0e-4\n", encoding="utf-8-sig")
    assert load_recipe(path).sft.lr == 1e-4


@pytest.mark.fast
def test_nonfinite_numbers_are_found_at_any_depth():
    assert formats.nonfinite_field({"a": 1.0, "b": [1, {"c": float("-inf")}]}) == ("b[1].c", float("-inf"))
    assert formats.nonfinite_field({"margin": 2.5, "ranks": [0, 1]}) is None
    nan = formats.nonfinite_field({"scores": {"helpful": float("nan")}})
    assert nan[0] == "scores.helpful" and nan[1] != nan[1]
