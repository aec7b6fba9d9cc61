"""Environments: what an agent's episode acts on, with the contract of TRL's GRPO ``environment_factory``, so that
a class written for TRL works here unchanged.

- The class is made with no arguments, once per episode (``Environment.make``).
- ``reset(**row)`` gets the prompt row's fields (only those its signature takes, when it takes no ``**kwargs``) and
  may return text, which is added to the last user turn (TRL appends it to the last message's content).
- Its public methods other than ``reset`` and ``get_reward`` are the tools: each needs type hints and a Google-style
  docstring, from which transformers' ``get_json_schema`` makes the JSON schema the chat template gets as
  ``tools=``. A method that has none is refused when the environment loads, in one line naming it.
- ``get_reward()``, when defined, scores the episode from the environment's state after it ends (TRL adds it as a
  reward of weight 1 named after the class); reward functions can read the instances too.
- ``get_turn_reward()``, this project's addition (TRL has no per-turn reward), when defined, is called after each
  assistant turn, its calls answered, and gives that turn's reward: per-turn rewards, discounted between turns by
  ``ppo.turn_gamma`` (``ppo_math.turn_returns``).

An environment is named the way scorers are: ``FILE.py:NAME``, ``package.module:NAME``, or a built-in
(``tiny:calculator``).

The model calls a tool in its family's own format (``call_format``): Hermes / Qwen2.5's
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the tiny base's template uses it too), or
Llama 3.1's JSON message ``{"name": ..., "parameters": {...}}``. ``parse_calls`` reads them from the decoded text of
the sampled ids (decoding to read a call is fine; the ids themselves are never re-encoded). ``run_tool`` runs one
call under ``Limits``: a malformed call, an unknown tool, arguments the tool does not take, a tool that raises, or
one past its time limit becomes an error message to the model, as in real agent stacks, with its kind counted;
output past ``max_output_chars`` is cut, and what a tool prints goes to a bounded buffer, not the terminal.
``continuation_ids`` is the token-in, token-out step: the ids the chat template writes for the tool results
(through the next generation prompt), appended after the sampled ids without rendering the conversation again.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from rlhf.errors import UserError

BUILTIN = {"tiny:calculator": ("rlhf.tiny.environments", "Calculator")}
"""built-in environments: spec -> (module, class)"""

NOT_TOOLS = ("reset", "get_reward", "get_turn_reward")


@dataclass(frozen=True)
class Limits:
    """What bounds an episode and each tool call."""

    max_turns: int = 4
    """assistant turns per episode (the last is answered with no further tool call run)"""
    max_tokens: int = 256
    """tokens after the prompt per episode, sampled and written by the environment together"""
    timeout_s: float = 5.0
    """seconds a tool call may take; past it the model is told it timed out (the call's thread is abandoned)"""
    max_output_chars: int = 1000
    """characters of a tool's result the model sees; the rest is cut and said to be cut"""

    @classmethod
    def of(cls, ppo) -> "Limits":
        """The limits a recipe's ``ppo`` section sets: a ``PPOConfig``, or its dict in a run's manifest (keys it
        lacks keep their defaults)."""
        get = ppo.get if isinstance(ppo, dict) else lambda key, default: getattr(ppo, key, default)
        return cls(max_turns=get("max_turns", cls.max_turns), max_tokens=get("max_episode_tokens", cls.max_tokens),
                   timeout_s=get("tool_timeout", cls.timeout_s),
                   max_output_chars=get("max_tool_output", cls.max_output_chars))


@dataclass(frozen=True)
class Environment:
    """A loaded environment class (``load``): its tools' JSON schemas, checked once."""

    spec: str
    cls: type
    schemas: tuple[dict, ...]
    """each tool's JSON schema (``get_json_schema``), as the chat template gets them (``tools=``)"""
    owns_reward: bool
    """whether the class defines ``get_reward`` (a reward term of its own)"""
    takes: frozenset[str] | None
    """the row fields ``reset`` takes, or None when it takes ``**kwargs`` (every field)"""
    rewards_turns: bool = False
    """whether the class defines ``get_turn_reward`` (a reward after each turn)"""

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(s["function"]["name"] for s in self.schemas)

    def make(self, row: dict) -> tuple[object, str | None]:
        """A fresh instance for one episode, reset with ``row``'s fields; returns it and the text ``reset`` gave to
        add to the first user turn (None for none)."""
        instance = self.cls()
        fields = row if self.takes is None else {k: v for k, v in row.items() if k in self.takes}
        observation = instance.reset(**fields)
        if observation is not None and not isinstance(observation, str):
            raise UserError(f"{self.spec}: reset() returned a {type(observation).__name__}; it must return a "
                            "string to add to the user turn, or None")
        return instance, observation


def tools_of(instance) -> dict[str, Callable]:
    """The bound tool methods of an environment instance, by name (listed on the class: properties are not run)."""
    return {name: getattr(instance, name) for name, _ in inspect.getmembers(type(instance), inspect.isfunction)
            if not name.startswith("_") and name not in NOT_TOOLS}


def load(spec: str, where: str = "environment") -> Environment:
    """The environment a spec names (module docstring), checked: it can be made with no arguments, has a callable
    ``reset`` and at least one tool, and every tool has the type hints and docstring its schema needs. ``where``
    (a recipe key or an option) starts every error."""
    from transformers.utils import get_json_schema

    from rlhf.feedback.scorers import import_reference

    if spec in BUILTIN:
        module, attr = BUILTIN[spec]
    elif ":" in spec and all(spec.rsplit(":", 1)):
        module, attr = spec.rsplit(":", 1)
    else:
        raise UserError(f"{where}: unknown environment {spec!r} (built-in: {', '.join(BUILTIN)}, or "
                        "path/to/file.py:Class, or package.module:Class)")
    cls = getattr(import_reference(module, where, "environment"), attr, None)
    if cls is None or not inspect.isclass(cls):
        raise UserError(f"{where}: {module} has no class {attr!r} (environment {spec!r})")
    if not callable(getattr(cls, "reset", None)):
        raise UserError(f"{where}: environment {spec!r} has no reset method (TRL's environment contract needs one)")
    try:
        probe = cls()  # the tools are described as the episode calls them: bound, without self
    except Exception as e:  # noqa: BLE001 - the user's class; its error in one line
        raise UserError(f"{where}: making environment {spec!r} ({attr}()) raised {type(e).__name__}: "
                        f"{str(e)[:200]}") from None
    schemas = []
    for name, method in tools_of(probe).items():
        try:
            schemas.append(get_json_schema(method))
        except Exception as e:  # noqa: BLE001 - transformers' own words say what is missing
            raise UserError(f"{where}: tool {attr}.{name} of {spec!r} cannot be described to the model "
                            f"({str(e).splitlines()[0]}); a tool needs type hints and a Google-style docstring "
                            "with an Args section") from None
    if not schemas:
        raise UserError(f"{where}: environment {spec!r} has no tools (public methods other than reset, "
                        "get_reward and get_turn_reward)")
    parameters = inspect.signature(cls.reset).parameters
    takes = None if any(p.kind is p.VAR_KEYWORD for p in parameters.values()) else frozenset(parameters) - {"self"}
    return Environment(spec, cls, tuple(schemas), callable(getattr(cls, "get_reward", None)), takes,
                       callable(getattr(cls, "get_turn_reward", None)))


def turn_reward(env: Environment, instance) -> float:
    """The reward of the turn just played (``get_turn_reward``), checked: a finite number, or one line naming the
    environment."""
    import math

    try:
        value = float(instance.get_turn_reward())
    except Exception as e:  # noqa: BLE001 - the user's method; its error in one line
        raise UserError(f"{env.spec}: get_turn_reward() raised {type(e).__name__}: {str(e)[:200]}") from None
    if not math.isfinite(value):
        raise UserError(f"{env.spec}: get_turn_reward() returned {value}, not a finite number")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Tool calls in the family's own format
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


@dataclass(frozen=True)
class Parsed:
    """What an assistant turn asked for: the calls that parsed, and an error message for each that did not."""

    calls: tuple[ToolCall, ...] = ()
    errors: tuple[str, ...] = ()
    content: str | None = None
    """the turn's text outside its calls (a message's ``content`` beside its ``tool_calls``); None: all of it"""

    @property
    def any(self) -> bool:
        """Whether the turn tried to call a tool (a malformed call too: the model is told what was wrong)."""
        return bool(self.calls or self.errors)


FORMATS = ("hermes", "llama3_json")

_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


def call_format(chat_template: str | None) -> str | None:
    """Which tool-call format a chat template writes: ``hermes`` (``<tool_call>`` tags: Qwen2.5, Hermes, the tiny
    base), ``llama3_json`` (Llama 3.1's JSON message with ``parameters``), or None when it renders no tool calls."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return "hermes"
    if "tool_calls" in template and '"parameters": ' in template:
        return "llama3_json"
    return None


def parse_calls(text: str, fmt: str) -> Parsed:
    """The tool calls in an assistant turn's decoded ``text``, in format ``fmt`` (``FORMATS``)."""
    if fmt == "hermes":
        bodies = [(m.group(1), bool(m.group(2))) for m in _HERMES.finditer(text)]
        return _parsed([_one_call(body, "arguments") if closed else (None, "a <tool_call> was never closed")
                        for body, closed in bodies], _HERMES.sub("", text).strip())
    if fmt == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not (body.startswith("{") and '"name"' in body):
            return Parsed(content=text)
        return _parsed([_one_call(body, "parameters")], "")
    raise ValueError(f"unknown tool-call format {fmt!r}; known: {', '.join(FORMATS)}")


def _parsed(results: list[tuple[ToolCall | None, str | None]], content: str) -> Parsed:
    return Parsed(tuple(c for c, _ in results if c is not None), tuple(e for _, e in results if e is not None),
                  content)


def _one_call(body: str, key: str) -> tuple[ToolCall | None, str | None]:
    """One call's JSON body: ``{"name": ..., key: {...}}`` (``arguments`` may also come as a JSON string)."""
    try:
        data = json.loads(body.strip())
    except (ValueError, RecursionError):
        return None, f"the tool call is not JSON: {body.strip()[:80]!r}"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None, 'the tool call has no "name"'
    arguments = data.get(key, data.get("arguments", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None, f'the arguments of {data["name"]} are not a JSON object'
    if not isinstance(arguments, dict):
        return None, f'the arguments of {data["name"]} are not a JSON object'
    return ToolCall(data["name"], arguments), None


# ---------------------------------------------------------------------------------------------------------------
# Running a call
# ---------------------------------------------------------------------------------------------------------------

FAILURES = ("malformed", "unknown_tool", "bad_arguments", "raised", "timeout")
"""the kinds of failed call the metrics count (``tools/<kind>``)"""


@dataclass(frozen=True)
class Result:
    """A call's result as the ``tool`` message's content, and its failure kind (``FAILURES``) or None."""

    name: str
    content: str
    failure: str | None = None
    truncated: bool = False
    printed_chars: int = 0
    """characters the tool printed (kept from the terminal)"""

    def message(self) -> dict:
        return {"role": "tool", "name": self.name, "content": self.content}


def malformed(error: str) -> Result:
    """The result the model sees for a call that did not parse."""
    return Result("unknown", f"error: {error}", "malformed")


def run_tool(tools: dict[str, Callable], call: ToolCall, limits: Limits) -> Result:
    """Run one call of an episode's ``tools`` (``tools_of``) within ``limits``; never raises for what the model or
    the tool did."""
    tool = tools.get(call.name)
    if tool is None:
        return Result(call.name, f"error: unknown tool {call.name!r} (tools: {', '.join(sorted(tools))})",
                      "unknown_tool")
    try:
        inspect.signature(tool).bind(**call.arguments)
    except TypeError as e:
        return Result(call.name, f"error: {call.name}: {e}", "bad_arguments")
    box: dict = {}
    sink = _Sink(limits.max_output_chars)

    def work():
        _ROUTED.sinks[threading.get_ident()] = sink
        try:
            box["value"] = tool(**call.arguments)
        except BaseException as e:  # noqa: BLE001 - the model is told; SystemExit from a tool ends nothing here
            box["error"] = e
        finally:
            _ROUTED.sinks.pop(threading.get_ident(), None)

    _ROUTED.install()
    thread = threading.Thread(target=work, daemon=True, name=f"tool-{call.name}")
    thread.start()
    thread.join(limits.timeout_s)
    if thread.is_alive():
        return Result(call.name, f"error: {call.name} did not finish within {limits.timeout_s:g} s", "timeout",
                      printed_chars=sink.seen)
    if "error" in box:
        e = box["error"]
        return Result(call.name, f"error: {call.name} raised {type(e).__name__}: {str(e)[:200]}", "raised",
                      printed_chars=sink.seen)
    content = _as_text(box.get("value"))
    cut = len(content) > limits.max_output_chars
    if cut:
        content = content[:limits.max_output_chars] + f"... [cut: {len(content)} characters]"
    return Result(call.name, content, None, cut, sink.seen)


def _as_text(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    return str(value)


class _Sink:
    """Where a tool's prints go: the first ``limit`` characters kept, every one counted."""

    def __init__(self, limit: int):
        self.limit, self.seen, self.kept = limit, 0, []

    def write(self, text: str) -> int:
        if self.seen < self.limit:
            self.kept.append(text[:self.limit - self.seen])
        self.seen += len(text)
        return len(text)


class _Routed:
    """``sys.stdout`` and ``sys.stderr`` as seen by tool threads: a thread running a tool writes to its sink (even
    after its call timed out), every other thread to the real stream. Installed at the first tool call."""

    def __init__(self):
        self.sinks: dict[int, _Sink] = {}
        self.lock = threading.Lock()

    def install(self) -> None:
        with self.lock:
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name)
                if not isinstance(stream, _Stream):
                    setattr(sys, name, _Stream(stream, self))


class _Stream:
    def __init__(self, real, routed: _Routed):
        self.real, self.routed = real, routed

    def write(self, text: str) -> int:
        sink = self.routed.sinks.get(threading.get_ident())
        return sink.write(text) if sink is not None else self.real.write(text)

    def flush(self) -> None:
        if threading.get_ident() not in self.routed.sinks:
            self.real.flush()

    def __getattr__(self, name):
        return getattr(self.real, name)


_ROUTED = _Routed()


# ---------------------------------------------------------------------------------------------------------------
# Token in, token out
# ---------------------------------------------------------------------------------------------------------------

class PrefixBroken(ValueError):
    """The chat template renders a conversation so that an earlier render is not a prefix of a later one (Qwen3
    drops earlier turns' reasoning, for instance): appending ids would not be what the template writes."""


def continuation_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The ids the chat template writes for ``messages`` (tool results, or a user turn) after an assistant turn
    that ended with EOS, through the next generation prompt: rendered after a stand-in conversation whose
    assistant turn made a call to the first message's tool, less that conversation's own render (cut after its
    last EOS, where the sampled ids end). Raises ``PrefixBroken`` where the template does not extend that render."""
    name = messages[0].get("name") or "tool"
    stand_in = [{"role": "user", "content": "x"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]}]
    prefix = _render(tokenizer, stand_in, tools, add_generation_prompt=False)
    full = _render(tokenizer, stand_in + messages, tools, add_generation_prompt=True)
    ends = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if ends:
        prefix = prefix[:ends[-1] + 1]
    if full[:len(prefix)] != prefix:
        raise PrefixBroken("the chat template does not render the conversation so far as a prefix of the "
                           "conversation with the new messages")
    return full[len(prefix):]


def _render(tokenizer, messages: list[dict], tools, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        tokenize=True, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)
