"""PPO: the SFT policy optimised against the reward model, with a per-token KL penalty to the frozen SFT reference.

setup (prompts, the four models on one base, optimizer, KL controller), then for every PPO step:
  1 rollout: sample a response to each prompt of the batch with the policy
  2 score and KL-shape the rewards
  3 advantages (GAE) and returns
  4 PPO epochs over shuffled mini-batches (clipped surrogate + clipped value loss)
  5 KL controller, metrics, periodic evaluation and checkpoints
and finally save the policy adapter (plus the value adapter and head), metrics and the manifest.
The maths lives in ``rlhf.ppo_math``; which adapter a forward pass uses lives in ``rlhf.ppo_models``.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf import checkpoint, distributed, formats, methods, modeling, ppo_math, ppo_models
from rlhf.checkpoint import Run
from rlhf.config import AdapterConfig, ModelConfig, Recipe
from rlhf.rollout import episode_keys, left_pad
from rlhf.training import show_progress
from rlhf.errors import TrainingStopped, UserError
from rlhf.tiny import world


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
    entropy: torch.Tensor = None
    scores: torch.Tensor = None
    rewards: torch.Tensor = None
    kl: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None


# ---------------------------------------------------------------------------------------------------------------
# Helpers of the loop
# ---------------------------------------------------------------------------------------------------------------

def encode_prompts(tokenizer, prompts: list[list[dict]], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Chat-template each prompt (with the generation prompt) into token ids; returns those of at most
    ``max_length`` tokens and the indices of the prompts they came from (longer ones are left out)."""
    out, kept = [], []
    for i, messages in enumerate(prompts):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_length:
            out.append(ids)
            kept.append(i)
    return out, kept


def truncate_after_eos(response: torch.Tensor, eos_id: int, pad_id: int):
    """Mask of tokens up to and including the first EOS (everything when there is none), the padded response,
    and whether each response stopped."""
    is_eos = response == eos_id
    stopped = is_eos.any(1)
    first = torch.where(stopped, is_eos.float().argmax(1), torch.full_like(stopped, response.shape[1] - 1,
                                                                          dtype=torch.long))
    mask = (torch.arange(response.shape[1], device=response.device)[None, :] <= first[:, None]).long()
    return response.masked_fill(mask == 0, pad_id), mask, stopped


def response_logits(models, ids, mask, length: int, role: str = "policy") -> torch.Tensor:
    """Logits that predict each of the last ``length`` tokens (position t-1 predicts token t)."""
    return models.policy_logits(ids, mask, keep=length + 1, role=role)[:, :-1]


def response_values(models, ids, mask, length: int) -> torch.Tensor:
    """V(s_t) for each response token t: the value head at the position before the token."""
    return models.values(ids, mask)[:, -length - 1:-1]


def shape_scores(raw: torch.Tensor, stopped: torch.Tensor, p, stats: dict) -> torch.Tensor:
    """Normalise with the reward model's stored mean/std, penalise responses without EOS, then clip."""
    s = raw.clone()
    if p.normalize_reward:
        s = (s - stats["mean"]) / max(stats["std"], 1e-6)
    if p.missing_eos_penalty is not None:
        s = torch.where(stopped, s, s - p.missing_eos_penalty)
    if p.reward_clip is not None:
        s = s.clamp(-p.reward_clip, p.reward_clip)
    return s


def _precision(models) -> str:
    """How the loop's passes run, for the start line."""
    measured = f" (bf16 products measured {models.bf16_speedup:.2f}x fp32 here)" if models.bf16_speedup else ""
    return ("bf16 autocast" if models.autocast else "fp32") + measured


def sequence_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ppo_math.masked(x, mask).sum(1)


@torch.no_grad()
def evaluate(models, tokenizer, prompts: list[list[dict]], encoded: list[list[int]], max_new_tokens: int) -> dict:
    """Greedy responses to held-out prompts: mean reward score, and mean gold score where the world defines one."""
    ids, mask = (t.to(models.device) for t in left_pad(encoded, tokenizer.pad_token_id))
    out = models.generate(ids, mask, do_sample=False, max_new_tokens=max_new_tokens,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    response, rmask, stopped = truncate_after_eos(out[:, ids.shape[1]:], tokenizer.eos_token_id,
                                                  tokenizer.pad_token_id)
    scores = models.scores(torch.cat([ids, response], 1), torch.cat([mask, rmask], 1))
    result = {"eval/score": scores.mean().item(), "eval/eos_rate": stopped.float().mean().item(),
              "eval/length": rmask.sum(1).float().mean().item()}
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    questions = [p[-1]["content"] for p in prompts]
    if all(world.parse_prompt(q) for q in questions):
        result["eval/gold"] = sum(world.score(q, t.strip()) for q, t in zip(questions, texts)) / len(texts)
    return result


def resolve_parents(recipe: Recipe, policy: str | None, reward: str | None):
    """The SFT and RM run directories, checked: finished, the right stages, the same base."""
    sft_dir = None if policy == "base" else Path(policy or recipe.stage_dir("sft"))
    rm_dir = Path(reward or recipe.stage_dir("rm"))
    rm_manifest = modeling.read_manifest(rm_dir)
    if rm_manifest.get("stage") != "rm":
        raise UserError(f"{rm_dir}: is a {rm_manifest.get('stage')!r} run, not a reward model (rm)")
    base = rm_manifest["base"]
    sft_manifest = None
    if sft_dir is not None:
        sft_manifest = modeling.read_manifest(sft_dir)
        if sft_manifest.get("stage") not in ("sft", "ppo"):
            raise UserError(f"{sft_dir}: is a {sft_manifest.get('stage')!r} run, not a policy (sft or ppo)")
        if _same_model(sft_manifest["base"], base) is False:
            raise UserError(f"{sft_dir} was trained on base {sft_manifest['base']!r} but {rm_dir} on {base!r}; "
                            "PPO needs one base for both")
        if sft_manifest["adapter"]["method"] != rm_manifest["adapter"]["method"]:
            raise UserError(f"{sft_dir} ({sft_manifest['adapter']['method']}) and {rm_dir} "
                            f"({rm_manifest['adapter']['method']}) must use the same adapter method")
    return sft_dir, sft_manifest, rm_dir, rm_manifest


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

def main(recipe: Recipe, policy: str | None = None, reward: str | None = None, out: str | Path | None = None,
         overwrite: bool = False, resume: bool = False) -> dict:
    """Run PPO as the recipe says; returns the manifest written to the run directory."""
    p = recipe.ppo
    if not recipe.data.prompts:
        raise UserError(f"{recipe.source}: data.prompts is required for the ppo stage")
    sft_dir, sft_manifest, rm_dir, rm_manifest = resolve_parents(recipe, policy, reward)
    prompts = formats.load(recipe.data.prompts, "prompts", columns=recipe.data.columns, split=recipe.data.split,
                           on_bad_row=recipe.data.on_bad_row)
    n_proc = distributed.world_size()
    eval_prompts = None
    if recipe.data.eval_prompts and p.eval_every:
        eval_prompts = formats.load(recipe.data.eval_prompts, "prompts", columns=recipe.data.columns,
                                    split=recipe.data.split).rows[:p.eval_samples]
    if distributed.sharding():
        raise UserError(f"ppo: the accelerate config asks for {distributed.sharding()} sharding; the PPO stage runs "
                        "data-parallel (recipes/accelerate/multi_gpu.yaml, or --num-processes N); SFT and RM run "
                        "sharded")
    base_cfg = ModelConfig(**{**rm_manifest["recipe"]["model"], "base": rm_manifest["base"]})
    modeling.check_lengths(modeling.load_config(base_cfg), {"ppo.max_prompt_length + ppo.max_new_tokens":
                                                            p.max_prompt_length + p.max_new_tokens}, recipe.source)
    with Run(Path(out) if out else recipe.stage_dir("ppo"), "ppo", overwrite=overwrite, resume=resume) as run:
        run.track(recipe)
        return _train(recipe, run, sft_dir, sft_manifest, rm_dir, rm_manifest, prompts, eval_prompts)


def _train(recipe, run, sft_dir, sft_manifest, rm_dir, rm_manifest, prompts, eval_prompts) -> dict:
    p = recipe.ppo
    torch.manual_seed(p.seed)
    model_cfg = recipe.model
    model_cfg.base = rm_manifest["base"]
    model_cfg.quantization = rm_manifest["recipe"]["model"].get("quantization")
    method = rm_manifest["adapter"]["method"]
    methods.check_stage(method, "ppo", str(rm_dir))
    # the method's options as the reward model was trained with them (a fresh policy adapter uses them too)
    adapter_cfg = AdapterConfig(**rm_manifest["recipe"]["adapter"])
    tokenizer = modeling.load_tokenizer(model_cfg, str(sft_dir or rm_dir))
    rm_stats = rm_manifest["reward_stats"]
    shift, scale = (rm_stats["mean"], rm_stats["std"]) if p.normalize_reward else (0.0, 1.0)
    dev = distributed.device()
    if not model_cfg.attn_implementation and dev.type == "cpu":
        # measured on CPU: eager attention's backward is much faster than SDPA's at PPO's lengths in bf16, and
        # within noise of it in fp32 (docs/ppo.md, "Where the time goes"); a recipe's model.attn_implementation wins
        model_cfg.attn_implementation = "eager"
    models = ppo_models.load(model_cfg, method, sft_dir, rm_dir, adapter_cfg, shift, scale, dev,
                             mixed_precision=p.mixed_precision)
    n_proc, rank, main = distributed.world_size(), distributed.rank(), distributed.is_main()
    global_batch = p.batch_size * n_proc  # ppo.batch_size episodes on each process
    models.train(False)  # dropout off in every pass: the log-prob ratios compare like with like
    encoded, kept = encode_prompts(tokenizer, prompts.rows, p.max_prompt_length)
    too_long = len(prompts.rows) - len(kept)
    if len(encoded) < global_batch:
        raise UserError(f"{recipe.data.prompts}: {len(encoded)} prompts" + (
            f" within ppo.max_prompt_length={p.max_prompt_length}" if too_long else "") + ", fewer than "
            f"ppo.batch_size={p.batch_size}" + (f" x {n_proc} processes" if n_proc > 1 else ""))
    if main:
        modeling.report_dropped("ppo", too_long, len(prompts.rows), f"prompts of {recipe.data.prompts}",
                                "ppo.max_prompt_length", p.max_prompt_length)
    eval_encoded = None
    if eval_prompts:
        eval_encoded, eval_kept = encode_prompts(tokenizer, eval_prompts, p.max_prompt_length)
        if main:
            modeling.report_dropped("ppo", len(eval_prompts) - len(eval_kept), len(eval_prompts),
                                    f"held-out prompts of {recipe.data.eval_prompts}", "ppo.max_prompt_length",
                                    p.max_prompt_length)
        eval_prompts = [eval_prompts[i] for i in eval_kept]
        eval_encoded = eval_encoded or None
    params = {role: models.parameters(role) for role in ("policy", "value")}
    optimizer = torch.optim.AdamW([{"params": params["policy"]}, {"params": params["value"]}], lr=p.lr, eps=1e-5)
    kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else ppo_math.FixedKLController(p.kl_coef))
    steps = p.max_steps or max(1, math.ceil(p.epochs * len(encoded) / global_batch))
    order_gen = torch.Generator().manual_seed(p.seed)
    order: list[int] = []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    n_trainable = sum(x.numel() for x in params["policy"] + params["value"])
    if main:
        print(f"ppo: {len(encoded)} prompts, {steps} steps of {global_batch} episodes"
              + (f" ({n_proc} processes x {p.batch_size})" if n_proc > 1 else "")
              + f"; training {n_trainable:,} parameters (policy + value); {_precision(models)}", file=sys.stderr)

    first_step, history, bad_in_a_row = 1, [], 0
    if run.resumed:
        first_step, order, lines = resume_from(run, models, optimizer, kl_ctl, order_gen, order)
        history = run.truncate_metrics(lines)
    progress = show_progress(recipe)  # a bar on a terminal, a line per step in logs
    bar = tqdm(total=steps, initial=first_step - 1, desc="ppo", unit="step", disable=not (progress and main))
    for step in range(first_step, steps + 1):
        t0 = time.time()
        # 1 rollout: sample one response per prompt with the policy. Every process draws the same global batch
        # from the same prompt order and takes its own slice; each episode samples with its own key, so its
        # response does not depend on which process runs it or what else is in the batch
        if len(order) < global_batch:
            order += torch.randperm(len(encoded), generator=order_gen).tolist()
        batch, order = order[:global_batch][rank * p.batch_size:(rank + 1) * p.batch_size], order[global_batch:]
        query, query_mask = (t.to(dev) for t in left_pad([encoded[i] for i in batch], pad))
        keys = episode_keys(p.seed, step, torch.arange(rank * p.batch_size, (rank + 1) * p.batch_size))
        sampled = models.sample(query, query_mask, keys=keys, temperature=p.temperature,
                                max_new_tokens=p.max_new_tokens, min_new_tokens=p.min_new_tokens,
                                eos_token_id=eos, pad_token_id=pad)
        response, response_mask, stopped = truncate_after_eos(sampled.tokens, eos, pad)
        # the policy's log-probs and entropies come from the sampling pass itself, not from another forward pass
        ro = Rollout(ids=torch.cat([query, response], 1), mask=torch.cat([query_mask, response_mask], 1),
                     response=response, response_mask=response_mask, stopped=stopped, logp=sampled.logprobs,
                     entropy=sampled.entropy)
        length = response.shape[1]
        t1 = time.time()

        # 2 score and KL-shape the rewards
        with torch.no_grad():
            ro.ref_logp = ppo_math.logprobs_from_logits(
                response_logits(models, ro.ids, ro.mask, length, role="reference"), response, p.temperature)
            ro.values = response_values(models, ro.ids, ro.mask, length)
            ro.scores = models.scores(ro.ids, ro.mask)
        shaped = shape_scores(ro.scores, stopped, p, rm_stats)
        ro.rewards, ro.kl = ppo_math.kl_penalized_rewards(shaped, ro.logp, ro.ref_logp, response_mask,
                                                          kl_ctl.value, p.kl_estimator)

        # 3 advantages (GAE) and returns
        ro.advantages, ro.returns = ppo_math.gae(ro.rewards, ro.values, response_mask, p.gamma, p.lam)
        if p.whiten_advantages:
            # over every process's tokens: each scales its advantages as one process holding the whole batch would
            ro.advantages = ppo_math.masked_whiten(ro.advantages, response_mask, total=distributed.all_sum)
        t2 = time.time()

        # 4 PPO epochs over shuffled mini-batches (no update at all from non-finite rewards)
        finite = bool(torch.isfinite(ro.rewards).all() and torch.isfinite(ro.values).all())
        if not distributed.any_failed(not finite):  # every process updates, or none does
            stats = _ppo_epochs(models, optimizer, params, ro, p, step)
        else:
            stats = {"nonfinite/skipped_updates": p.ppo_epochs * (p.batch_size // p.mini_batch_size)}
        t3 = time.time()
        bad_in_a_row = _guard_nonfinite(stats, p, step, bad_in_a_row)

        # 5 KL controller, metrics, evaluation, checkpoints
        seq_kl = sequence_sum(ro.kl, response_mask)
        non_score = sequence_sum(ro.rewards, response_mask) - shaped
        row = {
            "objective/score": ro.scores.mean().item(),
            "objective/score_shaped": shaped.mean().item(),
            "objective/kl": seq_kl.mean().item(),
            "objective/non_score_reward": non_score.mean().item(),
            "objective/rlhf_reward": (shaped + non_score).mean().item(),
            "objective/entropy": sequence_sum(ro.entropy, response_mask).mean().item(),
            **stats,
            "response/length": response_mask.sum(1).float().mean().item(),
            "response/eos_rate": stopped.float().mean().item(),
            "time/generation_s": t1 - t0,
            "time/scoring_s": t2 - t1,
            "time/update_s": t3 - t2,
        }
        row = {"step": step, "episodes": step * global_batch, **distributed.all_mean(row)}  # means over processes
        kl_ctl.update(row["objective/kl"], global_batch)
        row["ppo/kl_coef"] = kl_ctl.value
        if eval_encoded and (step % p.eval_every == 0 or step == steps):
            row.update(evaluate(models, tokenizer, eval_prompts, eval_encoded, p.max_new_tokens))
        row["time/step_s"] = time.time() - t0
        run.metrics.write(row)
        history.append(row)
        shown = {"score": row["objective/score"], "kl": row["objective/kl"], "len": row["response/length"],
                 **({"eval/gold": row["eval/gold"]} if "eval/gold" in row else {})}
        if progress and main:
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
            bar.update(1)
        elif main:
            print(f"ppo: step {step}/{steps} " + " ".join(f"{k} {v:.3f}" for k, v in shown.items()),
                  file=sys.stderr, flush=True)
        if row["objective/kl"] < -1e-3 and step > 1 and main:
            print(f"ppo: warning: mean KL is negative ({row['objective/kl']:.4f}) at step {step}: the k1 estimate "
                  "is only non-negative on average; persistent negative values usually mean the sampling and "
                  "the log-prob passes disagree (temperature, top-k/top-p, dropout or padding positions)",
                  file=sys.stderr)
        if p.save_every and step % p.save_every == 0 and step != steps:
            ckpt = run.staging / "checkpoints" / f"step_{step:06d}"  # the policy, for evaluation later
            with run.saving() as writer:
                if writer:
                    ckpt.mkdir(parents=True)
                    models.save(ckpt)
                    save_resume_state(run, step, models, optimizer, kl_ctl, order_gen, order, p.keep_checkpoints)
            distributed.barrier()

    bar.close()

    # save
    final = history[-1]
    within_budget = None if p.kl_budget is None else final["objective/kl"] <= p.kl_budget
    if within_budget is False and main:
        print(f"ppo: warning: final mean KL {final['objective/kl']:.3f} is over ppo.kl_budget={p.kl_budget}; "
              "raise ppo.kl_coef or use ppo.adaptive_kl", file=sys.stderr)
    bad = [i for i, x in enumerate(params["policy"] + params["value"]) if not torch.isfinite(x).all()]
    if bad:
        raise TrainingStopped(f"ppo: not saving: {len(bad)} trained tensors hold NaN or inf")
    with run.saving() as writer:
        if writer:
            models.save(run.staging)
            tokenizer.save_pretrained(str(run.staging))
    return run.finish({
        "base": model_cfg.base,
        "parents": {"sft": str(sft_dir) if sft_dir else None, "rm": str(rm_dir)},
        "adapter": {"method": method,
                    "parameters": {"trainable": n_trainable,
                                   "total": sum(x.numel() for x in _all_parameters(models))}},
        "data": {"prompts": prompts.summary(), "prompts_used": len(encoded), "prompts_too_long": too_long},
        "metrics": {"steps": steps, "episodes": steps * global_batch,
                    **{k: v for k, v in final.items() if "/" in k and not k.startswith("time/")}},
        "reward_stats": rm_manifest["reward_stats"],
        "kl_controller": kl_ctl.state_dict(),
        "mixed_precision": "bf16" if models.autocast else "no",
        "bf16_speedup": models.bf16_speedup,
        "kl_budget": {"budget": p.kl_budget, "within": within_budget},
        "seed": p.seed,
        "recipe": recipe.to_dict(),
    })


def save_resume_state(run: Run, step: int, models, optimizer, kl_ctl, order_gen, order, keep: int) -> None:
    """Everything the next step depends on: trainable weights, optimizer, KL controller, RNG, data position."""
    opt_tensors, opt_meta = checkpoint.optimizer_state(optimizer)
    rng_tensors, rng_meta = checkpoint.rng_state()
    tensors = {**{f"model.{k}": v for k, v in models.trainable_state().items()}, **opt_tensors, **rng_tensors,
               "rng.order": order_gen.get_state()}
    meta = {"optimizer": opt_meta, "rng": rng_meta, "kl_controller": kl_ctl.state_dict(), "order": order,
            "metrics_lines": run.metrics_lines()}
    checkpoint.save_state(run.work, step, tensors, meta, keep)


def resume_from(run: Run, models, optimizer, kl_ctl, order_gen, order) -> tuple[int, list[int], int]:
    """Restore the newest complete resume checkpoint; returns the step to run next, the data order, and how many
    metrics lines were written when it was saved."""
    state = checkpoint.latest_state(run.work)
    step, lines = 0, 0
    if state is not None:
        step, tensors, meta = state
        models.load_trainable_state({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        checkpoint.load_optimizer_state(optimizer, tensors, meta["optimizer"])
        kl_ctl.load_state_dict(meta["kl_controller"])
        order_gen.set_state(tensors["rng.order"])
        checkpoint.set_rng_state(tensors, meta["rng"])
        order, lines = meta["order"], meta["metrics_lines"]
    distributed.barrier()  # everyone has read the state before the main process tidies up
    if distributed.is_main():
        for snapshot in (run.staging / "checkpoints").glob("step_*"):
            if int(snapshot.name.split("_")[1]) > step:  # written after the state we resume from: redo them
                shutil.rmtree(snapshot)
        print(f"ppo: resuming from step {step}", file=sys.stderr)
    return step + 1, order, lines


def _all_parameters(models):
    if isinstance(models, ppo_models.SharedBase):
        return list(models.model.parameters()) + list(models.value_head.parameters())
    return [x for m in (models.policy, models.reference, models.reward, models.value) for x in m.parameters()]


def _ppo_epochs(models, optimizer, params, ro: Rollout, p, step: int) -> dict:
    """``ppo_epochs`` passes over the rollout in shuffled mini-batches; one optimizer step per mini-batch,
    gradients accumulated over micro-batches; stops early when the approximate KL passes ``early_stop_kl``.

    Each loss is a mean over the response tokens of the whole mini-batch, across micro-batches and processes
    (every micro-batch's token mean is weighted by its share of those tokens), and the gradients are summed over
    processes before clipping: every process then holds the gradient one process would compute on all of it.
    """
    B, length = ro.ids.shape[0], ro.response.shape[1]
    trainable = params["policy"] + params["value"]
    totals: dict[str, float] = {}
    count = skipped = 0  # mini-batches, and skipped updates
    epochs_run = 0
    grad_norms: dict[str, list[float]] = {"policy": [], "value": []}
    for epoch in range(p.ppo_epochs):
        epochs_run += 1
        epoch_kl = 0.0  # this process's part of the epoch's mean approximate KL
        # a shuffle of this process's episodes, fixed by (seed, step, epoch, process): resume needs no RNG state
        perm = torch.randperm(B, generator=torch.Generator().manual_seed(
            hash((p.seed, step, epoch, distributed.rank())) & 0x7FFFFFFF)).to(ro.ids.device)
        for start in range(0, B, p.mini_batch_size):
            optimizer.zero_grad(set_to_none=True)
            rows = perm[start:start + p.mini_batch_size]
            tokens = distributed.all_sum(ro.response_mask[rows].sum().float()).clamp(min=1)
            for micro in rows.split(p.micro_batch_size):
                ids, mask, rmask = ro.ids[micro], ro.mask[micro], ro.response_mask[micro]
                share = rmask.sum() / tokens  # this micro-batch's part of the mini-batch token mean
                logits = response_logits(models, ids, mask, length)
                logp = ppo_math.logprobs_from_logits(logits, ro.response[micro], p.temperature)
                pg_loss, pstats = ppo_math.policy_loss(logp, ro.logp[micro], ro.advantages[micro], rmask, p.clip)
                entropy = ppo_math.masked_mean(ppo_math.entropy_from_logits(logits, p.temperature), rmask)
                ((pg_loss - p.entropy_coef * entropy) * share).backward()
                vpred = response_values(models, ids, mask, length)
                vf_loss, vstats = ppo_math.value_loss(vpred, ro.values[micro], ro.returns[micro], rmask,
                                                      p.value_clip)
                (p.vf_coef * vf_loss * share).backward()
                for key, value in (("policy/loss", pg_loss), ("value/loss", vf_loss), ("policy/entropy", entropy),
                                   ("policy/approxkl", pstats["approxkl"]), ("policy/clipfrac", pstats["clipfrac"]),
                                   ("policy/ratio", pstats["ratio"]), ("value/clipfrac", vstats["clipfrac"])):
                    totals[key] = totals.get(key, 0.0) + (value * share).item()  # summed: the mini-batch's mean
                epoch_kl += (pstats["approxkl"] * share).item()
            count += 1
            distributed.all_reduce_grads(trainable)
            norms = {role: torch.nn.utils.clip_grad_norm_(params[role], p.max_grad_norm)
                     for role in ("policy", "value")}
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
    stats["ppo/epochs_run"] = epochs_run
    stats["nonfinite/skipped_updates"] = skipped
    return stats


def _guard_nonfinite(stats: dict, p, step: int, bad_in_a_row: int) -> int:
    """Count PPO steps whose every update was skipped for NaN/inf; stop the run after ``max_nonfinite`` in a row."""
    updates = p.ppo_epochs * (p.batch_size // p.mini_batch_size)
    if stats["nonfinite/skipped_updates"] < updates:
        return 0
    print(f"ppo: step {step}: non-finite reward, loss or gradient, update skipped", file=sys.stderr)
    if bad_in_a_row + 1 >= p.max_nonfinite:
        raise TrainingStopped(f"ppo: stopped at step {step}: {bad_in_a_row + 1} steps in a row had a non-finite "
                              "reward, loss or gradient (lower ppo.lr, check the reward model)")
    return bad_in_a_row + 1
