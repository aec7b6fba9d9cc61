"""A batch of episodes, each phase of a PPO step a new value built whole: what sampling made (``Episodes``), what
the reward made of it (``Scored``), and, in ``rlhf.ppo.ppo_update``, what the update trains on (``Batch``).

No field waits for a later phase to fill it: a phase reads the value before it and returns the next. A field that
does not apply (no reward model, no overlong shaping, no value head in the sampling pass) is None from the start.

Tensors are ``[B, Lq + Lr]`` for the whole sequence (prompts left-padded) and ``[B, Lr]`` per response token
(responses right-padded). A multi-turn episode (``rlhf.engine.agent``) lays the environment's tokens between
sampled ones: ``response_mask`` marks every real response token (what the forward passes read) and ``sampled``
those the policy sampled (what the loss, the KL and the advantages count); for a single response they are the
same. ``logp`` is the sampler's own log-prob of each sampled token (the behaviour policy, mu), which equals the
training forward's only while the two compute the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Episodes:
    """What sampling made (``stages/ppo.py``'s ``roll_out``, from the engine's ``rollout.Samples``)."""

    ids: torch.Tensor
    """prompt and response token ids, ``[B, Lq + Lr]``"""
    mask: torch.Tensor
    """their attention mask"""
    response: torch.Tensor
    """the response tokens, ``[B, Lr]``, pad after the first EOS"""
    response_mask: torch.Tensor
    """1 on each real response token: up to and including its first EOS, or every turn of a multi-turn episode
    with the environment's tokens between them"""
    sampled: torch.Tensor
    """1 on each response token the policy sampled: what the loss, the KL and the advantages count (the
    environment's tokens are 0)"""
    stopped: torch.Tensor
    """``[B]``: whether the policy ended the episode with EOS (not a length or turn limit)"""
    logp: torch.Tensor
    """the sampler's log-prob of each sampled token at the sampling temperature (the behaviour policy's)"""
    entropy: torch.Tensor
    """the sampling distribution's entropy at each response position"""
    sampling_values: torch.Tensor | None
    """a value head's output beside each sampled token when the sampling pass computes it (the shared critic),
    else None"""
    turns: "Turns | None" = None
    """what multi-turn episodes did beyond their tokens; None for single responses"""

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @property
    def length(self) -> int:
        """Lr, the longest response's length (the batch's response width)."""
        return self.response.shape[1]


@dataclass(frozen=True)
class Turns:
    """What multi-turn episodes did (``rlhf.engine.agent``), one entry per episode."""

    answers: list[str]
    """the text of each episode's last assistant turn: what scorers read"""
    instances: list
    """each episode's environment instance, as the episode left it (``get_reward`` reads it)"""
    turns: torch.Tensor
    """``[B]`` assistant turns"""
    calls: torch.Tensor
    """``[B]`` tool calls made (malformed ones included)"""
    failures: dict[str, torch.Tensor]
    """``[B]`` failed calls of each kind (``environments.FAILURES``)"""
    ended: list[str]
    """why each episode ended (``agent.Episode.ended``)"""
    ends: list[list[int]]
    """each episode's turn ends: the offset of each turn's last sampled token in the response"""
    rewards: list[list[float]] | None = None
    """each episode's per-turn rewards (``get_turn_reward``), or None when the environment gives none"""

    def turn_tensors(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, M] turn ends, [B, M] turn rewards)``, M the most turns of any episode: ends past every offset and
        rewards 0 for the turns an episode did not play (``ppo_math.turn_index``, ``turn_returns``)."""
        width = max(1, max(len(e) for e in self.ends))
        ends = torch.full((len(self.ends), width), 1 << 30, dtype=torch.long)
        rewards = torch.zeros(len(self.ends), width)
        for i, row in enumerate(self.ends):
            ends[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            if self.rewards is not None and self.rewards[i]:
                rewards[i, :len(self.rewards[i])] = torch.tensor(self.rewards[i])
        return ends.to(device), rewards.to(device)

    def replaced(self, rows: list[int], new: "Turns") -> "Turns":
        """These episodes with ``rows`` replaced by ``new``'s, in order."""
        lists = {k: list(getattr(self, k)) for k in ("answers", "instances", "ended", "ends")}
        if self.rewards is not None or new.rewards is not None:
            lists["rewards"] = list(self.rewards or [[] for _ in self.ends])
            new_rewards = new.rewards or [[] for _ in new.ends]
        tensors = {"turns": self.turns.clone(), "calls": self.calls.clone()}
        failures = {k: v.clone() for k, v in self.failures.items()}
        for j, row in enumerate(rows):
            for k in lists:
                lists[k][row] = new_rewards[j] if k == "rewards" else getattr(new, k)[j]
            for k in tensors:
                tensors[k][row] = getattr(new, k)[j]
            for k in failures:
                failures[k][row] = new.failures[k][j]
        return Turns(**lists, **tensors, failures=failures)


@dataclass(frozen=True)
class Scored:
    """What the reward made of the episodes (``stages/ppo.py``'s ``score``)."""

    episodes: Episodes
    scores: torch.Tensor | None
    """the reward model's raw score of each episode (None without a reward-model term)"""
    terms: dict[str, torch.Tensor]
    """each scorer term's values (a "does not apply" counted as 0), by scorer name"""
    overlong: torch.Tensor | None
    """DAPO's overlong shaping term (None when ppo.overlong_buffer is 0)"""
    total: torch.Tensor
    """the weighted sum of the terms, before the missing-EOS penalty and clipping"""
    shaped: torch.Tensor
    """the total after the missing-EOS penalty and clipping: the score the advantages start from"""


def replace_rows(old: Scored, rows: torch.Tensor, new: Scored, pad_id: int) -> Scored:
    """``old`` with its ``rows`` replaced by ``new``'s episodes, sampled and scored (dynamic sampling's refills),
    both re-padded to the longer prompt and the longer response: prompts stay left-padded and responses
    right-padded."""
    a, b = old.episodes, new.episodes
    lq = max(x.ids.shape[1] - x.length for x in (a, b))
    lr = max(x.length for x in (a, b))
    whole = {"ids": pad_id, "mask": 0}  # left-padded
    tokens = {"response": pad_id, "response_mask": 0, "sampled": 0, "logp": 0.0, "entropy": 0.0,
              "sampling_values": 0.0}

    def widen(x: Episodes) -> dict:
        q = x.ids.shape[1] - x.length
        out = {k: F.pad(getattr(x, k), (lq - q, lr - x.length), value=v) for k, v in whole.items()}
        out.update({k: F.pad(getattr(x, k), (0, lr - x.length), value=v) for k, v in tokens.items()
                    if getattr(x, k) is not None})
        return {**out, "stopped": x.stopped}

    merged, incoming = widen(a), widen(b)
    for key, value in merged.items():
        value = value.clone()
        value[rows.to(value.device)] = incoming[key]
        merged[key] = value
    if a.turns is not None:
        merged["turns"] = a.turns.replaced(rows.tolist(), b.turns)
    episodes = replace(a, **merged)
    scored = {}
    for f in fields(Scored):
        if f.name in ("episodes", "terms") or getattr(old, f.name) is None:
            continue
        value = getattr(old, f.name).clone()
        value[rows.to(value.device)] = getattr(new, f.name)
        scored[f.name] = value
    terms = {}
    for name, values in old.terms.items():
        terms[name] = values.clone()
        terms[name][rows.to(values.device)] = new.terms[name]
    return replace(old, episodes=episodes, terms=terms, **scored)
