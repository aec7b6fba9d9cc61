"""What the trainer-based stages (SFT, RM) share: the held-out split, progress, metrics, and trainer arguments."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from rlhf.checkpoint import Run
from rlhf.config import Recipe, TrainConfig


def split_rows(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministically hold out ``fraction`` of ``rows`` (at least one when the fraction is positive)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def show_progress(recipe: Recipe) -> bool:
    """Progress bars on an interactive terminal (``logging.progress: auto``), or as the recipe forces."""
    return recipe.logging.progress == "on" or (recipe.logging.progress == "auto" and sys.stderr.isatty())


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
        seed=s.seed,
        data_seed=s.seed,
        use_cpu=not on_gpu,
        bf16=on_gpu and recipe.model.dtype == "bfloat16",
        fp16=on_gpu and recipe.model.dtype == "float16",
        gradient_checkpointing=False,
        report_to=recipe.logging.report_to or "none",
        disable_tqdm=not show_progress(recipe),
        dataset_num_proc=None,
    )


def quiet_trainer(trainer, run: Run, recipe: Recipe, stage: str, shown=("train/loss", "eval/loss")):
    """Route the trainer's logs to metrics.jsonl (and a short line on stderr) instead of printing dicts."""
    from transformers import PrinterCallback

    trainer.add_callback(metrics_callback(run, stage, echo=not show_progress(recipe), shown=shown))
    trainer.remove_callback(PrinterCallback)
    return trainer
