"""The PPO step's pieces that act on one batch of episodes: the ``Batch`` the update trains on, the advantages
by ``ppo.advantage``, and the update (``ppo_epochs``: the PPO epochs
over shuffled mini-batches, and the guard that stops a run whose updates are all non-finite); ``probe_pass``, a
step in small that ``rlhf.ppo.precision.repeats`` runs twice to tell whether the run will repeat bit for bit.

``stages/ppo.py`` holds the loop that calls them: sampling, scoring, metrics, checkpoints. The maths lives in
``rlhf.ppo.ppo_math``; which adapter a forward pass uses in ``rlhf.ppo.ppo_models``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from rlhf.ppo import ppo_math
from rlhf.scale import distributed
from rlhf.config import PPOConfig
from rlhf.errors import TrainingStopped
from rlhf.ppo.ppo_math import predicting
from rlhf.ppo.ppo_models import PPOModels
from rlhf.engine.episodes import Episodes, Scored
from rlhf.engine.rollout import episode_keys


@dataclass(frozen=True)
class Batch:
    """What the update trains on: the episodes, their reference log-probs and KL-shaped rewards, the critic's
    values at rollout time, and the advantages (and value targets) the estimator made of them, built whole once
    the episodes are scored (``stages/ppo.py``)."""

    episodes: Episodes
    ref_logp: torch.Tensor
    """the reference's log-prob of each response token"""
    values: torch.Tensor | None
    """the critic's value of each response state (None without a critic)"""
    rewards: torch.Tensor
    """per-token rewards: the KL penalty when it is in the reward, the shaped score at the last token"""
    kl: torch.Tensor
    """per-token KL estimate to the reference"""
    advantages: torch.Tensor
    returns: torch.Tensor | None
    """the value targets (None without a critic)"""


def advantages(p: PPOConfig, scored: Scored, values: torch.Tensor | None, ref_logp: torch.Tensor,
               rewards: torch.Tensor, reward_kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages, returns)`` by ``ppo.advantage`` (returns, the value targets, only with a critic), from the
    episodes' KL-shaped ``rewards`` (``reward_kl_coef``: the KL's weight in them, 0 when the KL is a loss term). A
    prompt's K responses are consecutive rows of this process (groups never straddle processes); statistics over
    the whole batch are over every process's tokens, as one process holding the whole batch would compute them."""
    episodes = scored.episodes
    mask, K = episodes.sampled, p.samples_per_prompt
    if episodes.turns is not None and (episodes.turns.rewards is not None or p.turn_gamma != 1.0):
        return turn_advantages(p, scored, values, ref_logp, rewards, reward_kl_coef)
    whiten, returns = p.whiten_advantages, None
    if p.advantage == "gae":
        advantage, returns = ppo_math.gae(rewards, values, mask, p.gamma, p.lam)
    elif p.advantage == "reinforce_pp":  # returns normalised over the batch: that normalisation is the estimator
        if K > 1:  # the group's mean score as a baseline (REINFORCE++-baseline)
            rewards, _ = ppo_math.kl_penalized_rewards(ppo_math.group_baseline(scored.shaped, K), episodes.logp,
                                                       ref_logp, mask, reward_kl_coef, p.kl_kind)
        advantage, whiten = ppo_math.returns_to_go(rewards, mask, p.gamma), True
    elif p.advantage in ("grpo", "dr_grpo"):  # one advantage per response, from its sequence reward, centred in
        # its group (and divided by the group's std for grpo); no batch whitening, which would divide again
        estimator = ppo_math.grpo_advantages if p.advantage == "grpo" else ppo_math.dr_grpo_advantages
        advantage = ppo_math.per_token(estimator(ppo_math.sequence_sum(rewards, mask), K), mask)
        whiten = False
    else:  # rloo
        advantage = ppo_math.per_token(ppo_math.rloo_advantages(ppo_math.sequence_sum(rewards, mask), K), mask)
    if whiten:
        advantage = ppo_math.masked_whiten(advantage, mask, total=distributed.all_sum)
    return advantage, returns


def turn_advantages(p: PPOConfig, scored: Scored, values: torch.Tensor | None, ref_logp: torch.Tensor,
                    rewards: torch.Tensor, reward_kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``advantages`` of multi-turn episodes whose turns are rewarded (the environment's ``get_turn_reward``) or
    discounted (ppo.turn_gamma below 1). Each turn's reward joins the token rewards at the turn's last sampled
    token, and from one turn to the next the discount is ppo.turn_gamma (times ppo.gamma).

    - gae: over the sampled tokens with that discount;
    - reinforce_pp: the tokens' discounted returns (with K > 1 the outcome centred in its group, as for one turn),
      whitened over the batch;
    - grpo, dr_grpo, rloo: each turn's return-to-go (its tokens' rewards and every later turn's, discounted),
      compared at each turn index within the group, zeros standing for the episodes that had stopped
      (``ppo_math.turn_group_advantages``: a baseline whose terms do not depend on when the episode stopped)."""
    episodes, K = scored.episodes, p.samples_per_prompt
    mask = episodes.sampled
    ends, turn_rewards = episodes.turns.turn_tensors(mask.device)
    played = episodes.turns.turns.to(mask.device)
    if p.advantage == "reinforce_pp" and K > 1:  # the group's mean score as a baseline (REINFORCE++-baseline)
        rewards, _ = ppo_math.kl_penalized_rewards(ppo_math.group_baseline(scored.shaped, K), episodes.logp,
                                                   ref_logp, mask, reward_kl_coef, p.kl_kind)
    rewards = rewards + torch.zeros_like(rewards).scatter_add_(1, ends.clamp(max=mask.shape[1] - 1),
                                                               turn_rewards.to(rewards.dtype))
    discount = ppo_math.turn_discounts(ends, played, mask, p.gamma, p.turn_gamma)
    if p.advantage == "gae":
        advantage, returns = ppo_math.gae(rewards, values, mask, discount, p.lam)
    elif p.advantage == "reinforce_pp":
        advantage, returns = ppo_math.returns_to_go(rewards, mask, discount), None
    else:
        index = ppo_math.turn_index(ends, mask.shape[1])
        estimator = {"grpo": ppo_math.grpo_advantages, "dr_grpo": ppo_math.dr_grpo_advantages,
                     "rloo": ppo_math.rloo_advantages}[p.advantage]
        turn_return = ppo_math.turn_returns(ppo_math.turn_sums(rewards, index, mask, ends.shape[1]), played,
                                            p.turn_gamma)
        advantage = ppo_math.per_token(ppo_math.turn_group_advantages(turn_return, K, estimator), mask, index)
        returns = None
    if p.advantage in ("gae", "rloo") and p.whiten_advantages or p.advantage == "reinforce_pp":
        advantage = ppo_math.masked_whiten(advantage, mask, total=distributed.all_sum)
    return advantage, returns


def response_logits(models: PPOModels, ids, mask, length: int, role: str = "policy") -> torch.Tensor:
    """The logits each of the last ``length`` tokens was drawn from, under ``role`` (``ppo_math.predicting``;
    only the positions needed are computed)."""
    return predicting(models.policy_logits(ids, mask, keep=length + 1, role=role), length)


def ppo_epochs(models: PPOModels, optimizer, params, batch: Batch, p: PPOConfig, step: int, kl_coef: float) -> dict:
    """``ppo_epochs`` passes over the rollout in shuffled mini-batches; one optimizer step per mini-batch,
    gradients accumulated over micro-batches; stops early when the approximate KL passes ``early_stop_kl``.
    The loss: the policy objective (``ppo.policy_loss``: the clipped surrogate, GSPO's or CISPO's) minus the
    entropy bonus, plus ``kl_coef`` times the KL to the reference when ``ppo.kl_in`` makes it a loss term, each
    aggregated over tokens and responses as ``ppo.loss_aggregation`` says, plus the clipped value loss (a token
    mean) when there is a critic. A critic whose values come with the policy's pass (the shared critic) gives
    them from the one forward that gives the logits, and one backward takes both losses (the value loss's
    gradient reaches the policy's weights through ``ppo.vf_coef``); another (the adapter critic) has a forward and
    backward of its own.

    Each loss is that of the whole mini-batch, across micro-batches and processes (every micro-batch's aggregate
    is weighted by its share of the mini-batch's tokens or responses, ``ppo_math.batch_share``), and the
    gradients are summed over processes before clipping: every process then holds the gradient one process would
    compute on all of it. Logged figures are token means (the losses: their aggregates).
    """
    episodes = batch.episodes
    B = episodes.size
    trainable = [x for role in params.values() for x in role]
    totals: dict[str, float] = {}
    count = skipped = 0  # mini-batches, and skipped updates
    epochs_run = 0
    first_ratio = 0.0  # this process's part of the first mini-batch's mean ratio, before any update of the step
    grad_norms: dict[str, list[float]] = {role: [] for role in params}
    for epoch in range(p.ppo_epochs):
        epochs_run += 1
        epoch_kl = 0.0  # this process's part of the epoch's mean approximate KL
        # a shuffle of this process's episodes, fixed by (seed, step, epoch, process): resume needs no RNG state
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(
            hash((p.seed, step, epoch, distributed.rank())) & 0x7FFFFFFF)).to(episodes.ids.device)
        for start_ in range(0, B, p.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            rows = perm[start_:start_ + p.mini_batch_size]
            tokens = distributed.all_sum(episodes.sampled[rows].sum().float()).clamp(min=1)
            responses = len(rows) * distributed.world_size()  # every process's mini-batch is the same size
            for micro in rows.split(p.micro_batch_size):
                logged, approxkl, ratio = micro_batch(models, batch, micro, p, kl_coef, tokens, responses)
                for key, value, weight in logged:
                    totals[key] = totals.get(key, 0.0) + (value * weight).item()  # summed: the mini-batch's
                epoch_kl += approxkl.item()
                if count == 0:
                    first_ratio += ratio.item()
            count += 1
            norms = clipped_update(optimizer, params, trainable, p.max_grad_norm)
            if norms is None:
                skipped += 1
                continue
            for role, norm in norms.items():
                grad_norms[role].append(norm)
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


def micro_batch(models: PPOModels, batch: Batch, micro: torch.Tensor, p: PPOConfig, kl_coef: float,
                tokens: torch.Tensor, responses: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """One micro-batch's forward passes and backward (``ppo_epochs``), its losses weighted by its share of the
    mini-batch of ``tokens`` response tokens and ``responses`` responses over every process. Returns the logged
    ``(name, value, weight)`` triples and this micro-batch's part of the mini-batch's approximate KL and ratio."""
    episodes, length = batch.episodes, batch.episodes.length
    ids, mask, rmask = episodes.ids[micro], episodes.mask[micro], episodes.sampled[micro]
    by_token = rmask.sum() / tokens  # this micro-batch's part of the mini-batch's token means
    share = ppo_math.batch_share(rmask, p.aggregation, tokens, responses)  # and of its losses
    critic = models.critic
    vpred = None
    if critic is not None and critic.on_policy_pass:  # one pass: the policy's logits and the values on its hidden
        logits, vpred = (predicting(x, length) for x in critic.with_policy(ids, mask, length + 1))
    else:
        logits = response_logits(models, ids, mask, length)
    loss, logged, pstats = policy_objective(logits, batch, micro, p, kl_coef, share, by_token)
    objective = loss * share
    if critic is not None:
        if vpred is None:  # the critic's own pass, after the policy's graph is freed
            objective.backward()
            objective = 0.0
            vpred = predicting(critic.values(ids, mask), length)
        vf_loss, vstats = ppo_math.value_loss(vpred, batch.values[micro], batch.returns[micro], rmask, p.value_clip)
        objective = objective + p.value_coef * vf_loss * by_token
        logged += [("value/loss", vf_loss, by_token), ("value/clipfrac", vstats["clipfrac"], by_token)]
    objective.backward()
    return logged, pstats["approxkl"] * by_token, pstats["ratio"] * by_token


def policy_objective(logits: torch.Tensor, batch: Batch, micro: torch.Tensor, p: PPOConfig, kl_coef: float,
                     share: torch.Tensor, by_token: torch.Tensor) -> tuple[torch.Tensor, list, dict]:
    """A micro-batch's policy loss (before its ``share``): the objective ``ppo.policy_loss`` names, minus the
    entropy bonus, plus the KL to the reference when ``ppo.kl_in`` makes it a loss term; with what it logs and the
    objective's statistics (``ppo_math.policy_loss_terms``)."""
    episodes, how, horizon = batch.episodes, p.aggregation, p.max_new_tokens
    rmask = episodes.sampled[micro]
    clip_low, clip_high = p.clip_range
    logp = ppo_math.logprobs_from_logits(logits, episodes.response[micro], p.temperature)
    terms, pstats = ppo_math.policy_loss_terms(logp, episodes.logp[micro], batch.advantages[micro], rmask,
                                               p.policy_loss, clip_low, clip_high)
    pg_loss = ppo_math.aggregate(terms, rmask, how, horizon)
    if p.entropy_coef:  # the bonus is differentiated; without one the entropy is only logged
        entropies = ppo_math.entropy_from_logits(logits, p.temperature)
        loss = pg_loss - p.entropy_coef * ppo_math.aggregate(entropies, rmask, how, horizon)
    else:
        with torch.no_grad():
            entropies = ppo_math.entropy_from_logits(logits, p.temperature)
        loss = pg_loss
    logged = [("policy/loss", pg_loss, share), ("policy/entropy", ppo_math.masked_mean(entropies, rmask), by_token),
              ("policy/approxkl", pstats["approxkl"], by_token), ("policy/clipfrac", pstats["clipfrac"], by_token),
              ("policy/ratio", pstats["ratio"], by_token)]
    if p.kl_where == "loss":
        kl = ppo_math.kl_loss(logp, batch.ref_logp[micro], rmask, p.kl_kind, how, horizon)
        loss = loss + kl_coef * kl
        logged.append(("policy/kl_loss", kl, share))
    return loss, logged, pstats


def clipped_update(optimizer, params: dict, trainable: list, max_norm: float) -> dict[str, float] | None:
    """The optimizer step of one mini-batch: gradients summed over processes, each role's clipped to ``max_norm``
    (a sharded model's norm is over every process's shards). Returns each role's norm before clipping, or None
    when one is not finite (a NaN/inf loss or gradient): the update is skipped and the gradients dropped."""
    distributed.all_reduce_grads(trainable)
    norms = {role: distributed.whole(torch.nn.utils.clip_grad_norm_(params[role], max_norm)) for role in params}
    if not all(torch.isfinite(n) for n in norms.values()):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return {role: norm.item() for role, norm in norms.items()}


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
               query_mask: torch.Tensor, p: PPOConfig, eos_token_id: int, pad_token_id: int) -> list[torch.Tensor]:
    """Every kind of pass a PPO step makes, in small, for ``precision.repeats``: the policy samples up to 8
    tokens for ``query`` (keyed, with the KV cache, as a rollout does), the reference (and the reward model the
    models hold) scores them, and the policy's (and the critic's) forward and backward run on them. Returns the
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
        if models.has_reward:
            outputs.append(models.scores(ids, mask))
    logits = response_logits(models, ids, mask, length)
    loss = ppo_math.logprobs_from_logits(logits, response, p.temperature).mean()
    outputs.append(logits.detach())
    if models.critic is not None:
        values = models.critic.values(ids, mask)
        loss = loss + values.float().pow(2).mean()
        outputs.append(values.detach())
    trainable = [x for role in params.values() for x in role]
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    return outputs + [g for g in grads if g is not None]
