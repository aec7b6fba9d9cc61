"""The mathematics of PPO for language models, as pure tensor functions.

Shapes: ``[batch, T]`` over response tokens, with ``mask`` 1 on real tokens (up to and including the first EOS)
and 0 on padding. Every function takes tensors and returns tensors; none touches a model or an optimizer.
References: Schulman et al. 2017 (PPO, "Proximal Policy Optimization Algorithms"), Schulman et al. 2016 (GAE),
Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences": KL-shaped reward, adaptive KL); the
objectives after GRPO: Yu et al. 2025 (DAPO: clip-higher, token-level loss, overlong shaping), Liu et al. 2025
(Dr. GRPO), Zheng et al. 2025 (GSPO), MiniMax 2025 (MiniMax-M1: CISPO).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------------------

def _own(total: torch.Tensor) -> torch.Tensor:
    return total


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where ``mask`` is set, 0 elsewhere. A select, not ``x * mask``: padding positions may hold inf or NaN
    (an exp of a log-prob gap between two passes that saw different padding), and 0 * inf is NaN."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, total=_own) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over ``dim`` or over everything. ``total`` turns a local sum into the sum the
    statistic is over (e.g. an all-reduce over processes; over everything only)."""
    kept = masked(x, mask)
    mask = mask.to(x.dtype)
    if dim is None:
        return total(kept.sum()) / total(mask.sum()).clamp(min=1)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, total=_own) -> torch.Tensor:
    """Variance of the masked-in entries (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask, total=total)
    var = masked_mean((x - mean) ** 2, mask, total=total)
    if unbiased:
        n = total(mask.to(x.dtype).sum())
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total=_own) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked-in entries; with ``shift_mean=False`` the mean is added back.
    Masked-out entries come back as 0. With ``total`` an all-reduce, mean and variance are those of every
    process's entries together."""
    mean = masked_mean(x, mask, total=total)
    var = masked_var(x, mask, total=total)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return masked(white, mask)


# ---------------------------------------------------------------------------------------------------------------
# Responses: where they end, which positions predict them, what their scores become
# ---------------------------------------------------------------------------------------------------------------

def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(response, mask, stopped)``: the mask covers the tokens up to and including each row's first EOS (the
    whole row when it has none), the response has ``pad_id`` after that, and ``stopped`` says whether the row
    has an EOS at all."""
    is_eos = response == eos_id
    stopped = is_eos.any(1)
    first = torch.where(stopped, is_eos.float().argmax(1), torch.full_like(stopped, response.shape[1] - 1,
                                                                          dtype=torch.long))
    mask = (torch.arange(response.shape[1], device=response.device)[None, :] <= first[:, None]).long()
    return response.masked_fill(mask == 0, pad_id), mask, stopped


def predicting(x: torch.Tensor, length: int) -> torch.Tensor:
    """The positions of ``x`` (``[batch, seq, ...]``, one entry per input position) that look at each of the last
    ``length`` tokens before seeing it: position t - 1 for token t. Applied to a causal LM's logits this gives the
    distribution every response token was drawn from; applied to a value head's outputs, V(s_t), the value of the
    state the token was chosen in. ``x`` may be the last ``length + 1`` positions only (``logits_to_keep``)."""
    return x[:, -length - 1:-1]


def shape_scores(scores: torch.Tensor, stopped: torch.Tensor, mean: float | None = None, std: float | None = None,
                 missing_eos_penalty: float | None = None, clip: float | None = None) -> torch.Tensor:
    """The reward-model scores PPO optimises: standardised with the reward model's stored ``mean`` and ``std``
    (when given; a std below 1e-6 counts as 1e-6), minus ``missing_eos_penalty`` for responses that never
    ``stopped`` (after standardising), then clipped to ``[-clip, clip]``. None skips a step."""
    s = scores.clone()
    if mean is not None:
        s = (s - mean) / max(std, 1e-6)
    if missing_eos_penalty is not None:
        s = torch.where(stopped, s, s - missing_eos_penalty)
    if clip is not None:
        s = s.clamp(-clip, clip)
    return s


def weighted_score(terms: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum_i weight_i * value_i`` per sequence for ``terms`` of (``[B]`` values, weight). A non-finite value
    stays non-finite (PPO's guard skips that update); one term of weight 1 returns its values unchanged."""
    total = None
    for values, weight in terms:
        term = values * weight
        total = term if total is None else total + term
    return total


def sequence_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sum over the last dimension of the masked-in entries, ``[batch]`` for ``[batch, T]`` (e.g. a sequence
    KL from per-token KLs)."""
    return masked(x, mask).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities, KL, entropy
# ---------------------------------------------------------------------------------------------------------------

MASKED_LOGIT = -1e30
"""the logit of an id the tokenizer does not have: exp underflows to exactly 0, and unlike -inf it keeps
``0 * logit`` (the entropy's sum) a number; finite in fp32 and bf16 after any temperature division above 1e-8"""


def restrict_vocab(logits: torch.Tensor, vocab: int | None) -> torch.Tensor:
    """``logits`` (fp32) with every id at or above ``vocab`` (the tokenizer's size) masked out. Embedding matrices
    are padded past the tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens; the tiny world: 512 for 430): an
    untrained model puts real probability on those rows, which decode to nothing. The engine samples and PPO scores
    over the same support, so the log-probs are renormalised alike and the ratio stays exact."""
    if vocab is None or vocab >= logits.shape[-1]:
        return logits
    unknown = torch.arange(logits.shape[-1], device=logits.device) >= vocab
    return logits.float().masked_fill(unknown, MASKED_LOGIT)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature): the sampling distribution's own log-probabilities."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H(pi) = logsumexp(z) - sum softmax(z) * z per position, with z = logits / temperature."""
    z = logits.float() / temperature
    return torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a): unbiased per-token KL estimate, can be negative (Schulman, "Approximating
    KL divergence", 2020)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(a) / pi(a): unbiased, never negative, lower variance."""
    log_r = ref_logp - logp
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def kl_penalized_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -beta * kl_t, plus the sequence score at the last real token (Ziegler et al. eq. 2).

    Returns ``(rewards, kl)``, both ``[batch, T]`` and zero on padding.
    """
    kl = masked(KL_ESTIMATORS[estimator](logp, ref_logp), mask)
    rewards = -kl_coef * kl
    last = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(-1)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores.to(rewards.dtype)
    return masked(rewards, mask), kl


# ---------------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float | torch.Tensor = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), right to left over the masked-in tokens:

        delta_t = r_t + gamma * V_next - V_t            (V after the last real token is 0)
        A_t     = delta_t + gamma * lambda * A_next
        R_t     = A_t + V_t                             (the value targets)

    where "next" is the next masked-in token: tokens masked out between two of them (what an environment wrote
    between two turns of an episode) are no action and no step, part of the transition from one sampled token's
    state to the next. With the mask a run of ones then padding, next is t + 1. ``gamma`` may be ``[B, T]``: the
    discount from each token to the next (``turn_discounts``: a turn's discount at the end of a turn). Returns
    ``(advantages, returns)``, zero where masked out.
    """
    values = masked(values, mask)
    rewards = masked(rewards, mask)
    on = mask.bool()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(last)
    for t in reversed(range(T)):
        g = gamma[:, t] if isinstance(gamma, torch.Tensor) else gamma
        delta = rewards[:, t] + g * next_value - values[:, t]
        last = torch.where(on[:, t], delta + g * lam * last, last)
        next_value = torch.where(on[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(on[:, t], last, 0.0)
    return advantages, masked(advantages + values, mask)


def _flat(g: torch.Tensor) -> torch.Tensor:
    """[G, K] -> [G, 1]: the groups whose rewards are all equal. Their advantage is exactly 0: the float32 mean of K
    equal values that are not exact in binary (seven times -1.3) is often one ulp off, which would give every
    response of a flat group the same small push."""
    return (g == g[:, :1]).all(1, keepdim=True)


def flat_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` scores -> ``[B / K]``: whether each group's K scores are all equal (no signal for a group
    estimator: its advantages are exactly 0; DAPO's dynamic sampling refills such groups)."""
    return _flat(_groups(scores, group_size)).reshape(-1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B]`` sequence scores as ``[B / K, K]``: rows ``g*K .. g*K + K - 1`` are the K responses to one prompt."""
    if group_size < 2 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size} (at least 2)")
    return scores.reshape(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024 "DeepSeekMath", section 4.1.2, outcome supervision):

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    over the K = ``group_size`` responses to the same prompt (consecutive rows), std Bessel-corrected as in TRL's
    GRPOTrainer; a group whose rewards are all equal gets A = 0 (nothing to prefer). ``[B]`` in, ``[B]`` out: every
    token of response i then carries A_i (``per_token``)."""
    g = _groups(scores.float(), group_size)
    a = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)
    return a.masked_fill(_flat(g), 0.0).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024 "Back to Basics", eq. 6):

        A_i = r_i - 1/(K - 1) * sum_{j != i} r_j   =   K / (K - 1) * (r_i - mean(r_group))

    each response's baseline is the mean reward of the other K - 1 responses to its prompt, so the baseline does
    not depend on the response it judges (unbiased). ``[B]`` in, ``[B]`` out."""
    g = _groups(scores.float(), group_size)
    return (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).masked_fill(_flat(g), 0.0).reshape(-1)


def group_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``r_i - mean(r_group)``: the group-mean baseline REINFORCE++ subtracts from the score when several responses
    share a prompt (OpenRLHF's ``reinforce_baseline``). ``[B]`` in, ``[B]`` out."""
    g = _groups(scores.float(), group_size)
    return (g - g.mean(1, keepdim=True)).masked_fill(_flat(g), 0.0).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO's advantages (Liu et al. 2025 "Understanding R1-Zero-Like Training", eq. 3 / section 3.2): GRPO's
    without the division by the group's standard deviation,

        A_i = r_i - mean(r_group)

    which otherwise weighs prompts whose K rewards barely differ (too easy or too hard) the most. The same
    quantity as ``group_baseline``; ``[B]`` in, ``[B]`` out, 0 for a flat group."""
    return group_baseline(scores, group_size)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Discounted returns of per-token rewards, right to left over the masked-in tokens (REINFORCE; Hu 2025
    "REINFORCE++", eq. 5 with the per-token KL in r_t):

        G_t = r_t + gamma * G_next                      (G after the last real token is 0)

    "next" as in ``gae``: tokens masked out between two masked-in ones are skipped, not discounted; ``gamma`` may
    be ``[B, T]`` as there. ``[B, T]``, zero where masked out."""
    rewards, on = masked(rewards, mask), mask.bool()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        g = gamma[:, t] if isinstance(gamma, torch.Tensor) else gamma
        running = torch.where(on[:, t], rewards[:, t] + g * running, running)
        out[:, t] = torch.where(on[:, t], running, 0.0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Per-turn rewards of multi-turn episodes
# ---------------------------------------------------------------------------------------------------------------

def turn_index(ends: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, M]`` each turn's last sampled token (an offset in the response; turns an episode did not play are past
    every offset) -> ``[B, length]``: the turn each response token belongs to (the number of turns ended before
    it). The environment's tokens after a turn count with the next one; they are masked out of everything."""
    t = torch.arange(length, device=ends.device)
    return (ends[:, None, :] < t[None, :, None]).sum(-1)


def turn_discounts(ends: torch.Tensor, turns: torch.Tensor, mask: torch.Tensor, gamma: float, turn_gamma: float
                   ) -> torch.Tensor:
    """``[B, T]`` the discount from each sampled token to the next for ``gae`` and ``returns_to_go``: ``gamma``
    within a turn, ``gamma * turn_gamma`` from the last token of a turn to the first of the next (``turns[b]``
    turns played; the last turn's end is the episode's, with nothing after it)."""
    out = torch.full(mask.shape, float(gamma), device=mask.device)
    played = torch.arange(ends.shape[1], device=ends.device)[None, :] < (turns[:, None] - 1)
    rows, cols = played.nonzero(as_tuple=True)
    out[rows, ends[rows, cols]] = gamma * turn_gamma
    return out


def turn_returns(turn_rewards: torch.Tensor, turns: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Each turn's discounted return-to-go over the episode's turns (``[B, M]`` rewards, ``turns[b]`` played):

        G_k = sum_{j = k .. T - 1} gamma^(j - k) r_j

    and 0 for every turn index past the episode's T. The zeros are what keep a per-turn baseline unbiased: with
    them every turn index holds a value for every episode of the group, so the baseline of turn k has the same
    terms whatever turn an episode stopped at (``turn_group_advantages``)."""
    played = torch.arange(turn_rewards.shape[1], device=turns.device)[None, :] < turns[:, None]
    rewards = turn_rewards.float().masked_fill(~played, 0.0)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for k in reversed(range(rewards.shape[1])):
        running = rewards[:, k] + gamma * running
        out[:, k] = running
    return out.masked_fill(~played, 0.0)


def turn_group_advantages(returns: torch.Tensor, group_size: int, estimator: Callable) -> torch.Tensor:
    """A group estimator (``grpo_advantages``, ``rloo_advantages``, ``dr_grpo_advantages``) applied at each turn
    index: turn k of response i gets ``estimator`` of the K responses' returns-to-go at turn k, zeros included
    for those that had stopped (``turn_returns``).

    Why the zeros (verl RFC #7244): centring each turn index over only the episodes that reached it, then summing
    an episode's turn advantages from k to its own last turn, subtracts a baseline whose number of terms is the
    episode's own stopping turn. The policy chooses when to stop, so that baseline depends on the action and biases
    the gradient (the RFC works the bias out: a hidden push on every "take another turn"). Here the
    baseline of turn k reads every episode's return from k, and RLOO's leaves the episode itself out, so it does
    not depend on what the episode did (unbiased; GRPO's and Dr. GRPO's include it, as they do for one turn).
    ``[B, M]`` in and out."""
    return torch.stack([estimator(returns[:, k], group_size) for k in range(returns.shape[1])], 1)


def turn_sums(rewards: torch.Tensor, index: torch.Tensor, mask: torch.Tensor, turns: int) -> torch.Tensor:
    """``[B, T]`` per-token rewards -> ``[B, turns]``: each turn's sum over its sampled tokens."""
    out = torch.zeros(rewards.shape[0], turns, dtype=torch.float32, device=rewards.device)
    return out.scatter_add_(1, index.clamp(max=turns - 1), masked(rewards.float(), mask))


def per_token(advantages: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """A sequence-level advantage ``[B]`` on every real token of its response ``[B, T]`` (0 on padding); or with
    ``index`` (``turn_index``) a per-turn one ``[B, M]`` on the tokens of each turn."""
    if index is not None:
        return masked(advantages.float().gather(1, index.clamp(max=advantages.shape[1] - 1)), mask)
    return masked(advantages[:, None].to(torch.float32).expand(mask.shape), mask)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
"""How per-token loss terms become one loss (``aggregate``)."""


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", horizon: int | None = None
              ) -> torch.Tensor:
    """One loss from per-token terms ``x`` ``[B, T]`` over a batch of B responses, |o_i| real tokens each:

        token_mean               sum_i sum_t x_it / sum_i |o_i|     every token weighs the same (DAPO, eq. 12;
                                                                    PPO as implemented for LMs)
        seq_mean_token_mean      1/B sum_i 1/|o_i| sum_t x_it       every response weighs the same (GRPO, Shao
                                                                    et al. 2024 eq. 3; GSPO, eq. 5)
        seq_mean_token_sum       1/B sum_i sum_t x_it               a response weighs its length
        seq_mean_token_sum_norm  1/(B L) sum_i sum_t x_it           the same over a constant L = ``horizon``,
                                                                    the generation budget (Dr. GRPO, eq. 3)

    ``seq_mean_token_mean`` divides a long response's per-token gradient by its length, so long wrong answers are
    punished less per token than short ones: the length bias Dr. GRPO and DAPO remove. Padding is left out.
    Over micro-batches and processes the loop weighs each part by ``batch_share``.
    """
    if how == "token_mean":
        return masked_mean(x, mask)
    per_response = masked(x, mask).sum(1)
    if how == "seq_mean_token_mean":
        per_response = per_response / mask.to(x.dtype).sum(1).clamp(min=1)
    elif how == "seq_mean_token_sum_norm":
        if not horizon:
            raise ValueError("seq_mean_token_sum_norm needs the horizon (the generation budget, in tokens)")
        per_response = per_response / horizon
    elif how != "seq_mean_token_sum":
        raise ValueError(f"unknown loss aggregation {how!r}; one of {', '.join(AGGREGATIONS)}")
    return per_response.mean()


def batch_share(mask: torch.Tensor, how: str, tokens, responses) -> torch.Tensor:
    """This part's weight in the whole batch's ``aggregate``: its share of the batch's ``tokens`` (token_mean) or
    of its ``responses`` (the others), both counted over every part and process. ``aggregate`` of each part times
    its share, summed, is ``aggregate`` of the whole batch."""
    if how == "token_mean":
        return mask.sum() / tokens
    return torch.tensor(mask.shape[0], dtype=torch.float32, device=mask.device) / responses


POLICY_LOSSES = ("ppo", "gspo", "cispo")
"""The policy objectives ``policy_loss_terms`` computes."""

LOG_RATIO_CLAMP = 20.0
"""log pi - log pi_old is clamped to [-20, 20] before it is exponentiated (verl's ``compute_policy_loss`` does the
same): a sampled token whose old log-prob is below about -88.7 (float32's smallest exp) would otherwise give an
infinite ratio and a NaN gradient. A ratio of e^20 is clipped by every objective long before; the clamp changes
nothing inside it."""


def policy_loss_terms(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      objective: str = "ppo", clip_low: float = 0.2, clip_high: float | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss terms ``[B, T]`` (0 on padding; ``aggregate`` makes them one loss), to minimise.
    ``clip_high`` defaults to ``clip_low`` (symmetric); a larger ``clip_high`` is DAPO's clip-higher (Yu et al. 2025,
    eq. 10: more room for raising unlikely tokens, against entropy collapse).

    ``ppo``: the clipped surrogate (Schulman et al. 2017, eq. 7), with r_t = pi(o_t) / pi_old(o_t):

        l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high))

    ``gspo``: the same with one ratio per response, the length-normalised sequence ratio (Zheng et al. 2025 "Group
    Sequence Policy Optimization", eq. 7), in its token form (GSPO-token, eq. 13):

        s_i  = exp(1/|o_i| sum_t log r_t)          s_it = sg[s_i] * pi(o_t) / sg[pi(o_t)]
        l_t  = max(-A_t s_it, -A_t clip(s_it, 1 - eps_low, 1 + eps_high))

    s_it equals s_i, and its gradient is s_i * grad log pi(o_t); averaged over a response's tokens
    (``seq_mean_token_mean``) with one advantage per response this is GSPO's sequence objective exactly, and a
    critic's per-token advantages are allowed (what the token form is for). The paper's epsilons are ~3e-4/4e-4:
    a sequence ratio moves far less than a token's.

    ``cispo``: a clipped importance weight that is not differentiated, times the advantage, times the log-prob
    (MiniMax 2025 "MiniMax-M1", eq. 4-5), so no token's gradient is dropped by the clip, only down-weighted:

        l_t = -sg[clip(r_t, 1 - eps_low, 1 + eps_high)] * A_t * log pi(o_t)

    Every log r_t is clamped to [-20, 20] first (``LOG_RATIO_CLAMP``). Stats (token means): ``clipfrac`` (tokens
    whose clipped term is taken, or for cispo whose weight is clipped), ``approxkl`` (0.5 * (log r_t)^2, an
    estimate of KL(old || new)) and ``ratio`` (r_t, or s_i for gspo).
    """
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = masked(logp - old_logp, mask)  # padding: ratio 1, whatever the two passes computed there
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if objective == "gspo":
        sequence = masked_mean(log_ratio, mask, dim=1)[:, None].detach()
        own = masked(logp, mask)  # padding's log-probs (possibly -inf) kept out of the graph
        ratio = torch.exp(sequence + own - own.detach())  # value s_i, gradient s_i * grad log pi(o_t)
        ratio = masked(ratio, mask) + (1 - mask.to(ratio.dtype))  # padding: 1, as for the token ratio
    else:
        ratio = torch.exp(log_ratio)
    bounded = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    if objective == "cispo":
        terms = -bounded.detach() * advantages * masked(logp, mask)
        taken = (bounded != ratio).float()
    elif objective in ("ppo", "gspo"):
        unclipped, clipped = -advantages * ratio, -advantages * bounded
        terms = torch.max(unclipped, clipped)
        taken = (clipped > unclipped).float()
    else:
        raise ValueError(f"unknown policy loss {objective!r}; one of {', '.join(POLICY_LOSSES)}")
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(taken, mask),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "ratio": masked_mean(ratio, mask)}
    return masked(terms, mask), stats


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate averaged over tokens (``policy_loss_terms`` with ``ppo``, ``aggregate`` with
    ``token_mean``):

        ratio = exp(logp - old_logp)
        L     = mean_t max(-A_t * ratio, -A_t * clip(ratio, 1 - eps, 1 + eps))

    Also returns ``clipfrac`` (share of tokens where the clipped term is taken) and ``approxkl``
    (0.5 * mean (logp - old_logp)^2, an estimate of KL(old || new)).
    """
    terms, stats = policy_loss_terms(logp, old_logp, advantages, mask, "ppo", clip)
    return aggregate(terms, mask), stats


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k3",
            how: str = "token_mean", horizon: int | None = None) -> torch.Tensor:
    """The KL to the reference as a loss term (GRPO, Shao et al. 2024 eq. 3-4): the estimate aggregated like the
    policy loss (``aggregate``; the token mean by default), differentiated through the policy's current log-probs
    ``logp``; the loop adds ``beta`` times it to the policy loss. k3 (``kl_k3``) is GRPO's choice: its gradient
    pulls towards the reference, where k1's is zero in expectation under the sampling policy. The log-probs are
    masked before the estimator: a padding position's gap can exceed the ~88.7 nats where exp overflows, and
    0 * inf in the backward pass of a k3 masked afterwards is NaN."""
    return aggregate(KL_ESTIMATORS[estimator](masked(logp, mask), masked(ref_logp, mask)), mask, how, horizon)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0
                     ) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a length-aware term added to the score: with
    L_max = ``max_new_tokens`` and L_cache = ``buffer``,

        R(|y|) = 0                                   |y| <= L_max - L_cache
               = ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
               = -1                                  |y| > L_max

    times ``factor``: nothing for responses that end in time, then a penalty growing linearly to -factor at the
    limit. A response cut at the limit without EOS has |y| = L_max and gets -factor (``missing_eos_penalty`` is
    the separate, flat penalty for having no EOS at all). ``[B]`` lengths in tokens, ``[B]`` out."""
    if not 0 < buffer <= max_new_tokens:
        raise ValueError(f"the overlong buffer ({buffer}) must be in (0, max_new_tokens={max_new_tokens}]")
    lengths = lengths.to(torch.float32)
    start = max_new_tokens - buffer
    penalty = torch.where(lengths > max_new_tokens, torch.full_like(lengths, -1.0),
                          ((start - lengths) / buffer).clamp(max=0.0))
    return factor * penalty


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in the PPO reference implementations):

        V_clip = old_V + clip(V - old_V, -eps, eps)
        L      = 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

    Also returns ``clipfrac`` (share of tokens where the clipped term is larger).
    """
    values, old_values, returns = (masked(t, mask) for t in (values, old_values, returns))
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, section 2.2)
# ---------------------------------------------------------------------------------------------------------------

class FixedKLController:
    """beta stays where it starts."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Proportional control of beta towards a target KL:

        e_t     = clip(KL_t / target - 1, -0.2, 0.2)
        beta_t+1 = beta_t * (1 + K_beta * e_t),  K_beta = n_steps / horizon
    """

    def __init__(self, value: float, target: float, horizon: float):
        self.value = value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
