"""Environments as TRL's ``environment_factory`` defines them: a class written for TRL loads here unchanged, its
tools described by transformers' ``get_json_schema``; tool calls read in the family's own format; every way a call
can fail becomes a message to the model and a counted kind, never a stopped run; and the ids of tool results are
what the chat template writes after the sampled ids (token in, token out)."""

from __future__ import annotations

import sys

import pytest

from families import BY_NAME, QWEN25_TOOLS_TEMPLATE, make_tokenizer

pytestmark = pytest.mark.fast

# written as TRL's docs and its own demo write one: a counter the model increments through a tool
TRL_STYLE = '''
class IncrementEnv:
    def __init__(self):
        self._counter = 0

    def reset(self) -> None:
        self._counter = 0

    def increment(self, a: int) -> int:
        """
        Increment the integer by a specified value

        Args:
            a: The value to increment by

        Returns:
            The incremented integer.
        """
        self._counter += a
        return self._counter

    def get_reward(self) -> float:
        return float(self._counter == 3)


class WithRow:
    def reset(self, prompt, answer=None, **kwargs):
        self.answer = answer
        return f"(the answer has {len(str(answer))} digits)"

    def check(self, guess: str) -> bool:
        """Check a guess.

        Args:
            guess: The guess.
        """
        return guess == str(self.answer)
'''


def _env_file(tmp_path, text: str = TRL_STYLE):
    path = tmp_path / "my_env.py"
    path.write_text(text)
    return path


def test_an_environment_written_for_trl_loads_unchanged(tmp_path):
    """Its public methods but reset and get_reward are the tools, described as get_json_schema describes the bound
    method; reset gets the row's fields it takes (all of them with **kwargs); get_reward makes it own a reward."""
    from transformers.utils import get_json_schema

    from rlhf.engine import environments

    path = _env_file(tmp_path)
    env = environments.load(f"{path}:IncrementEnv", "ppo.environment")
    assert env.tool_names == ("increment",) and env.owns_reward and env.takes == frozenset()
    instance, observation = env.make({"prompt": [{"role": "user", "content": "Increment by three."}], "n": 3})
    assert observation is None and env.schemas[0] == get_json_schema(instance.increment)
    assert env.schemas[0]["function"]["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "The value to increment by"}}
    tools = environments.tools_of(instance)
    assert environments.run_tool(tools, environments.ToolCall("increment", {"a": 3}), environments.Limits()).content \
        == "3" and instance.get_reward() == 1.0
    other, _ = env.make({})
    assert other is not instance and other._counter == 0  # one instance per episode

    with_row = environments.load(f"{path}:WithRow")
    assert with_row.takes is None and not with_row.owns_reward
    instance, observation = with_row.make({"prompt": [], "answer": 85, "kind": "add"})
    assert observation == "(the answer has 2 digits)" and instance.answer == 85


def test_the_built_in_calculator():
    from rlhf.engine import environments

    env = environments.load("tiny:calculator")
    assert env.tool_names == ("add", "subtract")
    instance, _ = env.make({"prompt": []})
    tools, limits = environments.tools_of(instance), environments.Limits()
    call = environments.ToolCall
    assert environments.run_tool(tools, call("add", {"a": 37, "b": 48}), limits).content == "85"
    assert environments.run_tool(tools, call("subtract", {"a": "12", "b": 30}), limits).content == "-18"
    for bad in ("1e5", True, "__import__('os')", 10**40, [1], 2.5):  # parsed, never evaluated
        result = environments.run_tool(tools, call("add", {"a": bad, "b": 1}), limits)
        assert result.failure == "raised" and "must be a whole number" in result.content
    assert instance.calls == 8


@pytest.mark.parametrize("text, message", [
    ("import nowhere_at_all\n", "raised ModuleNotFoundError: No module named 'nowhere_at_all'"),
    ("def broken(:\n", "importing environment file"),
    ("class Env:\n    def reset(self): pass\n", "has no tools"),
    ("class Env:\n    def reset(self): pass\n    def add(self, a, b):\n        '''Add.'''\n        return a + b\n",
     "tool Env.add of"),
    ("class Env:\n    def add(self, a: int) -> int:\n        '''Add.\n\n        Args:\n            a: A.\n        '''\n"
     "        return a\n", "has no reset method"),
    ("class Env:\n    def __init__(self, required): pass\n    def reset(self): pass\n", "raised TypeError"),
    ("Env = 3\n", "has no class 'Env'"),
])
def test_a_bad_environment_is_one_line_naming_it(tmp_path, text, message):
    from rlhf.engine import environments
    from rlhf.errors import UserError

    path = _env_file(tmp_path, text)
    with pytest.raises(UserError) as e:
        environments.load(f"{path}:Env", "ppo.environment")
    assert message in str(e.value) and str(e.value).startswith("ppo.environment: ") and "\n" not in str(e.value)
    with pytest.raises(UserError, match="unknown environment 'calculator'"):
        environments.load("calculator", "--env")


@pytest.mark.parametrize("text, names, errors", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', ["add"], 0),
    ('Let me add.\n<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>\n'
     '<tool_call>{"name": "subtract", "arguments": "{\\"a\\": 5, \\"b\\": 1}"}</tool_call>', ["add", "subtract"], 0),
    ("The answer is 85.", [], 0),
    ("<tool_call>{'name': 'add'}</tool_call>", [], 1),                # not JSON
    ('<tool_call>{"arguments": {}}</tool_call>', [], 1),              # no name
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', [], 1),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}', [], 1),     # never closed (cut at max tokens)
])
def test_hermes_tool_calls(text, names, errors):
    from rlhf.engine import environments

    parsed = environments.parse_calls(text, "hermes")
    assert [c.name for c in parsed.calls] == names and len(parsed.errors) == errors
    assert parsed.any == bool(names or errors)
    if len(names) == 2:
        assert parsed.calls[1].arguments == {"a": 5, "b": 1}  # arguments given as a JSON string


def test_llama3_json_tool_calls():
    from rlhf.engine import environments

    parsed = environments.parse_calls('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "llama3_json")
    assert parsed.calls == (environments.ToolCall("add", {"a": 1, "b": 2}),)
    assert not environments.parse_calls("The answer is 3.", "llama3_json").any
    assert environments.parse_calls('{"name": "add", "parameters": {', "llama3_json").errors


def test_which_format_a_template_writes():
    from rlhf.engine import environments

    assert environments.call_format(QWEN25_TOOLS_TEMPLATE) == "hermes"
    assert environments.call_format(BY_NAME["llama3"].template) is None  # the test family's template has no tools
    assert environments.call_format(None) is None


class Tools:
    def ok(self, n: int) -> str:
        """Echo.

        Args:
            n: How many characters.
        """
        return "x" * n

    def slow(self) -> int:
        """Sleep past the limit."""
        import time

        time.sleep(2)
        return 1

    def noisy(self) -> int:
        """Print megabytes."""
        for _ in range(200):
            print("y" * 10_000)
        print("z" * 10, file=sys.stderr)
        return 7

    def fails(self) -> int:
        """Raise."""
        raise RuntimeError("the disk is on fire")


def test_every_way_a_call_can_fail_is_a_message_and_a_kind(capfd):
    """The run goes on: the model reads what went wrong; the kind is counted; what a tool prints never reaches the
    terminal, however much; a result past max_output_chars is cut and says so."""
    from rlhf.engine import environments
    from rlhf.engine.environments import ToolCall, run_tool

    tools = environments.tools_of(Tools())
    limits = environments.Limits(timeout_s=0.2, max_output_chars=50)
    assert run_tool(tools, ToolCall("ok", {"n": 3}), limits) == environments.Result("ok", "xxx")
    cut = run_tool(tools, ToolCall("ok", {"n": 80}), limits)
    assert cut.truncated and cut.content == "x" * 50 + "... [cut: 80 characters]" and cut.failure is None
    unknown = run_tool(tools, ToolCall("delete_everything", {}), limits)
    assert unknown.failure == "unknown_tool" and "tools: fails, noisy, ok, slow" in unknown.content
    assert run_tool(tools, ToolCall("ok", {"m": 1}), limits).failure == "bad_arguments"
    raised = run_tool(tools, ToolCall("fails", {}), limits)
    assert raised.failure == "raised" and raised.content == "error: fails raised RuntimeError: the disk is on fire"
    timed = run_tool(tools, ToolCall("slow", {}), limits)
    assert timed.failure == "timeout" and "did not finish within 0.2 s" in timed.content
    noisy = run_tool(tools, ToolCall("noisy", {}), environments.Limits(timeout_s=5))
    assert noisy.content == "7" and noisy.printed_chars == 200 * 10_001 + 11
    print("the main thread still prints")
    out, err = capfd.readouterr()
    assert "y" * 100 not in out and "zzz" not in err and "the main thread still prints" in out
    assert environments.malformed("the tool call is not JSON").failure == "malformed"


def _qwen25():
    return make_tokenizer(BY_NAME["qwen2"], template=QWEN25_TOOLS_TEMPLATE)


def test_tool_results_are_the_ids_the_template_writes_after_the_sampled_ids():
    """Token in, token out: the conversation's ids up to the assistant's EOS (as sampled), then the continuation's
    ids, are the template's own render of the whole conversation, tool results and generation prompt included."""
    from rlhf.engine import environments

    tok = _qwen25()
    schemas = list(environments.load("tiny:calculator").schemas)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 37, "b": 48}}}
    so_far = [{"role": "user", "content": "What is 37 + 48?"},
              {"role": "assistant", "content": "", "tool_calls": [call]}]
    results = [{"role": "tool", "name": "add", "content": "85"}, {"role": "tool", "name": "add", "content": "85"}]
    before = tok.apply_chat_template(so_far, tools=schemas, tokenize=True, return_dict=False)
    sampled = before[:len(before) - before[::-1].index(tok.eos_token_id)]  # the sampled turn stops at its EOS
    whole = tok.apply_chat_template(so_far + results, tools=schemas, add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    assert sampled + environments.continuation_ids(tok, results, schemas) == whole
    text = tok.decode(environments.continuation_ids(tok, results, schemas))
    assert text == "\n<|im_start|>user\n<tool_response>\n85\n</tool_response>\n<tool_response>\n85\n" \
                   "</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_earlier_turns_is_said_to_break_the_prefix():
    from rlhf.engine import environments

    rewrites = ("{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                "(earlier)<|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
                "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    tok = make_tokenizer(BY_NAME["qwen2"], template=rewrites)
    with pytest.raises(environments.PrefixBroken):
        environments.continuation_ids(tok, [{"role": "tool", "name": "add", "content": "3"}])


def test_the_tiny_base_speaks_the_hermes_format():
    """The tiny base's template lists tools, writes calls as <tool_call> JSON inside the assistant's generation
    markers (trained on) and tool results as a user turn (never trained on); token in, token out holds on it; and a
    conversation without tools renders as it did before tools existed."""
    from rlhf.config import ModelConfig
    from rlhf.engine import environments
    from rlhf.models import modeling

    tok = modeling.load_tokenizer(ModelConfig(base="data/tiny-base"))
    assert environments.call_format(tok.chat_template) == "hermes"
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
             {"role": "assistant", "content": "The answer is 5."}]
    assert tok.apply_chat_template(plain, tokenize=False) == \
        "<|system|>Be brief.<|end|><|user|>What is 2 + 3?<|end|><|assistant|>The answer is 5.<|end|>"
    schemas = list(environments.load("tiny:calculator").schemas)
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 37, "b": 48}}}
    conv = [{"role": "user", "content": "What is 37 + 48?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "add", "content": "85"}, {"role": "assistant", "content": "The answer is 85."}]
    out = tok.apply_chat_template(conv, tools=schemas, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert tok.decode(out["input_ids"]).startswith("<|system|>Tools:\nadd(a, b)\nsubtract(a, b)\nCall one as")
    trained = tok.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert trained == '<tool_call>{"name": "add", "arguments": {"a": 37, "b": 48}}</tool_call><|end|>' \
                      "The answer is 85.<|end|>"
    parsed = environments.parse_calls(trained.split("<|end|>")[0], "hermes")
    assert parsed.calls == (environments.ToolCall("add", {"a": 37, "b": 48}),)
    before = tok.apply_chat_template(conv[:2], tools=schemas, tokenize=True, return_dict=False)
    after = tok.apply_chat_template(conv[:3], tools=schemas, add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
    assert before + environments.continuation_ids(tok, conv[2:3], schemas) == after
