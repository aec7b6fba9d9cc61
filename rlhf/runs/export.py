"""``rlhf export``: a finished policy (SFT, PPO) or reward model (RM) as a plain Hugging Face model directory.

With ``--merge`` the adapter is folded into a full-precision copy of the base (QLoRA runs included), so that
``AutoModelForCausalLM.from_pretrained(DIR)`` (or ``AutoModelForSequenceClassification`` for a reward model) loads
it with no peft. Without it, the adapter is exported as peft files beside the tokenizer. The directory is written
atomically, with ``export.json`` recording the source run and how far the merged model's logits are from the
adapter version's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from rlhf.models import method_table, methods, modeling
from rlhf.runs import rundir
from rlhf.errors import UserError

PROBE = [{"role": "user", "content": "Reverse the words: the model is exported"}]


def export(run_dir: str | Path, out: str | Path, merge: bool = False, overwrite: bool = False) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    run = modeling.read_run(run_dir)
    stage = run.stage
    if stage not in ("sft", "rm", "ppo", "dpo"):
        raise UserError(f"{run_dir}: is a {stage!r} run; export takes an sft, rm, ppo or dpo run")
    method = run.method
    kind = method_table.kind(method)
    if merge and not method_table.get(method).mergeable:
        raise UserError(f"{run_dir}: adapter.method {method} adds layers or virtual tokens that cannot be merged "
                        "into the base weights; export without --merge")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")

    # a full-precision base under the adapter: merging into a quantized base would lose the update
    cfg = dataclasses.replace(run.model, quantization=None)
    load = modeling.load_reward if stage == "rm" else modeling.load_policy
    model, tokenizer = load(run_dir, cfg)
    probe = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    with torch.no_grad():
        before = _logits(model, probe)
    if merge and kind == "peft":
        model = model.merge_and_unload()
    difference = None
    if merge:
        with torch.no_grad():
            difference = (_logits(model, probe) - before).abs().max().item()

    staging = out.parent / f".{out.name}.export-partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if stage != "rm":
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        if kind == "bottleneck" and not merge:
            for name in (methods.BOTTLENECK_CONFIG, methods.BOTTLENECK_WEIGHTS):
                shutil.copy2(run_dir / name, staging / name)
        else:
            model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        info = {"source": str(run_dir), "stage": stage, "method": method, "base": run.model.base, "merged": merge,
                "loads_with": ("AutoModelForSequenceClassification" if stage == "rm" else "AutoModelForCausalLM")
                if merge or kind == "weights" else "peft", "max_logit_difference_after_merge": difference,
                "exported": rundir.now(), "versions": rundir.versions()}
        rundir.write_json(staging / "export.json", info)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{out}: cannot write the export ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def _logits(model, batch) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.float()

