"""The generation engine: prompt messages -> responses cut at the first EOS, with their log-probabilities.

``decode`` is the one decode loop (a KV cache preallocated for the batch, fixed-width mask and positions, greedy
or sampled with per-episode keys); ``generate`` puts chat prompts through it and decodes the texts. PPO's rollout
and held-out evaluation, ``rlhf eval`` and ``rlhf sample`` all generate through ``decode``; nothing calls
Hugging Face ``generate``. The keyed random numbers (``hash_uniform``, ``gumbel_max``) live here too."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.text.encoding import left_pad


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
    logprobs: list[torch.Tensor]
    """log-probability of each of those tokens at the temperature it was decoded at (1 for greedy)"""


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Chat-template each prompt (a list of messages) with the generation prompt appended."""
    return [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 32,
             temperature: float = 0.0, seed: int = 0, indices: list[int] | None = None,
             progress: bool = False) -> Generations:
    """Responses to ``prompts`` through the engine (``decode``): greedy when ``temperature`` is 0, else sampled
    at that temperature, prompt ``i`` with the key ``episode_keys(seed, 0, indices[i])`` (``indices`` defaults to
    0, 1, ...), so a response depends on its seed and index alone, not on the batch it was decoded in."""
    from tqdm.auto import tqdm

    indices = list(range(len(prompts))) if indices is None else indices
    device = getattr(model, "device", None) or torch.device("cpu")
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(tokenizer, prompts)]
    texts, stopped, lengths, token_ids, logps = [], [], [], [], []
    eos = tokenizer.eos_token_id
    for start in tqdm(range(0, len(encoded), batch_size), disable=not progress, desc="generate"):
        ids, mask = left_pad(encoded[start:start + batch_size], tokenizer.pad_token_id)
        keys = episode_keys(seed, 0, torch.tensor(indices[start:start + batch_size]))
        out = decode(model, ids.to(device), mask.to(device), keys=keys, temperature=temperature,
                     max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                     vocab=len(tokenizer))
        for row, logp in zip(out.tokens.tolist(), out.logprobs.cpu()):
            n = row.index(eos) + 1 if eos in row else len(row)
            stopped.append(eos in row)
            lengths.append(n)
            token_ids.append(row[:n])
            logps.append(logp[:n])
            texts.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return Generations(texts, stopped, lengths, token_ids, logps)


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[list[dict]] | None, responses: list[list[int]],
                      batch_size: int = 32, prompt_ids: list[list[int]] | None = None) -> list[torch.Tensor]:
    """Log-probabilities of each response's tokens under ``model`` (temperature 1, over the tokenizer's ids as the
    engine samples), one tensor per response; after ``prompt_ids`` when given (an episode's prompt, rendered with
    its tools), else after each prompt rendered."""
    from rlhf.text.encoding import position_ids
    from rlhf.ppo.ppo_math import logprobs_from_logits, restrict_vocab

    rendered = prompt_ids if prompt_ids is not None else [
        tokenizer(t, add_special_tokens=False)["input_ids"] for t in render_prompts(tokenizer, prompts)]
    out = []
    for start in range(0, len(rendered), batch_size):
        seqs = [q + r for q, r in zip(rendered[start:start + batch_size], responses[start:start + batch_size])]
        ids, mask = left_pad(seqs, tokenizer.pad_token_id)  # every response ends at the last column
        ids, mask = ids.to(model.device), mask.to(model.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1]
        logp = logprobs_from_logits(restrict_vocab(logits, len(tokenizer)), ids[:, 1:])
        for i, r in enumerate(responses[start:start + batch_size]):
            out.append(logp[i, logp.shape[1] - len(r):].cpu() if r else torch.zeros(0))
    return out


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


def _forward_owner(model):
    """The module whose ``forward`` a generation call reaches (a view of a shared base names it ``wrapped``)."""
    from rlhf.models.modeling import unwrap

    return unwrap(getattr(model, "wrapped", model))


def cache_keyword(model) -> str:
    """The forward argument that takes a KV cache: ``cache`` from transformers 5.24 on (``past_key_values`` is
    deprecated there and goes in 5.40), ``past_key_values`` before."""
    import inspect

    forward = _forward_owner(model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def prompt_learning(model) -> bool:
    """Whether ``model`` is a peft prompt-learning model (prompt, prefix or P-tuning, SFT-only methods): its forward
    prepends virtual tokens or key/value prefixes itself, which no cache of ours can hold. ``decode`` runs such a
    model with no cache: a full forward over prompt + response so far at each token, exactly the forward it was
    trained with (Hugging Face ``generate`` with peft 0.21 and transformers 5.24 ignored a prefix-tuning adapter's
    prefixes, and drifted from the full forward for prompt tuning after a few tokens)."""
    config = getattr(getattr(model, "wrapped", model), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def static_cache_supported(model) -> bool:
    """Whether the model's architecture runs over transformers' ``StaticCache`` (a preallocated KV cache written in
    place): every architecture transformers marks as compilable does (all eight families of the test matrix)."""
    return bool(getattr(_forward_owner(model), "_can_compile_fullgraph", False))


@dataclass
class Samples:
    """Responses decoded by ``decode``: ``[batch, length]`` each, ``length`` the longest response."""

    tokens: torch.Tensor
    """the decoded tokens; after a row's first EOS, pad"""
    logprobs: torch.Tensor
    """log pi(token | prefix) of each token under the model at the sampling temperature (1 for greedy), EOS
    unmasked"""
    entropy: torch.Tensor
    """entropy of that distribution at each position"""
    static: bool = True
    """whether the loop ran over a preallocated cache (False: the architecture needs the growing cache)"""
    values: torch.Tensor | None = None
    """with a ``value_head``: its value of the state each token was chosen in (the last hidden state of the pass
    that drew it), else None"""


CHECK_EVERY_ON_GPU = 8
"""on an accelerator, the loop asks the device whether every row has finished once every this many tokens (each
question waits for the queued work); a CPU has no queue, so it asks after every token"""


def _cache_for(model, width: int, static: bool | None) -> tuple[dict, bool, bool]:
    """The KV cache ``decode`` runs over, for ``width`` positions: the forward's cache argument (none for a
    prompt-learning model), whether it is static (preallocated; ``static`` False forces the growing cache), and
    whether the model runs uncached."""
    from transformers import DynamicCache, StaticCache

    config = getattr(model, "config", None)
    uncached = prompt_learning(model)
    static = config is not None and static_cache_supported(model) and static is not False and not uncached
    if static:
        cache = StaticCache(config=config, max_cache_len=width)
    else:
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
    return ({} if uncached else {cache_keyword(model): cache}), static, uncached


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, temperature: float,
           max_new_tokens: int, eos_token_id: int, pad_token_id: int, keys: torch.Tensor | None = None,
           min_new_tokens: int = 0, static: bool | None = None, vocab: int | None = None,
           value_head=None, offsets: torch.Tensor | None = None) -> Samples:
    """The generation engine: a response to each left-padded prompt, with each token's log-probability and the
    distribution's entropy (so that PPO's rollout does not compute them again). Every command generates here.

    ``temperature`` 0 is greedy (the argmax; log-probs at temperature 1). Otherwise each token is drawn from
    ``softmax(logits / temperature)`` with Gumbel noise from row ``i``'s own key (``gumbel_max`` with ``keys[i]``),
    so a response does not depend on its batch, its process or its device, and nothing needs saving to resume. No
    top-k or top-p: the distribution sampled is exactly the one PPO's log-probabilities refer to. While fewer than
    ``min_new_tokens`` tokens are out, EOS is not drawn (the recorded log-probs stay those of the unmasked model).
    ``vocab`` (the tokenizer's size): ids at or above it, rows of a padded embedding that decode to nothing, are
    never drawn and take no probability (``ppo_math.restrict_vocab``, which PPO's scoring passes apply too).
    ``value_head`` (PPO's shared critic: final hidden states ``[B, H]`` -> ``[B]``) is applied to the hidden state
    each token is drawn from, giving the rollout's values without a pass of their own. ``offsets`` (``[B]``, default
    0): where each row's response so far stands, so that the noise of a later turn of a multi-turn episode is drawn
    at the episode's own positions (``rlhf.engine.agent``), never again at those of its first turn.

    Static shapes: one forward pass over the prompts, then one per new token reading only the last position's
    logits, over a KV cache preallocated for ``prompt + max_new_tokens`` positions (transformers' ``StaticCache``)
    and an attention mask and positions built once for that whole width (causal masking hides the slots not yet
    written). A row that has finished keeps its slot (it decodes pad, masked out of everything that reads the
    response); the loop stops when every row has produced EOS. An architecture without static-cache support runs
    the same loop over a growing cache (``static`` False forces that, for measurements), and a prompt-learning model
    with no cache at all (``prompt_learning``).
    """
    from rlhf.text.encoding import position_ids
    from rlhf.ppo.ppo_math import entropy_from_logits, logprobs_from_logits, restrict_vocab

    device = input_ids.device
    batch, prompt = input_ids.shape
    cache_arg, static, uncached = _cache_for(model, prompt + max_new_tokens, static)
    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], 1)
    positions = position_ids(mask)
    greedy = temperature == 0
    scale = 1.0 if greedy else float(temperature)
    keys = None if greedy else keys.to(device)
    offsets = 0 if offsets is None else offsets.to(device)
    tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs, entropy = (torch.zeros(batch, max_new_tokens, device=device) for _ in range(2))
    values = torch.zeros(batch, max_new_tokens, device=device) if value_head is not None else None
    hidden = {"output_hidden_states": True} if value_head is not None else {}
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    finished_at = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor([eos_token_id], device=device)
    check_every = 1 if device.type == "cpu" else CHECK_EVERY_ON_GPU
    step_ids, columns, steps = input_ids, None, 0
    for t in range(max_new_tokens):
        end = prompt + t  # the inputs of this pass end at this column of the full-width buffers
        if uncached:  # peft prepends its virtual tokens (or prefixes) to every pass and sets the positions
            out = model(input_ids=torch.cat([input_ids, tokens[:, :t]], 1), attention_mask=mask[:, :end],
                        use_cache=False, **hidden)
        else:
            out = model(input_ids=step_ids, attention_mask=mask if static else mask[:, :end],
                        position_ids=positions[:, end - step_ids.shape[1]:end], use_cache=True,
                        logits_to_keep=1, **cache_arg, **hidden)
        logits = out.logits[:, -1].float() / scale
        if values is not None:
            values[:, t] = value_head(out.hidden_states[-1][:, -1])
        logits = restrict_vocab(logits, vocab)
        allowed = logits if t >= min_new_tokens else logits.index_fill(-1, eos, -torch.inf)
        columns = _columns(logits.shape[-1], device) if columns is None and not greedy else columns
        token = allowed.argmax(-1) if greedy else gumbel_max(allowed, keys, offsets + t, columns)
        token = token.masked_fill(done, pad_token_id)
        tokens[:, t] = token
        logprobs[:, t] = logprobs_from_logits(logits, token)  # the same functions as the update's
        entropy[:, t] = entropy_from_logits(logits)
        ended = (token == eos_token_id) & ~done
        finished_at.masked_fill_(ended, t + 1)
        done |= ended
        steps = t + 1
        if steps % check_every == 0 and bool(done.all()):
            break
        step_ids = token[:, None]
    # tokens decoded after every row had finished (the device was asked only every few tokens) are pad: cut them
    length = int(finished_at.max()) if bool(done.all()) else steps
    return Samples(tokens[:, :length], logprobs[:, :length], entropy[:, :length], static,
                   values[:, :length] if values is not None else None)
