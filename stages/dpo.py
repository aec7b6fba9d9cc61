"""DPO: the SFT policy optimised directly on preference pairs, against the frozen SFT policy as the reference.

setup (pairs, or rankings as their comparisons; the SFT run's tokenizer, base and method) -> the policy (the SFT
adapter, trainable) and the reference -> TRL's DPOTrainer (``dpo.loss``: sigmoid = DPO, ipo, hinge, robust), or
TRL's CPOTrainer for the reference-free SimPO -> held-out implicit-reward accuracy -> save.

The reference is the frozen SFT policy, never the bare base: with an adapter method the SFT adapter is loaded
twice on ONE base (TRL keeps the copy as the frozen adapter "ref" and switches to it for the reference pass), so
no second model is held; with a method that trains base weights (full, bitfit, freeze) or bottleneck adapters the
reference is a second copy of the SFT model. The pairs are laid out as every other stage lays out an exchange
(``encoding.encode_exchange``): the prompt with the chat template's generation prompt, then the response up to its
first EOS, which is what the policy samples and what eval scores.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.models import method_table, methods, modeling, training
from rlhf.scale import distributed
from rlhf.text import encoding, formats
from rlhf.config import AdapterConfig, ModelConfig, Recipe
from rlhf.names import torch_dtype
from rlhf.runs.manifest import Manifest
from rlhf.runs.rundir import Run

TRL_LOSS = {"sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}
"""dpo.loss -> TRL DPOConfig.loss_type (simpo runs through TRL's CPOTrainer)"""


@dataclass
class PromptPairs:
    """Pairs as DPO's trainers read them, the prompt apart: ``{prompt_ids, chosen_ids, rejected_ids}`` (their
    pre-tokenised input), the pairs kept and how many were longer than ``max_length``."""

    rows: list[dict]
    pairs: list[dict]
    dropped: int


def encode_prompt_pairs(tokenizer, pairs: list[dict], max_length: int) -> PromptPairs:
    """Each pair's prompt and two responses as ``encoding.encode_exchange`` lays them out; a pair with either
    side longer than ``max_length`` tokens is left out."""
    rows, kept = [], []
    for p in pairs:
        prompt_ids, chosen = encoding.encode_exchange(tokenizer, p["prompt"], p["chosen"])
        rejected = encoding.encode_exchange(tokenizer, p["prompt"], p["rejected"])[1]
        if len(prompt_ids) + max(len(chosen), len(rejected)) > max_length:
            continue
        rows.append({"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected})
        kept.append(p)
    return PromptPairs(rows, kept, len(pairs) - len(kept))


def parent(recipe: Recipe, policy: str | None) -> tuple[Path | None, ModelConfig, AdapterConfig]:
    """The SFT run (None for ``--policy base``: a fresh adapter on the base, the base as the reference), and the
    model settings and method DPO continues with (the SFT run's)."""
    if policy == "base":
        return None, recipe.model, recipe.adapter
    sft = modeling.read_run(policy or recipe.stage_dir("sft"), "policy")
    return sft.dir, sft.model, sft.adapter


def load_models(cfg: ModelConfig, adapter: AdapterConfig, sft_dir: Path | None, reference_free: bool,
                total_steps: int):
    """The trainable policy (the SFT run's weights) and the reference model TRL should hold: None where TRL takes
    the reference from the policy itself (an adapter method: TRL copies the SFT adapter to a frozen "ref" adapter;
    no SFT run: adapters disabled = the base; a reference-free loss), else a frozen second copy of the SFT model."""
    from transformers import AutoModelForCausalLM

    kind = method_table.kind(adapter.method)
    if sft_dir is None:
        return modeling.attach_adapter(modeling.load_base(cfg), adapter, "CAUSAL_LM", cfg.base, total_steps), None

    def whole(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype), use_safetensors=True,
                                                    trust_remote_code=cfg.trust_remote_code)

    with modeling.loading(sft_dir, cfg.base):
        if kind == "peft":
            from peft import PeftModel

            policy = PeftModel.from_pretrained(modeling.load_base(cfg), str(sft_dir), is_trainable=True)
            return policy, None
        policy = methods.load(sft_dir, adapter.method, lambda: modeling.load_base(cfg), whole)
        if kind == "weights":
            policy.requires_grad_(False)
            methods.mark_trainable(policy, adapter)
        else:  # bottleneck: only the bottleneck weights train
            policy.requires_grad_(False)
            for name, param in policy.named_parameters():
                if ".bottleneck." in name:
                    param.requires_grad_(True)
        reference = None if reference_free else methods.load(sft_dir, adapter.method,
                                                             lambda: modeling.load_base(cfg), whole)
    if reference is not None:
        reference.requires_grad_(False).eval()
    return policy, reference


def copy_reference_adapter(model) -> int:
    """Make TRL's frozen "ref" adapter an exact copy of the trained "default" one (the SFT adapter), whatever the
    method names its weights. TRL copies the parameters named ``*.default.*``; IA3 keeps its vectors in
    ParameterDicts, named ``*.ia3_l.default``, which that misses, so the reference would be the bare base. Returns
    how many tensors this copied."""
    names = dict(model.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in names.items():
            parts = name.split(".")
            if "default" not in parts:
                continue
            twin = names.get(".".join("ref" if p == "default" else p for p in parts))
            if twin is not None and not torch.equal(twin, param):
                twin.copy_(param)
                copied += 1
    return copied


def trainer_class(reference_free: bool):
    """TRL's DPOTrainer, or for SimPO its CPOTrainer, fed the pairs this stage encoded (built on first use: TRL
    imports slowly)."""
    if not reference_free:
        from trl import DPOTrainer

        class EncodedDPOTrainer(DPOTrainer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                copy_reference_adapter(self.model)

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # encoded and length-filtered by encode_prompt_pairs

        return EncodedDPOTrainer

    from trl.experimental.cpo import CPOTrainer

    class EncodedCPOTrainer(CPOTrainer):
        def tokenize_row(self, feature, model=None) -> dict:
            prompt = feature["prompt_ids"]
            out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                ids = prompt + feature[f"{side}_ids"]
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
            return out

    return EncodedCPOTrainer


def trainer_args(recipe: Recipe, work: Path, has_eval: bool):
    """TRL's DPOConfig (or CPOConfig for SimPO) from the recipe's dpo section."""
    d = recipe.dpo
    common = {**training.trainer_kwargs(recipe, d, work, has_eval), "beta": d.beta, "disable_dropout": True}
    if d.reference_free:
        from trl.experimental.cpo import CPOConfig

        return CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=d.simpo_gamma,
                         remove_unused_columns=False)
    from trl import DPOConfig

    return DPOConfig(**common, loss_type=[TRL_LOSS[d.loss]], label_smoothing=d.label_smoothing)


def main(recipe: Recipe, policy: str | None = None, out: str | Path | None = None, overwrite: bool = False,
         resume: bool = False, command: str | None = None) -> dict:
    """Run DPO as the recipe says; returns the manifest written to the run directory (``command``: the command line
    the manifest records)."""
    from datasets import Dataset
    from transformers import set_seed

    d = recipe.dpo
    distributed.prepare_sharding("dpo")
    sft_dir, model_cfg, adapter = parent(recipe, policy)
    method_table.check_stage(adapter.method, "dpo", str(sft_dir or recipe.source))
    data, held = training.preference_data(recipe, "dpo")
    modeling.check_lengths(modeling.load_config(model_cfg), {"dpo.max_length": d.max_length}, recipe.source)
    with Run(Path(out) if out else recipe.stage_dir("dpo"), "dpo", overwrite=overwrite, resume=resume,
             command=command) as run:
        run.track(recipe)
        set_seed(d.seed)
        tokenizer = modeling.load_tokenizer(model_cfg, str(sft_dir) if sft_dir else None)
        train, held_out = encode_split(recipe, data, held, tokenizer)
        model, reference = load_models(model_cfg, adapter, sft_dir, d.reference_free,
                                       training.planned_steps(d, len(train.rows)))
        for m in (model, reference):  # TRL's disable_dropout misses functional dropout (OPT): policy = reference
            if m is not None:         # at step 0 only with every rate zeroed
                modeling.disable_dropout(m)
        params = modeling.trainable_parameters(model)
        ref = reference_words(d, sft_dir, reference)
        training.announce("dpo", f"{len(train.rows)} pairs, loss {d.loss} (beta {d.beta}), reference {ref}",
                          adapter.method, params, [], tokenizer)

        trainer = trainer_class(d.reference_free)(
            model=model, **({} if d.reference_free else {"ref_model": reference}),
            args=trainer_args(recipe, run.work, bool(held_out.rows)), train_dataset=Dataset.from_list(train.rows),
            eval_dataset=Dataset.from_list(held_out.rows) if held_out.rows else None, processing_class=tokenizer)
        training.quiet_trainer(trainer, run, recipe, "dpo",
                               shown=("train/loss", "train/rewards/accuracies", "eval/rewards/accuracies"))
        training.method_callbacks(trainer, adapter)
        result, shards = training.train(trainer, run)
        metrics = measure(trainer, result, bool(held_out.rows))

        # save the policy alone (TRL's frozen "ref" adapter is a copy of the SFT adapter the manifest names)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        if "ref" in getattr(unwrapped, "peft_config", {}):
            unwrapped.delete_adapter("ref")
        training.save_trained(trainer, tokenizer, dataclasses.replace(recipe, adapter=adapter), run, "dpo")
        return run.finish(Manifest(
            base=model_cfg.base, parents={"sft": str(sft_dir) if sft_dir else None},
            adapter={"method": adapter.method, "parameters": params},
            data={"preference": data.summary(), "eval_preference": held.summary() if held else None,
                  "train_pairs": len(train.rows), "eval_pairs": len(held_out.rows),
                  "pairs_too_long": train.dropped, "eval_pairs_too_long": held_out.dropped},
            metrics=metrics, seed=d.seed,
            # the model settings DPO ran with: the SFT run's base and method (later loads of this run use them)
            recipe={**recipe.to_dict(), "model": dataclasses.asdict(model_cfg), "adapter": dataclasses.asdict(adapter)},
            shards=shards,
            sections={"dpo": {"loss": d.loss, "beta": d.beta, "reference": ref,
                              **({"simpo_gamma": d.simpo_gamma} if d.reference_free else {})}},
        ), files=training.trained_files(adapter.method))


def reference_words(d, sft_dir: Path | None, reference) -> str:
    """What DPO's reference is, in words for the start line and the manifest."""
    if d.reference_free:
        return "none (reference-free)"
    if sft_dir is None:
        return "the base"
    return "the SFT policy" + (" (a frozen copy of its adapter on the same base)" if reference is None
                               else " (a second copy)")


def encode_split(recipe: Recipe, data: formats.Loaded, held: formats.Loaded | None, tokenizer
                 ) -> tuple[PromptPairs, PromptPairs]:
    """The training and held-out pairs (``data.eval_preference``, else ``dpo.eval_fraction`` of whole rankings:
    never single comparisons of a ranking trained on), encoded; pairs longer than dpo.max_length are left out and
    reported (or refused: ``dpo.on_too_long``)."""
    d = recipe.dpo
    train_rows, eval_rows = training.train_and_held_out(data, held, d.eval_fraction, d.seed)
    train = encode_prompt_pairs(tokenizer, formats.rankings_as_pairs(train_rows), d.max_length)
    held_out = encode_prompt_pairs(tokenizer, formats.rankings_as_pairs(eval_rows), d.max_length)
    encoding.keep_fitting(train, recipe.data.preference, "pairs", "dpo.max_length", d.max_length, "dpo",
                          d.on_too_long)
    encoding.keep_fitting(held_out, recipe.data.eval_preference or recipe.data.preference, "pairs",
                          "dpo.max_length", d.max_length, "dpo", held_out=True)  # the file the held-out rows came from
    return train, held_out


def measure(trainer, result, held_out: bool) -> dict:
    """The training loss and steps, and with ``held_out`` pairs the held-out implicit-reward accuracy and margin
    (TRL's evaluation, over every process's pairs)."""
    metrics = {"train_loss": result.training_loss, "steps": result.global_step}
    if held_out:
        measured = trainer.evaluate()
        metrics.update({k: v for k, v in measured.items() if k.startswith("eval_") and "/" in k or k == "eval_loss"})
        nan = float("nan")
        if distributed.is_main():
            print(f"dpo: held-out implicit-reward accuracy {measured.get('eval_rewards/accuracies', nan):.4f}, "
                  f"margin {measured.get('eval_rewards/margins', nan):.4f}", file=sys.stderr)
    return metrics
