"""Generation of responses to chat prompts: greedy or sampled batches for evaluation (Hugging Face ``generate``),
and ``sample``, PPO's rollout decode loop with per-episode random keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.modeling import left_pad  # noqa: F401  (also rollout.left_pad: PPO's prompt batches)


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


UNIFORM_BITS = 23
"""bits of each hash that ``hash_uniform`` keeps: (k + 1/2) / 2^23 = (2k + 1) / 2^24 is an odd multiple of 2^-24,
which float32 (24-bit significand) holds exactly for every k, so every value lies in [2^-24, 1 - 2^-24]"""


def hash_uniform(keys: torch.Tensor, position: int, width: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform numbers strictly inside (0, 1), ``[len(keys), width]``: a pure function of (key, position, column).

    A counter-based generator (an integer hash of the three numbers): the same episode key draws the same numbers
    whatever else is in its batch, on whichever process, on CPU or GPU, and nothing needs saving to resume.
    ``columns`` (``_columns(width, device)``) may be passed to save recomputing it every call.

    The top ``UNIFORM_BITS`` bits of the 31-bit hash make the number, exactly representable in float32: neither 0
    nor 1 can come out, so the Gumbel noise ``-log(-log(u))`` is always finite (between -2.8 and 16.6).
    """
    columns = _columns(width, keys.device) if columns is None else columns
    row = _mix((keys.to(torch.int64) & _M31) ^ ((position * 0x45D9F3B) & _M31))
    x = _mix((row[:, None] + columns) & _M31) >> (31 - UNIFORM_BITS)
    return uniform_from_bits(x)


def uniform_from_bits(k: torch.Tensor) -> torch.Tensor:
    """(k + 1/2) / 2^UNIFORM_BITS in float32 for integers 0 <= k < 2^UNIFORM_BITS (exact: see ``UNIFORM_BITS``)."""
    return (k.to(torch.float32) + 0.5) * (1.0 / (1 << UNIFORM_BITS))


def episode_keys(seed: int, step: int, indices: torch.Tensor) -> torch.Tensor:
    """One 31-bit key per episode of a PPO step, from the run's seed, the step and the episode's global index."""
    base = _mix(torch.tensor([(seed * 1_000_003 + step * 7_919) & _M31]))
    return _mix((indices.to(torch.int64) * 0x3C6EF35F + base) & _M31)


def gumbel_max(scores: torch.Tensor, keys: torch.Tensor, position: int, columns: torch.Tensor | None = None):
    """One sample per row from ``softmax(scores)``: the argmax of ``scores`` plus Gumbel noise drawn from
    ``hash_uniform`` with each row's episode key (Gumbel-max), so a row's draw depends on its key alone."""
    u = hash_uniform(keys, position, scores.shape[-1], columns)
    return (scores - gumbel_noise(u)).argmax(-1)


def gumbel_noise(u: torch.Tensor) -> torch.Tensor:
    """log(-log(u)), the negated Gumbel(0, 1) draw of a uniform ``u`` in (0, 1) (subtracted from the scores)."""
    return torch.log(-torch.log(u))


def cache_keyword(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.24 on (``past_key_values`` is
    deprecated there and goes in 5.40), ``past_key_values`` before."""
    import inspect

    from rlhf.modeling import unwrap

    forward = unwrap(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


@dataclass
class Samples:
    """Responses sampled by ``sample``: ``[batch, length]`` each, ``length`` the longest response."""

    tokens: torch.Tensor
    """the sampled tokens; after a row's first EOS, pad"""
    logprobs: torch.Tensor
    """log pi(token | prefix) of each sampled token under the policy at the sampling temperature, EOS unmasked"""
    entropy: torch.Tensor
    """entropy of that distribution at each position"""


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor, temperature: float,
           max_new_tokens: int, eos_token_id: int, pad_token_id: int, min_new_tokens: int = 0) -> Samples:
    """Sample a response to each left-padded prompt from ``softmax(logits / temperature)``, and keep each token's
    log-probability and the distribution's entropy, so that the rollout does not compute them again.

    A plain decode loop over a KV cache: one forward pass over the prompts, then one per new token, each reading
    only the last position's logits. Row ``i`` draws its noise with ``keys[i]`` (``gumbel_max``), so a response
    does not depend on the batch it was sampled in. No top-k or top-p: the sampling distribution is exactly the
    one PPO's log-probabilities refer to. While fewer than ``min_new_tokens`` tokens are out, EOS is not drawn
    (the recorded log-probabilities stay those of the unmasked policy). Stops when every row has sampled EOS.
    """
    from transformers import DynamicCache

    from rlhf.modeling import position_ids
    from rlhf.ppo_math import entropy_from_logits, logprobs_from_logits

    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    cache_arg = {cache_keyword(model): cache}
    positions = position_ids(attention_mask)
    mask = attention_mask
    keys = keys.to(input_ids.device)
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor([eos_token_id], device=input_ids.device)
    tokens, logprobs, entropy = [], [], []
    step_ids, step_positions, columns = input_ids, positions, None
    for t in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions, use_cache=True,
                       logits_to_keep=1, **cache_arg).logits[:, -1].float() / temperature
        if columns is None:
            columns = _columns(logits.shape[-1], logits.device)
        allowed = logits if t >= min_new_tokens else logits.index_fill(-1, eos, -torch.inf)
        token = gumbel_max(allowed, keys, t, columns).masked_fill(done, pad_token_id)
        tokens.append(token)
        logprobs.append(logprobs_from_logits(logits, token))  # the same functions as the update's
        entropy.append(entropy_from_logits(logits))
        done = done | (token == eos_token_id)
        if bool(done.all()):
            break
        step_ids, step_positions = token[:, None], step_positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
    return Samples(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(entropy, 1))
