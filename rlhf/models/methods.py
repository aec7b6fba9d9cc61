"""Fine-tuning methods: one place that turns ``adapter.method`` and its options into a model ready to train, saves
what the method trains, and loads it back.

Three kinds of method:

- **peft** (lora, dora, qlora, ia3, adalora, prefix, prompt, ptuning, ptuning_v2): a peft adapter on a frozen base;
  saved as ``adapter_config.json`` + ``adapter_model.safetensors``, loadable by plain peft.
- **bottleneck** (adapter): Houlsby bottleneck adapters after each block's attention output and MLP output. peft has
  no such adapter, so this module implements it; saved as ``bottleneck_config.json`` +
  ``bottleneck_model.safetensors`` and loaded by :func:`load`.
- **weights** (bitfit, freeze, full): a subset of the base's own weights trains (biases, the top blocks, or all);
  saved as a plain Hugging Face model directory.

Which stage supports which method is the table ``rlhf.models.method_table.METHODS`` (plain data without torch,
re-exported here); ``rlhf methods`` prints it and the recipe check enforces it.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.models import heads

if TYPE_CHECKING:
    from rlhf.config import AdapterConfig, ModelConfig

from rlhf.models.method_table import METHODS


# ---------------------------------------------------------------------------------------------------------------
# Making a model trainable
# ---------------------------------------------------------------------------------------------------------------

def quantization_config(cfg: ModelConfig):
    """bitsandbytes settings for ``model.quantization`` (None when the base loads in full precision)."""
    if not cfg.quantization:
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype, torch.float32)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)


def peft_config(cfg: AdapterConfig, task_type: str, tokenizer_path: str | None = None, total_steps: int = 0):
    """The peft config for a peft method."""
    import peft

    lora = dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                task_type=task_type)
    if cfg.method in ("lora", "qlora"):
        return peft.LoraConfig(**lora)
    if cfg.method == "dora":
        return peft.LoraConfig(**lora, use_dora=True)
    if cfg.method == "adalora":
        total = max(total_steps, 10)
        # warm up with the full rank for 10% of training, prune until 80%, then keep the final budget fixed
        return peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.target_r, lora_alpha=cfg.alpha,
                                  lora_dropout=cfg.dropout, target_modules=cfg.target_modules, task_type=task_type,
                                  total_step=total, tinit=total // 10, tfinal=total // 5, deltaT=1)
    if cfg.method == "ia3":
        # "all-linear" means peft's per-architecture default here: keys, values and the MLP down projection
        targets = None if cfg.target_modules == "all-linear" else cfg.target_modules
        return peft.IA3Config(task_type=task_type, target_modules=targets,
                              feedforward_modules=None if targets is None else [])
    virtual = dict(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method == "prefix":
        return peft.PrefixTuningConfig(**virtual, prefix_projection=True,
                                       encoder_hidden_size=cfg.encoder_hidden_size)
    if cfg.method == "ptuning_v2":
        return peft.PrefixTuningConfig(**virtual, prefix_projection=False)
    if cfg.method == "prompt":
        if cfg.prompt_init == "text":
            return peft.PromptTuningConfig(**virtual, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text=cfg.prompt_init_text,
                                           tokenizer_name_or_path=tokenizer_path)
        return peft.PromptTuningConfig(**virtual, prompt_tuning_init="RANDOM")
    if cfg.method == "ptuning":
        return peft.PromptEncoderConfig(**virtual, encoder_reparameterization_type=cfg.encoder.upper(),
                                        encoder_hidden_size=cfg.encoder_hidden_size)
    raise ValueError(f"{cfg.method} is not a peft method")


def prepare(model, cfg: AdapterConfig, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None,
            total_steps: int = 0, adapter_name: str = "default"):
    """``model`` made trainable as ``cfg.method`` says. ``task_type`` is CAUSAL_LM or SEQ_CLS (then the score
    head trains too); AdaLoRA schedules its rank pruning over ``total_steps`` optimizer steps."""
    kind_ = METHODS[cfg.method].kind
    if kind_ == "peft":
        from peft import get_peft_model, prepare_model_for_kbit_training

        if cfg.method == "ia3" and cfg.target_modules == "all-linear":
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as defaults

            model_type = getattr(model.config, "model_type", None)
            if model_type not in defaults:
                raise UserError(f"adapter.method ia3: peft has no default modules for {model_type} models; set "
                                "adapter.target_modules to the attention and MLP projections to scale (e.g. "
                                "[qkv_proj, down_proj])")
        if isinstance(cfg.target_modules, list):
            check_targets(model, cfg.target_modules)
        if getattr(model, "is_quantized", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, peft_config(cfg, task_type, tokenizer_path, total_steps),
                              adapter_name=adapter_name)
    model.requires_grad_(False)
    if kind_ == "bottleneck":
        add_bottlenecks(model, cfg.bottleneck_size, cfg.dropout, _bottleneck_targets(cfg))
    else:
        mark_trainable(model, cfg)
    if task_type == "SEQ_CLS":
        heads.score_head(model).requires_grad_(True)
    return model


def check_targets(model, targets: list[str]) -> None:
    """Each of ``adapter.target_modules`` must name modules of the base as peft matches them (the whole name, or
    its last dotted parts); one that matches nothing is a typo or another family's name. The error lists the
    layer names the base has (the names a target can take)."""
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            layers = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                             if isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
                             or type(module).__name__ == "Conv1D"})
            close = difflib.get_close_matches(target, layers, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"adapter.target_modules: {target!r} matches no module of {type(model).__name__} "
                            f"({hint}its layers: {', '.join(layers)})")


def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers are injected in place, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mark_trainable(model, cfg: AdapterConfig) -> None:
    """For the weights methods: switch on the gradients of the weights the method trains."""
    if cfg.method == "full":
        model.requires_grad_(True)
        return
    named = dict(model.named_parameters())
    if cfg.method == "bitfit":
        biases = [n for n in named if n.endswith(".bias")]
        if not biases:
            raise UserError(f"adapter.method bitfit: base {model.config.name_or_path!r} has no bias terms to train "
                            "(Llama-style models have none); use another method")
        chosen = biases
    else:  # freeze
        prefix, blocks = _blocks(model)
        if cfg.freeze_layers > blocks:
            raise UserError(f"adapter.freeze_layers ({cfg.freeze_layers}) is more than the {blocks} blocks of "
                            f"base {model.config.name_or_path!r}")
        top = tuple(f"{prefix}.{i}." for i in range(blocks - cfg.freeze_layers, blocks))
        chosen = [n for n in named if n.startswith(top)]
        for fragment in cfg.trainable_modules:
            hits = [n for n in named if fragment in n]
            if not hits:
                raise UserError(f"adapter.trainable_modules: {fragment!r} names no module of base "
                                f"{model.config.name_or_path!r}")
            chosen += hits
    for n in chosen:
        named[n].requires_grad_(True)


def _blocks(model) -> tuple[str, int]:
    """The name and length of the model's list of transformer blocks (the longest ModuleList)."""
    lists = [(name, len(mod)) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
    if not lists:
        raise UserError(f"{type(model).__name__} has no list of transformer blocks for adapter.method freeze")
    return max(lists, key=lambda x: x[1])


# ---------------------------------------------------------------------------------------------------------------
# Houlsby bottleneck adapters (peft has none)
# ---------------------------------------------------------------------------------------------------------------

# The output projections of attention and MLP in common architectures (Llama/Qwen/Mistral, GPT-NeoX, GPT-2, OPT)
BOTTLENECK_TARGETS = ("self_attn.o_proj", "mlp.down_proj", "attention.dense", "mlp.dense_4h_to_h", "attn.c_proj",
                      "mlp.c_proj", "self_attn.out_proj", "fc2")


class Bottleneck(nn.Module):
    """``h + up(dropout(gelu(down(h))))``, Houlsby et al. 2019 eq. (1); ``up`` starts at zero, so a fresh adapter
    is the identity and training starts from the base model."""

    def __init__(self, width: int, size: int, dropout: float, dtype: torch.dtype):
        super().__init__()
        self.down = nn.Linear(width, size, dtype=dtype)
        self.up = nn.Linear(size, width, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(nn.functional.gelu(self.down(h.to(self.down.weight.dtype))))).to(h.dtype)


def _apply_bottleneck(module, inputs, output):
    return module.bottleneck(output)


def _bottleneck_targets(cfg: AdapterConfig) -> tuple[str, ...]:
    return BOTTLENECK_TARGETS if cfg.target_modules == "all-linear" else tuple(cfg.target_modules)


def add_bottlenecks(model, size: int, dropout: float, targets: tuple[str, ...]) -> int:
    """Attach a trainable bottleneck to the output of every module whose name ends with one of ``targets``;
    returns how many. The base's own parameter names do not change (each bottleneck is a child of its module)."""
    count = 0
    for name, module in list(model.named_modules()):
        width = getattr(module, "out_features", None) or getattr(module, "nf", None)  # nn.Linear, GPT-2's Conv1D
        if width and name.endswith(targets):
            weight = module.weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantized bases: float32
            module.bottleneck = Bottleneck(width, size, dropout, dtype).to(weight.device)
            module.register_forward_hook(_apply_bottleneck)
            count += 1
    if not count:
        raise UserError(f"adapter.method adapter: no module of {type(model).__name__} matches "
                        f"adapter.target_modules {list(targets)}")
    return count


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading what a method trained
# ---------------------------------------------------------------------------------------------------------------

BOTTLENECK_CONFIG = "bottleneck_config.json"
BOTTLENECK_WEIGHTS = "bottleneck_model.safetensors"


def saved_files(method: str, where: str = "") -> list[tuple[str, ...]]:
    """The files ``save`` writes for ``method``, under ``where`` (a folder of the run, or the run itself): each
    entry is one file, or the names of which one must exist (a whole model's weights may be one file or an index
    of several). ``Run.finish`` refuses to publish a run that lacks one."""
    names = {"peft": [("adapter_config.json",), ("adapter_model.safetensors",)],
             "bottleneck": [(BOTTLENECK_CONFIG,), (BOTTLENECK_WEIGHTS,)],
             "weights": [("config.json",), ("model.safetensors", "model.safetensors.index.json")]}[METHODS[method].kind]
    return [tuple(f"{where}/{n}" if where else n for n in entry) for entry in names]


def save(trainer_or_model, cfg: AdapterConfig, out: Path) -> None:
    """Write what ``cfg.method`` trained into ``out``: a peft adapter, a bottleneck file, or the whole model."""
    is_trainer = hasattr(trainer_or_model, "save_model")
    model = trainer_or_model.model if is_trainer else trainer_or_model
    if METHODS[cfg.method].kind != "bottleneck":
        from rlhf.scale import distributed

        if distributed.is_sharded(model):  # FSDP2 on CPU processes: gathered by every process, written by one
            state = distributed.full_state_dict(model)
            if distributed.is_main():
                model.save_pretrained(str(out), state_dict=state)
        elif is_trainer:
            trainer_or_model.save_model(str(out))
        else:
            model.save_pretrained(str(out))
        return
    from safetensors.torch import save_file

    if is_trainer and not trainer_or_model.args.should_save:  # not the process that writes
        return
    state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(out / BOTTLENECK_WEIGHTS))
    (out / BOTTLENECK_CONFIG).write_text(json.dumps({
        "method": "adapter", "bottleneck_size": cfg.bottleneck_size, "dropout": cfg.dropout,
        "targets": list(_bottleneck_targets(cfg)), "base_model": model.config.name_or_path}, indent=2) + "\n")


def load(run_dir: Path, method: str, base_loader, full_loader):
    """A trained model from a run directory: ``base_loader()`` gives the base (for adapter kinds),
    ``full_loader(path)`` loads a whole saved model (for the weights kind)."""
    kind_ = METHODS[method].kind
    if kind_ == "weights":
        return full_loader(str(run_dir))
    if kind_ == "peft":
        from peft import PeftModel

        return PeftModel.from_pretrained(base_loader(), str(run_dir))
    from safetensors.torch import load_file

    spec = json.loads((Path(run_dir) / BOTTLENECK_CONFIG).read_text())
    model = base_loader()
    add_bottlenecks(model, spec["bottleneck_size"], spec["dropout"], tuple(spec["targets"]))
    result = model.load_state_dict(load_file(str(Path(run_dir) / BOTTLENECK_WEIGHTS)), strict=False)
    missing = [k for k in result.missing_keys if ".bottleneck." in k]
    if missing or result.unexpected_keys:
        raise UserError(f"{run_dir}: bottleneck weights do not fit the base "
                        f"(e.g. {(missing or result.unexpected_keys)[0]})")
    return model


def adalora_callback():
    """Trainer callback for AdaLoRA: after each backward pass, update the importance scores and prune the rank
    budget (peft's ``update_and_allocate``; Trainer does not call it)."""
    from transformers import TrainerCallback

    class _AdaLora(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            model.base_model.update_and_allocate(state.global_step)

    return _AdaLora()
