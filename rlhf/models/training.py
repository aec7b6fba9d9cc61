"""What the trainer-based stages (SFT, RM) share: the held-out split, progress, metrics, and trainer arguments."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import torch

from rlhf.models import methods, modeling
from rlhf.runs import preempt
from rlhf.scale import distributed
from rlhf.runs.rundir import Run
from rlhf.config import AdapterConfig, Recipe, TrainConfig
from rlhf.errors import TrainingStopped


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out ``fraction`` of ``rows`` (at least one when the fraction is positive)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def train_and_held_out(data, held, fraction: float, seed: int) -> tuple[list, list]:
    """The training and held-out rows of a preference stage: a held-out file's rows (``held``, loaded from
    ``data.eval_preference``) beside every row of ``data``, else ``fraction`` of ``data``'s rows (``split_rows``:
    whole rankings, never single comparisons of a ranking trained on)."""
    if held is not None:
        return data.rows, held.rows
    return split_rows(data.rows, fraction, seed)


def show_progress(recipe: Recipe) -> bool:
    """Progress bars on an interactive terminal (``logging.progress: auto``), or as the recipe forces."""
    return recipe.logging.progress == "on" or (recipe.logging.progress == "auto" and distributed.stderr_is_terminal())


def metrics_callback(run: Run, stage: str, echo: bool, shown=("train/loss", "eval/loss")):
    """A trainer callback that copies each log into ``metrics.jsonl`` with namespaced names (``train/``,
    ``eval/``, ``summary/``), and prints a short line per log when there is no progress bar (``echo``)."""
    from transformers import TrainerCallback

    class _Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            row = {"step": state.global_step}
            for key, value in logs.items():
                if key.startswith("eval_"):
                    row[f"eval/{key[5:]}"] = value
                elif key.startswith("train_"):
                    row[f"summary/{key[6:]}"] = value
                else:
                    row[f"train/{key}"] = value
            run.metrics.write(row)
            picked = {k: v for k, v in row.items() if k in shown}
            if echo and picked:
                print(f"{stage}: step {state.global_step}/{state.max_steps} "
                      + " ".join(f"{k} {v:.4g}" for k, v in picked.items()), file=sys.stderr, flush=True)

    return _Metrics()


def trainer_kwargs(recipe: Recipe, s: TrainConfig, output_dir: Path, has_eval: bool) -> dict:
    """TrainingArguments shared by the TRL configs, from a stage's recipe section.

    CPU-safe precision (TRL turns bf16 on by default; here it follows model.dtype, and only on a GPU), no
    gradient checkpointing unless a later recipe key asks for it, trainer checkpoints only every save_every.
    """
    on_gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(output_dir),
        learning_rate=s.lr,
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps or -1,
        lr_scheduler_type=s.lr_scheduler,
        warmup_steps=s.warmup_ratio,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        max_length=s.max_length,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=s.eval_every,
        logging_steps=s.logging_every,
        save_strategy="steps" if s.save_every else "no",
        save_steps=s.save_every or 500,
        save_total_limit=s.keep_checkpoints,
        seed=s.seed,
        data_seed=s.seed,
        use_cpu=not on_gpu,
        bf16=on_gpu and recipe.model.dtype == "bfloat16",
        fp16=on_gpu and recipe.model.dtype == "float16",
        gradient_checkpointing=False,
        report_to="none",  # trackers get every metric through run.metrics (one path for every stage)
        disable_tqdm=not show_progress(recipe) or not distributed.is_main(),
        ddp_find_unused_parameters=False,  # every trainable tensor takes part in every step
        dataset_num_proc=None,
    )


def preference_data(recipe: Recipe, stage: str):
    """The preference data the RM and DPO stages train on (``data.preference``) and hold out
    (``data.eval_preference``, or None), each pairs or rankings; files the labelling loop writes must exist."""
    from rlhf.text import formats
    from rlhf.errors import UserError

    if not recipe.data.preference:
        raise UserError(f"{recipe.source}: data.preference is required for the {stage} stage")
    for key in ("preference", "eval_preference"):
        value = getattr(recipe.data, key)
        if value and recipe.written_by_pipeline(value) and not Path(value).exists():
            raise UserError(f"{recipe.source}: data.{key} names {value!r}, which does not exist yet: `rlhf label` "
                            "writes it (make sample label)")
    data = formats.load_preferences(recipe.data.preference, recipe.data)
    held = (formats.load_preferences(recipe.data.eval_preference, recipe.data) if recipe.data.eval_preference
            else None)
    return data, held


def planned_steps(s: TrainConfig, rows: int) -> int:
    """Optimizer steps the stage will take on ``rows`` training rows (one process); AdaLoRA schedules its rank
    pruning over them."""
    if s.max_steps:
        return s.max_steps
    return max(1, math.ceil(s.epochs * math.ceil(rows / s.batch_size) / s.grad_accum))


def method_callbacks(trainer, cfg: AdapterConfig) -> None:
    """Callbacks a fine-tuning method needs during training (AdaLoRA's rank-budget updates)."""
    if cfg.method == "adalora":
        trainer.add_callback(methods.adalora_callback())


def nonfinite_guard(run: Run, stage: str, max_in_a_row: int):
    """A trainer callback that skips an optimizer step whose gradients hold NaN or inf (a NaN loss gives such
    gradients), counts the skips in metrics.jsonl, and stops the run after ``max_in_a_row`` in a row."""
    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        skipped = 0
        in_a_row = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            params = [p for p in model.parameters() if p.grad is not None]
            if all(torch.isfinite(p.grad).all() for p in params):
                self.in_a_row = 0
                return
            for p in params:  # AdamW leaves parameters without a gradient untouched: the step is skipped
                p.grad = None
            self.skipped += 1
            self.in_a_row += 1
            step = state.global_step + 1
            run.metrics.write({"step": step, "train/nonfinite_skipped": self.skipped})
            print(f"{stage}: step {step}: non-finite loss or gradient, update skipped", file=sys.stderr)
            if self.in_a_row >= max_in_a_row:
                raise TrainingStopped(f"{stage}: stopped at step {step}: {self.in_a_row} updates in a row had a "
                                      "non-finite loss or gradient (lower the learning rate or check the data)")

    return _Guard()


def check_finite(model, stage: str) -> None:
    """Refuse to save weights that hold NaN or inf."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingStopped(f"{stage}: not saving: {len(bad)} trained tensors hold NaN or inf (e.g. {bad[0]})")


def announce(stage: str, what: str, method: str, params: dict, reinitialised: list[int], tokenizer) -> None:
    """The stage's start line on the main process: what it trains on, what ``method`` trains, and what
    ``load_base`` did to the base's untrained embedding rows, if anything."""
    if not distributed.is_main():
        return
    print(f"{stage}: {what}, {method} trains {params['trainable']:,} of {params['total']:,} parameters "
          f"({params['percent']}%)", file=sys.stderr)
    note = modeling.untrained_note(reinitialised, tokenizer)
    if note:
        print(f"{stage}: {note}", file=sys.stderr)


def trained_files(method: str) -> list[tuple[str, ...]]:
    """What a trainer-based stage's run holds when it is done: the weights ``method`` saves and the tokenizer
    (``Run.finish`` checks them)."""
    return [*methods.saved_files(method), ("tokenizer_config.json",)]


def save_trained(trainer, tokenizer, recipe: Recipe, run: Run, stage: str) -> None:
    """Save what a trainer trained (refusing NaN/inf weights) and the tokenizer into the run's staging directory.
    Every process takes part (a sharded model is gathered); only the main one writes."""
    check_finite(trainer.model, stage)
    with run.saving() as main:
        methods.save(trainer, recipe.adapter, run.staging)
        if main:
            tokenizer.save_pretrained(str(run.staging))


def quiet_trainer(trainer, run: Run, recipe: Recipe, stage: str, shown=("train/loss", "eval/loss")):
    """Route the trainer's logs to metrics.jsonl (and a short line on stderr) instead of printing dicts, and
    guard every optimizer step against non-finite gradients."""
    from transformers import PrinterCallback

    trainer.add_callback(metrics_callback(run, stage, echo=not show_progress(recipe), shown=shown))
    trainer.add_callback(nonfinite_guard(run, stage, getattr(recipe, stage).max_nonfinite))
    trainer.remove_callback(PrinterCallback)
    return trainer


def latest_checkpoint(work: Path) -> Path | None:
    """The newest complete trainer checkpoint (``checkpoint-N`` holding its trainer_state.json, which the trainer
    writes last, and our metrics_lines, written after it), or None."""
    done = [d for d in Path(work).glob("checkpoint-*")
            if (d / "trainer_state.json").is_file() and (d / "metrics_lines").is_file()]
    return max(done, key=lambda d: int(d.name.split("-")[1]), default=None)


def train(trainer, run: Run) -> tuple:
    """``trainer.train()``, continuing from the newest complete checkpoint when the run is resumed (metrics.jsonl
    goes back to what it held when that checkpoint was saved). Returns the trainer's result and, where the model was
    sharded over CPU processes (``distributed.shard_on_cpu``), what each process held (the manifest's ``shards``;
    else None)."""
    from transformers import TrainerCallback

    class _RecordMetricsLines(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            # no resume checkpoint after the last step: the stage saves its output itself, and the trainer,
            # resumed from a checkpoint at max_steps, would take one step too many. Nor an evaluation there
            # (transformers >= 5 adds one at the end): every stage measures its final model itself afterwards,
            # and held-out sets are evaluated once, not twice
            if state.global_step >= state.max_steps:
                control.should_save = control.should_evaluate = False

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (ckpt / "metrics_lines").write_text(str(run.metrics_lines()))

    class _Preemption(TrainerCallback):
        """On SIGTERM/SIGINT: a resume checkpoint at the end of the step, then stop (``rlhf.runs.preempt``). After the
        last step there is nothing to resume: the stage finishes instead."""
        stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step < state.max_steps and preempt.requested():
                control.should_save = control.should_training_stop = True
                self.stopped_at = state.global_step

    counter = distributed.shard_on_cpu(trainer, run.stage)
    preemption = _Preemption()
    trainer.add_callback(_RecordMetricsLines())
    trainer.add_callback(preemption)
    checkpoint = latest_checkpoint(run.work) if run.resumed else None
    if run.resumed:
        lines = checkpoint / "metrics_lines" if checkpoint else None
        run.truncate_metrics(int(lines.read_text()) if lines and lines.is_file() else 0)
        print(f"resuming from {checkpoint.name if checkpoint else 'the start'}", file=sys.stderr)
    with preempt.handlers(run.stage):
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if preemption.stopped_at is not None:
            raise preempt.stop(run.stage, preemption.stopped_at, trainer.state.max_steps, run.command)
    # the trainer's final average loss is each process's own; the run reports the mean over all of them
    return (result._replace(training_loss=distributed.all_mean({"loss": result.training_loss})["loss"]),
            counter.shards if counter else None)
