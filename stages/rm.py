"""RM: a reward model trained on ranked response pairs, as an adapter plus a scalar score head on the base.

setup (pairs, tokenizer, base with a one-output head + adapter) -> TRL's RewardTrainer (Bradley-Terry loss
``-log sigmoid(r_chosen - r_rejected [- margin])``) -> held-out accuracy and margins, and the mean and standard
deviation of the reward over the training responses (PPO normalises scores with them) -> save.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import distributed, formats, methods, modeling, training
from rlhf.rundir import Run
from rlhf.config import Recipe
from rlhf.errors import UserError


def load_pairs(recipe: Recipe, source: str) -> formats.Loaded:
    d = recipe.data
    return formats.load(source, "preference", fmt=d.preference_format, columns=d.columns, split=d.split,
                        on_bad_row=d.on_bad_row)


@dataclass
class Encoded:
    """Pairs as the token ids the reward model trains and is read on (``modeling.encode_exchange``), with the
    pairs that fit ``max_length`` and how many did not."""

    rows: list[dict]
    """``{chosen_ids, rejected_ids, margin}`` per kept pair (the trainer's pre-tokenised input)"""
    pairs: list[dict]
    """the kept pairs themselves"""
    dropped: int


def encode_pairs(tokenizer, pairs: list[dict], max_length: int) -> Encoded:
    """Encode each pair's two conversations; a pair with either longer than ``max_length`` tokens is left out,
    as the reward trainer leaves it out of training."""
    rows, kept = [], []
    margins = any("margin" in p for p in pairs)
    for p in pairs:
        chosen = sum(modeling.encode_exchange(tokenizer, p["prompt"], p["chosen"]), [])
        rejected = sum(modeling.encode_exchange(tokenizer, p["prompt"], p["rejected"]), [])
        if max(len(chosen), len(rejected)) > max_length:
            continue
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected,
                     **({"margin": p.get("margin", 0.0)} if margins else {})})
        kept.append(p)
    return Encoded(rows, kept, len(pairs) - len(kept))


def evaluate_pairs(model, tokenizer, encoded: Encoded, batch_size: int = 32, progress: bool = False) -> dict:
    """Accuracy and margins of a reward model on encoded pairs, read where PPO reads."""
    seqs = [r["chosen_ids"] for r in encoded.rows] + [r["rejected_ids"] for r in encoded.rows]
    scores = modeling.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)
    n = len(encoded.rows)
    return modeling.pair_metrics(scores[:n], scores[n:])


def reward_statistics(model, tokenizer, encoded: Encoded, samples: int, seed: int, batch_size: int = 32,
                      progress: bool = False) -> dict:
    """Mean and standard deviation of the reward over the training responses (chosen and rejected) of the pairs
    training used, or over a fixed random sample of ``samples`` of them."""
    seqs = [r[side] for r in encoded.rows for side in ("chosen_ids", "rejected_ids")]
    if 0 < samples < len(seqs):
        seqs = random.Random(seed).sample(seqs, samples)
    scores = modeling.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)
    return {"mean": scores.mean().item(), "std": scores.std().item(), "responses": len(seqs)}


def drop_too_long(encoded: Encoded, total: int, recipe: Recipe, source: str, stage: str = "rm") -> None:
    """Report (or refuse, with ``rm.on_too_long: error``) the pairs longer than rm.max_length."""
    limit = recipe.rm.max_length
    if encoded.dropped and recipe.rm.on_too_long == "error":
        raise UserError(f"{source}: {encoded.dropped} of {total} pairs are longer than rm.max_length={limit} tokens "
                        "(raise it, or set rm.on_too_long: drop)")
    if not encoded.rows:
        raise UserError(f"{source}: every pair is longer than rm.max_length={limit} tokens; raise rm.max_length")
    modeling.report_dropped(stage, encoded.dropped, total, f"pairs of {source}", "rm.max_length", limit)


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
    modeling.check_lengths(modeling.load_config(recipe.model), {"rm.max_length": recipe.rm.max_length},
                           recipe.source)
    with Run(Path(out) if out else recipe.stage_dir("rm"), "rm", overwrite=overwrite, resume=resume) as run:
        run.track(recipe)
        set_seed(recipe.rm.seed)
        tokenizer = modeling.load_tokenizer(recipe.model)
        base = modeling.load_base(recipe.model, kind="score")
        base.config.pad_token_id = tokenizer.pad_token_id  # where the head is read: see modeling.reward_index
        if held is not None:
            train_rows, eval_rows = data.rows, held.rows
        else:
            train_rows, eval_rows = training.split_rows(data.rows, recipe.rm.eval_fraction, recipe.rm.seed)
        # the pairs as the token ids PPO's episodes are laid out in; too long ones are dropped (or refused)
        train = encode_pairs(tokenizer, train_rows, recipe.rm.max_length)
        drop_too_long(train, len(train_rows), recipe, recipe.data.preference)
        held_out = encode_pairs(tokenizer, eval_rows, recipe.rm.max_length)
        if eval_rows:
            modeling.report_dropped("rm", held_out.dropped, len(eval_rows), "held-out pairs", "rm.max_length",
                                    recipe.rm.max_length)
        model = modeling.attach_adapter(base, recipe.adapter, "SEQ_CLS", recipe.model.base,
                                        training.planned_steps(recipe.rm, len(train.rows)))
        params = modeling.trainable_parameters(model)
        print(f"rm: {len(train.rows)} pairs, {recipe.adapter.method} trains {params['trainable']:,} of "
              f"{params['total']:,} parameters ({params['percent']}%)", file=sys.stderr)

        args = RewardConfig(**training.trainer_kwargs(recipe, recipe.rm, run.work, bool(held_out.rows)),
                            center_rewards_coefficient=recipe.rm.center_rewards_coefficient,
                            disable_dropout=True)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train.rows),
            eval_dataset=Dataset.from_list(held_out.rows) if held_out.rows else None,
            processing_class=tokenizer,
        )
        if recipe.model.quantization:  # TRL casts a quantized model's trainable weights to bf16; the score head
            # reads hidden states in the compute dtype, so it keeps that dtype
            modeling.score_head(model).to(model.get_input_embeddings().weight.dtype)
        training.quiet_trainer(trainer, run, recipe, "rm", shown=("train/loss", "train/accuracy", "eval/accuracy"))
        training.method_callbacks(trainer, recipe.adapter)

        # train
        result = training.train(trainer, run)

        # measure: held-out accuracy with the shared scoring function, reward statistics for PPO
        model.eval()
        progress = training.show_progress(recipe)
        metrics = {"train_loss": result.training_loss, "steps": result.global_step}
        if held_out.rows:
            metrics.update({f"eval_{k}": v for k, v in evaluate_pairs(model, tokenizer, held_out,
                                                                      progress=progress).items()})
            run.metrics.write({"step": result.global_step, **{f"eval/{k[5:]}": v for k, v in metrics.items()
                                                               if k.startswith("eval_")}})
        stats = reward_statistics(model, tokenizer, train, recipe.rm.stats_samples, recipe.rm.seed,
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
                     "train_rows": len(train.rows), "eval_rows": len(held_out.rows),
                     "rows_too_long": train.dropped, "eval_rows_too_long": held_out.dropped},
            "metrics": metrics,
            "reward_stats": stats,
            "seed": recipe.rm.seed,
            "recipe": recipe.to_dict(),
        })
