"""Score heads, one home: the scalar head of a sequence-classification model, read the same way everywhere (a
reward model's score, PPO's values), the heads PPO builds from a reward model's (its reward head, the value head),
and where a sequence's score is read.

A reward model's score of a sequence is its head at ``reward_index``: the last real token that is not the pad
token, where transformers' sequence-classification models pool and so where TRL's reward trainer trains the head.
PPO's value of a state is a value head on the hidden state the token was chosen from; every head runs outside any
autocast, in its own precision (``head_values``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.scale import distributed
from rlhf.text.encoding import position_ids


def _core(model):
    """The transformers model inside a peft wrapper (``methods.unwrap``'s one line, here so that ``methods``, whose
    ``prepare`` marks a score head trainable, can import this module)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_head(model):
    """The scalar head of a sequence-classification model (``score`` in most architectures)."""
    core = _core(model)
    for name in ("score", "classifier", "v_head"):
        head = getattr(core, name, None)
        if head is not None:
            return head
    raise UserError(f"{type(core).__name__} has no score head (expected an attribute 'score' or 'classifier')")


def token_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head's scalar at every position, ``[batch, seq]`` in float32 (values for PPO, rewards at the end)."""
    core = _core(model)
    if distributed.is_sharded(core):  # FSDP2: only the root's forward gathers the embeddings and the head
        head, out = score_head(model), []
        hook = head.register_forward_hook(lambda module, args, output: out.append(output))
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                  use_cache=False)
        finally:
            hook.remove()
        return out[0].squeeze(-1).float()
    backbone = getattr(core, core.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return score_head(model)(hidden).squeeze(-1).float()


def reward_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Where a reward is read in each row: the last real token that is not ``pad_token_id``, which is where
    transformers' sequence-classification models pool (and so where TRL's reward trainer trains the head). With
    pad == EOS that is the token before the final EOS; with a distinct pad token, the EOS itself. A row of pad
    tokens only is read at its last real token. Independent of the padding side."""
    real = attention_mask.bool()
    if pad_token_id is not None:
        keep = real & (input_ids != pad_token_id)
        real = torch.where(keep.any(-1, keepdim=True), keep, real)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * real.long()).argmax(-1)


def pad_id(model) -> int | None:
    """The pad token id a sequence-classification model pools by (its ``config.pad_token_id``)."""
    config = _core(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "pad_token_id", None)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Reward of each sequence, ``[batch]``: the head read at ``reward_index`` (the model's own pad token id
    unless another is given), the position the model's own forward pools at and the reward trainer trained."""
    scores = token_scores(model, input_ids, attention_mask)
    index = reward_index(input_ids, attention_mask, pad_id(model) if pad_token_id is None else pad_token_id)
    return scores[torch.arange(scores.shape[0], device=scores.device), index]


def score_head_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The score head saved inside a reward-model adapter (peft's modules_to_save), as ``{weight[, bias]}``: what
    PPO's reward and value heads and eval's reward head (``rlhf.models.one_base``) are built from, by ``linear_head``."""
    from safetensors.torch import load_file

    weights = load_file(run_dir / "adapter_model.safetensors")
    head = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if ".score." in k or k.endswith(".score.weight")}
    if "weight" not in head:
        raise UserError(f"{run_dir}: the reward adapter holds no score head")
    return head


def linear_head(weights: dict[str, torch.Tensor], dtype: torch.dtype, shift: float = 0.0, scale: float = 1.0,
                bias: bool = False) -> nn.Linear:
    """A linear head from saved weights, computing ``(w x + b - shift) / scale`` (with a bias when asked)."""
    out_features, in_features = weights["weight"].shape
    head = nn.Linear(in_features, out_features, bias=bias or "bias" in weights, dtype=dtype,
                     device=weights["weight"].device)
    if head.weight.is_meta:  # shapes only (a sharded run's other processes): the main process sends the values
        return head
    with torch.no_grad():
        head.weight.copy_(weights["weight"] / scale)
        if head.bias is not None:
            head.bias.copy_((weights.get("bias", torch.zeros(out_features)) - shift) / scale)
    return head


def zero_head(width: int, dtype: torch.dtype) -> nn.Linear:
    """A value head that predicts 0 everywhere at the start (weights and bias zero)."""
    head = nn.Linear(width, 1, bias=True, dtype=dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def head_values(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """A value head on hidden states ``[..., H]``: ``[...]`` in float32, the head itself in its own precision
    (outside any autocast, in the update and in the sampling pass alike)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


def save_value_head(head: nn.Linear, out: Path, critic: str, reads: str) -> None:
    """The value head at ``out/value/value_head.safetensors``, its metadata naming the ``critic`` and which hidden
    state it ``reads``."""
    from safetensors.torch import save_file

    (out / "value").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "value" / "value_head.safetensors"),
              metadata={"critic": critic, "reads": reads})
