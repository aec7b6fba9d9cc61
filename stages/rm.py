"""RM: a reward model trained on ranked responses, as an adapter plus a scalar score head on the base.

setup (pairs or rankings, tokenizer, base with a one-output head + adapter) -> TRL's RewardTrainer -> held-out
accuracy, and the mean and standard deviation of the reward over the training responses (PPO normalises scores
with them) -> save.

Pairs train with TRL's own collator and Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected [- margin])``.
Rankings of K responses per prompt train, by default (``rm.comparisons: grouped``), with the InstructGPT loss
(``rlhf/feedback/ranking.py``): one batch element is one prompt's K responses, all C(K,2) comparisons, K forward passes.
That is the same RewardTrainer with two pieces replaced (``RankingCollator`` and ``RankingRewardTrainer.
compute_loss``), so checkpoints, resume, logging and evaluation stay TRL's. ``rm.comparisons: shuffled`` trains
the same comparisons as independent pairs instead (the setting InstructGPT found to overfit).
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.feedback import ranking, rewards
from rlhf.models import heads, method_table, modeling, training
from rlhf.scale import distributed
from rlhf.text import encoding, formats
from rlhf.runs.manifest import Manifest
from rlhf.runs.rundir import Run
from rlhf.config import Recipe
from rlhf.names import run_name


@dataclass
class Encoded:
    """Rankings (a pair is a ranking of two) as the token ids the reward model trains and is read on
    (``encoding.encode_exchange``), with the rankings that fit ``max_length`` and how many did not."""

    rows: list[dict]
    """``{responses_ids: [[ids], ...], ranks: [...][, margin]}`` per kept ranking"""
    rankings: list[dict]
    """the kept rankings themselves"""
    dropped: int


def encode_rankings(tokenizer, rankings: list[dict], max_length: int) -> Encoded:
    """Encode each ranking's responses; a ranking with any response longer than ``max_length`` tokens is left out
    (a pair: either side), as the reward trainer would leave it out. A pair's margin is kept."""
    rows, kept = [], []
    for r in rankings:
        ids = [sum(encoding.encode_exchange(tokenizer, r["prompt"], resp, r.get("tools")), [])
               for resp in r["responses"]]
        if max(map(len, ids)) > max_length:
            continue
        rows.append({"responses_ids": ids, "ranks": r["ranks"], **({"margin": r["margin"]} if "margin" in r else {})})
        kept.append(r)
    return Encoded(rows, kept, len(rankings) - len(kept))


def trl_pairs(encoded: Encoded) -> list[dict]:
    """Every comparison of every encoded ranking as TRL's pre-tokenised pair ``{chosen_ids, rejected_ids[,
    margin]}``, in ``formats.ranking_as_pairs``'s order: what RewardTrainer's own collator and Bradley-Terry loss
    read, for pair data and ``rm.comparisons: shuffled``. With a margin on any pair, every pair has one (0 where
    none was given), as TRL's collator needs."""
    margins = any("margin" in r for r in encoded.rows)
    return [{"chosen_ids": r["responses_ids"][w], "rejected_ids": r["responses_ids"][l],
             **({"margin": r.get("margin", 0.0)} if margins else {})}
            for r in encoded.rows for w, l in ranking.ranking_pairs(r["ranks"])]


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


def ranking_scores(model, tokenizer, encoded: Encoded, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """The reward of every response of every encoded ranking, flat and in order, read where PPO reads."""
    seqs = [ids for r in encoded.rows for ids in r["responses_ids"]]
    return rewards.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)


def ranking_metrics(scores: torch.Tensor, encoded: Encoded) -> dict:
    """Accuracy over all comparisons of the rankings (ties in score count half; at K = 2, the pair accuracy),
    top-1 accuracy (the top-scored response is among the best-placed), the InstructGPT loss (however the model was
    trained), and where every ranking is a pair the margins of the better response's score over the worse's."""
    ranks = [r["ranks"] for r in encoded.rows]
    measured = ranking.ranking_accuracy(scores, ranks)
    out = {"accuracy": measured["pair_accuracy"], "top1_accuracy": measured["top1_accuracy"],
           "ranking_loss": ranking.ranking_loss(scores.float(), ranks).item(),
           "pairs": sum(len(ranking.ranking_pairs(r)) for r in ranks), "rankings": len(ranks)}
    if ranks and all(len(r) == 2 for r in ranks):
        better = torch.tensor([min(range(2), key=r.__getitem__) for r in ranks])
        pairs = scores.view(-1, 2)
        diff = pairs.gather(1, better[:, None]).squeeze(1) - pairs.gather(1, 1 - better[:, None]).squeeze(1)
        out.update(margin_mean=diff.mean().item(), margin_std=diff.std().item() if len(diff) > 1 else 0.0)
    return out


def measure(model, tokenizer, encoded: Encoded, batch_size: int = 32, progress: bool = False) -> dict:
    """``ranking_metrics`` of a reward model on encoded rankings or pairs."""
    return ranking_metrics(ranking_scores(model, tokenizer, encoded, batch_size, progress), encoded)


def reward_statistics(model, tokenizer, seqs: list[list[int]], samples: int, seed: int, batch_size: int = 32,
                      progress: bool = False) -> dict:
    """Mean and standard deviation of the reward over the training responses (token ids as trained on), or over
    a fixed random sample of ``samples`` of them."""
    if 0 < samples < len(seqs):
        seqs = random.Random(seed).sample(seqs, samples)
    scores = rewards.score_sequences(model, seqs, tokenizer.pad_token_id, batch_size, progress=progress)
    return {"mean": scores.mean().item(), "std": scores.std().item(), "responses": len(seqs)}


def main(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
         command: str | None = None) -> dict:
    """Train the reward model as the recipe says; returns the manifest written to the run directory (``command``:
    the command line the manifest records)."""
    from transformers import set_seed

    method_table.check_stage(recipe.adapter.method, "rm", recipe.source)
    distributed.prepare_sharding("rm")
    data, held = training.preference_data(recipe, "rm")
    # rankings train grouped per prompt (InstructGPT) unless rm.comparisons says shuffled; pairs are pairs
    grouped = not formats.is_pairs(data) and recipe.rm.comparisons == "grouped"
    modeling.check_lengths(modeling.load_config(recipe.model), {"rm.max_length": recipe.rm.max_length},
                           recipe.source)
    with Run(Path(out) if out else recipe.stage_dir("rm"), "rm", overwrite=overwrite, resume=resume,
             command=command) as run:
        run.track(recipe)
        set_seed(recipe.rm.seed)
        tokenizer = modeling.load_tokenizer(recipe.model)
        base = modeling.load_base(recipe.model, kind="score")
        base.config.pad_token_id = tokenizer.pad_token_id  # where the head is read: see heads.reward_index
        train, held_out = encode_split(recipe, data, held, tokenizer)
        # what the trainer reads: whole rankings (grouped), or every comparison as TRL's chosen/rejected pair
        train_rows = train.rows if grouped else trl_pairs(train)
        model = modeling.attach_adapter(base, recipe.adapter, "SEQ_CLS", recipe.model.base,
                                        training.planned_steps(recipe.rm, len(train_rows)))
        modeling.disable_dropout(model)  # what disable_dropout=True means, functional dropout (OPT) included
        params = modeling.trainable_parameters(model)
        training.announce("rm", f"{len(train_rows)} " + (
            f"rankings ({len(train.rankings)} prompts, {sum(len(r['ranks']) for r in train.rows)} responses, "
            "InstructGPT loss)" if grouped else "pairs"), recipe.adapter.method, params,
            modeling.reinitialised(base), tokenizer)
        trainer = make_trainer(recipe, run, model, tokenizer, train_rows,
                               held_out.rows if grouped else trl_pairs(held_out), grouped)
        result, shards = training.train(trainer, run)

        # measure: held-out accuracy with the shared scoring function, reward statistics for PPO
        model.eval()
        with distributed.gathered(model):  # FSDP2 on CPU processes: the scoring passes read the whole model
            metrics, stats = measure_trained(recipe, run, model, tokenizer, train_rows, held_out, result)
        training.save_trained(trainer, tokenizer, recipe, run, "rm")
        return run.finish(Manifest(
            base=recipe.model.base, untrained_rows_reinitialised=len(modeling.reinitialised(base)), parents={},
            adapter={"method": recipe.adapter.method, "parameters": params},
            data={"preference": data.summary(), "eval_preference": held.summary() if held else None,
                  "loss": "instructgpt_ranking" if grouped else "bradley_terry",
                  "unit": "rankings" if grouped else "pairs", "train_rows": len(train_rows),
                  "eval_rows": len(held_out.rows), "rows_too_long": train.dropped,
                  "eval_rows_too_long": held_out.dropped, **policies_of(data.rows)},
            metrics=metrics, reward_stats=stats, seed=recipe.rm.seed, recipe=recipe.to_dict(), shards=shards,
        ), files=training.trained_files(recipe.adapter.method))


def encode_split(recipe: Recipe, data: formats.Loaded, held: formats.Loaded | None, tokenizer
                 ) -> tuple[Encoded, Encoded]:
    """The training and held-out rankings (``data.eval_preference``, else ``rm.eval_fraction`` of whole rankings:
    never single comparisons of a ranking trained on) encoded as PPO's episodes are laid out; rankings longer
    than rm.max_length are left out and reported (or refused: ``rm.on_too_long``)."""
    train_rows, eval_rows = training.train_and_held_out(data, held, recipe.rm.eval_fraction, recipe.rm.seed)
    limit = recipe.rm.max_length
    train, held_out = encode_rankings(tokenizer, train_rows, limit), encode_rankings(tokenizer, eval_rows, limit)
    unit = "pairs" if formats.is_pairs(data) else "rankings"
    encoding.keep_fitting(train, recipe.data.preference, unit, "rm.max_length", limit, "rm", recipe.rm.on_too_long)
    encoding.keep_fitting(held_out, recipe.data.eval_preference or recipe.data.preference,
                          "pairs" if formats.is_pairs(held or data) else "rankings", "rm.max_length", limit, "rm",
                          held_out=True)
    return train, held_out


def make_trainer(recipe: Recipe, run: Run, model, tokenizer, train_rows: list[dict], eval_rows: list[dict],
                 grouped: bool):
    """TRL's RewardTrainer on pre-tokenised pairs (its own collator and Bradley-Terry loss), or with ``grouped``
    the same trainer over whole rankings (``RankingCollator``, the InstructGPT loss)."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**training.trainer_kwargs(recipe, recipe.rm, run.work, bool(eval_rows)),
                        center_rewards_coefficient=recipe.rm.center_rewards_coefficient, disable_dropout=True)
    trainer = (ranking_trainer_class() if grouped else RewardTrainer)(
        model=model, args=args, data_collator=RankingCollator(tokenizer.pad_token_id) if grouped else None,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tokenizer)
    if recipe.model.quantization:  # TRL casts a quantized model's trainable weights to bf16; the score head
        # reads hidden states in the compute dtype, so it keeps that dtype
        heads.score_head(model).to(model.get_input_embeddings().weight.dtype)
    training.quiet_trainer(trainer, run, recipe, "rm", shown=("train/loss", "train/accuracy", "eval/accuracy"))
    training.method_callbacks(trainer, recipe.adapter)
    return trainer


def measure_trained(recipe: Recipe, run: Run, model, tokenizer, train_rows: list[dict], held_out: Encoded,
                    result) -> tuple[dict, dict]:
    """The trained model's metrics (training loss and steps; on the held-out rankings or pairs, ``measure``) and
    its reward statistics over the responses it trained on (PPO normalises with them)."""
    progress = training.show_progress(recipe)
    metrics = {"train_loss": result.training_loss, "steps": result.global_step}
    if held_out.rows:
        metrics.update({f"eval_{k}": v for k, v in measure(model, tokenizer, held_out, progress=progress).items()})
        run.metrics.write({"step": result.global_step, **{f"eval/{k[5:]}": v for k, v in metrics.items()
                                                           if k.startswith("eval_")}})
    responses = [ids for r in train_rows for ids in (r["responses_ids"] if "responses_ids" in r
                                                     else (r["chosen_ids"], r["rejected_ids"]))]
    stats = reward_statistics(model, tokenizer, responses, recipe.rm.stats_samples, recipe.rm.seed, progress=progress)
    if distributed.is_main():
        print(f"rm: held-out accuracy {metrics.get('eval_accuracy', float('nan')):.4f}"
              + (f", top-1 {metrics['eval_top1_accuracy']:.4f}" if "eval_margin_mean" not in metrics
                 and "eval_top1_accuracy" in metrics else "")
              + f", reward mean {stats['mean']:.4f} std {stats['std']:.4f}", file=sys.stderr)
    if not (torch.isfinite(torch.tensor(stats["mean"])) and stats["std"] > 0):
        raise RuntimeError(f"reward statistics are degenerate ({stats}); the reward model did not train")
    return metrics, stats


def policies_of(rows: list[dict]) -> dict:
    """``{"policies": {run: responses}}`` for rankings of several policies' candidates (``rlhf sample RUN1 RUN2``):
    where the training responses came from, for the manifest; nothing for data without that tag."""
    counts = Counter(run_name(p) for r in rows for p in r.get("policies", ()))  # one run under two spellings: once
    return {"policies": dict(counts)} if counts else {}


def score(reward: str, data_path: str, out: str | None = None, on_bad_row: str = "error") -> dict:
    """``rlhf rm score``: a reward model's accuracy on pairs (with margins) or rankings (over all comparisons, and
    top-1), through the same encoding, length limit and measurement as its training's held-out rows; with
    ``out``, every row with its scores (pairs: ``score_chosen``/``score_rejected``; rankings: ``scores``)."""
    # the reward model's own length limit: longer rows are left out (and counted), as its training left them out
    rm = rewards.RunReward(reward)
    model, tokenizer, limit = rm.model, rm.tokenizer, rm.max_length
    loaded = formats.load(data_path, "ranking", on_bad_row=on_bad_row)
    pairs = formats.is_pairs(loaded)
    encoded = encode_rankings(tokenizer, loaded.rows, limit)
    encoding.keep_fitting(encoded, data_path, "pairs" if pairs else "rankings", "rm.max_length", limit, "rm score",
                          advice=" (the reward model's own limit)")
    scores = ranking_scores(model, tokenizer, encoded)
    rows, start = [], 0
    for r in encoded.rankings:
        these = scores[start:start + len(r["ranks"])].tolist()
        start += len(r["ranks"])
        if pairs:  # as the pair it was read as: {prompt, chosen, rejected[, margin]} and both scores
            rows.append({**formats.ranking_as_pairs(r)[0], "score_chosen": these[0], "score_rejected": these[1]})
        else:
            rows.append({**r, "scores": these})
    if out:
        from rlhf.runs.rundir import write_jsonl

        write_jsonl(out, rows)  # atomically: an interrupted score never leaves half a file
    return {**ranking_metrics(scores, encoded), "dropped_too_long": encoded.dropped}
