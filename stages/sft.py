"""SFT: supervised instruction tuning on demonstrations, with the loss on response tokens only.

setup (data, tokenizer, base + adapter) -> TRL's SFTTrainer -> save adapter, tokenizer, metrics and manifest.
Every data format becomes conversational ``{prompt, completion}`` rows (see ``rlhf.text.formats``), which TRL renders
with the tokenizer's chat template and masks so that only the completion tokens carry loss.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf.models import method_table, modeling, training
from rlhf.scale import distributed
from rlhf.text import encoding, formats
from rlhf.runs.manifest import Manifest
from rlhf.runs.rundir import Run
from rlhf.config import Recipe
from rlhf.errors import UserError


def main(recipe: Recipe, out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
         command: str | None = None) -> dict:
    """Run SFT as the recipe says; returns the manifest written to the run directory (``command``: the command line
    the manifest records, as the CLI was given it)."""
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    # setup: data first (the cheapest thing to get wrong), then the output directory, then the model
    method_table.check_stage(recipe.adapter.method, "sft", recipe.source)
    distributed.prepare_sharding("sft")
    if not recipe.data.sft:
        raise UserError(f"{recipe.source}: data.sft is required for the sft stage")
    data = formats.load(recipe.data.sft, "sft", fmt=recipe.data.sft_format, columns=recipe.data.columns,
                        split=recipe.data.split, on_bad_row=recipe.data.on_bad_row)
    modeling.check_lengths(modeling.load_config(recipe.model), {"sft.max_length": recipe.sft.max_length},
                           recipe.source)
    with Run(Path(out) if out else recipe.stage_dir("sft"), "sft", overwrite=overwrite, resume=resume,
             command=command) as run:
        run.track(recipe)
        set_seed(recipe.sft.seed)
        tokenizer = modeling.load_tokenizer(recipe.model)
        train_rows, eval_rows = training.split_rows(data.rows, recipe.sft.eval_fraction, recipe.sft.seed)
        base = modeling.load_base(recipe.model)
        model = modeling.attach_adapter(base, recipe.adapter, "CAUSAL_LM", recipe.model.base,
                                        training.planned_steps(recipe.sft, len(train_rows)))
        params = modeling.trainable_parameters(model)
        training.announce("sft", f"{len(data.rows)} rows", recipe.adapter.method, params,
                          modeling.reinitialised(base), tokenizer)

        # train
        args = SFTConfig(**training.trainer_kwargs(recipe, recipe.sft, run.work, bool(eval_rows)),
                         completion_only_loss=True, packing=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(tokenizer, train_rows, recipe),
                             eval_dataset=dataset(tokenizer, eval_rows, recipe) if eval_rows else None,
                             processing_class=tokenizer)
        lengths = _report_truncation(trainer, recipe, len(train_rows), len(eval_rows))
        training.quiet_trainer(trainer, run, recipe, "sft")
        training.method_callbacks(trainer, recipe.adapter)
        result, shards = training.train(trainer, run)
        metrics = {"train_loss": result.training_loss, "steps": result.global_step}
        if eval_rows:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]

        # save
        training.save_trained(trainer, tokenizer, recipe, run, "sft")
        return run.finish(Manifest(
            base=recipe.model.base, untrained_rows_reinitialised=len(modeling.reinitialised(base)), parents={},
            adapter={"method": recipe.adapter.method, "parameters": params},
            data={"sft": data.summary(), "train_rows": len(train_rows), "eval_rows": len(eval_rows), **lengths},
            metrics=metrics, seed=recipe.sft.seed, recipe=recipe.to_dict(), shards=shards,
        ), files=training.trained_files(recipe.adapter.method))


def dataset(tokenizer, rows: list[dict], recipe: Recipe):
    """The rows as TRL's SFTTrainer reads them: conversational prompt/completion rows, which it renders and masks
    itself (loss on the completion); or, when the data uses tools, the ids and the loss mask made here
    (``encoding.encode_turns``: loss on the assistant's turns, calls included, never on a tool's result). TRL's
    arrow dataset would merge the arguments of different tool calls into one record type, giving each call the
    others' argument names as nulls, so tool rows are tokenized before they reach it."""
    from datasets import Dataset

    if not any("tools" in row for row in rows):
        return Dataset.from_list(rows)
    encoded = []
    for i, row in enumerate(rows):
        try:
            ids, mask = encoding.encode_turns(tokenizer, row["prompt"], row["completion"], row.get("tools"))
        except ValueError as e:
            raise UserError(f"{recipe.data.sft}: a tool-using conversation cannot be laid out for training "
                            f"({e}): {row['prompt'][-1]['content'][:60]!r}") from None
        encoded.append({"input_ids": ids, "completion_mask": mask})
    return Dataset.from_list(encoded)


def _report_truncation(trainer, recipe: Recipe, n_train: int, n_eval: int) -> dict:
    """Count what truncation to sft.max_length did: TRL cuts every row to the limit and leaves out the rows whose
    whole response lay past it (no token left to learn from); this says so, as the RM stage reports its dropped
    pairs, and refuses when no row is left. Returns the counts for the manifest."""
    limit = recipe.sft.max_length
    train, held = trainer.train_dataset, trainer.eval_dataset
    counts = {"rows_without_response": n_train - len(train),
              "rows_truncated": sum(len(ids) >= limit for ids in train["input_ids"]),
              "eval_rows_without_response": n_eval - len(held) if held is not None else 0}
    source = recipe.data.sft
    if not len(train):
        raise UserError(f"{source}: every row's response lies past sft.max_length={limit} tokens (the prompt "
                        "fills the limit); raise sft.max_length")
    if distributed.is_main():
        if counts["rows_without_response"]:
            share = 100.0 * counts["rows_without_response"] / max(n_train, 1)
            print(f"sft: {'WARNING: ' if share > 50 else ''}dropped {counts['rows_without_response']} of {n_train} "
                  f"rows of {source} ({share:.1f}%) whose whole response lies past sft.max_length={limit} tokens "
                  "(nothing left to learn from)", file=sys.stderr)
        if counts["eval_rows_without_response"]:
            print(f"sft: dropped {counts['eval_rows_without_response']} of {n_eval} held-out rows whose whole "
                  f"response lies past sft.max_length={limit} tokens", file=sys.stderr)
        if counts["rows_truncated"]:
            print(f"sft: {counts['rows_truncated']} of {len(train)} rows reach sft.max_length={limit} tokens and are "
                  "cut there (their response's end is not learned)", file=sys.stderr)
    return counts
