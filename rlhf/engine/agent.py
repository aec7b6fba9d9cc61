"""Multi-turn episodes: the policy answers, calls tools, reads what they return and answers again, token in and
token out.

Each turn samples through the engine (``rollout.decode``) from the episode's ids so far: the prompt, every token the
policy sampled, and the ids the chat template writes for the environment's messages (``environments.
continuation_ids``), appended as ids. Sampled ids are never decoded and encoded again: a turn's text is decoded only
to read its tool calls. Each response token is marked sampled (1: the policy chose it, the loss and the KL count
it) or written by the environment (0). A turn's noise is drawn at the episode's own response positions (``offsets``),
so no two tokens of an episode share a draw, and an episode depends on its key alone, as single-turn sampling does.

An episode ends when a turn calls no tool (its answer), when a turn stops without EOS (cut by the token limit),
after ``Limits.max_turns`` turns, or when the environment's reply would pass ``Limits.max_tokens``. Episodes of one
batch end at different turns; each turn samples only the episodes still going.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from rlhf.engine import environments
from rlhf.engine.environments import Environment, Limits, Parsed
from rlhf.engine.episodes import Episodes, Turns
from rlhf.errors import UserError
from rlhf.text.encoding import encode_prompt, left_pad


@dataclass
class Episode:
    """One multi-turn episode as it grows (``roll_out``)."""

    prompt: list[int]
    instance: object
    """the environment instance it acts on (reward functions may read it afterwards)"""
    response: list[int] = field(default_factory=list)
    """every token after the prompt: sampled ones and the environment's, in order"""
    sampled: list[int] = field(default_factory=list)
    """per response token: 1 sampled by the policy, 0 written by the environment"""
    logp: list[float] = field(default_factory=list)
    """the sampler's log-prob of each sampled token (0 for the environment's)"""
    entropy: list[float] = field(default_factory=list)
    turns: int = 0
    calls: int = 0
    failures: Counter = field(default_factory=Counter)
    """failed tool calls by kind (``environments.FAILURES``)"""
    messages: list[dict] = field(default_factory=list)
    """the episode as chat messages after the prompt (the assistant's text, tool results), for reading"""
    ends: list[int] = field(default_factory=list)
    """each turn's last sampled token, as an offset in ``response``"""
    turn_rewards: list[float] = field(default_factory=list)
    """each turn's reward (``get_turn_reward``; empty when the environment gives none)"""
    ended: str | None = None
    """why it ended: ``answered``, ``max_turns``, ``max_tokens`` or ``cut`` (a turn stopped by the token limit)"""

    @property
    def answer(self) -> str:
        """The text of its last assistant turn (what a scorer reads)."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def record(self) -> dict:
        """What a file keeps of it beside its messages: turns, tool calls, failed calls and why it ended."""
        return {"turns": self.turns, "calls": self.calls, "failed": sum(self.failures.values()), "ended": self.ended}

    @property
    def stopped(self) -> bool:
        """Whether the policy ended the episode itself (an answer with EOS), not a limit."""
        return self.ended == "answered"


@dataclass(frozen=True)
class Play:
    """An environment and the limits its episodes are played under (``rlhf sample --env``, ``rlhf eval``)."""

    env: Environment
    limits: Limits

    @property
    def tools(self) -> list[dict]:
        """The environment's tools as the chat template gets them (``tools=``)."""
        return list(self.env.schemas)


ENDINGS = ("answered", "cut", "max_turns", "max_tokens")
"""why an episode ends (``Episode.ended``)"""

Sampler = Callable[..., object]
"""``sample(query, query_mask, keys=..., offsets=..., max_new_tokens=...)`` -> ``rollout.Samples``: the engine with
the run's temperature, EOS and pad fixed (``PPOModels.sample`` or ``rollout.decode`` bound to a model)"""


def roll_out(sample: Sampler, tokenizer, prompts: list[list[dict]], env: Environment, rows: list[dict],
             keys: torch.Tensor, limits: Limits, max_new_tokens: int,
             parse: Callable[[str], Parsed] | None = None) -> list[Episode]:
    """Run one episode per prompt (chat messages), each on a fresh instance of ``env`` reset with its ``rows``
    entry, the prompt rendered with the environment's tools and the text ``reset`` returned (``prompt_ids``);
    ``keys[i]`` is episode i's sampling key. ``max_new_tokens`` bounds one turn; ``parse`` reads a turn's calls
    (default: the template's own format)."""
    schemas = list(env.schemas)
    fmt = check_template(tokenizer, schemas)
    if parse is None:
        parse = lambda text: environments.parse_calls(text, fmt)  # noqa: E731
    episodes = []
    for messages, row in zip(prompts, rows):
        instance, observation = env.make(row)
        episodes.append(Episode(prompt_ids(tokenizer, messages, observation, schemas), instance))
    going = list(range(len(episodes)))
    while going:
        budget = [limits.max_tokens - len(episodes[i].response) for i in going]
        turn = sample_turn(sample, tokenizer, [episodes[i] for i in going], keys[going],
                           min(max_new_tokens, max(budget)))
        still = []
        for i, (ids, logp, entropy) in zip(going, turn):
            ep = episodes[i]
            room = limits.max_tokens - len(ep.response)
            ids, logp, entropy = ids[:room], logp[:room], entropy[:room]
            going_on = act(ep, ids, logp, entropy, tokenizer, parse, schemas, limits)
            if env.rewards_turns:
                ep.turn_rewards.append(environments.turn_reward(env, ep.instance))
            if going_on:
                still.append(i)
        going = still
    return episodes


def generate(model, tokenizer, prompts: list[list[dict]], env: Environment, limits: Limits, max_new_tokens: int,
             batch_size: int = 32, temperature: float = 0.0, seed: int = 0, indices: list[int] | None = None,
             rows: list[dict] | None = None, progress: bool = False) -> list[Episode]:
    """Whole episodes of ``model`` with ``env``, one per prompt: what ``rollout.generate`` is to single responses
    (``rlhf sample --env``, ``rlhf eval`` with an environment). Greedy when ``temperature`` is 0; episode ``i``
    draws its noise from ``episode_keys(seed, 0, indices[i])``, so it depends on its seed and index alone, not on
    the batch it was played in. ``rows[i]`` resets episode i's environment (default: ``{"prompt": prompts[i]}``);
    ``max_new_tokens`` bounds one turn."""
    from tqdm.auto import tqdm

    from rlhf.engine.rollout import decode, episode_keys

    indices = list(range(len(prompts))) if indices is None else indices
    rows = [{"prompt": m} for m in prompts] if rows is None else rows
    device = getattr(model, "device", None) or torch.device("cpu")

    def sample(query, mask, **kwargs):
        return decode(model, query.to(device), mask.to(device), temperature=temperature,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, vocab=len(tokenizer),
                      **kwargs)

    out = []
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="episodes"):
        at = slice(start, start + batch_size)
        keys = episode_keys(seed, 0, torch.tensor(indices[at]))
        out += roll_out(sample, tokenizer, prompts[at], env, rows[at], keys, limits, max_new_tokens)
    return out


def prompt_ids(tokenizer, messages: list[dict], observation: str | None, schemas: list[dict]) -> list[int]:
    """An episode's prompt as ids: its messages, the text ``reset`` returned added to the last one (as TRL adds
    it), rendered with the tools and the generation prompt."""
    if observation:
        messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + observation}]
    return encode_prompt(tokenizer, messages, tools=schemas)


def to_episodes(episodes: list[Episode], pad_id: int, device) -> Episodes:
    """The batch the PPO step trains on: prompts left-padded, responses right-padded, the sampled tokens marked,
    and what the episodes did (``Turns``: final answers, instances, turns, calls, failures by kind)."""
    query, query_mask = left_pad([ep.prompt for ep in episodes], pad_id)
    width = max(1, max(len(ep.response) for ep in episodes))

    def right(rows, value, dtype):
        out = torch.full((len(rows), width), value, dtype=dtype)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=dtype)
        return out.to(device)

    response = right([ep.response for ep in episodes], pad_id, torch.long)
    response_mask = right([[1] * len(ep.response) for ep in episodes], 0, torch.long)
    turns = Turns(answers=[ep.answer for ep in episodes], instances=[ep.instance for ep in episodes],
                  turns=torch.tensor([ep.turns for ep in episodes]), calls=torch.tensor([ep.calls for ep in episodes]),
                  failures={k: torch.tensor([ep.failures[k] for ep in episodes]) for k in environments.FAILURES},
                  ended=[ep.ended for ep in episodes], ends=[ep.ends for ep in episodes],
                  rewards=[ep.turn_rewards for ep in episodes] if any(ep.turn_rewards for ep in episodes) else None)
    return Episodes(ids=torch.cat([query.to(device), response], 1),
                    mask=torch.cat([query_mask.to(device), response_mask], 1), response=response,
                    response_mask=response_mask, sampled=right([ep.sampled for ep in episodes], 0, torch.long),
                    stopped=torch.tensor([ep.stopped for ep in episodes], device=device),
                    logp=right([ep.logp for ep in episodes], 0.0, torch.float32),
                    entropy=right([ep.entropy for ep in episodes], 0.0, torch.float32), sampling_values=None,
                    turns=turns)


def check_template(tokenizer, schemas: list[dict]) -> str:
    """The tool-call format of the tokenizer's chat template (``environments.call_format``), checked to render
    tools, and to keep earlier turns as they were once later ones follow (Qwen3 drops earlier reasoning, for
    instance: appended ids would then not be what it writes; such a template needs each turn trained as a row of
    its own, which multi-turn episodes do not do yet). Refusals are one line naming the tokenizer."""
    fmt = environments.call_format(tokenizer.chat_template)
    if fmt is None:
        raise UserError(f"{tokenizer.name_or_path}: its chat template writes no tool calls (no <tool_call> or "
                        "Llama 3.1 JSON format), so the policy cannot call an environment's tools; use a template "
                        "that renders tools (docs/agents.md)")
    try:
        environments.continuation_ids(tokenizer, [{"role": "tool", "name": schemas[0]["function"]["name"],
                                                   "content": "0"}], schemas)
    except environments.PrefixBroken as e:
        raise UserError(f"{tokenizer.name_or_path}: {e}; multi-turn episodes append ids and need a template "
                        "that keeps earlier turns as they were") from None
    return fmt


def sample_turn(sample: Sampler, tokenizer, episodes: list[Episode], keys: torch.Tensor, max_new_tokens: int
                ) -> list[tuple[list[int], list[float], list[float]]]:
    """One turn of each episode: its sampled ids up to and including EOS (all of them when cut), their log-probs
    and entropies. The engine reads each episode's ids so far, left-padded."""
    eos = tokenizer.eos_token_id
    query, mask = left_pad([ep.prompt + ep.response for ep in episodes], tokenizer.pad_token_id)
    offsets = torch.tensor([len(ep.response) for ep in episodes])
    out = sample(query, mask, keys=keys, offsets=offsets, max_new_tokens=max_new_tokens)
    turns = []
    for row in range(len(episodes)):
        ids = out.tokens[row].tolist()
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        turns.append((ids[:n], out.logprobs[row, :n].tolist(), out.entropy[row, :n].tolist()))
    return turns


def act(ep: Episode, ids: list[int], logp: list[float], entropy: list[float], tokenizer,
        parse: Callable[[str], Parsed], schemas: list[dict], limits: Limits) -> bool:
    """Add a sampled turn to ``ep`` and answer its tool calls; returns whether the episode goes on."""
    eos = tokenizer.eos_token_id
    ep.response += ids
    ep.sampled += [1] * len(ids)
    ep.logp += logp
    ep.entropy += entropy
    ep.turns += 1
    ep.ends.append(len(ep.response) - 1)
    ended_with_eos = bool(ids) and ids[-1] == eos
    text = tokenizer.decode(ids[:-1] if ended_with_eos else ids, skip_special_tokens=False)
    parsed = parse(text)
    # a turn with a malformed call is kept as written (its calls unparsed), so the episode reads as it was sampled
    ep.messages.append({"role": "assistant", "content": text if parsed.content is None or parsed.errors else
                        parsed.content, **({"tool_calls": [
                            {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                            for c in parsed.calls]} if parsed.calls and not parsed.errors else {})})
    if not ended_with_eos:
        ep.ended = "cut"
        return False
    if not parsed.any:
        ep.ended = "answered"
        return False
    if ep.turns >= limits.max_turns:
        ep.ended = "max_turns"
        return False
    results = [environments.malformed(e) for e in parsed.errors]
    tools = environments.tools_of(ep.instance)
    results += [environments.run_tool(tools, call, limits) for call in parsed.calls]
    ep.calls += len(results)
    ep.failures.update(r.failure for r in results if r.failure)
    written = environments.continuation_ids(tokenizer, [r.message() for r in results], schemas)
    if len(ep.response) + len(written) >= limits.max_tokens:
        ep.ended = "max_tokens"
        return False
    ep.messages += [r.message() for r in results]
    ep.response += written
    ep.sampled += [0] * len(written)
    ep.logp += [0.0] * len(written)
    ep.entropy += [0.0] * len(written)
    return True


def metrics(turns: Turns, prefix: str = "agent") -> dict:
    """Means over a batch's multi-turn episodes: turns, tool calls, each kind of failed call, how they ended, and
    the per-turn rewards where the environment gives them."""
    row = {f"{prefix}/turns": turns.turns.float().mean().item(), f"{prefix}/calls": turns.calls.float().mean().item()}
    row.update({f"{prefix}/tool_{kind}": n.float().mean().item() for kind, n in turns.failures.items()})
    row.update({f"{prefix}/ended_{why}": sum(e == why for e in turns.ended) / len(turns.ended)
                for why in ENDINGS})
    if turns.rewards is not None:  # the environment's per-turn rewards, summed over each episode's turns
        row[f"{prefix}/turn_rewards"] = sum(sum(r) for r in turns.rewards) / len(turns.rewards)
    return row
