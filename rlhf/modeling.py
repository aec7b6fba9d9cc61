"""Loading the base model and tokenizer, attaching adapters, and loading what a stage saved.

Every stage goes through these functions, so a base is loaded the same way everywhere (dtype, revision,
``trust_remote_code``), and a run directory is turned back into a model in one place.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf import methods
from rlhf.config import AdapterConfig, ModelConfig
from rlhf.errors import UserError

# Used when a tokenizer has no chat template of its own. The assistant turn carries generation markers (TRL's
# assistant-only loss needs them) and ends with the EOS token, so a trained model learns to stop.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "### Assistant:\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n\n"
    "{%- else -%}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}\n\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}### Assistant:\n{%- endif -%}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _pretrained_kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    """The tokenizer of the base (or of ``path``), with a pad token and a chat template guaranteed."""
    from transformers import AutoTokenizer

    source = path or cfg.base
    try:
        tok = AutoTokenizer.from_pretrained(source, **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def load_base(cfg: ModelConfig, kind: str = "causal"):
    """The base model as a causal LM (``kind="causal"``) or with a one-score head (``kind="score"``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs = {**_pretrained_kwargs(cfg), "dtype": DTYPES[cfg.dtype], "use_safetensors": True}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization:
        kwargs["quantization_config"] = methods.quantization_config(cfg)
        if torch.cuda.is_available():  # a quantized model cannot be moved after loading: load it on this process's GPU
            from rlhf import distributed

            kwargs["device_map"] = {"": distributed.device()}
    try:
        if kind == "score":
            return AutoModelForSequenceClassification.from_pretrained(cfg.base, num_labels=1, **kwargs)
        return AutoModelForCausalLM.from_pretrained(cfg.base, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg.base}: cannot load the base model ({str(e).splitlines()[0]})") from None


def attach_adapter(model, cfg: AdapterConfig, task_type: str = "CAUSAL_LM", base: str | None = None,
                   total_steps: int = 0):
    """Make ``model`` trainable as ``cfg.method`` says (see ``rlhf.methods``)."""
    return methods.prepare(model, cfg, task_type, tokenizer_path=base, total_steps=total_steps)


def trainable_parameters(model) -> dict:
    """Trainable and total parameter counts, and the trainable percentage. peft's count is used for peft models:
    it counts a 4-bit weight's parameters, not the bytes it is packed into."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": round(100.0 * trainable / max(total, 1), 4)}


@contextmanager
def loading(run_dir: str | Path, base: str):
    """Turn the libraries' errors for weights that do not fit (an adapter made for another base, a truncated or
    damaged safetensors file) into one-line errors naming the run directory."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (RuntimeError, ValueError, OSError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{run_dir}: its weights cannot be loaded onto base {base} ({first[:300]})") from None


def verify_weights(run_dir: str | Path) -> None:
    """Open every safetensors file of a run (headers and sizes are checked), so that a damaged file is reported
    before any work starts."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(run_dir).glob("*.safetensors")) + sorted(Path(run_dir).glob("value/*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    f.get_slice(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{path}: damaged weights file ({str(e).splitlines()[0][:200]})") from None


def read_manifest(run_dir: str | Path) -> dict:
    """A finished run directory's manifest (its weight files checked); a clear error for anything else."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: damaged manifest ({e.msg})") from None
    if manifest.get("status") != "complete":
        raise UserError(f"{run_dir}: the run did not finish (status {manifest.get('status')!r})")
    verify_weights(run_dir)
    return manifest


def load_policy(run_dir: str | Path, model_cfg: ModelConfig | None = None):
    """A causal LM from a finished SFT (or later PPO) run directory, and its tokenizer.

    Adapter runs load their base (as recorded in the manifest, with the recorded model settings) and the adapter
    on top; full fine-tuning runs load the saved weights directly.
    """
    from transformers import AutoModelForCausalLM

    manifest = read_manifest(run_dir)
    cfg = model_cfg or ModelConfig(**manifest["recipe"]["model"])
    cfg.base = manifest["base"]
    tokenizer = load_tokenizer(cfg, str(run_dir))
    with loading(run_dir, cfg.base):
        model = methods.load(
            Path(run_dir), manifest["adapter"]["method"], lambda: load_base(cfg),
            lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], use_safetensors=True))
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Score heads: reward model scores and (later) PPO values, read the same way everywhere
# ---------------------------------------------------------------------------------------------------------------

def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers are injected in place, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model):
    """The scalar head of a sequence-classification model (``score`` in most architectures)."""
    core = unwrap(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(core, name, None)
        if head is not None:
            return head
    raise UserError(f"{type(core).__name__} has no score head (expected an attribute 'score' or 'classifier')")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded sequence gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's scalar at every position, ``[batch, seq]`` in float32 (values for PPO, rewards at the end)."""
    core = unwrap(model)
    backbone = getattr(core, core.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, whatever the padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward of each sequence: the head read at its last real token, ``[batch]``.

    Independent of padding side: positions come from the mask and the read index is the last masked-in token.
    """
    scores = token_scores(model, input_ids, attention_mask)
    return scores[torch.arange(scores.shape[0], device=scores.device), last_index(attention_mask)]


def load_reward(run_dir: str | Path, model_cfg: ModelConfig | None = None):
    """The reward model of a finished RM run directory (base + adapter + score head), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    manifest = read_manifest(run_dir)
    if manifest.get("stage") != "rm":
        raise UserError(f"{run_dir}: is a {manifest.get('stage')!r} run, not a reward model (rm)")
    cfg = model_cfg or ModelConfig(**manifest["recipe"]["model"])
    cfg.base = manifest["base"]
    tokenizer = load_tokenizer(cfg, str(run_dir))

    def base():
        model = load_base(cfg, kind="score")
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    with loading(run_dir, cfg.base):
        model = methods.load(
            Path(run_dir), manifest["adapter"]["method"], base,
            lambda path: AutoModelForSequenceClassification.from_pretrained(path, dtype=DTYPES[cfg.dtype],
                                                                            num_labels=1, use_safetensors=True))
    model.eval()
    return model, tokenizer
