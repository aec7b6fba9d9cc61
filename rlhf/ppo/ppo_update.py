"""The PPO step's pieces that act on one batch of episodes: the ``Rollout`` they live in, replacing its rows
(dynamic sampling's refills), the advantages by ``ppo.advantage``, and the update (``ppo_epochs``: the PPO epochs
over shuffled mini-batches, and the guard that stops a run whose updates are all non-finite); ``probe_pass``, a
step in small that ``rlhf.ppo.precision.repeats`` runs twice to tell whether the run will repeat bit for bit.

``stages/ppo.py`` holds the loop that calls them: sampling, scoring, metrics, checkpoints. The maths lives in
``rlhf.ppo.ppo_math``; which adapter a forward pass uses in ``rlhf.ppo.ppo_models``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.ppo import ppo_math
from rlhf.scale import distributed
from rlhf.config import PPOConfig
from rlhf.errors import TrainingStopped
from rlhf.ppo.ppo_math import predicting
from rlhf.ppo.ppo_models import PPOModels
from rlhf.engine.rollout import episode_keys


@dataclass
class Rollout:
    """One batch of episodes. ``ids``/``mask`` are prompt + response ``[B, Lq + Lr]`` (prompts left-padded,
    responses right-padded after their first EOS); per-token tensors are ``[B, Lr]`` over response tokens."""

    ids: torch.Tensor
    mask: torch.Tensor
    response: torch.Tensor
    response_mask: torch.Tensor
    stopped: torch.Tensor
    logp: torch.Tensor = None
    ref_logp: torch.Tensor = None
    values: torch.Tensor = None
    """the critic's values (None without a critic; the shared critic's come from the sampling pass)"""
    entropy: torch.Tensor = None
    scores: torch.Tensor = None
    """the reward model's raw scores (None without a reward model term)"""
    terms: dict = None
    """each scorer term's values (None counted as 0), by scorer name"""
    overlong: torch.Tensor = None
    """the overlong shaping's term (None when ppo.overlong_buffer is 0)"""
    resampled: int = 0
    """the step's prompt slots refilled because their group was flat (ppo.drop_flat_groups), over every process"""
    total: torch.Tensor = None
    """the weighted sum of the terms, before the missing-EOS penalty and clipping"""
    shaped: torch.Tensor = None
    rewards: torch.Tensor = None
    kl: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None
    """the value targets (None without a critic)"""


def replace_rows(ro: Rollout, rows: torch.Tensor, new: Rollout, pad_id: int) -> Rollout:
    """``ro`` with its ``rows`` replaced by ``new``'s episodes (sampled and scored), both re-padded to the longer
    prompt and the longer response: prompts stay left-padded and responses right-padded."""
    lq = max(x.ids.shape[1] - x.response.shape[1] for x in (ro, new))
    lr = max(x.response.shape[1] for x in (ro, new))

    def widen(x: Rollout) -> dict:
        q, length = x.ids.shape[1] - x.response.shape[1], x.response.shape[1]
        whole = {"ids": pad_id, "mask": 0}
        tokens = {"response": pad_id, "response_mask": 0, "logp": 0.0, "entropy": 0.0,
                  **({"values": 0.0} if x.values is not None else {})}
        out = {k: F.pad(getattr(x, k), (lq - q, lr - length), value=v) for k, v in whole.items()}
        out.update({k: F.pad(getattr(x, k), (0, lr - length), value=v) for k, v in tokens.items()})
        return out

    merged, incoming = widen(ro), widen(new)
    for key in list(merged) + ["stopped", "scores", "total", "shaped", "overlong"]:
        if key not in merged:
            if getattr(ro, key) is None:
                continue
            merged[key], incoming[key] = getattr(ro, key).clone(), getattr(new, key)
        merged[key][rows.to(merged[key].device)] = incoming[key]
    terms = {name: values.clone() for name, values in ro.terms.items()}
    for name in terms:
        terms[name][rows.to(terms[name].device)] = new.terms[name]
    return dataclasses.replace(ro, **merged, terms=terms)


def advantages(p: PPOConfig, ro: Rollout, reward_kl_coef: float) -> None:
    """``ro.advantages`` (and ``ro.returns`` with a critic) by ``ppo.advantage``, from the rollout's KL-shaped
    rewards (``reward_kl_coef``: the KL's weight in them, 0 when the KL is a loss term). A prompt's K responses are
    consecutive rows of this process (groups never straddle processes); statistics over the whole batch are over
    every process's tokens, as one process holding the whole batch would compute them."""
    mask, K = ro.response_mask, p.samples_per_prompt
    whiten = p.whiten_advantages
    if p.advantage == "gae":
        ro.advantages, ro.returns = ppo_math.gae(ro.rewards, ro.values, mask, p.gamma, p.lam)
    elif p.advantage == "reinforce_pp":  # returns normalised over the batch: that normalisation is the estimator
        rewards = ro.rewards
        if K > 1:  # the group's mean score as a baseline (REINFORCE++-baseline)
            rewards, _ = ppo_math.kl_penalized_rewards(ppo_math.group_baseline(ro.shaped, K), ro.logp, ro.ref_logp,
                                                       mask, reward_kl_coef, p.kl_kind)
        ro.advantages, whiten = ppo_math.returns_to_go(rewards, mask, p.gamma), True
    elif p.advantage in ("grpo", "dr_grpo"):  # one advantage per response, from its sequence reward, centred in
        # its group (and divided by the group's std for grpo); no batch whitening, which would divide again
        estimator = ppo_math.grpo_advantages if p.advantage == "grpo" else ppo_math.dr_grpo_advantages
        ro.advantages = ppo_math.per_token(estimator(ppo_math.sequence_sum(ro.rewards, mask), K), mask)
        whiten = False
    else:  # rloo
        ro.advantages = ppo_math.per_token(ppo_math.rloo_advantages(ppo_math.sequence_sum(ro.rewards, mask), K), mask)
    if whiten:
        ro.advantages = ppo_math.masked_whiten(ro.advantages, mask, total=distributed.all_sum)


def response_logits(models: PPOModels, ids, mask, length: int, role: str = "policy") -> torch.Tensor:
    """The logits each of the last ``length`` tokens was drawn from, under ``role`` (``ppo_math.predicting``;
    only the positions needed are computed)."""
    return predicting(models.policy_logits(ids, mask, keep=length + 1, role=role), length)


def ppo_epochs(models: PPOModels, optimizer, params, ro: Rollout, p: PPOConfig, step: int, kl_coef: float) -> dict:
    """``ppo_epochs`` passes over the rollout in shuffled mini-batches; one optimizer step per mini-batch,
    gradients accumulated over micro-batches; stops early when the approximate KL passes ``early_stop_kl``.
    The loss: the policy objective (``ppo.policy_loss``: the clipped surrogate, GSPO's or CISPO's) minus the
    entropy bonus, plus ``kl_coef`` times the KL to the reference when ``ppo.kl_in`` makes it a loss term, each
    aggregated over tokens and responses as ``ppo.loss_aggregation`` says, plus the clipped value loss (a token
    mean) when there is a critic. With the shared critic (``ppo.critic: shared``) one forward pass gives the
    logits and the values, and one backward takes both losses (the value loss's gradient reaches the policy
    adapter through ``ppo.vf_coef``); with the adapter critic the value adapter has a forward and backward of its
    own.

    Each loss is that of the whole mini-batch, across micro-batches and processes (every micro-batch's aggregate
    is weighted by its share of the mini-batch's tokens or responses, ``ppo_math.batch_share``), and the
    gradients are summed over processes before clipping: every process then holds the gradient one process would
    compute on all of it. Logged figures are token means (the losses: their aggregates).
    """
    B, length = ro.ids.shape[0], ro.response.shape[1]
    how, horizon, (clip_low, clip_high) = p.aggregation, p.max_new_tokens, p.clip_range
    trainable = [x for role in params.values() for x in role]
    totals: dict[str, float] = {}
    count = skipped = 0  # mini-batches, and skipped updates
    epochs_run = 0
    first_ratio = 0.0  # this process's part of the first mini-batch's mean ratio, before any update of the step
    grad_norms: dict[str, list[float]] = {role: [] for role in params}
    shared = "value" in params and p.value_model == "shared"
    for epoch in range(p.ppo_epochs):
        epochs_run += 1
        epoch_kl = 0.0  # this process's part of the epoch's mean approximate KL
        # a shuffle of this process's episodes, fixed by (seed, step, epoch, process): resume needs no RNG state
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(
            hash((p.seed, step, epoch, distributed.rank())) & 0x7FFFFFFF)).to(ro.ids.device)
        for start_ in range(0, B, p.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            rows = perm[start_:start_ + p.mini_batch_size]
            tokens = distributed.all_sum(ro.response_mask[rows].sum().float()).clamp(min=1)
            responses = len(rows) * distributed.world_size()  # every process's mini-batch is the same size
            for micro in rows.split(p.micro_batch_size):
                ids, mask, rmask = ro.ids[micro], ro.mask[micro], ro.response_mask[micro]
                by_token = rmask.sum() / tokens  # this micro-batch's part of the mini-batch's token means
                share = ppo_math.batch_share(rmask, how, tokens, responses)  # and of its losses
                vpred = None
                if shared:  # one pass: the policy's logits and the values on its hidden state
                    logits, vpred = (predicting(x, length) for x in models.policy_and_values(ids, mask, length + 1))
                else:
                    logits = response_logits(models, ids, mask, length)
                logp = ppo_math.logprobs_from_logits(logits, ro.response[micro], p.temperature)
                terms, pstats = ppo_math.policy_loss_terms(logp, ro.logp[micro], ro.advantages[micro], rmask,
                                                           p.policy_loss, clip_low, clip_high)
                pg_loss = ppo_math.aggregate(terms, rmask, how, horizon)
                if p.entropy_coef:  # the bonus is differentiated; without one the entropy is only logged
                    entropies = ppo_math.entropy_from_logits(logits, p.temperature)
                    loss = pg_loss - p.entropy_coef * ppo_math.aggregate(entropies, rmask, how, horizon)
                else:
                    with torch.no_grad():
                        entropies = ppo_math.entropy_from_logits(logits, p.temperature)
                    loss = pg_loss
                logged = [("policy/loss", pg_loss, share), ("policy/entropy", ppo_math.masked_mean(entropies, rmask),
                          by_token), ("policy/approxkl", pstats["approxkl"], by_token),
                          ("policy/clipfrac", pstats["clipfrac"], by_token), ("policy/ratio", pstats["ratio"], by_token)]
                if p.kl_where == "loss":
                    kl = ppo_math.kl_loss(logp, ro.ref_logp[micro], rmask, p.kl_kind, how, horizon)
                    loss = loss + kl_coef * kl
                    logged.append(("policy/kl_loss", kl, share))
                objective = loss * share
                if "value" in params:
                    if vpred is None:  # the value adapter's own pass, after the policy's graph is freed
                        objective.backward()
                        objective = 0.0
                        vpred = predicting(models.values(ids, mask), length)
                    vf_loss, vstats = ppo_math.value_loss(vpred, ro.values[micro], ro.returns[micro], rmask,
                                                          p.value_clip)
                    objective = objective + p.value_coef * vf_loss * by_token
                    logged += [("value/loss", vf_loss, by_token), ("value/clipfrac", vstats["clipfrac"], by_token)]
                objective.backward()
                for key, value, weight in logged:
                    totals[key] = totals.get(key, 0.0) + (value * weight).item()  # summed: the mini-batch's
                epoch_kl += (pstats["approxkl"] * by_token).item()
                if count == 0:
                    first_ratio += (pstats["ratio"] * by_token).item()
            count += 1
            distributed.all_reduce_grads(trainable)
            norms = {role: distributed.whole(torch.nn.utils.clip_grad_norm_(params[role], p.max_grad_norm))
                     for role in params}  # a sharded model's norm is over every process's shards
            if not all(torch.isfinite(n) for n in norms.values()):  # NaN/inf loss or gradient: skip this update
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            for role, norm in norms.items():
                grad_norms[role].append(norm.item())
            optimizer.step()
        # the epoch's mean approximate KL over all processes' tokens: every process stops together
        epoch_kl = distributed.all_sum(torch.tensor(epoch_kl)).item() / (B // p.mini_batch_size)
        if p.early_stop_kl is not None and epoch_kl > p.early_stop_kl:
            break
    keys = sorted(totals)  # each process holds its tokens' part of every mini-batch mean: the sum is the whole
    summed = distributed.all_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64))
    stats = {k: v / count for k, v in zip(keys, summed.tolist())}
    for role, norms in grad_norms.items():  # averaged over the updates that happened
        stats[f"{role}/grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
    # exactly 1 when the sampling pass and the training pass compute the same log-probs; kernels that differ by
    # shape (a KV-cache decode against a full forward, on a GPU in bf16) move it away from 1
    stats["policy/ratio_first"] = distributed.all_sum(torch.tensor(first_ratio, dtype=torch.float64)).item()
    stats["ppo/epochs_run"] = epochs_run
    stats["nonfinite/skipped_updates"] = skipped
    return stats


def guard_nonfinite(stats: dict, p: PPOConfig, step: int, bad_in_a_row: int) -> int:
    """Count PPO steps whose every update was skipped for NaN/inf; stop the run after ``max_nonfinite`` in a row."""
    if stats["nonfinite/skipped_updates"] < p.updates_per_step:
        return 0
    print(f"ppo: step {step}: non-finite reward, loss or gradient, update skipped", file=sys.stderr)
    if bad_in_a_row + 1 >= p.max_nonfinite:
        raise TrainingStopped(f"ppo: stopped at step {step}: {bad_in_a_row + 1} steps in a row had a non-finite "
                              "reward, loss or gradient (lower ppo.lr, check the reward model)")
    return bad_in_a_row + 1


def probe_pass(models: PPOModels, params: dict[str, list[torch.nn.Parameter]], query: torch.Tensor,
               query_mask: torch.Tensor, p: PPOConfig, eos_token_id: int, pad_token_id: int,
               reward: bool) -> list[torch.Tensor]:
    """Every kind of pass a PPO step makes, in small, for ``precision.repeats``: the policy samples up to 8
    tokens for ``query`` (keyed, with the KV cache, as a rollout does), the reference (and with ``reward`` the
    reward model) scores them, and the policy's (and the critic's) forward and backward run on them. Returns the
    outputs and the trainable parameters' gradients; leaves no gradient behind (``torch.autograd.grad``)."""
    keys = episode_keys(p.seed, 0, torch.arange(len(query)))
    sampled = models.sample(query, query_mask, keys=keys, temperature=p.temperature,
                            max_new_tokens=min(8, p.max_new_tokens), min_new_tokens=0, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id)
    response = sampled.tokens
    ids, mask = torch.cat([query, response], 1), torch.cat([query_mask, torch.ones_like(response)], 1)
    length = response.shape[1]
    outputs = [sampled.tokens, sampled.logprobs]
    with torch.no_grad():
        outputs.append(response_logits(models, ids, mask, length, role="reference"))
        if reward:
            outputs.append(models.scores(ids, mask))
    logits = response_logits(models, ids, mask, length)
    loss = ppo_math.logprobs_from_logits(logits, response, p.temperature).mean()
    outputs.append(logits.detach())
    if "value" in params:
        values = models.values(ids, mask)
        loss = loss + values.float().pow(2).mean()
        outputs.append(values.detach())
    trainable = [x for role in params.values() for x in role]
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    return outputs + [g for g in grads if g is not None]
