"""PPO: the SFT policy optimised against the reward (the reward model's score, scorers, or a weighted sum of them:
``ppo.reward``), with a per-token KL penalty to the frozen SFT reference.

``main`` checks the recipe and the parent runs, ``setup`` loads what the loop reads (prompts, the four models on
one base) and ``start`` what it changes (optimizer, KL controller, data order: a resume checkpoint's contents).
``train`` is the loop; for every PPO step:
  1 rollout: sample ``ppo.samples_per_prompt`` responses to each prompt of the batch with the policy
  2 score and KL-shape the rewards
  3 advantages (``ppo.advantage``: GAE with the critic's values, or a critic-free estimator) and returns
  4 PPO epochs over shuffled mini-batches (clipped surrogate, + clipped value loss with a critic, + the KL as a
    loss term when ``ppo.kl_in`` says so)
  5 KL controller, metrics, periodic evaluation and checkpoints (``log_step``, ``save_checkpoint``)
and ``finish`` saves the policy adapter (plus the value adapter and head with a critic), metrics and the manifest.
The rollout's container, its advantages and the update (steps 3-4) live in ``rlhf.ppo.ppo_update``, the maths in
``rlhf.ppo.ppo_math``; which adapter a forward pass uses lives in ``rlhf.ppo.ppo_models``.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.feedback import rewards, scorers
from rlhf.models import method_table, modeling
from rlhf.ppo import ppo_math, ppo_models, precision
from rlhf.runs import preempt, resume
from rlhf.scale import distributed
from rlhf.text import encoding, formats
from rlhf.runs.manifest import Manifest
from rlhf.runs.rundir import Run
from rlhf.config import AdapterConfig, ModelConfig, PPOConfig, Recipe
from rlhf.errors import TrainingStopped, UserError
from rlhf.ppo.ppo_math import predicting
from rlhf.ppo.ppo_models import PPOModels
from rlhf.engine import agent, environments
from rlhf.engine.episodes import Episodes, Scored, replace_rows
from rlhf.ppo.ppo_update import Batch, advantages, guard_nonfinite, ppo_epochs, probe_pass, response_logits
from rlhf.text.encoding import left_pad
from rlhf.engine.rollout import episode_keys
from rlhf.models.training import show_progress



@dataclass
class Setup:
    """What the loop reads and never changes."""

    recipe: Recipe
    p: PPOConfig
    run: Run
    models: PPOModels
    tokenizer: object
    model_cfg: ModelConfig
    """the model settings PPO ran with: the reward model's (or the SFT run's) base and quantization, the
    attention kernel chosen"""
    method: str
    sft_dir: Path | None
    rm_dir: Path | None
    reward: "Reward"
    prompts: formats.Loaded
    encoded: list[list[int]]
    """the training prompts' token ids (those within ppo.max_prompt_length)"""
    messages: list[list[dict]]
    """the same prompts as messages (what scorers read)"""
    eval_prompts: list[list[dict]] | None
    eval_encoded: list[list[int]] | None
    eval_scorers: list[scorers.Scorer]
    env: environments.Environment | None
    """the environment of multi-turn episodes (``ppo.environment``), or None for one response per prompt"""
    params: dict[str, list[torch.nn.Parameter]]
    """the trainable parameters of "policy" and (with a critic) "value", the critic's"""
    steps: int
    rank: int
    main: bool
    repeat_check_s: float = 0.0
    """seconds the repeatability check took (``precision.repeats``; the last one when "auto" fell back)"""

    @property
    def global_batch(self) -> int:
        """Episodes per PPO step over every process."""
        return self.p.global_batch(distributed.world_size())

    @property
    def tools(self) -> list[dict] | None:
        """The environment's tools as the chat template gets them, or None without one."""
        return list(self.env.schemas) if self.env is not None else None

    @property
    def limits(self) -> environments.Limits:
        return environments.Limits.of(self.p)


@dataclass(frozen=True)
class Reward:
    """What PPO maximises (``ppo.reward``): the reward model's weight (0: no reward model) and the scorers'."""

    model_weight: float
    scorers: list[tuple[scorers.Scorer, float]]
    model: rewards.RewardModel | None
    """the reward model weighed by ``model_weight``: a reward-model run's adapter on the policy's base, reading the
    episodes' token ids (``rewards.TokenReward``), or a published model reading their text; None without one"""

    def describe(self) -> dict:
        """For the manifest: each term's weight (scorers by name, with the spec they load from)."""
        out = {"reward_model": self.model_weight} if self.model_weight else {}
        if self.model is not None and self.model.identity:
            out["reward_model"] = {"weight": self.model_weight, **self.model.identity}
        return {**out, **{s.name: {"spec": s.spec, "weight": w} for s, w in self.scorers}}


@dataclass
class State:
    """What changes from step to step: everything a resume checkpoint holds, and the metrics so far."""

    optimizer: torch.optim.Optimizer
    kl_ctl: ppo_math.FixedKLController | ppo_math.AdaptiveKLController
    order_gen: torch.Generator
    """draws the prompt order, one permutation of the prompts at a time"""
    order: list[int] = field(default_factory=list)
    """prompt indices not yet drawn from the current permutations"""
    step: int = 0
    """the last finished PPO step"""
    history: list[dict] = field(default_factory=list)
    bad_in_a_row: int = 0
    """PPO steps in a row whose every update was skipped for a non-finite value"""


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

def main(recipe: Recipe, policy: str | None = None, reward: str | None = None, out: str | Path | None = None,
         overwrite: bool = False, resume: bool = False, command: str | None = None) -> dict:
    """Run PPO as the recipe says; returns the manifest written to the run directory (``command``: the command line
    the manifest records)."""
    p = recipe.ppo
    if not recipe.data.prompts:
        raise UserError(f"{recipe.source}: data.prompts is required for the ppo stage")
    model_weight, terms = scorers.reward_terms(p.reward, f"{recipe.source}: ppo.reward")
    if reward and not model_weight:
        raise UserError(f"--reward {reward}: {recipe.source}: ppo.reward has no reward_model term, so PPO uses no "
                        "reward model")
    sft = None if policy == "base" else modeling.read_run(policy or recipe.stage_dir("sft"), "policy")
    # the reward model, decided once: a run of ours (its adapter will sit on the policy's base, nothing loaded here)
    # or a published model (a separate frozen model reading text, loaded now)
    reward_model = (rewards.load(reward, dtype=recipe.model.dtype, device=distributed.device(),
                                 batch_size=p.micro_batch_size) if reward else
                    rewards.RunReward(recipe.stage_dir("rm"))) if model_weight else None
    rm = check_parents(sft, reward_model.run if reward_model is not None else None)
    eval_scorers = scorers.load_all(recipe.eval.scorers, f"{recipe.source}: eval.scorers") if p.eval_every else []
    env = environments.load(p.environment, f"{recipe.source}: ppo.environment") if p.environment else None
    prompts = formats.load(recipe.data.prompts, "prompts", columns=recipe.data.columns, split=recipe.data.split,
                           on_bad_row=recipe.data.on_bad_row)
    eval_prompts = None
    if recipe.data.eval_prompts and p.eval_every:
        eval_prompts = formats.load(recipe.data.eval_prompts, "prompts", columns=recipe.data.columns,
                                    split=recipe.data.split).rows[:p.eval_samples]
    base_cfg, method, adapter_cfg = model_source(recipe, sft, rm)
    parent = rm or sft
    fixed_by = f" (the method of {parent.dir}, which PPO continues)" if parent is not None else ""
    if parent is not None and recipe.adapter.method != method and distributed.is_main():
        print(f"ppo: adapter.method {recipe.adapter.method} in {recipe.source} is not used: PPO continues with "
              f"{method}, the method {parent.dir} trained with", file=sys.stderr)
    check_sharding(method, fixed_by)
    longest = ("max_episode_tokens", p.max_episode_tokens) if env else ("max_new_tokens", p.max_new_tokens)
    modeling.check_lengths(modeling.load_config(base_cfg), {f"ppo.max_prompt_length + ppo.{longest[0]}":
                                                            p.max_prompt_length + longest[1]}, recipe.source)
    with Run(Path(out) if out else recipe.stage_dir("ppo"), "ppo", overwrite=overwrite, resume=resume,
             command=command) as run:
        run.track(recipe)
        s = setup(recipe, run, (base_cfg, method, adapter_cfg), sft, rm, (model_weight, terms, reward_model),
                  prompts, eval_prompts, eval_scorers, env)
        state = start(s)
        with preempt.handlers("ppo"):
            train(s, state)
        return finish(s, state)


def check_sharding(method: str, fixed_by: str = "") -> None:
    """PPO shards full fine-tuning with FSDP2 (``ppo_models.SeparateCopies.shard``); an adapter method runs
    data-parallel (a whole, usually quantized, base on every process and only the adapters' gradients summed), and
    DeepSpeed is the trainers' (SFT, RM, DPO) on GPUs: a config asking otherwise is an error, not a silent
    replica. ``fixed_by`` says which parent run fixed the method (PPO continues its parents')."""
    how = distributed.sharding()
    if how == "deepspeed":
        raise UserError(f"ppo: {distributed.config_name()} asks for deepspeed; the PPO stage shards with FSDP2 "
                        "(recipes/accelerate/fsdp.yaml, full fine-tuning) or runs data-parallel "
                        "(recipes/accelerate/multi_gpu.yaml, or --num-processes N)")
    if how == "fsdp" and method_table.kind(method) != "weights":
        raise UserError(f"ppo: {distributed.config_name()} asks for fsdp sharding, but PPO with {method}{fixed_by} "
                        "runs data-parallel: a whole base on every process, only the adapters' gradients summed "
                        "(recipes/accelerate/multi_gpu.yaml, or --num-processes N); PPO shards full fine-tuning")
    if how == "fsdp" and distributed.world_size() > 1 and not torch.cuda.is_available():
        from accelerate.utils import FullyShardedDataParallelPlugin

        if FullyShardedDataParallelPlugin().fsdp_version != 2:
            raise UserError(f"ppo: {distributed.config_name()} asks for FSDP version 1; PPO shards with FSDP2 "
                            "(fsdp_config: fsdp_version: 2, as recipes/accelerate/fsdp.yaml)")


def check_parents(sft: modeling.ParentRun | None, rm: modeling.ParentRun | None) -> modeling.ParentRun | None:
    """The reward-model run (None: a published reward model, or none), checked against the SFT run: one base and
    one adapter method for both, since the reward adapter sits on the policy's base."""
    if sft is not None and rm is not None:
        if not modeling.same_base(sft.model.base, rm.model.base):
            raise UserError(f"{sft.dir} was trained on base {sft.model.base!r} but {rm.dir} on {rm.model.base!r}; "
                            "PPO needs one base for both")
        if sft.method != rm.method:
            raise UserError(f"{sft.dir} ({sft.method}) and {rm.dir} ({rm.method}) must use the same adapter method")
    return rm


def model_source(recipe: Recipe, sft: modeling.ParentRun | None, rm: modeling.ParentRun | None
                 ) -> tuple[ModelConfig, str, AdapterConfig]:
    """The base (and its settings), the method and the method's options PPO runs with: the reward model's, else
    the SFT run's, else (from the untuned base with scorers alone) the recipe's own."""
    parent = rm or sft
    if parent is None:
        return recipe.model, recipe.adapter.method, recipe.adapter
    return parent.model, parent.method, parent.adapter


def setup(recipe: Recipe, run: Run, source: tuple[ModelConfig, str, AdapterConfig], sft: modeling.ParentRun | None,
          rm: modeling.ParentRun | None, reward: tuple, prompts, eval_prompts: list[list[dict]] | None,
          eval_scorers: list[scorers.Scorer], env: environments.Environment | None) -> Setup:
    """The four models on one base (``source``: its settings, the method and its options, ``model_source``), the
    tokenizer, the encoded prompts (with the environment's tools, when there is one) and the trainable
    parameters."""
    p = recipe.ppo
    sft_dir, rm_dir = (x.dir if x is not None else None for x in (sft, rm))
    torch.manual_seed(p.seed)
    dev = distributed.device()
    base_cfg, method, adapter_cfg = source
    # the parent's base and quantization; measured on CPU, eager attention's backward is much faster than SDPA's
    # at PPO's lengths in bf16, and within noise of it in fp32 (docs/ppo.md, "Where the time goes"); a recipe's
    # model.attn_implementation wins
    model_cfg = dataclasses.replace(
        recipe.model, base=base_cfg.base, quantization=base_cfg.quantization,
        attn_implementation=recipe.model.attn_implementation or ("eager" if dev.type == "cpu" else None))
    method_table.check_stage(method, "ppo", str(rm_dir or sft_dir or recipe.source))
    tokenizer = modeling.load_tokenizer(model_cfg, str(sft_dir or rm_dir) if (sft_dir or rm_dir) else None)
    shift, scale = 0.0, 1.0
    if rm is not None and p.normalize_reward:
        shift, scale = rm.reward_stats["mean"], rm.reward_stats["std"]
    model_weight, terms, reward_model = reward  # weight, scorers, the reward model (``main``)
    if rm is not None:  # the reward adapter on the policy's base: the value head starts on the reward model's scale
        scale = scale / model_weight
    n_proc, main = distributed.world_size(), distributed.is_main()
    tools = list(env.schemas) if env is not None else None
    if env is not None:
        agent.check_template(tokenizer, tools)
    encoded, kept = encoding.encode_prompts(tokenizer, prompts.rows, p.max_prompt_length, tools)
    too_long = len(prompts.rows) - len(kept)
    if len(encoded) < p.prompts_per_step(n_proc):
        raise UserError(f"{recipe.data.prompts}: {len(encoded)} prompts" + (
            f" within ppo.max_prompt_length={p.max_prompt_length}" if too_long else "") + ", fewer than "
            f"ppo.batch_size={p.batch_size}" + (f" / samples_per_prompt={p.samples_per_prompt}"
                                                 if p.samples_per_prompt > 1 else "")
            + (f" x {n_proc} processes" if n_proc > 1 else ""))
    if main:
        encoding.report_dropped("ppo", too_long, len(prompts.rows), f"prompts of {recipe.data.prompts}",
                                "ppo.max_prompt_length", p.max_prompt_length)
    eval_prompts, eval_encoded = encode_eval(recipe, tokenizer, eval_prompts, tools, main)
    setting, measured = precision_of(run, p)
    models, params, checked = load_checked(
        lambda precision_: ppo_models.load(model_cfg, method, sft_dir, rm_dir, adapter_cfg, shift, scale, dev,
                                           mixed_precision=precision_, critic=p.value_model, vocab=len(tokenizer),
                                           shard=distributed.sharding() == "fsdp" and n_proc > 1),
        setting, measured, p, tokenizer, encoded, main)
    if rm is not None:  # the run's reward model is its adapter on the policy's base, reading token ids
        reward_model = rewards.TokenReward(models.scores, tokenizer, rm.dir, rm.reward_stats, models.device)
    reward = Reward(model_weight, terms, reward_model)
    return Setup(recipe=recipe, p=p, run=run, models=models, tokenizer=tokenizer, model_cfg=model_cfg,
                 method=method, sft_dir=sft_dir, rm_dir=rm_dir, reward=reward,
                 prompts=prompts, encoded=encoded, messages=[prompts.rows[i] for i in kept],
                 eval_prompts=eval_prompts, eval_encoded=eval_encoded, eval_scorers=eval_scorers, env=env,
                 params=params,
                 steps=p.total_steps(len(encoded), n_proc), rank=distributed.rank(), main=main,
                 repeat_check_s=checked)


def encode_eval(recipe: Recipe, tokenizer, eval_prompts: list[list[dict]] | None, tools: list[dict] | None,
                main: bool) -> tuple[list[list[dict]] | None, list[list[int]] | None]:
    """The held-out prompts within ppo.max_prompt_length and their ids (None when there are none)."""
    if not eval_prompts:
        return eval_prompts, None
    limit = recipe.ppo.max_prompt_length
    eval_encoded, eval_kept = encoding.encode_prompts(tokenizer, eval_prompts, limit, tools)
    if main:
        encoding.report_dropped("ppo", len(eval_prompts) - len(eval_kept), len(eval_prompts),
                                f"held-out prompts of {recipe.data.eval_prompts}", "ppo.max_prompt_length", limit)
    return [eval_prompts[i] for i in eval_kept], eval_encoded or None


def load_checked(load, setting: str, measured: float | None, p: PPOConfig, tokenizer, encoded: list[list[int]],
                 main: bool) -> tuple[PPOModels, dict, float]:
    """The models loaded in ``setting``'s precision (``load(setting)``), their trainable parameters by role and the
    seconds the repeatability check took. The check (``precision.repeats`` of ``probe_pass`` on the first prompts)
    sets ``models.repeatable``; "auto" falls back to fp32 where bf16 passes do not repeat bit for bit. The bf16
    speed-up measured (``measured`` in a resumed run) is kept on the models either way."""
    for attempt in (setting, "no"):
        models = load(attempt)
        measured = models.bf16_speedup = measured if measured is not None else models.bf16_speedup
        models.train(False)  # dropout off in every pass: the log-prob ratios compare like with like
        params = {role: models.parameters(role) for role in ("policy", "value")[:1 + (models.critic is not None)]}
        query, query_mask = (x.to(models.device) for x in left_pad(encoded[:4], tokenizer.pad_token_id))
        checked = time.perf_counter()
        models.repeatable = precision.repeats(lambda: probe_pass(
            models, params, query, query_mask, p, tokenizer.eos_token_id, tokenizer.pad_token_id), models.device)
        checked = time.perf_counter() - checked
        if models.repeatable or models.autocast is None or attempt != "auto":
            break
        if main:
            print(f"ppo: bf16 is {models.bf16_speedup or 0:.1f}x fp32 here, but a bf16 pass of the policy did not "
                  "give the same bits twice on this machine: running fp32, so that the run repeats and resumes "
                  "bit for bit (ppo.mixed_precision: bf16 forces bf16)", file=sys.stderr)
        models = params = None  # freed before the fp32 copy loads
    if not models.repeatable and main:
        print(f"ppo: warning: {'bf16' if models.autocast else 'fp32'} passes do not give the same bits twice on this "
              "machine: this run will not repeat or resume bit for bit" + (
                  " (ppo.mixed_precision: auto or no runs fp32)" if models.autocast is not None else ""),
              file=sys.stderr)
    return models, params, checked


def precision_of(run: Run, p: PPOConfig) -> tuple[str, float | None]:
    """``ppo.mixed_precision``, except in a resumed run: the precision it started with (and the speed-up measured
    then). "auto" measures matrix products when a run starts, and a CPU that is busy with other work can measure
    otherwise the next time; a resumed run that switched precision would not continue bit for bit."""
    saved = resume.latest_meta(run.work) if run.resumed else None
    if saved is None or "mixed_precision" not in saved:
        return p.mixed_precision, None
    return saved["mixed_precision"], saved.get("bf16_speedup")


def start(s: Setup) -> State:
    """A fresh optimizer, KL controller and prompt order, or those of the newest resume checkpoint."""
    p = s.p
    optimizer = torch.optim.AdamW([{"params": params} for params in s.params.values()], lr=p.lr, eps=1e-5)
    kl_ctl = (ppo_math.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else ppo_math.FixedKLController(p.kl_coef))
    state = State(optimizer, kl_ctl, torch.Generator().manual_seed(p.seed))
    if s.main:
        n_proc = distributed.world_size()
        print(f"ppo: {len(s.encoded)} prompts, {s.steps} steps of {s.global_batch} episodes"
              + (f" ({p.samples_per_prompt} per prompt)" if p.samples_per_prompt > 1 else "")
              + (f" ({n_proc} processes x {p.batch_size}" + (", FSDP2 shards" if s.models.sharded else "") + ")"
                 if n_proc > 1 else "")
              + f"; advantage {p.advantage}" + (f" ({s.models.critic.name} critic)" if s.models.critic else "")
              + f", loss {_objective(p)}, KL in the {p.kl_where} ({p.kl_kind}); training "
              f"{trainable_count(s):,} parameters ({' + '.join(s.params)}); {_precision(s.models)}",
              file=sys.stderr)
    if s.run.resumed:
        resume_from(s.run, s.models, state, s.reward.model)
    return state


def train(s: Setup, state: State) -> None:
    """The PPO steps after ``state.step``, up to ``s.steps``."""
    p, models = s.p, s.models
    bar = tqdm(total=s.steps, initial=state.step, desc="ppo", unit="step",
               disable=not (show_progress(s.recipe) and s.main))  # a bar on a terminal, a line per step in logs
    for step in range(state.step + 1, s.steps + 1):
        clock = [time.time()]
        # 1 rollout: sample samples_per_prompt responses per prompt with the policy (a prompt's K episodes are
        # consecutive rows, each with its own key); log-probs and entropies come from the sampling pass itself
        prompts = [i for i in next_batch(s, state) for _ in range(p.samples_per_prompt)]  # each episode's prompt
        episodes = roll_out(s, step, prompts, torch.arange(s.rank * p.batch_size, (s.rank + 1) * p.batch_size))
        clock.append(time.time())

        # 2 score (refilling the slots of flat groups with new prompts when ppo.drop_flat_groups)
        scored, rounds, resampled = score(s, episodes, prompts, state), 0, 0
        if p.drop_flat_groups:
            scored, prompts, rounds, resampled = refill_flat_groups(s, state, step, scored, prompts)

        # 3 KL-shape the rewards, advantages and returns (``to_batch``)
        batch = to_batch(s, state, scored)
        clock.append(time.time())

        # 4 PPO epochs over shuffled mini-batches; every process updates or none does (non-finite rewards)
        finite = bool(torch.isfinite(batch.rewards).all() and torch.isfinite(batch.advantages).all()
                      and (batch.values is None or torch.isfinite(batch.values).all()))
        if not distributed.any_failed(not finite):
            update = ppo_epochs(models, state.optimizer, s.params, batch, p, step, state.kl_ctl.value)
        else:
            update = {"nonfinite/skipped_updates": p.updates_per_step}
        clock.append(time.time())
        state.bad_in_a_row = guard_nonfinite(update, p, step, state.bad_in_a_row)

        # 5 KL controller, metrics, evaluation, checkpoints
        row = log_step(s, state, step, scored, batch, resampled, update, clock)
        _show(s, bar, row, step)
        warn_flat(s, state, step, row, rounds)
        state.step = step
        saved = bool(p.save_every and step % p.save_every == 0 and step != s.steps)
        if saved:
            save_checkpoint(s, state)
        if step != s.steps and preempt.requested():  # SIGTERM/SIGINT: resume state at this step, then stop
            if not saved:
                save_checkpoint(s, state, snapshot=False)
            bar.close()
            raise preempt.stop("ppo", step, s.steps, s.run.command)
    bar.close()


# ---------------------------------------------------------------------------------------------------------------
# The steps of the loop
# ---------------------------------------------------------------------------------------------------------------

def next_batch(s: Setup, state: State) -> list[int]:
    """This process's prompts of the next step (indices into ``s.encoded`` and ``s.messages``). Every process
    draws the same global batch from the same prompt order and takes its own slice; each episode samples with its
    own key (``rollout.episode_keys``), so its response does not depend on which process runs it or what else is
    in the batch."""
    mine = s.p.prompts_per_step()
    return draw(s, state, s.p.prompts_per_step(distributed.world_size()))[s.rank * mine:(s.rank + 1) * mine]


def draw(s: Setup, state: State, n: int) -> list[int]:
    """The next ``n`` prompts of the run's order, a permutation of the prompts after another (every process
    draws the same)."""
    while len(state.order) < n:
        state.order += torch.randperm(len(s.encoded), generator=state.order_gen).tolist()
    drawn, state.order = state.order[:n], state.order[n:]
    return drawn


def roll_out(s: Setup, step: int, prompts: list[int], episodes: torch.Tensor) -> Episodes:
    """Sample one response for each of ``prompts`` (indices into the prompt set), episode ``episodes[i]`` (its global
    index in the step) with its own key; the sampling pass keeps each token's log-prob and entropy (and the shared
    critic's value)."""
    p, tok = s.p, s.tokenizer
    if s.env is not None:
        return play(s, [s.messages[i] for i in prompts], episode_keys(p.seed, step, episodes), p.temperature)
    query, query_mask = (t.to(s.models.device) for t in left_pad([s.encoded[i] for i in prompts], tok.pad_token_id))
    sampled = s.models.sample(query, query_mask, keys=episode_keys(p.seed, step, episodes),
                              temperature=p.temperature, max_new_tokens=p.max_new_tokens,
                              min_new_tokens=p.min_new_tokens, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id,
                              values=s.models.critic is not None and s.models.critic.on_policy_pass)
    response, response_mask, stopped = ppo_math.truncate_after_eos(sampled.tokens, tok.eos_token_id,
                                                                   tok.pad_token_id)
    return Episodes(ids=torch.cat([query, response], 1), mask=torch.cat([query_mask, response_mask], 1),
                    response=response, response_mask=response_mask, sampled=response_mask, stopped=stopped,
                    logp=sampled.logprobs, entropy=sampled.entropy, sampling_values=sampled.values)


def play(s: Setup, messages: list[list[dict]], keys: torch.Tensor, temperature: float) -> Episodes:
    """Multi-turn episodes of the policy with the environment's tools (``rlhf.engine.agent``): each turn at most
    ppo.max_new_tokens, each episode within ppo.max_turns and ppo.max_episode_tokens; the environment is reset with
    the prompt row (its ``prompt``)."""
    p, tok = s.p, s.tokenizer

    def sample(query, mask, **kwargs):
        return s.models.sample(query.to(s.models.device), mask.to(s.models.device), temperature=temperature,
                               min_new_tokens=p.min_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **kwargs)

    played = agent.roll_out(sample, tok, messages, s.env, [{"prompt": m} for m in messages], keys, s.limits,
                            p.max_new_tokens)
    return agent.to_episodes(played, tok.pad_token_id, s.models.device)


def refill_flat_groups(s: Setup, state: State, step: int, scored: Scored, prompts: list[int]
                       ) -> tuple[Scored, list[int], int, int]:
    """DAPO's dynamic sampling (Yu et al. 2025, section 3.2), slot by slot: the step's G prompt slots (over every
    process) whose K scores are all equal are refilled, in slot order, with the next prompts of the run's order,
    sampled and scored; again for the slots still flat, up to ``ppo.resample_rounds`` rounds, and never past one
    pass over the prompt set within a step (a reward that is flat everywhere would otherwise refill forever). Round
    r's episode in slot j, response k, has key index ``r * global_batch + j * K + k``: which process holds a slot
    and what else is sampled beside it change nothing, so several processes and a resumed run refill exactly as
    one uninterrupted process does. Returns the scored episodes, their prompts, the rounds refilled and the slots
    refilled (over every process). Refilling that runs long says how far it got."""
    p, K = s.p, s.p.samples_per_prompt
    mine = p.batch_size // K  # slots on this process; slot j of the step is process j // mine's
    started, rounds, resampled = time.time(), 0, 0
    for round_ in range(1, p.resample_rounds + 1):
        flat = torch.zeros(mine * distributed.world_size())
        flat[s.rank * mine:(s.rank + 1) * mine] = ppo_math.flat_groups(scored.shaped, K).float().cpu()
        slots = distributed.all_sum(flat).nonzero().reshape(-1).tolist()
        if not slots or resampled + len(slots) > len(s.encoded):
            break  # nothing flat, or every prompt of the set has been tried in this step
        if s.main and time.time() - started > 10:
            print(f"ppo: step {step}: refill round {round_} of up to {p.resample_rounds}: {len(slots)} of "
                  f"{len(flat)} prompt groups still flat ({resampled} refilled so far)", file=sys.stderr, flush=True)
        drawn = draw(s, state, len(slots))
        resampled, rounds = resampled + len(slots), round_
        refill = [(slot - s.rank * mine, prompt) for slot, prompt in zip(slots, drawn) if slot // mine == s.rank]
        if not refill:
            continue  # none of the slots still flat is this process's
        new_prompts = [prompt for _, prompt in refill for _ in range(K)]
        keys = torch.tensor([round_ * s.global_batch + (s.rank * mine + g) * K + k for g, _ in refill
                             for k in range(K)])
        new = score(s, roll_out(s, step, new_prompts, keys), new_prompts, state)
        rows = torch.tensor([g * K + k for g, _ in refill for k in range(K)])
        scored = replace_rows(scored, rows, new, s.tokenizer.pad_token_id)
        for (g, prompt) in refill:
            prompts[g * K:(g + 1) * K] = [prompt] * K
    return scored, prompts, rounds, resampled


def flat_steps(history: list[dict]) -> int:
    """Steps so far whose every prompt group scored the same for all its responses (``objective/flat_groups``
    1)."""
    return sum(row.get("objective/flat_groups") == 1.0 for row in history)


def warn_flat(s: Setup, state: State, step: int, row: dict, rounds: int) -> None:
    """One line when a step trains on nothing: every prompt group's K responses scored the same (a critic-free
    estimator's advantages are then 0 for every token, up to the KL term), after ``rounds`` refill rounds of
    dynamic sampling. Said at the first such step and every 10th after it; the manifest counts them."""
    if s.p.samples_per_prompt < 2 or s.models.critic is not None or row.get("objective/flat_groups") != 1.0:
        return
    flat = flat_steps(state.history)
    if s.main and flat % 10 == 1:
        refilled = (f" after {rounds} refill round{'s' * (rounds != 1)} of ppo.drop_flat_groups"
                    if s.p.drop_flat_groups else "")
        print(f"ppo: warning: step {step} trains on nothing: every one of its prompts' "
              f"{s.p.samples_per_prompt} responses got the same score{refilled} (the reward is flat: mean score "
              f"{row['objective/score_shaped']:.4g}); check ppo.reward" + (
                  f" ({flat} such steps so far)" if flat > 1 else ""), file=sys.stderr)


def score(s: Setup, episodes: Episodes, prompts: list[int], state: State) -> Scored:
    """The episodes' total score: the reward model's (standardised with its statistics when ppo.normalize_reward)
    and each scorer's on the decoded response, weighted and summed (``ppo.reward``), and the shaped score (the
    total after the missing-EOS penalty and clipping). A published reward model's statistics are measured on the
    first step's samples (every process's) and kept for the run; the reward adapter reads the episodes' token ids
    and its run's stored statistics."""
    p, weighted, rm = s.p, [], s.reward.model
    reads_text = bool(s.reward.scorers) or (rm is not None and not rm.reads_ids)
    texts = None  # the reward adapter reads the episodes' token ids
    if reads_text:  # scorers read a multi-turn episode's answer, its last turn
        texts = [t.strip() for t in (episodes.turns.answers if episodes.turns is not None else
                                     s.tokenizer.batch_decode(episodes.response, skip_special_tokens=True))]
    messages = [s.messages[i] for i in prompts]
    scores = overlong = None
    if s.reward.model_weight:
        scores = rm.episodes(messages, texts, episodes.ids, episodes.mask)
        stats = rm.stats or rm.measure(scores, f"the {s.global_batch} episodes of step {state.step + 1}")
        normalise = (stats["mean"], stats["std"]) if p.normalize_reward else (None, None)
        weighted.append((ppo_math.shape_scores(scores, episodes.stopped, *normalise), s.reward.model_weight))
    if p.overlong_buffer:  # DAPO's overlong shaping, a term of its own
        overlong = ppo_math.overlong_penalty(episodes.sampled.sum(1), p.max_new_tokens, p.overlong_buffer,
                                             p.overlong_penalty)
        weighted.append((overlong, 1.0))
    terms = {}
    for scorer, weight in s.reward.scorers:
        values = [0.0 if v is None else v for v in scorer(messages, texts)]  # "does not apply" adds 0
        terms[scorer.name] = torch.tensor(values, dtype=torch.float32, device=episodes.response.device)
        weighted.append((terms[scorer.name], weight))
    if s.env is not None and s.env.owns_reward:  # the environment scores its own episodes (TRL: weight 1)
        name = s.env.cls.__name__
        terms[name] = torch.tensor([float(x.get_reward()) for x in episodes.turns.instances],
                                   device=episodes.response.device)
        weighted.append((terms[name], 1.0))
    total = ppo_math.weighted_score(weighted)
    shaped = ppo_math.shape_scores(total, episodes.stopped, missing_eos_penalty=p.missing_eos_penalty,
                                   clip=p.reward_clip)
    return Scored(episodes=episodes, scores=scores, terms=terms, overlong=overlong, total=total, shaped=shaped)


def to_batch(s: Setup, state: State, scored: Scored) -> Batch:
    """What the update trains on: the reference's log-probs, the critic's values (the value adapter's own pass;
    the shared critic's came with the sampling pass), the KL-shaped per-token rewards (``kl_coef`` times the KL
    in them when ``ppo.kl_in`` is the reward) and the advantages and returns of ``ppo.advantage``."""
    p, models, episodes = s.p, s.models, scored.episodes
    with torch.no_grad():
        ref_logp = ppo_math.logprobs_from_logits(response_logits(models, episodes.ids, episodes.mask,
                                                                 episodes.length, role="reference"),
                                                 episodes.response, p.temperature)
        critic = models.critic
        values = (None if critic is None else episodes.sampling_values if episodes.sampling_values is not None
                  else predicting(critic.values(episodes.ids, episodes.mask), episodes.length))
    reward_kl_coef = state.kl_ctl.value if p.kl_where == "reward" else 0.0
    rewards, kl = ppo_math.kl_penalized_rewards(scored.shaped, episodes.logp, ref_logp, episodes.sampled,
                                                reward_kl_coef, p.kl_kind)
    advantage, returns = advantages(p, scored, values, ref_logp, rewards, reward_kl_coef)
    return Batch(episodes=episodes, ref_logp=ref_logp, values=values, rewards=rewards, kl=kl, advantages=advantage,
                 returns=returns)


def log_step(s: Setup, state: State, step: int, scored: Scored, batch: Batch, resampled: int, update: dict,
             clock: list[float]) -> dict:
    """The step's metrics (means over processes) after the KL controller's update, with a held-out evaluation
    every ``ppo.eval_every`` steps and at the end; written to ``metrics.jsonl`` and the history."""
    episodes, K = scored.episodes, s.p.samples_per_prompt
    mask = episodes.sampled
    seq_kl = ppo_math.sequence_sum(batch.kl, mask)
    non_score = -state.kl_ctl.value * seq_kl  # the KL penalty, in the reward or as a loss term
    row = {
        **({"objective/score": scored.scores.mean().item()} if scored.scores is not None else {}),
        **{f"objective/scorer/{name}": values.mean().item() for name, values in scored.terms.items()},
        **({"objective/overlong": scored.overlong.mean().item()} if scored.overlong is not None else {}),
        "objective/score_total": scored.total.mean().item(),
        "objective/score_shaped": scored.shaped.mean().item(),
        "objective/kl": seq_kl.mean().item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": (scored.shaped + non_score).mean().item(),
        "objective/entropy": ppo_math.sequence_sum(episodes.entropy, mask).mean().item(),
        # prompts whose K responses all scored the same: no signal for the group estimators
        **({"objective/flat_groups": ppo_math.flat_groups(scored.shaped, K).float().mean().item()} if K > 1 else {}),
        **({"objective/resampled": float(resampled)} if s.p.drop_flat_groups else {}),
        **update,
        "response/length": mask.sum(1).float().mean().item(),
        "response/eos_rate": episodes.stopped.float().mean().item(),
        **(agent.metrics(episodes.turns) if episodes.turns is not None else {}),
        **{f"time/{phase}_s": b - a for phase, a, b in zip(("generation", "scoring", "update"), clock, clock[1:])},
    }
    row = {"step": step, "episodes": step * s.global_batch, **distributed.all_mean(row)}
    state.kl_ctl.update(row["objective/kl"], s.global_batch)
    row["ppo/kl_coef"] = state.kl_ctl.value
    if s.eval_encoded and (step % s.p.eval_every == 0 or step == s.steps):
        row.update(evaluate(s, s.eval_prompts, s.eval_encoded))
    row["time/step_s"] = time.time() - clock[0]
    s.run.metrics.write(row)
    state.history.append(row)
    return row


def _show(s: Setup, bar, row: dict, step: int) -> None:
    """The progress bar's figures, or a line per step; a warning when the mean KL turns negative."""
    if not s.main:
        return
    shown = {"score": row.get("objective/score", row["objective/score_total"]), "kl": row["objective/kl"],
             "len": row["response/length"], **{k: v for k, v in row.items() if k.startswith("eval/")
                                               and k[5:] in [x.name for x in s.eval_scorers]}}
    if not bar.disable:
        bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
        bar.update(1)
    else:
        print(f"ppo: step {step}/{s.steps} " + " ".join(f"{k} {v:.3f}" for k, v in shown.items()),
              file=sys.stderr, flush=True)
    if row["objective/kl"] < -1e-3 and step > 1:
        print(f"ppo: warning: mean KL is negative ({row['objective/kl']:.4f}) at step {step}: the k1 estimate "
              "is only non-negative on average; persistent negative values usually mean the sampling and "
              "the log-prob passes disagree (temperature, top-k/top-p, dropout or padding positions)",
              file=sys.stderr)


@torch.no_grad()
def evaluate(s: Setup, prompts: list[list[dict]], encoded: list[list[int]]) -> dict:
    """Greedy responses to held-out prompts (greedy episodes with an environment): the reward model's mean score
    (when PPO uses one), and each of eval.scorers' mean over the prompts it applies to (on an episode's answer)."""
    models, tokenizer = s.models, s.tokenizer
    if s.env is not None:
        episodes = play(s, prompts, torch.zeros(len(prompts), dtype=torch.long), 0.0)
        ids, mask, rmask, stopped = episodes.ids, episodes.mask, episodes.sampled, episodes.stopped
        texts = episodes.turns.answers
    else:
        ids, mask = (t.to(models.device) for t in left_pad(encoded, tokenizer.pad_token_id))
        out = models.sample(ids, mask, temperature=0.0, max_new_tokens=s.p.max_new_tokens,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        response, rmask, stopped = ppo_math.truncate_after_eos(out.tokens, tokenizer.eos_token_id,
                                                               tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        ids, mask = torch.cat([ids, response], 1), torch.cat([mask, rmask], 1)
    result = {}
    if s.reward.model_weight:
        result["eval/score"] = s.reward.model.episodes(prompts, [t.strip() for t in texts], ids, mask).mean().item()
    result.update({"eval/eos_rate": stopped.float().mean().item(), "eval/length": rmask.sum(1).float().mean().item()})
    if s.env is not None:
        result.update(agent.metrics(episodes.turns, "eval"))
    for scorer in s.eval_scorers:
        values = [v for v in scorer(prompts, texts) if v is not None]
        if values:
            result[f"eval/{scorer.name}"] = sum(values) / len(values)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, resume and the finished run
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(s: Setup, state: State, snapshot: bool = True) -> None:
    """The policy under ``checkpoints/step_N`` of the output (for evaluation later; not with ``snapshot=False``,
    a preemption's checkpoint), and a resume checkpoint: trainable weights, optimizer, KL controller, RNG and
    data position."""
    ckpt = s.run.staging / "checkpoints" / f"step_{state.step:06d}"
    with s.run.saving() as writer:  # every process gathers what is sharded; the main one writes
        if snapshot:
            if writer:
                ckpt.mkdir(parents=True)
            s.models.save(ckpt)
        if writer or s.models.sharded:  # gathering shards takes every process
            opt_tensors, opt_meta = resume.optimizer_state(state.optimizer)
            model_tensors = s.models.trainable_state()
        if writer:
            rng_tensors, rng_meta = resume.rng_state()
            tensors = {**{f"model.{k}": v for k, v in model_tensors.items()}, **opt_tensors,
                       **rng_tensors, "rng.order": state.order_gen.get_state()}
            meta = {"optimizer": opt_meta, "rng": rng_meta, "kl_controller": state.kl_ctl.state_dict(),
                    "reward_stats": reward_stats(s), "mixed_precision": "bf16" if s.models.autocast else "no",
                    "bf16_speedup": s.models.bf16_speedup, "repeatable": s.models.repeatable,
                    "order": state.order, "metrics_lines": s.run.metrics_lines()}
            resume.save_state(s.run.work, state.step, tensors, meta, s.p.keep_checkpoints)
    distributed.barrier()


def resume_from(run: Run, models: PPOModels, state: State, reward_model: rewards.RewardModel | None) -> None:
    """Restore ``state`` (and the trained weights) from the newest complete resume checkpoint, and the metrics
    written up to it; policy snapshots written after it are removed, to be made again."""
    saved = resume.latest_state(run.work)
    lines = 0
    if saved is not None:
        state.step, tensors, meta = saved
        models.load_trainable_state({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        resume.load_optimizer_state(state.optimizer, tensors, meta["optimizer"])
        state.kl_ctl.load_state_dict(meta["kl_controller"])
        state.order_gen.set_state(tensors["rng.order"])
        resume.set_rng_state(tensors, meta["rng"])
        state.order, lines = meta["order"], meta["metrics_lines"]
        if reward_model is not None and meta.get("reward_stats"):  # a published model's, measured at step 1
            reward_model.stats = meta["reward_stats"]
    distributed.barrier()  # everyone has read the state before the main process tidies up
    if distributed.is_main():
        for snapshot in (run.staging / "checkpoints").glob("step_*"):
            if int(snapshot.name.split("_")[1]) > state.step:  # written after the state we resume from: redo them
                shutil.rmtree(snapshot)
        print(f"ppo: resuming from step {state.step}", file=sys.stderr)
    state.history = run.truncate_metrics(lines)


def finish(s: Setup, state: State) -> dict:
    """Save the trained policy and value model and the tokenizer; returns the manifest."""
    p, final = s.p, state.history[-1]
    within_budget = None if p.kl_budget is None else final["objective/kl"] <= p.kl_budget
    if within_budget is False and s.main:
        print(f"ppo: warning: final mean KL {final['objective/kl']:.3f} is over ppo.kl_budget={p.kl_budget}; "
              "raise ppo.kl_coef or use ppo.adaptive_kl", file=sys.stderr)
    flat = flat_steps(state.history)
    if flat == s.steps and p.samples_per_prompt > 1 and s.models.critic is None and s.main:
        print(f"ppo: warning: all {s.steps} steps trained on nothing: every prompt's {p.samples_per_prompt} "
              "responses always got the same score (the policy moved by the KL term alone)", file=sys.stderr)
    bad = [i for i, x in enumerate(x for role in s.params.values() for x in role)
           if not torch.isfinite(distributed.local(x)).all()]  # a sharded weight: this process's shard
    if distributed.any_failed(bool(bad)):
        raise TrainingStopped("ppo: not saving: trained tensors hold NaN or inf")
    with s.run.saving() as writer:
        s.models.save(s.run.staging)  # every process: a sharded model is gathered
        if writer:
            s.tokenizer.save_pretrained(str(s.run.staging))
    return s.run.finish(Manifest(
        base=s.model_cfg.base,
        parents={"sft": str(s.sft_dir) if s.sft_dir else None, "rm": str(s.rm_dir) if s.rm_dir else None},
        adapter={"method": s.method, "parameters": {"trainable": trainable_count(s),
                                                    "total": sum(x.numel() for x in s.models.all_parameters())}},
        data={"prompts": s.prompts.summary(), "prompts_used": len(s.encoded),
              "prompts_too_long": len(s.prompts.rows) - len(s.encoded)},
        metrics={"steps": s.steps, "episodes": s.steps * s.global_batch,
                 **({"flat_steps": flat} if p.samples_per_prompt > 1 else {}),
                 **{k: v for k, v in final.items() if "/" in k and not k.startswith("time/")}},
        reward_stats=reward_stats(s), seed=p.seed, shards=s.models.shards,
        # the model settings PPO ran with (later loads of this run use them)
        recipe={**s.recipe.to_dict(), "model": dataclasses.asdict(s.model_cfg)},
        sections=sections(s, state, within_budget),
    ), files=[*s.models.saved_files(s.method), ("tokenizer_config.json",)])


def sections(s: Setup, state: State, within_budget: bool | None) -> dict:
    """PPO's own sections of its manifest: the reward, the estimator, the objective, the KL controller and
    budget, and the precision its passes ran in."""
    p = s.p
    return {
        "reward": s.reward.describe(),
        "advantage": {"estimator": p.advantage, "samples_per_prompt": p.samples_per_prompt,
                      "critic": s.models.critic.name if s.models.critic else None,
                      "kl_in": p.kl_where, "kl_estimator": p.kl_kind},
        "objective": {"policy_loss": p.policy_loss, "loss_aggregation": p.aggregation, "clip": list(p.clip_range),
                      "overlong": {"buffer": p.overlong_buffer, "penalty": p.overlong_penalty}
                      if p.overlong_buffer else None},
        "kl_controller": state.kl_ctl.state_dict(),
        "mixed_precision": "bf16" if s.models.autocast else "no",
        "bf16_speedup": s.models.bf16_speedup,
        "repeatable": s.models.repeatable,
        "repeat_check_s": round(s.repeat_check_s, 3),
        "kl_budget": {"budget": p.kl_budget, "within": within_budget},
        **({"environment": {"spec": s.env.spec, "tools": list(s.env.tool_names), "owns_reward": s.env.owns_reward,
                            "max_turns": p.max_turns, "max_episode_tokens": p.max_episode_tokens,
                            "max_new_tokens_per_turn": p.max_new_tokens, "tool_timeout": p.tool_timeout,
                            "max_tool_output": p.max_tool_output, "turn_rewards": s.env.rewards_turns,
                            "turn_gamma": p.turn_gamma}} if s.env is not None else {}),
    }


def reward_stats(s: Setup) -> dict | None:
    """The reward model's normalisation statistics (its run's, or a published model's measured at step 1)."""
    return s.reward.model.stats if s.reward.model is not None else None


def trainable_count(s: Setup) -> int:
    return sum(x.numel() for role in s.params.values() for x in role)


def _objective(p: PPOConfig) -> str:
    """The policy objective, its clip range and aggregation, for the start line."""
    low, high = p.clip_range
    return f"{p.policy_loss} (clip {low:g}" + (f"/{high:g}" if high != low else "") + f", {p.aggregation})"


def _precision(models: PPOModels) -> str:
    """How the loop's passes run, for the start line."""
    measured = f"bf16 products measured {models.bf16_speedup:.2f}x fp32 here; " if models.bf16_speedup else ""
    repeats = {True: "passes repeat bit for bit", False: "passes do NOT repeat bit for bit",
               None: "repeatability not checked"}[models.repeatable]
    return ("bf16 autocast" if models.autocast else "fp32") + f" ({measured}{repeats})"
