"""RM: a reward model trained on ranked responses, as an adapter plus a scalar score head on the base.

setup (pairs or rankings, tokenizer, base with a one-output head + adapter) -> TRL's RewardTrainer -> held-out
accuracy, and the mean and standard deviation of the reward over the training responses (PPO normalises scores
with them) -> save.

Pairs train with TRL's own collator and Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected [- margin])``.
Rankings of K responses per prompt train, by default (``rm.comparisons: grouped``), with the InstructGPT loss
(``rlhf/ranking.py``): one batch element is one prompt's K responses, all C(K,2) comparisons, K forward passes.
That is the same RewardTrainer with two pieces replaced (``RankingCollator`` and ``RankingRewardTrainer.
compute_loss``), so checkpoints, resume, logging and evaluation stay TRL's. ``rm.comparisons: shuffled`` trains
the same comparisons as independent pairs instead (the setting InstructGPT found to overfit).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf import distributed, formats, methods, modeling, ranking, training
from rlhf.rundir import Run
from rlhf.config import Recipe
from rlhf.errors import UserError


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


@dataclass
class EncodedRankings:
    """Rankings as token ids (each response laid out by ``modeling.encode_exchange``), with the rankings kept."""

    rows: list[dict]
    """``{responses_ids: [[ids], ...], ranks: [...]}`` per kept ranking"""
    rankings: list[dict]
    dropped: int


def encode_rankings(tokenizer, rankings: list[dict], max_length: int) -> EncodedRankings:
    """Encode each ranking's responses; a ranking with any response longer than ``max_length`` tokens is left out
    (as a pair with either side too long is)."""
    rows, kept = [], []
    for r in rankings:
        ids = [sum(modeling.encode_exchange(tokenizer, r["prompt"], resp), []) for resp in r["responses"]]
        if max(map(len, ids)) > max_length:
            continue
        rows.append({"responses_ids": ids, "ranks": r["ranks"]})
        kept.append(r)
    return EncodedRankings(rows, kept, len(rankings) - len(kept))


@dataclass
class RankingCollator:
    """One batch element per ranking: every response of every ranking in the batch, right-padded into one
    ``[sum of K, T]`` batch, and each ranking's places."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        from trl.trainer.utils import pad

        seqs = [torch.tensor(ids) for ex in examples for ids in ex["responses_ids"]]
        return {
            "input_ids": pad(seqs, padding_value=self.pad_token_id, padding_side="right",
                             pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad([torch.ones_like(s) for s in seqs], padding_value=0, padding_side="right",
                                  pad_to_multiple_of=self.pad_to_multiple_of),
            "ranks": [list(ex["ranks"]) for ex in examples],
        }


def ranking_trainer_class():
    """TRL's RewardTrainer with the InstructGPT loss over rankings (built on first use: TRL imports slowly)."""
    from trl import RewardTrainer

    class RankingRewardTrainer(RewardTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # encoded and length-filtered by encode_rankings

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["responses_ids", "ranks"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            rankings = inputs["ranks"]
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                            use_cache=False)
            scores = outputs.logits.squeeze(-1)
            loss = ranking.ranking_loss(scores, rankings)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean(scores ** 2)
            if mode == "train":
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            with torch.no_grad():
                measured = ranking.ranking_accuracy(scores.detach().float(), rankings)
                for key, name in (("pair_accuracy", "accuracy"), ("top1_accuracy", "top1_accuracy")):
                    value = torch.tensor(measured[key], device=scores.device)
                    self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value).mean().item())
                self._metrics[mode]["mean_reward"].append(scores.mean().item())
            return (loss, outputs) if return_outputs else loss

    return RankingRewardTrainer


def ranking_scores(model, tokenizer, encoded: EncodedRankings, batch_size: int = 32,
                   progress: bool = False) -> torch.Tensor:
    """The reward of every response of every encoded ranking, flat and in order, read where PPO reads."""
    seqs = [ids for r in encoded.rows for ids in r["responses_ids"]]
    return modeling.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)


def ranking_metrics(scores: torch.Tensor, encoded: EncodedRankings) -> dict:
    """Accuracy over all comparisons of the rankings (ties in score count half), top-1 accuracy (the top-scored
    response is among the best-placed) and the InstructGPT loss (however the model was trained)."""
    ranks = [r["ranks"] for r in encoded.rows]
    measured = ranking.ranking_accuracy(scores, ranks)
    return {"accuracy": measured["pair_accuracy"], "top1_accuracy": measured["top1_accuracy"],
            "ranking_loss": ranking.ranking_loss(scores.float(), ranks).item(),
            "pairs": sum(len(ranking.ranking_pairs(r["ranks"])) for r in encoded.rows), "rankings": len(encoded.rows)}


def evaluate_rankings(model, tokenizer, encoded: EncodedRankings, batch_size: int = 32,
                      progress: bool = False) -> dict:
    """``ranking_metrics`` of a reward model on encoded rankings."""
    return ranking_metrics(ranking_scores(model, tokenizer, encoded, batch_size, progress), encoded)


def evaluate_pairs(model, tokenizer, encoded: Encoded, batch_size: int = 32, progress: bool = False) -> dict:
    """Accuracy and margins of a reward model on encoded pairs, read where PPO reads."""
    seqs = [r["chosen_ids"] for r in encoded.rows] + [r["rejected_ids"] for r in encoded.rows]
    scores = modeling.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)
    n = len(encoded.rows)
    return modeling.pair_metrics(scores[:n], scores[n:])


def reward_statistics(model, tokenizer, seqs: list[list[int]], samples: int, seed: int, batch_size: int = 32,
                      progress: bool = False) -> dict:
    """Mean and standard deviation of the reward over the training responses (token ids as trained on), or over
    a fixed random sample of ``samples`` of them."""
    if 0 < samples < len(seqs):
        seqs = random.Random(seed).sample(seqs, samples)
    scores = modeling.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)
    return {"mean": scores.mean().item(), "std": scores.std().item(), "responses": len(seqs)}


def drop_too_long(encoded, total: int, recipe: Recipe, source: str, stage: str = "rm",
                  unit: str = "pairs") -> None:
    """Report (or refuse, with ``rm.on_too_long: error``) the pairs or rankings longer than rm.max_length."""
    limit = recipe.rm.max_length
    if encoded.dropped and recipe.rm.on_too_long == "error":
        raise UserError(f"{source}: {encoded.dropped} of {total} {unit} are longer than rm.max_length={limit} "
                        "tokens (raise it, or set rm.on_too_long: drop)")
    if not encoded.rows:
        raise UserError(f"{source}: every {unit[:-1]} is longer than rm.max_length={limit} tokens; raise "
                        "rm.max_length")
    modeling.report_dropped(stage, encoded.dropped, total, f"{unit} of {source}", "rm.max_length", limit)


def main(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """Train the reward model as the recipe says; returns the manifest written to the run directory."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer

    # setup: data, output directory, model
    methods.check_stage(recipe.adapter.method, "rm", recipe.source)
    distributed.warn_unsharded("rm")
    data, held = training.preference_data(recipe, "rm")
    # rankings train grouped per prompt (InstructGPT) unless rm.comparisons says shuffled; pairs are pairs
    grouped = not formats.is_pairs(data) and recipe.rm.comparisons == "grouped"
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
        else:  # whole rankings are held out, never single comparisons of a ranking trained on
            train_rows, eval_rows = training.split_rows(data.rows, recipe.rm.eval_fraction, recipe.rm.seed)
        # the responses as the token ids PPO's episodes are laid out in; too long ones are dropped (or refused)
        unit = "rankings" if grouped else "pairs"
        train = (encode_rankings(tokenizer, train_rows, recipe.rm.max_length) if grouped
                 else encode_pairs(tokenizer, formats.rankings_as_pairs(train_rows), recipe.rm.max_length))
        drop_too_long(train, len(train.rows) + train.dropped, recipe, recipe.data.preference, unit=unit)
        held_out = encode_rankings(tokenizer, eval_rows, recipe.rm.max_length)
        held_pairs = formats.is_pairs(held if held is not None else data)
        if eval_rows:
            modeling.report_dropped("rm", held_out.dropped, len(eval_rows),
                                    "held-out " + ("pairs" if held_pairs else "rankings"), "rm.max_length",
                                    recipe.rm.max_length)
        # what the trainer evaluates on every rm.eval_every steps: held-out data in the training's own shape
        held_as_pairs = (encode_pairs(tokenizer, formats.rankings_as_pairs(held_out.rankings),
                                      recipe.rm.max_length)
                         if held_pairs or not grouped else None)  # encoded once: trainer eval and final measure
        eval_rows_encoded = held_out.rows if grouped else held_as_pairs.rows
        model = modeling.attach_adapter(base, recipe.adapter, "SEQ_CLS", recipe.model.base,
                                        training.planned_steps(recipe.rm, len(train.rows)))
        modeling.disable_dropout(model)  # what disable_dropout=True means, functional dropout (OPT) included
        params = modeling.trainable_parameters(model)
        print(f"rm: {len(train.rows)} {unit}" + (f" ({len(train.rankings)} prompts, "
              f"{sum(len(r['ranks']) for r in train.rows)} responses, InstructGPT loss)" if grouped else "")
              + f", {recipe.adapter.method} trains {params['trainable']:,} of {params['total']:,} parameters "
              f"({params['percent']}%)", file=sys.stderr)
        note = modeling.untrained_note(recipe.model, tokenizer)
        if note and distributed.is_main():
            print(f"rm: {note}", file=sys.stderr)

        args = RewardConfig(**training.trainer_kwargs(recipe, recipe.rm, run.work, bool(eval_rows_encoded)),
                            center_rewards_coefficient=recipe.rm.center_rewards_coefficient,
                            disable_dropout=True)
        trainer = (ranking_trainer_class() if grouped else RewardTrainer)(
            model=model,
            args=args,
            data_collator=RankingCollator(tokenizer.pad_token_id) if grouped else None,
            train_dataset=Dataset.from_list(train.rows),
            eval_dataset=Dataset.from_list(eval_rows_encoded) if eval_rows_encoded else None,
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
        if held_out.rows:  # pairs: accuracy and margins; rankings: accuracy over all comparisons and top-1
            if held_pairs:
                measured = evaluate_pairs(model, tokenizer, held_as_pairs, progress=progress)
            else:
                measured = evaluate_rankings(model, tokenizer, held_out, progress=progress)
            metrics.update({f"eval_{k}": v for k, v in measured.items()})
            run.metrics.write({"step": result.global_step, **{f"eval/{k[5:]}": v for k, v in metrics.items()
                                                               if k.startswith("eval_")}})
        responses = ([ids for r in train.rows for ids in r["responses_ids"]] if grouped
                     else [r[side] for r in train.rows for side in ("chosen_ids", "rejected_ids")])
        stats = reward_statistics(model, tokenizer, responses, recipe.rm.stats_samples, recipe.rm.seed,
                                  progress=progress)
        print(f"rm: held-out accuracy {metrics.get('eval_accuracy', float('nan')):.4f}"
              + (f", top-1 {metrics['eval_top1_accuracy']:.4f}" if "eval_top1_accuracy" in metrics else "")
              + f", reward mean {stats['mean']:.4f} std {stats['std']:.4f}", file=sys.stderr)
        if not (torch.isfinite(torch.tensor(stats["mean"])) and stats["std"] > 0):
            raise RuntimeError(f"reward statistics are degenerate ({stats}); the reward model did not train")

        # save
        training.save_trained(trainer, tokenizer, recipe, run, "rm")
        return run.finish({
            "base": recipe.model.base,
            "untrained_rows_reinitialised": len(modeling.REINITIALISED.get(recipe.model.base, []))
            if recipe.model.untrained_rows == "reinit" else 0,
            "parents": {},
            "adapter": {"method": recipe.adapter.method, "parameters": params},
            "data": {"preference": data.summary(), "eval_preference": held.summary() if held else None,
                     "loss": "instructgpt_ranking" if grouped else "bradley_terry", "unit": unit,
                     "train_rows": len(train.rows), "eval_rows": len(held_out.rows),
                     "rows_too_long": train.dropped, "eval_rows_too_long": held_out.dropped},
            "metrics": metrics,
            "reward_stats": stats,
            "seed": recipe.rm.seed,
            "recipe": recipe.to_dict(),
        })
