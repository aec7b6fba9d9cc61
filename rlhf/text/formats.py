"""Reading SFT and prompt data in the formats users have, with row-level errors.

Every SFT row becomes one canonical example, ``{"prompt": [messages], "completion": [assistant message]}``: the
conversation up to the last assistant turn is the prompt, that turn is the response the loss is computed on.
Formats (``data.sft_format``, detected from each file's first row when "auto"):

- ``prompt_completion``  ``{prompt, completion}``; each a string or a list of ``{role, content}`` messages
- ``messages``           ``{messages: [{role, content}, ...]}`` ending with an assistant turn
- ``alpaca``             ``{instruction, input, output[, system][, history: [[user, assistant], ...]]}``
- ``sharegpt``           ``{conversations: [{from, value}, ...]}`` (from: system / human / gpt)

Preference rows become ``{"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}``
(plus ``"margin"`` when the row has one). Formats (``data.preference_format``):

- ``prompt_chosen_rejected``  ``{prompt, chosen, rejected}``; each a string or a list of messages
- ``implicit_prompt``         ``{chosen, rejected}`` full dialogues (message lists, or HH-RLHF strings with
                              "\n\nHuman:" / "\n\nAssistant:" turns); the shared prefix is split off as the prompt
- ``alpaca``                  ``{instruction[, input][, system][, history], chosen, rejected}``
- ``sharegpt``                ``{conversations, chosen, rejected}`` (chosen/rejected: strings or {from, value} turns)

An optional numeric ``margin`` field is kept. A pair whose chosen equals its rejected is a bad row.

Rankings (the reward model's K-way data, ``kind="ranking"``) become ``{"prompt": [messages], "responses":
[[assistant message], ...], "ranks": [int, ...]}``: ``ranks[i]`` is the place of ``responses[i]``, lower is better,
equal ranks are a tie (no comparison). Identical responses are kept once, at the better place. Formats:

- ``responses``    ``{prompt, responses: [best, ..., worst]}``, or with ``ranking`` (or ``ranks``): one place per
                   response (0- or 1-based, lower is better, equal = tie), e.g. OpenHermesPreferences with
                   ``data.columns: {candidates_completions: responses}``
- ``completions``  Open-Assistant / NeMo-RL: ``{prompt or context, completions: [{text or completion, rank}]}``
- ``argilla``      Argilla's ranking question: a field holding ``[{value, rank}]`` (``value``: the response, or the
                   name of the row's field that holds it, e.g. ``reply-1``), or Argilla's list of annotator
                   responses ``[{value: [{value, rank}], status}]`` (the first submitted one is used)

Every pair format is a ranking of two. The prompt of a ranking row is read as a prompt file's is (``prompt``,
``messages``, ``instruction``, ``conversations``; or NeMo-RL's ``context``).

Prompt files (PPO rollouts, evaluation) accept ``{prompt}``, ``{messages}`` (a trailing assistant turn is
dropped), alpaca rows (``output`` ignored) and sharegpt rows; each becomes a list of messages ending with a user
turn.

Sources: a .jsonl / .json / .csv / .parquet file, a folder of them, or a hub dataset id (through ``datasets``).
A bad row is a ``UserError`` naming the file and line; with ``on_bad_row="drop"`` it is skipped and counted.
"""

from __future__ import annotations

import csv
import re
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from rlhf.errors import UserError
from rlhf.names import DATA_SUFFIXES, is_local

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """A malformed row; the reader adds the file and line."""


class SkipRow(Exception):
    """A well-formed row that carries no training signal (a ranking the annotator skipped); counted, not kept."""


@dataclass
class Loaded:
    """Rows read from one source, with what the manifest records about it."""

    rows: list[Any]
    files: list[dict] = field(default_factory=list)
    """one entry per file read: path, sha256"""
    read: int = 0
    dropped: int = 0
    skipped: int = 0
    """rows recorded as skipped or 'all unacceptable' by an annotator (rankings): no comparison, no error"""
    formats: list[str] = field(default_factory=list)
    drop_examples: list[str] = field(default_factory=list)
    """the first few drop reasons, with their file and line"""

    def summary(self) -> dict:
        return {"files": self.files, "formats": sorted(set(self.formats)), "rows_read": self.read,
                "rows_kept": len(self.rows), "rows_dropped": self.dropped,
                "rows_skipped": self.skipped, "drop_examples": self.drop_examples}


# ---------------------------------------------------------------------------------------------------------------
# Raw rows from files, folders and the hub
# ---------------------------------------------------------------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark (Windows tools) is fine
            except UnicodeDecodeError as e:
                yield where, RowError(f"not valid UTF-8 (byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, RowError(f"invalid JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                yield where, RowError("JSON nested too deeply to read")


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        yield f"{path}: row {i}", row


def _csv(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), 1):
        yield f"{path}: row {i}", row


READERS: dict[str, Callable[[Path], Iterator[tuple[str, Any]]]] = {
    ".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


def source_files(source: str) -> list[Path]:
    """The data files behind a local source (a file, or every supported file in a folder, sorted)."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
        if not files:
            raise UserError(f"{source}: folder holds no {', '.join(DATA_SUFFIXES)} files")
        return files
    if p.suffix not in DATA_SUFFIXES:
        raise UserError(f"{source}: unsupported file type {p.suffix!r} (expected {', '.join(DATA_SUFFIXES)})")
    return [p]


def _hub_rows(source: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, missing split: the message from datasets says which
        raise UserError(f"{source}: could not load hub dataset split {split!r} ({type(e).__name__}: {e})") from None
    for i, row in enumerate(ds, 1):
        yield f"{source}[{split}] row {i}", row


def nonfinite_field(row: Any) -> tuple[str, float | str] | None:
    """The first field (as a path: ``margin``, ``ranks[2]``, ``scores.helpful``) holding an infinity or NaN, and
    its value; None when every number is finite and every string is text. JSON has neither (Python's reader
    accepts ``Infinity``, ``NaN`` and ``1e999``); a margin, rank or score of either trains a meaningless model. A
    string holding a lone UTF-16 surrogate (JSON's ``"\\ud800"``, which UTF-8 cannot write) is returned with that
    escape as its value. Iterative: any depth."""
    stack: list[tuple[str, Any]] = [("", row)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where, value
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800" escape reads as half a UTF-16 pair: not text
                return where, f"\\u{ord(value[e.start]):04x}"
        if isinstance(value, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
    return None


# ---------------------------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------------------------

def _text(row: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError(f"missing field '{key}'")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def _messages(value: Any, key: str) -> list[dict]:
    """Validate a list of ``{role, content}`` messages."""
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"{key}[{i}] has unknown role {m['role']!r} (expected {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise RowError(f"{key}[{i}].content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _split_last_assistant(messages: list[dict], key: str) -> dict:
    if messages[-1]["role"] != "assistant":
        raise RowError(f"field '{key}' must end with an assistant message (the response to train on)")
    if not messages[-1]["content"].strip():
        raise RowError("empty response")
    if len(messages) < 2:
        raise RowError(f"field '{key}' has a response but no prompt")
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


def _alpaca_prompt(row: dict) -> list[dict]:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", required=False, allow_empty=True)
    messages = []
    system = _text(row, "system", required=False, allow_empty=True)
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("field 'history' must be a list of [user, assistant] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError(f"history[{i}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [{"role": "user", "content": content}]


def _sharegpt_messages(row: dict) -> list[dict]:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise RowError("field 'conversations' must be a non-empty list of {from, value} turns")
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowError(f"conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise RowError(f"conversations[{i}] has unknown speaker {turn['from']!r} "
                           f"(expected {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(turn["value"], str):
            raise RowError(f"conversations[{i}].value must be a string")
        out.append({"role": role, "content": turn["value"]})
    return out


def _as_messages(value: Any, key: str, role: str) -> list[dict]:
    """A string becomes one message of ``role``; a list is validated as messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty response" if role == "assistant" else f"field '{key}' is empty")
        return [{"role": role, "content": value}]
    return _messages(value, key)


# ---------------------------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------------------------

def sft_prompt_completion(row: dict) -> dict:
    for key in ("prompt", "completion"):
        if key not in row or row[key] is None:
            raise RowError(f"missing field '{key}'")
        if not isinstance(row[key], (str, list)):
            raise RowError(f"field '{key}' must be a string or a list of messages, got {type(row[key]).__name__}")
    prompt = _as_messages(row["prompt"], "prompt", "user")
    completion = _as_messages(row["completion"], "completion", "assistant")
    if completion[-1]["role"] != "assistant" or not completion[-1]["content"].strip():
        raise RowError("empty response" if completion[-1]["role"] == "assistant"
                       else "field 'completion' must end with an assistant message")
    return {"prompt": prompt, "completion": completion}


def sft_messages(row: dict) -> dict:
    if "messages" not in row:
        raise RowError("missing field 'messages'")
    if _uses_tools(row, row["messages"]):
        return _tool_conversation(_tool_messages(row["messages"], "messages"), row, "messages")
    return _split_last_assistant(_messages(row["messages"], "messages"), "messages")


def sft_alpaca(row: dict) -> dict:
    output = _text(row, "output", allow_empty=True)
    if not output.strip():
        raise RowError("empty response")
    return {"prompt": _alpaca_prompt(row), "completion": [{"role": "assistant", "content": output}]}


def sft_sharegpt(row: dict) -> dict:
    turns = row.get("conversations")
    if isinstance(turns, list) and ("tools" in row or any(
            isinstance(t, dict) and t.get("from") in SHAREGPT_TOOL_TURNS for t in turns)):
        return _tool_conversation(_sharegpt_tool_messages(turns), row, "conversations")
    return _split_last_assistant(_sharegpt_messages(row), "conversations")


# ---------------------------------------------------------------------------------------------------------------
# Tool-using conversations (SFT): OpenAI-style messages, LLaMA-Factory's ShareGPT
# ---------------------------------------------------------------------------------------------------------------

SHAREGPT_TOOL_TURNS = ("function_call", "observation")
"""LLaMA-Factory's ShareGPT speakers for a tool call (its value a JSON call) and the tool's result"""


def _uses_tools(row: dict, messages: Any) -> bool:
    return "tools" in row or (isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls")) for m in messages))


def _call(value: Any, where: str) -> dict:
    """One tool call as the chat templates read it, ``{"type": "function", "function": {"name", "arguments"}}``,
    from OpenAI's shape (``arguments`` an object or a JSON string) or a bare ``{name, arguments}``."""
    function = value.get("function", value) if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise RowError(f"{where} must be a tool call with a 'name'")
    arguments = function.get("arguments", function.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise RowError(f"{where}.arguments is not JSON") from None
    if not isinstance(arguments, dict):
        raise RowError(f"{where}.arguments must be an object")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _tool_messages(value: Any, key: str) -> list[dict]:
    """Messages of a tool-using conversation: as ``_messages``, and assistant turns may carry ``tool_calls`` (their
    content then empty or null), and ``tool`` turns hold a tool's result (a string, or any JSON value)."""
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{key}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict) or "role" not in m:
            raise RowError(f"{where} must be an object with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if role not in (*ROLES, "tool"):
            raise RowError(f"{where} has unknown role {role!r} (expected {', '.join(ROLES)} or tool)")
        calls = m.get("tool_calls") or []
        if role == "assistant" and calls:
            if not isinstance(calls, list):
                raise RowError(f"{where}.tool_calls must be a list")
            out.append({"role": role, "content": content or "",
                        "tool_calls": [_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]})
            continue
        if role == "tool":
            text = content if isinstance(content, str) else json.dumps(content)
            out.append({"role": "tool", "content": text, **({"name": m["name"]} if isinstance(m.get("name"), str)
                                                              else {})})
            continue
        if not isinstance(content, str):
            raise RowError(f"{where}.content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _sharegpt_tool_messages(turns: list) -> list[dict]:
    """LLaMA-Factory's ShareGPT with tools: a ``function_call`` turn is the assistant's call (its value one JSON
    call or a list of them), an ``observation`` turn the tool's result."""
    out, last_call = [], None
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise RowError(f"{where} must be an object with 'from' and a string 'value'")
        speaker, value = turn["from"], turn["value"]
        if speaker == "function_call":
            try:
                calls = json.loads(value)
            except ValueError:
                raise RowError(f"{where}.value is not a JSON tool call") from None
            calls = [_call(c, where) for c in (calls if isinstance(calls, list) else [calls])]
            last_call = calls[-1]["function"]["name"]
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
        elif speaker == "observation":
            out.append({"role": "tool", "content": value, **({"name": last_call} if last_call else {})})
        elif speaker in SHAREGPT_ROLES:
            out.append({"role": SHAREGPT_ROLES[speaker], "content": value})
        else:
            raise RowError(f"{where} has unknown speaker {speaker!r} (expected "
                           f"{', '.join([*SHAREGPT_ROLES, *SHAREGPT_TOOL_TURNS])})")
    return out


def _row_tools(row: dict) -> list[dict]:
    """A row's ``tools``: a list of JSON schemas, or that list as a JSON string (LLaMA-Factory); each
    ``{"type": "function", "function": {...}}`` or a bare function schema with a ``name``."""
    tools = row.get("tools")
    if tools is None:
        return []
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else []
        except ValueError:
            raise RowError("field 'tools' is not JSON") from None
    if not isinstance(tools, list):
        raise RowError("field 'tools' must be a list of tool schemas")
    out = []
    for i, tool in enumerate(tools):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RowError(f"tools[{i}] must be a tool schema with a 'name'")
        out.append({"type": "function", "function": function})
    return out


def _tool_conversation(messages: list[dict], row: dict, key: str) -> dict:
    """A tool-using conversation as an SFT row: the prompt up to its last user turn, the completion after it (the
    assistant's calls and answers, trained on, and the tools' results between them, not trained on), and the
    tools the template lists."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise RowError(f"field '{key}' has no user turn")
    prompt, completion = messages[:users[-1] + 1], messages[users[-1] + 1:]
    if not completion or completion[-1]["role"] != "assistant":
        raise RowError(f"field '{key}' must end with an assistant message (the response to train on)")
    if not (completion[-1]["content"].strip() or completion[-1].get("tool_calls")):
        raise RowError("empty response")
    return {"prompt": prompt, "completion": completion, "tools": _row_tools(row)}


SFT_FORMATS: dict[str, Callable[[dict], dict]] = {
    "prompt_completion": sft_prompt_completion, "messages": sft_messages,
    "alpaca": sft_alpaca, "sharegpt": sft_sharegpt}


# ---------------------------------------------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_messages(text: str, key: str) -> list[dict]:
    """An HH-RLHF dialogue string ("\n\nHuman: ...\n\nAssistant: ...") as messages."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f"field '{key}' is not a dialogue with Human:/Assistant: turns (and there is no 'prompt')")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2])]


def _response(value: Any, key: str, allow_empty: bool = False) -> list[dict]:
    """A chosen/rejected response: a string, one assistant message, or a list of messages ending with one. An empty
    one is refused (in a hand-made pair it is a mistake), unless ``allow_empty``: in a ranking of sampled responses
    it is what a policy said, and its place teaches the reward model something."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and _uses_tools({}, value):  # an episode with tool calls (rlhf sample --env)
        return _episode(value, key)
    if isinstance(value, list) and value and all(isinstance(t, dict) and "from" in t for t in value):
        value = _sharegpt_messages({"conversations": value})
    if not isinstance(value, (str, list)):
        raise RowError(f"field '{key}' must be a string or a list of messages, got {type(value).__name__}")
    messages = [{"role": "assistant", "content": value}] if allow_empty and isinstance(value, str) and \
        not value.strip() else _as_messages(value, key, "assistant")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"field '{key}' must end with an assistant message")
    if not messages[-1]["content"].strip() and not allow_empty:
        raise RowError(f"empty response in '{key}'")
    return messages


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict], row: dict) -> dict:
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if row.get("margin") is not None:
        margin = row["margin"]
        if isinstance(margin, str):
            try:
                margin = float(margin)
            except ValueError:
                raise RowError(f"field 'margin' must be a number, got {margin!r}") from None
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise RowError(f"field 'margin' must be a number, got {margin!r}")
        if not math.isfinite(margin):
            raise RowError(f"field 'margin' is {margin}, not a finite number")
        pair["margin"] = float(margin)
    return pair


def _need(row: dict, *keys: str) -> None:
    for key in keys:
        if key not in row or row[key] is None:
            raise RowError(f"missing field '{key}'")


def pref_prompt_chosen_rejected(row: dict) -> dict:
    _need(row, "prompt", "chosen", "rejected")
    if not isinstance(row["prompt"], (str, list)):
        raise RowError(f"field 'prompt' must be a string or a list of messages, got {type(row['prompt']).__name__}")
    prompt = _as_messages(row["prompt"], "prompt", "user")
    return _pair(prompt, _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected"), row)


def pref_implicit_prompt(row: dict) -> dict:
    """Full dialogues: the longest shared run of messages ending before an assistant turn is the prompt."""
    _need(row, "chosen", "rejected")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowError("fields 'chosen' and 'rejected' must both be strings or both be message lists")
    if isinstance(chosen, str):
        if chosen == rejected:
            raise RowError("chosen and rejected are identical")
        chosen, rejected = _hh_messages(chosen, "chosen"), _hh_messages(rejected, "rejected")
    else:
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    while shared > 0 and chosen[shared]["role"] != "assistant":
        shared -= 1  # the responses start at an assistant turn
    if shared == 0 or chosen[shared]["role"] != "assistant" or rejected[shared]["role"] != "assistant":
        raise RowError("chosen and rejected do not share a prompt that ends before an assistant turn")
    c, r = chosen[shared:], rejected[shared:]
    for key, msgs in (("chosen", c), ("rejected", r)):
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise RowError(f"empty response in '{key}'")
    return _pair(chosen[:shared], c, r, row)


def pref_alpaca(row: dict) -> dict:
    _need(row, "chosen", "rejected")
    return _pair(_alpaca_prompt(row), _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected"), row)


def pref_sharegpt(row: dict) -> dict:
    _need(row, "chosen", "rejected")
    prompt = _sharegpt_messages(row)
    if prompt[-1]["role"] != "user":
        raise RowError("field 'conversations' must end with a human turn (the prompt)")
    return _pair(prompt, _response(row["chosen"], "chosen"), _response(row["rejected"], "rejected"), row)


PREFERENCE_FORMATS: dict[str, Callable[[dict], dict]] = {
    "prompt_chosen_rejected": pref_prompt_chosen_rejected, "implicit_prompt": pref_implicit_prompt,
    "alpaca": pref_alpaca, "sharegpt": pref_sharegpt}


def detect_preference_format(row: dict) -> str:
    """The preference format a row's fields indicate."""
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row:
        return "prompt_chosen_rejected"
    if "chosen" in row or "rejected" in row:
        return "implicit_prompt"
    raise RowError(f"cannot tell the format from fields {sorted(row)} (expected prompt/chosen/rejected, "
                   "chosen/rejected dialogues, instruction + chosen/rejected or conversations + chosen/rejected; "
                   "set data.preference_format or data.columns)")


def prompt_only(row: dict) -> list[dict]:
    """A prompt row of any supported format as messages ending with a user turn."""
    if "context" in row and "prompt" not in row:  # NeMo-RL's preference rows
        messages = _messages(row["context"], "context")
    elif "prompt" in row:
        messages = _as_messages(row["prompt"], "prompt", "user")
    elif "messages" in row:
        messages = _messages(row["messages"], "messages")
    elif "instruction" in row:
        messages = _alpaca_prompt(row)
    elif "conversations" in row:
        messages = _sharegpt_messages(row)
    else:
        raise RowError("no prompt field (expected 'prompt', 'messages', 'instruction' or 'conversations')")
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise RowError("prompt must end with a user message")
    return messages


# ---------------------------------------------------------------------------------------------------------------
# Rankings of K responses
# ---------------------------------------------------------------------------------------------------------------

MAX_RANK = 10 ** 9
"""the largest place a ranking may give (places only order responses; one rule for the reward model and DPO)"""


def _rank(value: Any, where: str) -> int:
    if isinstance(value, float) and not math.isfinite(value):
        raise RowError(f"{where} is {value}, not a finite number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise RowError(f"{where} must be an integer place (lower is better), got {value!r}")
    if value < 0:
        raise RowError(f"{where} must not be negative, got {value!r}")
    if value > MAX_RANK:
        raise RowError(f"{where} is {value:.3g}: a place must be at most {MAX_RANK:,}")
    return int(value)


def response_key(response: str | list[dict]) -> str:
    """What makes two responses the same: the text, or an episode's messages (``rlhf sample --env``) whole."""
    return response if isinstance(response, str) else json.dumps(response, sort_keys=True)


def answer(response: str | list[dict]) -> str:
    """What scorers read of a response: the text, or an episode's last assistant answer."""
    return response if isinstance(response, str) else response[-1].get("content") or ""


def duplicates(responses: list[str | list[dict]]) -> list[int | None]:
    """For each response (a text or an episode), the index of the first identical one before it, or None (a
    candidates file's ``duplicate_of``: ``rlhf sample`` writes it, ``rlhf label`` shows a copy once)."""
    first: dict[str, int] = {}
    out = []
    for i, response in enumerate(responses):
        key = response_key(response)
        out.append(first.get(key))
        first.setdefault(key, i)
    return out


def ranks_from_scores(scores: list[float | None]) -> list[int | None]:
    """Dense places by descending score: the best is 0 and equal scores share a place (None stays None: a scorer
    that does not apply places nothing)."""
    place = {v: i for i, v in enumerate(sorted({v for v in scores if v is not None}, reverse=True))}
    return [None if v is None else place[v] for v in scores]


def _ranked(prompt: list[dict], responses: list[list[dict]], ranks: list[int], row: dict) -> dict:
    """A ranking row: identical responses merged (the better place kept); at least two distinct responses and one
    comparison."""
    best: dict[str, int] = {}
    kept_responses, kept_ranks, kept = [], [], []
    for i, (response, rank) in enumerate(zip(responses, ranks)):
        key = json.dumps(response, sort_keys=True)
        if key in best:
            kept_ranks[best[key]] = min(kept_ranks[best[key]], rank)
            continue
        best[key] = len(kept_responses)
        kept_responses.append(response)
        kept_ranks.append(rank)
        kept.append(i)
    if len(kept_responses) < 2:
        raise RowError("fewer than two distinct responses to rank")
    if len(set(kept_ranks)) < 2:
        raise RowError(f"every response is tied (ranks {kept_ranks}): the ranking makes no comparison")
    out = {"prompt": prompt, "responses": kept_responses, "ranks": kept_ranks}
    tools = _row_tools(row)
    if tools:  # episodes of an environment: the reward model reads them rendered with its tools
        out["tools"] = tools
    policies = row.get("policies")  # rlhf sample: the run each response came from (several) or the run (one)
    if policies is None and isinstance(row.get("run"), str):
        policies = [row["run"]] * len(responses)
    if isinstance(policies, list) and len(policies) == len(responses) and all(isinstance(p, str) for p in policies):
        out["policies"] = [policies[i] for i in kept]  # a merged copy keeps the first one's policy
    if row.get("margin") is not None:
        raise RowError("field 'margin' is only supported on pairs (chosen/rejected)")
    return out


def rank_responses(row: dict) -> dict:
    label = row.get("label")
    if isinstance(label, dict) and label.get("status") in ("skipped", "unacceptable"):
        raise SkipRow  # the labelling page records these; they rank nothing
    if not isinstance(row.get("responses"), list):
        raise RowError("field 'responses' must be a list of responses")
    responses = [_response(r, f"responses[{i}]", allow_empty=True) for i, r in enumerate(row["responses"])]
    if len(responses) < 2:
        raise RowError(f"field 'responses' must hold at least two responses, got {len(responses)}")
    key = "ranking" if row.get("ranking") is not None else "ranks" if row.get("ranks") is not None else None
    if key == "ranking" and row.get("ranks") is not None and row["ranks"] != row["ranking"]:
        raise RowError("fields 'ranking' and 'ranks' disagree: keep one")
    if key is None:  # best first
        ranks = list(range(len(responses)))
    else:
        if not isinstance(row[key], list):
            raise RowError(f"field '{key}' must be a list with one place per response")
        if len(row[key]) != len(responses):
            raise RowError(f"field '{key}' has {len(row[key])} places for {len(responses)} responses")
        ranks = [_rank(v, f"{key}[{i}]") for i, v in enumerate(row[key])]
    return _ranked(prompt_only(row), responses, ranks, row)


def rank_completions(row: dict) -> dict:
    completions = row.get("completions")
    if not isinstance(completions, list):
        raise RowError("field 'completions' must be a list of {text or completion, rank} objects")
    responses, ranks = [], []
    for i, c in enumerate(completions):
        if not isinstance(c, dict) or "rank" not in c:
            raise RowError(f"completions[{i}] must be an object with 'rank' and 'text' (or 'completion')")
        text_key = next((k for k in ("text", "completion", "content") if k in c), None)
        if text_key is None:
            raise RowError(f"completions[{i}] has no 'text' or 'completion'")
        responses.append(_response(c[text_key], f"completions[{i}].{text_key}"))
        ranks.append(_rank(c["rank"], f"completions[{i}].rank"))
    if len(responses) < 2:
        raise RowError(f"field 'completions' must hold at least two responses, got {len(responses)}")
    return _ranked(prompt_only(row), responses, ranks, row)


def _is_value_ranks(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, dict) and "value" in v and "rank" in v for v in value)


def _argilla_field(row: dict) -> str | None:
    """The field of a row holding an Argilla ranking: ``[{value, rank}]``, or annotator responses around one."""
    for key, value in row.items():
        if _is_value_ranks(value) or (isinstance(value, list) and value and all(
                isinstance(v, dict) and _is_value_ranks(v.get("value")) for v in value)):
            return key
    return None


def rank_argilla(row: dict) -> dict:
    key = _argilla_field(row)
    if key is None:
        raise RowError("no field holds an Argilla ranking ([{value, rank}, ...])")
    items = row[key]
    if not _is_value_ranks(items):  # annotator responses: the first submitted one
        submitted = [r for r in items if r.get("status", "submitted") == "submitted"]
        if not submitted:
            raise RowError(f"field '{key}' has no submitted response")
        items = submitted[0]["value"]
    # a value names the field holding its response (reply-1, reply-2: Argilla's ranking options), at the row's top
    # level or under "fields"; a name that points nowhere must not become the response text
    fields = {**(row["fields"] if isinstance(row.get("fields"), dict) else {}),
              **{k: v for k, v in row.items() if k != key}}
    values = [item["value"] for item in items]
    named = [isinstance(v, str) and isinstance(fields.get(v), str) for v in values]
    if any(named) and not all(named):
        i = named.index(False)
        raise RowError(f"{key}[{i}].value {str(values[i])[:40]!r} names no field of the row, where the others do")
    if not any(named) and all(isinstance(v, str) and v and not any(c.isspace() for c in v) and len(v) <= 64
                              for v in values):
        raise RowError(f"{key}[*].value ({', '.join(repr(v) for v in values[:4])}) name no field of the row: "
                       f"the fields holding the responses are missing")
    responses, ranks = [], []
    for i, item in enumerate(items):
        value = fields[item["value"]] if named[i] else item["value"]
        responses.append(_response(value, f"{key}[{i}].value"))
        ranks.append(_rank(item["rank"], f"{key}[{i}].rank"))
    if len(responses) < 2:
        raise RowError(f"field '{key}' must rank at least two responses, got {len(responses)}")
    return _ranked(prompt_only(row), responses, ranks, row)


def candidates(row: dict) -> dict:
    """A row of ``rlhf sample --num-samples K`` (responses not yet ranked): the prompt as messages, the responses
    (texts, or episodes: lists of messages ending with the assistant's answer, ``rlhf sample --env``), what scorers
    read of them (``texts``), the tools episodes were played with, and the row itself (its provenance is carried
    along)."""
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise RowError("field 'responses' must be a non-empty list of response texts or episodes")
    for i, r in enumerate(responses):
        if isinstance(r, list):
            _episode(r, f"responses[{i}]")
        elif not isinstance(r, str):
            raise RowError(f"responses[{i}] must be a string or an episode (a list of messages), got "
                           f"{type(r).__name__}")
    return {"prompt": prompt_only(row), "responses": responses, "texts": [answer(r) for r in responses],
            "tools": _row_tools(row), "row": row}


def _episode(value: list, key: str) -> list[dict]:
    """An episode (``rlhf sample --env``): tool-using messages after the prompt, ending with the assistant's."""
    messages = _tool_messages(value, key)
    if messages[-1]["role"] != "assistant":
        raise RowError(f"field '{key}' must end with an assistant message")
    return messages


def _pair_as_ranking(parse: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def parse_ranking(row: dict) -> dict:
        pair = parse(row)
        out = {"prompt": pair["prompt"], "responses": [pair["chosen"], pair["rejected"]], "ranks": [0, 1]}
        if "margin" in pair:
            out["margin"] = pair["margin"]
        return out

    return parse_ranking


RANKING_FORMATS: dict[str, Callable[[dict], dict]] = {
    "responses": rank_responses, "completions": rank_completions, "argilla": rank_argilla,
    **{name: _pair_as_ranking(parse) for name, parse in PREFERENCE_FORMATS.items()}}


def detect_ranking_format(row: dict) -> str:
    """The ranking format a row's fields indicate (a pair format is a ranking of two)."""
    if "responses" in row:
        return "responses"
    if "completions" in row:
        return "completions"
    if "chosen" not in row and _argilla_field(row) is not None:
        return "argilla"
    if "chosen" in row or "rejected" in row:
        return detect_preference_format(row)
    raise RowError(f"cannot tell the format from fields {sorted(row)} (expected responses [+ ranking], "
                   "completions: [{text, rank}], an Argilla [{value, rank}] field, or chosen/rejected pairs; set "
                   "data.preference_format or data.columns)")


def is_pairs(loaded: Loaded) -> bool:
    """Whether ranking rows all came from pair formats (rankings of two, optionally with margins)."""
    return not set(loaded.formats) & {"responses", "completions", "argilla"}


def rankings_as_pairs(rows: list[dict]) -> list[dict]:
    """Every comparison of every ranking row as one preference pair (``ranking_as_pairs``)."""
    return [pair for row in rows for pair in ranking_as_pairs(row)]


def load_preferences(source: str, data) -> Loaded:
    """Pairs or rankings (a pair is a ranking of two) from ``source``, read as the recipe's ``data`` section says
    (its preference_format, columns, split and on_bad_row): what the RM and DPO stages train on."""
    return load(source, "ranking", fmt=data.preference_format, columns=data.columns, split=data.split,
                on_bad_row=data.on_bad_row)


def ranking_as_pairs(row: dict) -> list[dict]:
    """Every comparison of a ranking row as a preference pair ``{prompt, chosen, rejected[, margin]}``."""
    from rlhf.feedback.ranking import ranking_pairs

    extra = {"margin": row["margin"]} if "margin" in row else {}
    return [{"prompt": row["prompt"], "chosen": row["responses"][w], "rejected": row["responses"][l], **extra}
            for w, l in ranking_pairs(row["ranks"])]


def detect_sft_format(row: dict) -> str:
    """The SFT format a row's fields indicate."""
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    raise RowError(f"cannot tell the format from fields {sorted(row)} (expected prompt/completion, messages, "
                   "instruction/output or conversations; set data.sft_format or data.columns)")


# ---------------------------------------------------------------------------------------------------------------
# Loading a source
# ---------------------------------------------------------------------------------------------------------------

def _rows(source: str, split: str) -> Iterator[tuple[Path | None, Iterator[tuple[str, Any]]]]:
    if is_local(source):
        if not Path(source).expanduser().exists():
            raise UserError(f"{source}: file not found")
        for path in source_files(source):
            yield path, READERS[path.suffix](path)
    else:
        yield None, _hub_rows(source, split)


KINDS = {
    "sft": (SFT_FORMATS, detect_sft_format),
    "preference": (PREFERENCE_FORMATS, detect_preference_format),
    "ranking": (RANKING_FORMATS, detect_ranking_format),
    "candidates": ({"candidates": candidates}, lambda row: "candidates"),
}


def load(source: str, kind: str, *, fmt: str = "auto", columns: dict[str, str] | None = None,
         split: str = "train", on_bad_row: str = "error") -> Loaded:
    """Read ``source`` as ``kind`` ("sft", "preference", "ranking", "candidates" or "prompts") into canonical
    rows."""
    columns = columns or {}
    out = Loaded(rows=[])
    for path, rows in _rows(source, split):
        if path is not None:
            out.files.append({"path": str(path), "sha256": sha256(path)})
        else:
            out.files.append({"path": source, "split": split, "hub": True})
        file_fmt = None if fmt == "auto" else fmt
        n_before = out.read
        for where, row in rows:
            out.read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                if not isinstance(row, dict):
                    raise RowError(f"expected a JSON object, got {type(row).__name__}")
                bad = nonfinite_field(row)
                if bad is not None:
                    raise RowError(f"field '{bad[0]}' is {bad[1]}, not a finite number" if isinstance(bad[1], float)
                                   else f"field '{bad[0]}' holds a lone surrogate {bad[1]} (half a UTF-16 pair): "
                                   "not text")
                row = {columns.get(k, k): v for k, v in row.items()}
                if kind == "prompts":
                    out.rows.append(prompt_only(row))
                    continue
                parsers, detect = KINDS[kind]
                if file_fmt is None:
                    file_fmt = detect(row)
                    out.formats.append(file_fmt)
                out.rows.append(parsers[file_fmt](row))
            except SkipRow:
                out.skipped += 1
            except RowError as e:
                if on_bad_row != "drop":
                    raise UserError(f"{where}: {e}") from None
                out.dropped += 1
                if len(out.drop_examples) < 5:
                    out.drop_examples.append(f"{where}: {e}")
            except (UserError, SkipRow):
                raise
            except Exception as e:  # whatever a row of user data makes a parser do, the answer names the row
                raise UserError(f"{where}: could not read this row ({type(e).__name__}: {e})") from None
        if out.read == n_before:
            raise UserError(f"{path or source}: no rows")
    if not out.rows and out.skipped and not out.dropped:
        raise UserError(f"{source}: every row ({out.skipped}) was skipped or marked unacceptable by its annotator")
    if not out.rows:
        raise UserError(f"{source}: every row was dropped as malformed ({out.dropped}); "
                        f"first: {out.drop_examples[0] if out.drop_examples else 'none'}")
    return out
