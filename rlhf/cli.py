"""The ``rlhf`` command: thin wrappers that parse options, load the recipe and call a stage.

A mistake in the user's input (``UserError``) prints one line and exits with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import os
import shlex
import sys

import click

from rlhf.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            if ctx.parent is None:  # the whole command succeeded (on this process)
                from rlhf.scale import distributed

                distributed.shut_down()
            return result
        except RuntimeError as e:  # in a launched run: another process died under a collective
            from rlhf.scale import distributed

            if (ctx.obj or {}).get("debug") or not distributed.lost_peer(e):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            distributed.report_error(f"{ctx.invoked_subcommand}: lost another process of the run ({first[:200]})", 1)
            ctx.exit(1)
        except UserError as e:
            if (ctx.obj or {}).get("debug"):
                raise
            code = getattr(e, "exit_code", 2)  # 2, or 128 + the signal for a preempted run (rlhf.runs.preempt)
            from rlhf.scale import distributed

            if not distributed.report_error(str(e), code):  # launched: the launching command prints it once
                click.echo(f"error: {e}", err=True)
            ctx.exit(code)


def _quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, load reports, optional-kernel notices) out of the output; the
    stages print what matters. ``--debug`` leaves it on. Environment variables only: nothing heavy is imported
    before the recipe has been checked."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("bitsandbytes", "kernels"):  # bitsandbytes asks the hub for a CPU kernel at import (kernels >= 0.19)
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, value in (("TRANSFORMERS_VERBOSITY", "error"), ("DATASETS_VERBOSITY", "error"),
                        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # imported already (a caller in this process): the variables came too late
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()


class FiniteFloat(click.FloatRange):
    """A number in a range that is also finite (click's FloatRange lets nan and inf through)."""

    def convert(self, value, param, ctx):
        import math

        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def recipe_options(f):
    f = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="override one recipe key, e.g. --set sft.lr=1e-4 (repeatable)")(f)
    f = click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False), required=True,
                     help="the recipe YAML file")(f)
    return f


def launch_options(f):
    """``--num-processes`` and ``--accelerate-config``: run the command under ``accelerate launch``."""
    f = click.option("--accelerate-config", type=click.Path(dir_okay=False),
                     help="run under accelerate launch with this config (see recipes/accelerate/)")(f)
    f = click.option("--num-processes", type=click.IntRange(min=1),
                     help="run on N processes under accelerate launch (GPUs, or CPU processes over gloo)")(f)
    return f


def _relaunch(num_processes: int | None, accelerate_config: str | None) -> None:
    """Re-run this very command under ``accelerate launch`` when asked to (and not already launched)."""
    from rlhf.scale import distributed

    if not (num_processes or accelerate_config) or os.environ.get(distributed.LAUNCHED) or distributed.in_launcher():
        return
    from rlhf.scale import launch

    sys.exit(launch.launch(sys.argv[1:], num_processes, accelerate_config))


def _command() -> str:
    """The command line a run's manifest records (``cli`` keeps it)."""
    return click.get_current_context().find_root().obj["command"]


def _echo(message: str) -> None:
    """A result line, printed once (by the main process when there are many)."""
    from rlhf.scale import distributed

    if distributed.is_main():
        click.echo(message)


def _recipe(path: str, overrides: tuple[str, ...], base: str | None = None):
    from rlhf.config import load_recipe

    extra = (f"model.base={base}",) if base else ()
    return load_recipe(path, (*overrides, *extra))


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="show tracebacks for input errors")
@click.option("--allow-changed-base", is_flag=True,
              help="load a run whose base model or parent run changed since it was trained (refused otherwise)")
@click.pass_context
def cli(ctx, debug, allow_changed_base):
    """Align a causal language model: SFT -> reward model -> PPO, one shared base with adapters."""
    ctx.obj = {"debug": debug}
    from rlhf.scale import distributed

    distributed.mark_started()  # in a launched process: the launching command can tell a killed one
    if allow_changed_base:
        from rlhf.runs import provenance

        os.environ[provenance.ALLOW_ENV] = "1"  # launched processes inherit it
    if not debug:
        _quiet_libraries()
    # the command line each run's manifest records; a launched process's own lacks --num-processes /
    # --accelerate-config: the launcher's has them
    ctx.obj["command"] = os.environ.get(distributed.COMMAND) or shlex.join(["rlhf", *sys.argv[1:]])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@cli.command()
@recipe_options
@click.option("--base", help="base model (local path or hub id); overrides model.base")
@click.option("--out", type=click.Path(file_okay=False), help="output run directory (default runs/<name>/sft)")
@click.option("--overwrite", is_flag=True, help="replace a finished run in the output directory")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its newest complete checkpoint")
@launch_options
def sft(recipe_path, overrides, base, out, overwrite, resume, num_processes, accelerate_config):
    """Supervised fine-tuning on demonstrations (loss on responses only)."""
    from stages import sft as stage

    recipe = _recipe(recipe_path, overrides, base)
    _relaunch(num_processes, accelerate_config)
    manifest = stage.main(recipe, out=out, overwrite=overwrite, resume=resume,
                          command=_command())
    m = manifest["metrics"]
    _echo(f"sft: {m['steps']} steps, train loss {m['train_loss']:.4f}"
               + (f", eval loss {m['eval_loss']:.4f}" if "eval_loss" in m else "")
               + f" -> {out or recipe.stage_dir('sft')}")


@cli.group(invoke_without_command=True)
@click.option("--recipe", "-r", "recipe_path", type=click.Path(dir_okay=False), help="the recipe YAML file")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override one recipe key (repeatable)")
@click.option("--base", help="base model (local path or hub id); overrides model.base")
@click.option("--out", type=click.Path(file_okay=False), help="output run directory (default runs/<name>/rm)")
@click.option("--overwrite", is_flag=True, help="replace a finished run in the output directory")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its newest complete checkpoint")
@launch_options
@click.pass_context
def rm(ctx, recipe_path, overrides, base, out, overwrite, resume, num_processes, accelerate_config):
    """Train the reward model on ranked pairs (Bradley-Terry loss). `rlhf rm score` scores pairs with one."""
    if ctx.invoked_subcommand is not None:
        return
    if not recipe_path:
        raise click.UsageError("Missing option '--recipe'.")
    from stages import rm as stage

    recipe = _recipe(recipe_path, overrides, base)
    _relaunch(num_processes, accelerate_config)
    manifest = stage.main(recipe, out=out, overwrite=overwrite, resume=resume,
                          command=_command())
    m = manifest["metrics"]
    _echo(f"rm: {m['steps']} steps, train loss {m['train_loss']:.4f}"
               + (f", held-out accuracy {m['eval_accuracy']:.4f}" if "eval_accuracy" in m else "")
               + f" -> {out or recipe.stage_dir('rm')}")


@rm.command("score")
@click.option("--reward", required=True, type=click.Path(file_okay=False), help="a reward-model run directory")
@click.option("--data", "data_path", required=True, help="preference pairs or rankings (any supported format)")
@click.option("--out", type=click.Path(dir_okay=False), help="also write each row's scores here (JSON lines)")
@click.option("--on-bad-row", type=click.Choice(["error", "drop"]), default="error", show_default=True)
def rm_score(reward, data_path, out, on_bad_row):
    """Accuracy of a reward model on pairs (with margins) or on rankings (over all comparisons, and top-1)."""
    import json

    from stages import rm as stage

    click.echo(json.dumps(stage.score(reward, data_path, out, on_bad_row)))


@cli.command()
@recipe_options
@click.option("--policy", help="SFT (or PPO) run directory to start from; 'base' to start from the bare base "
              "(default runs/<name>/sft)")
@click.option("--reward", help="reward-model run directory (default runs/<name>/rm), or a published sequence-"
              "classification reward model: a model directory or a hub id")
@click.option("--out", type=click.Path(file_okay=False), help="output run directory (default runs/<name>/ppo)")
@click.option("--overwrite", is_flag=True, help="replace a finished run in the output directory")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its newest complete checkpoint")
@launch_options
def ppo(recipe_path, overrides, policy, reward, out, overwrite, resume, num_processes, accelerate_config):
    """PPO of the policy against the reward model, with a KL penalty to the frozen SFT reference."""
    from stages import ppo as stage

    recipe = _recipe(recipe_path, overrides)
    _relaunch(num_processes, accelerate_config)
    manifest = stage.main(recipe, policy=policy, reward=reward, out=out, overwrite=overwrite, resume=resume,
                          command=_command())
    m = manifest["metrics"]
    score = m.get("objective/score", m["objective/score_total"])
    _echo(f"ppo: {m['steps']} steps, score {score:.4f}, kl {m['objective/kl']:.4f}"
               + (f", held-out gold {m['eval/gold']:.4f}" if "eval/gold" in m else "")
               + f" -> {out or recipe.stage_dir('ppo')}")


@cli.command()
@recipe_options
@click.option("--policy", help="SFT run directory to start from (and the reference); 'base' to start from the bare "
              "base (default runs/<name>/sft)")
@click.option("--out", type=click.Path(file_okay=False), help="output run directory (default runs/<name>/dpo)")
@click.option("--overwrite", is_flag=True, help="replace a finished run in the output directory")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its newest complete checkpoint")
@launch_options
def dpo(recipe_path, overrides, policy, out, overwrite, resume, num_processes, accelerate_config):
    """DPO (or IPO, hinge, robust DPO, SimPO: dpo.loss) of the SFT policy on the preference data."""
    from stages import dpo as stage

    recipe = _recipe(recipe_path, overrides)
    _relaunch(num_processes, accelerate_config)
    manifest = stage.main(recipe, policy=policy, out=out, overwrite=overwrite, resume=resume,
                          command=_command())
    m = manifest["metrics"]
    _echo(f"dpo: {m['steps']} steps, train loss {m['train_loss']:.4f}"
          + (f", held-out implicit-reward accuracy {m['eval_rewards/accuracies']:.4f}"
             if "eval_rewards/accuracies" in m else "") + f" -> {out or recipe.stage_dir('dpo')}")


@cli.command("eval")
@recipe_options
@click.option("--policy", "policies", multiple=True,
              help="policy to evaluate: a run directory, a stage of the recipe (sft, ppo) or 'base' (repeatable; "
                   "default eval.policies)")
@click.option("--reward", help="reward-model run directory (default runs/<name>/rm), or a published sequence-"
              "classification reward model: a model directory or a hub id")
@click.option("--prompts", help="held-out prompt file (default data.eval_prompts)")
@click.option("--samples", type=int, help="responses per prompt (1: greedy); overrides eval.samples")
@click.option("--icl-shots", type=int, help="demonstrations for the in-context baseline row; overrides eval.icl_shots")
@click.option("--scorer", "scorer_specs", multiple=True,
              help="a scorer column (built-in name, module:function or file.py:function; repeatable); replaces "
                   "eval.scorers")
@click.option("--env", help="play each answer as a multi-turn episode with this environment's tools (FILE.py:Class, "
              "module:Class or a built-in); overrides eval.environment")
@click.option("--out", type=click.Path(file_okay=False), help="output directory (default runs/<name>/eval)")
@click.option("--overwrite", is_flag=True, help="replace a finished evaluation in the output directory")
@launch_options
def evaluate(recipe_path, overrides, policies, reward, prompts, samples, icl_shots, scorer_specs, env, out, overwrite,
             num_processes, accelerate_config):
    """Compare policies on held-out prompts: reward, scorers (eval.scorers), win rate, KL, length; with a report
    and plots."""
    import json

    from rlhf.models.training import show_progress
    from stages import evaluate as stage

    extra = ((f"eval.samples={samples}",) if samples is not None else ()) + (
        (f"eval.icl_shots={icl_shots}",) if icl_shots is not None else ()) + (
        (f"eval.scorers={json.dumps(list(scorer_specs))}",) if scorer_specs else ()) + (
        (f"eval.environment={env}",) if env else ())
    recipe = _recipe(recipe_path, (*overrides, *extra))
    _relaunch(num_processes, accelerate_config)
    stage.main(recipe, policies=list(policies) or None, reward=reward, prompts=prompts, out=out,
               overwrite=overwrite, progress=show_progress(recipe), command=_command())
    _echo(f"eval: report in {out or recipe.stage_dir('eval')}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--prompts", required=True, type=click.Path(dir_okay=False), help="prompt file (any prompt format)")
@click.option("--num-samples", "-k", default=1, show_default=True, type=click.IntRange(min=1),
              help="responses per prompt and policy: 1 is greedy; K > 1 samples K candidates to rank (rlhf label)")
@click.option("--out", type=click.Path(dir_okay=False),
              help="write the rows here (whole, or not at all) instead of printing them")
@click.option("--temperature", type=FiniteFloat(min=0), help="sampling temperature (default: the run's "
              "ppo.temperature for K > 1, 0 = greedy for K = 1)")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="response length limit (default: the run's ppo.max_new_tokens, else 64)")
@click.option("--seed", default=0, show_default=True, help="sampling seed (the same seed gives the same file)")
@click.option("--limit", type=click.IntRange(min=1), help="use only the first N prompts")
@click.option("--scorer", "scorer_specs", multiple=True,
              help="score each response with this scorer where it applies (built-in name, module:function or "
                   "file.py:function; repeatable; default gold when printing greedy responses)")
@click.option("--icl-shots", default=0, show_default=True, type=click.IntRange(min=0),
              help="base: policies answer each prompt after this many demonstrations (eval's in-context row)")
@click.option("--demos", type=click.Path(dir_okay=False), help="the SFT file --icl-shots draws demonstrations from")
@click.option("--env", help="play each response as a multi-turn episode with this environment's tools (FILE.py:Class, "
              "module:Class or a built-in such as tiny:calculator; docs/agents.md): rows hold whole episodes")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
@click.option("--resume", is_flag=True, help="continue the interrupted run that left OUT.partial")
def sample(run_dirs, prompts, num_samples, out, temperature, max_new_tokens, seed, limit, scorer_specs, icl_shots,
           demos, env, overwrite, resume):
    """Responses of a run's policy (or of `base:PATH`) to a prompt file, as JSON lines: greedy ones with scores,
    or K sampled candidates per prompt to rank (`rlhf label`, or by hand) for the reward model. Several RUN_DIRS
    mix their candidates per prompt, each response tagged with its policy."""
    from stages import sample as stage

    if not scorer_specs and out is None and num_samples == 1:
        scorer_specs = ("gold",)
    n = stage.main(list(run_dirs), prompts, out, num_samples=num_samples, temperature=temperature,
                   max_new_tokens=max_new_tokens, seed=seed, limit=limit, scorer_specs=list(scorer_specs),
                   overwrite=overwrite, resume=resume, icl_shots=icl_shots, demos=demos, env=env,
                   progress=sys.stderr.isatty(), echo=click.echo)
    if out:
        click.echo(f"sample: {n} prompts x {num_samples * len(run_dirs)} responses -> {out}")


class _DefaultGroup(_Group):
    """A group whose first argument, when it names none of its commands, goes to its default command
    (``rlhf label FILE --by gold`` is ``rlhf label rank FILE --by gold``)."""

    default_command = "rank"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_DefaultGroup)
def label():
    """Rank candidate responses (from `rlhf sample -k K`): by a scorer or reward model (`rlhf label FILE --by`),
    by people in a browser (`rlhf label serve`); and how far people agree (`rlhf label agreement`)."""


@label.command("rank")
@click.argument("candidates", type=click.Path(dir_okay=False))
@click.option("--by", required=True, help="the labeller: a scorer (built-in name, module:function or "
              "file.py:function), a reward model (a run or model directory, or rm:HUB_ID), or an LLM judge "
              "comparing candidates pair by pair (judge:MODEL: a causal chat model's directory, hub id or run)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="the rankings file to write")
@click.option("--noise", default=0.0, show_default=True, type=float,
              help="for experiments: Gaussian noise (standard deviation, in the labeller's units) added to each "
                   "score before ordering, a simulated annotator who sometimes disagrees")
@click.option("--seed", default=0, show_default=True, help="seed of the noise")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file")
def label_rank(candidates, by, out, noise, seed, overwrite):
    """Rank each prompt's candidates with a scorer or a reward model; writes rankings the reward model trains on
    (data.preference). The default command: `rlhf label FILE --by ...`."""
    import json

    from stages import label as stage

    stats = stage.main(candidates, by, out, noise=noise, seed=seed, overwrite=overwrite)
    click.echo(json.dumps(stats) + f" -> {out}")


@label.command("serve")
@click.argument("candidates", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="the rankings file (appended to; several annotators may share it)")
@click.option("--annotator", required=True, help="who is ranking (recorded on every row)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface to listen on (another than loopback exposes the page to the network)")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("--overlap", type=click.IntRange(min=1),
              help="each prompt goes to N annotators: every annotator's queue holds what they have not answered "
                   "and fewer than N have, least covered first (default: every annotator sees every prompt)")
@click.option("--suggest", help="show a scorer's or reward model's scores and ranking beside the responses "
              "(off by default: a shown ranking anchors people); recorded in each answer")
def label_serve(candidates, out, annotator, host, port, overlap, suggest):
    """A page where a person ranks each prompt's responses, keyboard or mouse; each answer is on disk before the
    page confirms it, and the same command resumes where this annotator stopped. Every request needs the access
    token printed in the URL."""
    from stages import label as stage

    stage.serve(candidates, out, annotator, host=host, port=port, overlap=overlap, suggest=suggest,
                echo=lambda s: click.echo(s, nl=True))


@label.command("agreement")
@click.argument("rankings", type=click.Path(dir_okay=False))
def label_agreement(rankings):
    """How far annotators agree where several ranked the same prompt: pairwise agreement and Kendall's tau, per
    annotator and overall (JSON)."""
    import json

    from stages import label as stage

    click.echo(json.dumps(stage.agreement_report(rankings), indent=2))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False), help="the directory to write")
@click.option("--merge", is_flag=True, help="fold the adapter into a full-precision copy of the base: a plain "
              "Hugging Face model that loads without peft")
@click.option("--overwrite", is_flag=True, help="replace an existing export directory")
def export(run_dir, out, merge, overwrite):
    """Export an sft/ppo policy or an rm reward model as a Hugging Face model directory."""
    import json

    from rlhf.runs.export import export as run_export

    info = run_export(run_dir, out, merge=merge, overwrite=overwrite)
    click.echo(json.dumps({k: v for k, v in info.items() if k != "versions"}) + f" -> {out}")


@cli.command()
@click.argument("run_dir", type=click.Path())
def info(run_dir):
    """The lineage of a run (base -> sft -> rm -> ppo) with each step's key facts."""
    from rlhf.runs import lineage

    click.echo(lineage.describe(run_dir))


@cli.command()
@click.argument("root", default="runs", type=click.Path())
def runs(root):
    """The run directories under ROOT (default runs/): stage, status, headline metric."""
    from rlhf.runs import lineage

    rows = lineage.list_runs(root)
    if not rows:
        click.echo(f"no runs under {root}")
        return
    width = max(len(r["path"]) for r in rows)
    for r in rows:
        click.echo(f"{r['path']:<{width}}  {r['stage']:<5}  {r['status']:<11}  {r['finished'][:19]:<19}  "
                   f"{r['headline']}".rstrip())


@cli.command()
@click.argument("base")
@click.option("--method", type=click.Choice(["lora", "qlora", "full"]), default="lora", show_default=True)
@click.option("--stage", type=click.Choice(["sft", "rm", "dpo", "ppo", "ppo-shared"]),
              help="one stage (default: every stage; ppo-shared is PPO with ppo.critic: shared)")
@click.option("--processes", default=8, show_default=True, type=click.IntRange(min=1),
              help="GPUs to shard full fine-tuning over")
@click.option("--rank", default=16, show_default=True, type=click.IntRange(min=1), help="LoRA rank")
@click.option("--gpu-gb", default=80.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="memory of one GPU")
def memory(base, method, stage, processes, rank, gpu_gb):
    """Memory per process each stage needs for BASE (a model directory or hub id: its config.json is read),
    before activations: weights, gradients and optimizer state, data parallel and sharded (rlhf/scale/memory.py)."""
    from rlhf.scale import memory as mem

    try:
        shapes = mem.load_shapes(base)
    except (OSError, ValueError) as e:
        raise UserError(f"{base}: no model configuration to read ({str(e).splitlines()[0]})") from None
    click.echo(mem.describe(base, shapes, method, stage, processes, rank, gpu_gb))


@cli.command("methods")
def list_methods():
    """The fine-tuning methods (recipe adapter.method) and the stages that support each."""
    from rlhf.models import method_table

    click.echo(method_table.support_matrix())
    click.echo("\nLoRA on an 8-bit base: adapter.method lora with model.quantization 8bit. "
               "Options of each method: the adapter section of any recipe (rlhf/config.py documents each key).")


@cli.group()
def tiny():
    """The embedded tiny world: its data and its base model."""


@tiny.command("generate")
@click.option("--out", default="data/tiny", show_default=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
def tiny_generate(out, seed):
    """Write the tiny world's data files (deterministic for a seed)."""
    from rlhf.tiny import data

    for name, path in data.write(out, seed).items():
        click.echo(f"{path}")


@tiny.command("build-base")
@click.option("--out", default="data/tiny-base", show_default=True, type=click.Path(file_okay=False))
@click.option("--minutes", default=9.0, show_default=True, help="pretraining wall time")
@click.option("--seed", default=0, show_default=True)
def tiny_build_base(out, minutes, seed):
    """Train the tiny base's tokenizer and pretrain the model on fresh world text."""
    from rlhf.tiny import base

    base.build_base(out, minutes=minutes, seed=seed, log=lambda s: click.echo(s, err=True))


TRAINING_COMMANDS = ("sft", "rm", "ppo", "dpo", "eval", "sample")


def main():
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)  # the group's options are flags
    if command in TRAINING_COMMANDS:
        from rlhf.scale import allocator

        try:
            allocator.reexec_with_preload(sys.argv[1:])  # tcmalloc where the system has it (rlhf/scale/allocator.py)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
    try:
        cli(prog_name="rlhf")
    except SystemExit as e:  # click ends every command so, success included
        from rlhf.scale import distributed

        distributed.mark_ended(e.code)  # launched: how this process ended (rlhf/scale/launch.py reads it)
        raise


if __name__ == "__main__":
    sys.exit(main())
