"""Evaluation: policies side by side on held-out prompts, scored by the reward model and by the recipe's scorers
(``eval.scorers``: the tiny world's gold, correctness and style, or any of your own, ``rlhf.feedback.scorers``).

setup (prompts, reward model, the rows to compare: an in-context-learning baseline on the untuned base, then the
listed policies) -> for each row: generate (greedy, or k samples), score, KL to the row's reference -> report
(table, summary.json, summary.md, responses.jsonl) and pictures (reward distributions, the PPO run's curves, and
proxy vs gold reward across PPO's training-time evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf import report
from rlhf.engine import agent, environments, rollout
from rlhf.feedback import rewards, scorers
from rlhf.models import method_table, modeling, one_base
from rlhf.text import encoding, formats
from rlhf.runs.manifest import Manifest
from rlhf.runs.rundir import Run
from rlhf.config import ModelConfig, Recipe
from rlhf.errors import UserError


@dataclass
class Row:
    """One policy under evaluation."""

    name: str
    run_dir: Path | None = None
    """the run directory, or None for the untuned base"""
    icl_shots: int = 0
    results: dict = field(default_factory=dict)


STAGE_ROWS = ("sft", "ppo", "dpo")
"""the stages of the recipe a row may name instead of a run directory"""


def resolve_policy(recipe: Recipe, spec: str) -> Row:
    """"base", a stage name of this recipe ("sft", "ppo", "dpo"), or a run directory."""
    if spec == "base":
        return Row("base")
    path = Path(spec)
    if not path.exists() and spec in STAGE_ROWS:
        path = recipe.stage_dir(spec)
    modeling.read_manifest(path, "policy")
    return Row(spec if spec in STAGE_ROWS else str(path), run_dir=path)


def reference_of(row: Row) -> tuple[bool, Path | None, ModelConfig | None]:
    """What a row's KL is measured against: (whether it has a reference, the policy run it is (None: the bare
    base), that base's settings). A PPO or DPO run's SFT parent, an SFT run's (or a PPO or DPO run from the base's)
    base; the base row has none."""
    if row.run_dir is None:
        return False, None, None
    run = modeling.read_run(row.run_dir)
    parent = run.parent("sft") if run.stage in ("ppo", "dpo") else None
    if parent is not None:
        return True, parent, None
    return True, None, run.model


def row_models(row: Row, model_cfg: ModelConfig, shared: one_base.OneBase | None):
    """The row's policy, its tokenizer and its reference (None: no KL): adapters on the shared base where the row
    and its reference fit on it, else models of their own."""
    has_ref, ref_dir, ref_base = reference_of(row)
    fits = shared is not None and (shared.can_hold(row.run_dir) if row.run_dir else shared.can_hold_base(model_cfg))
    fits = fits and (not has_ref or (shared.can_hold(ref_dir) if ref_dir else shared.can_hold_base(ref_base)))
    if fits:
        tokenizer = modeling.load_tokenizer(model_cfg, str(row.run_dir) if row.run_dir else None)
        return shared.policy(row.run_dir), tokenizer, shared.policy(ref_dir) if has_ref else None
    if row.run_dir is None:
        model, tokenizer = modeling.load_base(model_cfg, device=modeling.accelerator()).eval(), \
            modeling.load_tokenizer(model_cfg)
    else:
        model, tokenizer = modeling.load_policy(row.run_dir)
    reference = None
    if has_ref:
        reference = (modeling.load_policy(ref_dir)[0] if ref_dir else
                     modeling.load_base(ref_base, device=modeling.accelerator()).eval())
    return model, tokenizer, reference


def evaluate_row(row: Row, recipe: Recipe, prompts, demos, reward: rewards.RewardModel, progress: bool,
                 shared: one_base.OneBase | None = None, scorer_list: list[scorers.Scorer] = (),
                 play: agent.Play | None = None) -> list[dict]:
    """Generate, score and measure one row; returns one record per (prompt, sample). With ``play`` each answer is
    an episode: the reward model scores the whole of it, the scorers its last answer, and the KL counts the tokens
    the policy sampled."""
    e = recipe.eval
    model, tokenizer, reference = row_models(row, recipe.model, shared)
    inputs = encoding.icl_prompts(prompts, demos, row.icl_shots, e.seed) if row.icl_shots else prompts
    if row.icl_shots:
        positions = modeling.max_positions(model.config)
        if positions is not None:
            inputs, shortened = encoding.fit_icl(tokenizer, inputs, prompts, positions - e.max_new_tokens)
            if shortened:
                print(f"eval: {row.name}: {shortened} of {len(prompts)} prompts keep fewer demonstrations, to fit "
                      f"the model's {positions} positions with eval.max_new_tokens={e.max_new_tokens}",
                      file=sys.stderr)
    questions = [p[-1]["content"] for p in prompts]
    records = []
    for sample in range(e.samples):
        gens = answer(model, tokenizer, inputs, e, sample, play, progress)
        scores = reward(prompts, gens.responses, play.tools if play else None)
        scorers.require_finite(scores, "eval: the reward model", prompts, f" of {row.name}")
        kls = [None] * len(prompts)
        if reference is not None:
            logp = rollout.response_logprobs(model, tokenizer, inputs, gens.token_ids, e.batch_size, gens.prompt_ids)
            ref = rollout.response_logprobs(reference, tokenizer, inputs, gens.token_ids, e.batch_size,
                                            gens.prompt_ids)
            kls = [report.sequence_kl(a, b, m).item() for a, b, m in zip(logp, ref, gens.sampled)]
        scored = {s.name: s(prompts, gens.texts) for s in scorer_list}
        for i, q in enumerate(questions):
            rec = {"policy": row.name, "prompt_index": i, "sample": sample, "prompt": q,
                   "response": gens.texts[i], "reward": scores[i], "eos": gens.stopped[i],
                   "length": gens.lengths[i], "kl": kls[i], **{name: v[i] for name, v in scored.items()}}
            if play is not None:
                rec.update({**gens.episodes[i].record(), "episode": gens.responses[i]})
            records.append(rec)
    return records


@dataclass
class Answers:
    """A row's answers to the prompts, single responses or episodes, as ``evaluate_row`` reads them."""

    texts: list[str]
    """what scorers read: each response, or each episode's last answer"""
    responses: list
    """what the reward model scores: the texts, or each episode's messages"""
    stopped: list[bool]
    lengths: list[int]
    """tokens the policy sampled"""
    token_ids: list[list[int]]
    """each response's ids after its prompt (an episode's include what the environment wrote)"""
    sampled: list[torch.Tensor]
    """per token of ``token_ids``: 1 sampled by the policy (the KL counts it), 0 written by the environment"""
    prompt_ids: list[list[int]] | None = None
    """each episode's prompt ids (rendered with its tools); None for single responses"""
    episodes: list | None = None


def answer(model, tokenizer, inputs: list[list[dict]], e, sample: int, play: agent.Play | None,
           progress: bool) -> Answers:
    """Sample ``sample``'s answers: greedy for one sample per prompt, else at eval.temperature; episodes with
    ``play``'s environment (eval.max_new_tokens bounds each turn)."""
    temperature, seed = 0.0 if e.samples == 1 else e.temperature, e.seed + sample
    if play is None:
        gens = rollout.generate(model, tokenizer, inputs, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                temperature=temperature, seed=seed, progress=progress)
        return Answers(gens.texts, gens.texts, gens.stopped, gens.lengths, gens.token_ids,
                       [torch.ones(len(t)) for t in gens.token_ids])
    played = agent.generate(model, tokenizer, inputs, play.env, play.limits, e.max_new_tokens, e.batch_size,
                            temperature, seed, progress=progress)
    return Answers([ep.answer.strip() for ep in played], [ep.messages for ep in played],
                   [ep.stopped for ep in played], [sum(ep.sampled) for ep in played], [ep.response for ep in played],
                   [torch.tensor(ep.sampled, dtype=torch.float32) for ep in played], [ep.prompt for ep in played],
                   played)


def summarise(rows: list[Row], records: list[dict], e, names: list[str] = ()) -> dict:
    """Per row: mean reward with a 95% bootstrap interval, each scorer's mean (over the responses it applies to)
    with its interval, win rate against the first row, KL, length, EOS rate."""
    by_row = {r.name: [x for x in records if x["policy"] == r.name] for r in rows}
    first = by_row[rows[0].name]
    summary = {}
    for r in rows:
        recs = by_row[r.name]
        rewards = [x["reward"] for x in recs]
        lo, hi = report.bootstrap_ci(rewards, resamples=e.bootstrap, seed=e.seed)
        s = {"reward": sum(rewards) / len(rewards), "reward_ci95": [lo, hi],
             "win_rate_vs_first": report.win_rate(rewards, [x["reward"] for x in first]),
             "length": sum(x["length"] for x in recs) / len(recs),
             "eos_rate": sum(x["eos"] for x in recs) / len(recs), "responses": len(recs),
             "kl": (sum(x["kl"] for x in recs) / len(recs)) if recs[0]["kl"] is not None else None}
        if "turns" in recs[0]:  # episodes: turns, tool calls and failed calls per episode
            s.update({k: sum(x[k] for x in recs) / len(recs) for k in EPISODE_COLUMNS})
        for name in names:
            values = [x[name] for x in recs if x[name] is not None]
            if values:
                s[name] = sum(values) / len(values)
                s[f"{name}_ci95"] = list(report.bootstrap_ci(values, resamples=e.bootstrap, seed=e.seed))
        summary[r.name] = s
    return summary


EPISODE_COLUMNS = ("turns", "calls", "failed")
"""what eval reports of episodes (means per episode): assistant turns, tool calls, failed tool calls"""


def markdown_table(summary: dict, baseline: str, names: list[str] = ()) -> str:
    """The summary as a table: a column per scorer that applied to some row (and for episodes, turns, tool calls
    and failed calls per episode)."""
    shown = [n for n in names if any(n in s for s in summary.values())]
    shown += [k for k in EPISODE_COLUMNS if any(k in s for s in summary.values())]
    head = ["policy", "reward (95% CI)"] + shown + [f"win rate vs {baseline}", "KL to ref", "length", "EOS rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summary.items():
        cells = [name, f"{s['reward']:.3f} ({s['reward_ci95'][0]:.3f}, {s['reward_ci95'][1]:.3f})"]
        cells += [f"{s[n]:.3f}" if n in s else "-" for n in shown]
        cells += [f"{s['win_rate_vs_first']:.3f}", "-" if s["kl"] is None else f"{s['kl']:.2f}",
                  f"{s['length']:.1f}", f"{s['eos_rate']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(recipe: Recipe, policies: list[str] | None = None, reward: str | None = None, prompts: str | None = None,
         out: str | Path | None = None, overwrite: bool = False, progress: bool = False,
         share_base: bool = True, command: str | None = None) -> dict:
    """Evaluate the recipe's (or the given) policies; returns the summary written to the run directory. With
    ``share_base`` (and a reward model trained with an adapter) the base is loaded once and every row that shares it
    is an adapter on it (``one_base.OneBase``); otherwise each model is a copy of its own. ``command``: the command
    line the manifest records."""
    e = recipe.eval
    scorer_list = scorers.load_all(e.scorers, f"{recipe.source}: eval.scorers")
    names = [s.name for s in scorer_list]
    source = prompts or recipe.data.eval_prompts
    if not source:
        raise UserError(f"{recipe.source}: data.eval_prompts (or --prompts) is required for eval")
    prompt_rows = formats.load(source, "prompts", columns=recipe.data.columns, split=recipe.data.split).rows
    prompt_rows = prompt_rows[:e.limit] if e.limit else prompt_rows
    rows = ([Row(f"base ICL {e.icl_shots}-shot", icl_shots=e.icl_shots)] if e.icl_shots else [])
    rows += [resolve_policy(recipe, spec) for spec in (policies or e.policies)]
    if not rows:
        raise UserError(f"{recipe.source}: nothing to evaluate (eval.policies is empty and eval.icl_shots is 0)")
    demos = icl_demos(recipe)
    play = agent.Play(environments.load(e.environment, f"{recipe.source}: eval.environment"),
                environments.Limits.of(recipe.ppo)) if e.environment else None
    reward_dir, reward_model, shared = reward_for(recipe, reward, share_base, progress)
    dropped, prompt_rows = fitting_prompts(recipe, prompt_rows, source, reward_model, play)
    # with many processes every one evaluates everything (the same numbers) and the main one writes
    with Run(Path(out) if out else recipe.stage_dir("eval"), "eval", overwrite=overwrite, command=command) as run:
        records = []
        for row in rows:
            if run.main:
                print(f"eval: {row.name} on {len(prompt_rows)} prompts x {e.samples}", file=sys.stderr, flush=True)
            records += evaluate_row(row, recipe, prompt_rows, demos, reward_model, progress, shared, scorer_list,
                                    play)
        summary = summarise(rows, records, e, names)
        table = markdown_table(summary, rows[0].name, names)
        pictures = []
        with run.saving() as main:
            if main:
                write_report(run.staging, records, summary, table, source, len(prompt_rows), e, reward_dir)
                pictures = draw(rows, records, run.staging)
        if run.main:
            print(table, end="")
        return run.finish(Manifest(
            base=recipe.model.base,
            parents={"policies": [str(r.run_dir) if r.run_dir else r.name for r in rows],
                     "rm": None if reward_model.identity else str(reward_dir)},
            data={"prompts": source, "prompts_used": len(prompt_rows), "prompts_too_long": dropped},
            metrics=summary, seed=e.seed, recipe=recipe.to_dict(),
            sections={**({"reward_model": reward_model.identity} if reward_model.identity else {}),
                      **({"environment": {"spec": e.environment, "tools": list(play.env.tool_names),
                                          "limits": dataclasses.asdict(play.limits)}} if play else {}),
                      "scorers": {x.name: x.spec for x in scorer_list}, "pictures": pictures},
        ), files=["responses.jsonl", "summary.json", "summary.md"])


def icl_demos(recipe: Recipe) -> list:
    """The SFT rows the in-context row draws its demonstrations from (none without eval.icl_shots)."""
    e = recipe.eval
    if not e.icl_shots:
        return []
    if not recipe.data.sft:
        raise UserError(f"{recipe.source}: eval.icl_shots needs data.sft for its demonstrations")
    demos = formats.load(recipe.data.sft, "sft", fmt=recipe.data.sft_format, columns=recipe.data.columns,
                         split=recipe.data.split, on_bad_row="drop").rows
    if len(demos) < e.icl_shots:
        raise UserError(f"{recipe.data.sft}: {len(demos)} demonstrations, fewer than eval.icl_shots")
    return demos


def reward_for(recipe: Recipe, reward: str | None, share_base: bool, progress: bool = False
               ) -> tuple[Path, rewards.RewardModel, one_base.OneBase | None]:
    """The reward model every row is scored with: ``(its run directory or id, the model, the shared base when
    rows are adapters on the reward model's base)``. A run's reward model scores every response within its
    positions (eval reports a reward for every row, whatever the run's rm.max_length)."""
    reward_dir = Path(reward) if reward else recipe.stage_dir("rm")
    batch = recipe.eval.batch_size
    model = (rewards.load(reward, batch_size=batch, max_length=None) if reward else
             rewards.RunReward(reward_dir, batch_size=batch, max_length=None))
    if model.run is None:  # a published reward model: its own tokenizer and template
        return reward_dir, model, None
    if share_base and method_table.kind(model.run.method) == "peft":
        shared = one_base.OneBase(reward_dir)
        return reward_dir, rewards.RunReward(model.run, shared.reward, shared.reward_tokenizer, batch_size=batch,
                                             max_length=None, progress=progress), shared
    return reward_dir, rewards.RunReward(model.run, batch_size=batch, max_length=None, progress=progress), None


def fitting_prompts(recipe: Recipe, prompt_rows: list, source: str, reward_model: rewards.RewardModel,
                    play: agent.Play | None = None) -> tuple[int, list]:
    """The prompts every row answers: those within the prompt limit PPO trained with that leave room for
    eval.max_new_tokens (an episode: ppo.max_episode_tokens) within the model's positions (longer ones are left out
    and counted); and how many were left out. Episodes' prompts are measured rendered with the tools."""
    e = recipe.eval
    limit, key = recipe.ppo.max_prompt_length, "ppo.max_prompt_length"
    room, room_key = (e.max_new_tokens, "eval.max_new_tokens") if play is None else (
        play.limits.max_tokens, "ppo.max_episode_tokens")
    positions = modeling.max_positions(reward_model.config)
    if positions is not None and positions - room < limit:
        limit, key = positions - room, f"(the model's {positions} positions - {room_key})"
    if limit <= 0:
        raise UserError(f"{recipe.source}: {room_key}={room} leaves no room for a prompt in the model's {positions} "
                        "positions")
    kept = encoding.encode_prompts(reward_model.tokenizer, prompt_rows, limit,
                                   None if play is None else play.tools)[1]
    if not kept:
        raise UserError(f"{source}: every prompt is longer than {key}={limit} tokens")
    encoding.report_dropped("eval", len(prompt_rows) - len(kept), len(prompt_rows), f"prompts of {source}", key,
                            limit)
    return len(prompt_rows) - len(kept), [prompt_rows[i] for i in kept]


def write_report(out: Path, records: list[dict], summary: dict, table: str, source: str, n_prompts: int, e,
                 reward_dir: Path) -> None:
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(
        f"# Evaluation on {source}\n\n{n_prompts} prompts, "
        + ("greedy" if e.samples == 1 else f"{e.samples} samples at temperature {e.temperature}")
        + f", reward model {reward_dir}\n\n" + table)


def draw(rows: list[Row], records: list[dict], out: Path) -> list[str]:
    """Reward distributions; for every PPO row, its training curves and the proxy-vs-gold view."""
    made = [report.plot_reward_distributions(
        {r.name: [x["reward"] for x in records if x["policy"] == r.name] for r in rows}, out / "rewards.png")]
    for i, r in enumerate(rows):
        if r.run_dir is None or modeling.read_run(r.run_dir).stage != "ppo":
            continue
        tag = "" if r.name == "ppo" else f"_{i}"  # the recipe's own PPO run, or the row's position
        made.append(report.plot_ppo_curves(r.run_dir, out / f"ppo_curves{tag}.png"))
        points = [{"step": m["step"], "score": m["eval/score"], "gold": m.get("eval/gold")}
                  for m in report.read_metrics(r.run_dir) if "eval/score" in m]
        made.append(report.plot_overoptimisation(points, out / f"proxy_vs_gold{tag}.png"))
    return [p.name for p in made if p is not None]
