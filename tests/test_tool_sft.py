"""SFT on tool-using conversations, in the two shapes users have: OpenAI-style ``messages`` with assistant
``tool_calls``, ``tool`` results and a ``tools`` column, and LLaMA-Factory's ShareGPT with ``function_call`` and
``observation`` turns and ``tools`` as a JSON string. Both read to the same row; the loss covers the assistant's
turns (calls included) and never a tool's result; SFT trains on them through the CLI on Qwen2.5's own template."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import ran
from families import BY_NAME, QWEN25_TOOLS_TEMPLATE, build, make_tokenizer

pytestmark = pytest.mark.fast

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}]
OPENAI = {"messages": [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "What is 37 + 48?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 37, "b": 48}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "add", "content": "85"},
    {"role": "assistant", "content": "The answer is 85."}], "tools": TOOLS}
LLAMA_FACTORY = {"conversations": [
    {"from": "system", "value": "Use the tools."},
    {"from": "human", "value": "What is 37 + 48?"},
    {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 37, "b": 48}}'},
    {"from": "observation", "value": "85"},
    {"from": "gpt", "value": "The answer is 85."}], "tools": json.dumps(TOOLS)}
PLAIN = {"prompt": "What is 2 + 2?", "completion": "The answer is 4."}
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 37, "b": 48}}}


def _load(tmp_path, rows):
    from rlhf.text import formats

    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return formats.load(str(path), "sft", fmt="auto").rows


def test_both_shapes_read_to_the_same_row(tmp_path):
    rows = _load(tmp_path, [OPENAI]) + _load(tmp_path, [LLAMA_FACTORY])
    expected = {"prompt": [{"role": "system", "content": "Use the tools."},
                           {"role": "user", "content": "What is 37 + 48?"}],
                "completion": [{"role": "assistant", "content": "", "tool_calls": [CALL]},
                               {"role": "tool", "content": "85", "name": "add"},
                               {"role": "assistant", "content": "The answer is 85."}],
                "tools": TOOLS}
    assert rows == [expected, expected]


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0] must be a tool call with a 'name'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "add", "arguments": "{a: 1"}}]}]}, "arguments is not JSON"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]},
     "must end with an assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "[{"},
     "field 'tools' is not JSON"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "add(1, 2)"}]},
     "conversations[1].value is not a JSON tool call"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "tool_output", "value": "1"},
                        {"from": "gpt", "value": "y"}], "tools": "[]"}, "unknown speaker 'tool_output'"),
])
def test_a_bad_tool_row_names_its_field(tmp_path, row, message):
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="sft.jsonl:1: ") as e:
        _load(tmp_path, [row])
    assert message in str(e.value)


def test_the_loss_covers_the_assistants_turns_and_never_a_tools_result(tmp_path):
    """On Qwen2.5's template (no generation markers) and on the tiny base's (with them, where the markers agree):
    the tokens trained on are the call, the answer and their end-of-turn; the prompt and the result are not."""
    from rlhf.config import ModelConfig, load_recipe
    from rlhf.models import modeling
    from stages import sft

    rows = _load(tmp_path, [OPENAI]) + _load(tmp_path, [PLAIN])
    recipe = load_recipe("recipes/tiny.yaml")
    qwen = make_tokenizer(BY_NAME["qwen2"], template=QWEN25_TOOLS_TEMPLATE)
    tiny = modeling.load_tokenizer(ModelConfig(base="data/tiny-base"))
    expected = {qwen: ['<tool_call>\n{"name": "add", "arguments": {"a": 37, "b": 48}}\n</tool_call><|im_end|>\n'
                       'The answer is 85.<|im_end|>\n', "The answer is 4.<|im_end|>\n"],
                tiny: ['<tool_call>{"name": "add", "arguments": {"a": 37, "b": 48}}</tool_call><|end|>'
                       "The answer is 85.<|end|>", "The answer is 4.<|end|>"]}
    for tok, trained in expected.items():
        data = sft.dataset(tok, rows, recipe)
        assert data.column_names == ["input_ids", "completion_mask"]
        for row, want in zip(data, trained):
            assert tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m]) == want
            assert "85\n</tool_response>" not in tok.decode([i for i, m in zip(row["input_ids"],
                                                                               row["completion_mask"]) if m])
    markers = tiny.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"], tools=TOOLS, tokenize=True,
                                       return_dict=True, return_assistant_tokens_mask=True)["assistant_masks"]
    assert sft.dataset(tiny, rows[:1], recipe)[0]["completion_mask"] == markers


def test_sft_trains_on_both_shapes_through_the_cli_on_qwen25s_template(tmp_path):
    base = build(BY_NAME["qwen2"], tmp_path / "qwen", template=QWEN25_TOOLS_TEMPLATE)
    data = tmp_path / "tools"  # a folder: one file a shape
    data.mkdir()
    for name, row in (("openai", OPENAI), ("llama_factory", LLAMA_FACTORY), ("plain", PLAIN)):
        (data / f"{name}.jsonl").write_text((json.dumps(row) + "\n") * 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tools", "run_dir": str(tmp_path / "runs"),
        "model": {"base": str(base), "attn_implementation": "eager"}, "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"sft": str(data)}, "sft": {"max_steps": 2, "batch_size": 4, "max_length": 512, "eval_fraction": 0.25,
                                            "logging_every": 1}}))
    ran("sft", "--recipe", str(recipe))
    m = json.loads((tmp_path / "runs" / "tools" / "sft" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["data"]["train_rows"] == 9 and m["data"]["rows_without_response"] == 0
    assert m["metrics"]["train_loss"] > 0 and m["metrics"]["eval_loss"] > 0
