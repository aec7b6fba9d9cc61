"""RM: a reward model trained on ranked response pairs, as an adapter plus a scalar score head on the base.

setup (pairs, tokenizer, base with a one-output head + adapter) -> TRL's RewardTrainer (Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected [- margin])``) -> held-out accuracy and margins, and the mean and standard
deviation of the reward over the training responses (PPO normalises scores with them) -> save.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from rlhf import distributed, formats, methods, modeling, rollout, training
from rlhf.checkpoint import Run
from rlhf.config import Recipe
from rlhf.errors import UserError


def load_pairs(recipe: Recipe, source: str) -> formats.Loaded:
    d = recipe.data
    return formats.load(source, "preference", fmt=d.preference_format, columns=d.columns, split=d.split,
                        on_bad_row=d.on_bad_row)


def evaluate_pairs(model, tokenizer, pairs: list[dict], batch_size: int = 32, progress: bool = False) -> dict:
    """Accuracy and margins of a reward model on pairs, scored with the one scoring function PPO uses too."""
    convs = [p["prompt"] + p[side] for side in ("chosen", "rejected") for p in pairs]
    scores = rollout.score_conversations(model, tokenizer, convs, batch_size, progress=progress)
    return rollout.pair_metrics(scores[:len(pairs)], scores[len(pairs):])


def reward_statistics(model, tokenizer, pairs: list[dict], samples: int, seed: int, batch_size: int = 32,
                      progress: bool = False) -> dict:
    """Mean and standard deviation of the reward over the training responses (chosen and rejected), or over a
    fixed random sample of ``samples`` of them."""
    convs = [p["prompt"] + p[side] for p in pairs for side in ("chosen", "rejected")]
    if 0 < samples < len(convs):
        convs = random.Random(seed).sample(convs, samples)
    scores = rollout.score_conversations(model, tokenizer, convs, batch_size, progress=progress)
    return {"mean": scores.mean().item(), "std": scores.std().item(), "responses": len(convs)}


def main(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """Train the reward model as the recipe says; returns the manifest written to the run directory."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    # setup: data, output directory, model
    methods.check_stage(recipe.adapter.method, "rm", recipe.source)
    distributed.warn_unsharded("rm")
    if not recipe.data.preference:
        raise UserError(f"{recipe.source}: data.preference is required for the rm stage")
    data = load_pairs(recipe, recipe.data.preference)
    held = load_pairs(recipe, recipe.data.eval_preference) if recipe.data.eval_preference else None
    with Run(Path(out) if out else recipe.stage_dir("rm"), "rm", overwrite=overwrite, resume=resume) as run:
        run.track(recipe)
        set_seed(recipe.rm.seed)
        tokenizer = modeling.load_tokenizer(recipe.model)
        base = modeling.load_base(recipe.model, kind="score")
        base.config.pad_token_id = tokenizer.pad_token_id
        if held is not None:
            train_rows, eval_rows = data.rows, held.rows
        else:
            train_rows, eval_rows = training.split_rows(data.rows, recipe.rm.eval_fraction, recipe.rm.seed)
        model = modeling.attach_adapter(base, recipe.adapter, "SEQ_CLS", recipe.model.base,
                                        training.planned_steps(recipe.rm, len(train_rows)))
        params = modeling.trainable_parameters(model)
        print(f"rm: {len(data.rows)} pairs, {recipe.adapter.method} trains {params['trainable']:,} of "
              f"{params['total']:,} parameters ({params['percent']}%)", file=sys.stderr)

        args = RewardConfig(**training.trainer_kwargs(recipe, recipe.rm, run.work, bool(eval_rows)),
                            center_rewards_coefficient=recipe.rm.center_rewards_coefficient,
                            disable_dropout=True)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
        )
        if recipe.model.quantization:  # TRL casts a quantized model's trainable weights to bf16; the score head
            # reads hidden states in the compute dtype, so it keeps that dtype
            modeling.score_head(model).to(model.get_input_embeddings().weight.dtype)
        # RewardTrainer drops pairs longer than max_length; count them rather than lose them silently
        too_long = len(train_rows) - len(trainer.train_dataset)
        if too_long and recipe.rm.on_too_long == "error":
            raise UserError(f"{recipe.data.preference}: {too_long} pairs are longer than rm.max_length="
                            f"{recipe.rm.max_length} tokens (raise it, or set rm.on_too_long: drop)")
        if too_long:
            print(f"rm: dropped {too_long} pairs longer than rm.max_length={recipe.rm.max_length}", file=sys.stderr)
        training.quiet_trainer(trainer, run, recipe, "rm", shown=("train/loss", "train/accuracy", "eval/accuracy"))
        training.method_callbacks(trainer, recipe.adapter)

        # train
        result = training.train(trainer, run)

        # measure: held-out accuracy with the shared scoring function, reward statistics for PPO
        model.eval()
        progress = training.show_progress(recipe)
        metrics = {"train_loss": result.training_loss, "steps": result.global_step}
        if eval_rows:
            held_out = evaluate_pairs(model, tokenizer, eval_rows, progress=progress)
            metrics.update({f"eval_{k}": v for k, v in held_out.items()})
            run.metrics.write({"step": result.global_step, **{f"eval/{k[5:]}": v for k, v in metrics.items()
                                                               if k.startswith("eval_")}})
        stats = reward_statistics(model, tokenizer, train_rows, recipe.rm.stats_samples, recipe.rm.seed,
                                  progress=progress)
        print(f"rm: held-out accuracy {metrics.get('eval_accuracy', float('nan')):.4f}, reward mean "
              f"{stats['mean']:.4f} std {stats['std']:.4f}", file=sys.stderr)
        if not (torch.isfinite(torch.tensor(stats["mean"])) and stats["std"] > 0):
            raise RuntimeError(f"reward statistics are degenerate ({stats}); the reward model did not train")

        # save
        training.save_trained(trainer, tokenizer, recipe, run, "rm")
        return run.finish({
            "base": recipe.model.base,
            "parents": {},
            "adapter": {"method": recipe.adapter.method, "parameters": params},
            "data": {"preference": data.summary(), "eval_preference": held.summary() if held else None,
                     "train_rows": len(trainer.train_dataset), "eval_rows": len(eval_rows),
                     "rows_too_long": too_long},
            "metrics": metrics,
            "reward_stats": stats,
            "seed": recipe.rm.seed,
            "recipe": recipe.to_dict(),
        })
