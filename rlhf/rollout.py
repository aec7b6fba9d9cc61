"""Batched generation of responses to chat prompts (for evaluation now, PPO rollouts later)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generations:
    texts: list[str]
    """the decoded responses, cut at the first EOS, special tokens removed"""
    stopped: list[bool]
    """whether each response ended with EOS (rather than running into max_new_tokens)"""
    lengths: list[int]
    """response lengths in tokens, the EOS included"""
    token_ids: list[list[int]]
    """the generated tokens of each response, up to and including the first EOS"""


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one left-padded batch ``(ids, attention_mask)``: every sequence ends at the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Chat-template each prompt (a list of messages) with the generation prompt appended."""
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 32,
             temperature: float = 0.0, progress: bool = False) -> Generations:
    """Responses to ``prompts``: greedy when ``temperature`` is 0, else sampled at that temperature."""
    from tqdm.auto import tqdm

    texts, stopped, lengths, token_ids = [], [], [], []
    eos = tokenizer.eos_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts are aligned on the right
    try:
        rendered = render_prompts(tokenizer, prompts)
        for start in tqdm(range(0, len(rendered), batch_size), disable=not progress, desc="generate"):
            batch = tokenizer(rendered[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
            kwargs = {"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature,
                                                                   "top_k": 0, "top_p": 1.0}
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=eos, **kwargs)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                n = row.index(eos) + 1 if eos in row else len(row)
                stopped.append(eos in row)
                lengths.append(n)
                token_ids.append(row[:n])
                texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return Generations(texts, stopped, lengths, token_ids)


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[list[dict]], responses: list[list[int]],
                      batch_size: int = 32) -> list[torch.Tensor]:
    """Log-probabilities of each response's tokens under ``model`` (temperature 1), one tensor per response."""
    from rlhf.modeling import position_ids
    from rlhf.ppo_math import logprobs_from_logits

    rendered = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(tokenizer, prompts)]
    out = []
    for start in range(0, len(rendered), batch_size):
        seqs = [q + r for q, r in zip(rendered[start:start + batch_size], responses[start:start + batch_size])]
        ids, mask = left_pad(seqs, tokenizer.pad_token_id)  # every response ends at the last column
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:])
        for i, r in enumerate(responses[start:start + batch_size]):
            out.append(logp[i, logp.shape[1] - len(r):].cpu() if r else torch.zeros(0))
    return out


def with_responses(prompts: list[list[dict]], responses: list[str]) -> list[list[dict]]:
    """Each prompt followed by its response as an assistant turn."""
    return [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32,
                        progress: bool = False) -> torch.Tensor:
    """Reward-model scores of whole conversations (each ending with the response), ``[n]``.

    Text goes in, so a policy with another tokenizer can be scored; each conversation is rendered with the reward
    model's chat template exactly as the reward trainer rendered its training pairs.
    """
    from tqdm.auto import tqdm

    from rlhf.modeling import sequence_scores

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of similar length pad less
    scores = torch.zeros(len(texts))
    for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="score"):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        scores[idx] = sequence_scores(model, batch["input_ids"], batch["attention_mask"]).cpu()
    return scores


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Pairwise accuracy (ties count half) and margins of chosen over rejected scores."""
    diff = chosen - rejected
    return {"accuracy": ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item(),
            "margin_mean": diff.mean().item(), "margin_std": diff.std().item() if len(diff) > 1 else 0.0,
            "pairs": len(diff)}


# ---------------------------------------------------------------------------------------------------------------
# Sampling that does not depend on how episodes are batched
# ---------------------------------------------------------------------------------------------------------------

_M31 = (1 << 31) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 31-bit values (kept in int64: no product can overflow)."""
    for multiplier in (0x2C1B3C6D, 0x297A2D39, 0x5BD1E995):
        x = x ^ (x >> 15)
        x = (x * multiplier) & _M31
    return x ^ (x >> 13)


def _columns(width: int, device) -> torch.Tensor:
    """The per-column term of ``hash_uniform``, ``[1, width]``."""
    return (torch.arange(width, device=device, dtype=torch.int64)[None, :] * 0x7FEB352D) & _M31


def hash_uniform(keys: torch.Tensor, position: int, width: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform numbers in (0, 1), ``[len(keys), width]``: a pure function of (key, position, column).

    A counter-based generator (an integer hash of the three numbers): the same episode key draws the same numbers
    whatever else is in its batch, on whichever process, on CPU or GPU, and nothing needs saving to resume.
    ``columns`` (``_columns(width, device)``) may be passed to save recomputing it every call.
    """
    columns = _columns(width, keys.device) if columns is None else columns
    row = _mix((keys.to(torch.int64) & _M31) ^ ((position * 0x45D9F3B) & _M31))
    x = _mix((row[:, None] + columns) & _M31)
    return ((x.to(torch.float64) + 0.5) / float(1 << 31)).to(torch.float32)


def episode_keys(seed: int, step: int, indices: torch.Tensor) -> torch.Tensor:
    """One 31-bit key per episode of a PPO step, from the run's seed, the step and the episode's global index."""
    base = _mix(torch.tensor([(seed * 1_000_003 + step * 7_919) & _M31]))
    return _mix((indices.to(torch.int64) * 0x3C6EF35F + base) & _M31)


class GumbelSampler:
    """A logits processor that turns greedy decoding into sampling from ``softmax(logits / temperature)`` with
    per-episode keys (Gumbel-max: the argmax of ``logits / T + Gumbel noise`` is such a sample). Pass it to
    ``generate(..., do_sample=False, logits_processor=[sampler])``; no top-k or top-p is applied, so the sampling
    distribution is exactly the one PPO's log-probabilities are computed under."""

    def __init__(self, keys: torch.Tensor, temperature: float):
        self.keys = keys
        self.temperature = temperature
        self.start: int | None = None
        self.columns: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:  # the first token: fix what every later call shares
            self.start = input_ids.shape[1]
            self.keys = self.keys.to(scores.device)
            self.columns = _columns(scores.shape[-1], scores.device)
        position = input_ids.shape[1] - self.start  # the response token being chosen: 0, 1, ...
        u = hash_uniform(self.keys, position, scores.shape[-1], self.columns)
        return scores.float() / self.temperature - torch.log(-torch.log(u))
