"""PPO's critic as one object: where its values come from, what it trains, how it is saved and resumed. The loop and
the update ask the critic (``models.critic``, None for a critic-free estimator), never the name in the recipe.

Two critics (``ppo.critic``), each on either layout of the four models (``rlhf.ppo.ppo_models``):

- ``AdapterCritic``: a value model of its own under a value head. On the shared base it is the ``value`` adapter
  (started from the reward model's adapter, its head from the score head on the scale PPO's rewards use; without
  a reward model from the SFT adapter, or a fresh one, under a head at zero); with full fine-tuning it is a copy of
  the reward model (or of the policy's weights) whose score head is the value head. Its values take a forward (and
  a backward) of their own.
- ``SharedCritic``: a value head on the policy's own last hidden state (TRL <= 0.11's value-head model), starting at
  zero: its values come out of the policy's passes, the sampling pass's and the update's (``on_policy_pass``), and
  the value loss trains the policy's weights too.

``KINDS`` names them for the recipe's ``ppo.critic``; each builds itself on a layout (``for_shared_base``,
``for_copies``), which the layouts call through it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.models import heads, methods
from rlhf.scale import distributed


class AdapterCritic:
    """A value model of its own: the shared base's ``value`` adapter under ``head``, or ``copy``, a whole
    sequence-classification model whose score head is the value head."""

    name = "adapter"
    on_policy_pass = False
    """its values take a pass of their own (not the policy's)"""
    reads = "the value adapter's last hidden state"

    def __init__(self, values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], head: nn.Linear | None = None,
                 copy: nn.Module | None = None, base=None):
        self._values, self.head, self.copy, self.base = values, head, copy, base
        """``head`` on the value adapter of the shared base (``base``: the peft model holding it), or ``copy``, the
        value model of full fine-tuning"""

    @classmethod
    def for_shared_base(cls, layout, sft_dir: Path | None, rm_dir: Path | None, adapter_cfg, head_weights,
                        dtype: torch.dtype, shift: float, scale: float) -> "AdapterCritic":
        """The ``value`` adapter on the shared base (``layout.model``, a peft model): the reward model's adapter with
        the score head (``head_weights``) mapped to ``(score - shift) / scale``, the scale of the rewards PPO
        optimises; else (scorers alone) the SFT adapter, or a fresh one, under a head at zero."""
        model = layout.model
        if rm_dir is not None:
            layout.load_reward_adapter(rm_dir, "value", trainable=True)
            head = heads.linear_head(head_weights, dtype, shift, scale, bias=True)
        else:
            if sft_dir is not None:
                model.load_adapter(str(sft_dir), adapter_name="value", is_trainable=True)
            else:
                model.add_adapter("value", methods.peft_config(adapter_cfg, "CAUSAL_LM", layout.base_name))
            head = heads.zero_head(layout.config.hidden_size, dtype)
        return cls(lambda ids, mask: heads.head_values(head, layout.hidden("value", ids, mask)), head=head,
                   base=model)

    @classmethod
    def for_copies(cls, layout, sft_dir: Path | None, rm_dir: Path | None, load, source: str, shift: float,
                   scale: float) -> "AdapterCritic":
        """A value model of full fine-tuning: a copy of the reward model whose score head is mapped to ``(score -
        shift) / scale``, else (scorers alone) the policy's weights (``load(source)``) under a head at zero; read
        under the layout's autocast."""
        if rm_dir is not None:
            value = copy.deepcopy(layout.reward).requires_grad_(True)
            head = heads.score_head(value)
            weights = {k: v.detach().clone() for k, v in head.state_dict().items()}
            value.score = heads.linear_head(weights, head.weight.dtype, shift, scale, bias=True)
        else:
            value = load(source)
            if value.config.pad_token_id is None:
                value.config.pad_token_id = layout.policy.config.pad_token_id
            value.score = heads.zero_head(value.config.hidden_size, heads.score_head(value).weight.dtype)

        def values(input_ids, attention_mask):
            with layout.autocasting():
                return heads.token_scores(value, input_ids, attention_mask).float()

        return cls(values, copy=value)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value of the state at every position, ``[B, L]`` in float32."""
        return self._values(input_ids, attention_mask)

    def parameters(self) -> list[nn.Parameter]:
        """What trains: the value adapter and the head, or the value model's trainable weights (read when asked:
        a method that trains some weights only marks them once the copy is made)."""
        if self.copy is not None:
            return [p for p in self.copy.parameters() if p.requires_grad]
        return [p for n, p in self.base.named_parameters() if ".value." in n or n.endswith(".value")] + list(
            self.head.parameters())

    def modules(self) -> list[nn.Module]:
        """What the critic holds beside the layout's models (for counting, moving, sharding, training mode)."""
        return [m for m in (self.head, self.copy) if m is not None]

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    def trainable_state(self, sharded: bool) -> dict[str, torch.Tensor]:
        """What the critic trained, whole, for a resume checkpoint (the keys resume checkpoints have always had)."""
        if self.copy is not None:
            weights = distributed.full_state_dict(self.copy) if sharded else self.copy.state_dict()
            return {f"value.{k}": v.clone() for k, v in weights.items()}
        state = {k: v for k, v in self.base.state_dict().items() if ".value." in k}
        return {**state, **{f"value_head.{k}": v for k, v in self.head.state_dict().items()}}

    def load_trainable_state(self, state: dict[str, torch.Tensor], sharded: bool) -> None:
        """The critic's part of a resume checkpoint (a value adapter's weights load with the shared base's)."""
        if self.copy is not None:
            load_copy(self.copy, "value", state, sharded)
        else:
            self.head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                       if k.startswith("value_head.")})

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        if self.copy is not None:
            return methods.saved_files("full", "value")
        return [*methods.saved_files(method, "value"), ("value/value_head.safetensors",)]

    def save(self, out: Path, sharded: bool) -> None:
        """The value model under ``out/value``: the value adapter's files and the head (the shared base's), or the
        whole value model (gathered by every process when sharded); the main process writes."""
        if self.copy is not None:
            weights = distributed.full_state_dict(self.copy) if sharded else None
            if distributed.is_main():
                self.copy.save_pretrained(str(out / "value"), state_dict=weights)
            return
        if not distributed.is_main():
            return
        tmp = out / ".value-adapter"
        self.base.save_pretrained(str(tmp), selected_adapters=["value"])
        (tmp / "value").replace(out / "value")
        for leftover in tmp.iterdir():  # peft writes a README next to the adapters
            leftover.unlink() if leftover.is_file() else None
        tmp.rmdir()
        heads.save_value_head(self.head, out, self.name, self.reads)


class SharedCritic:
    """A value head on the policy's last hidden state: ``with_policy(ids, mask, keep)`` is the policy's forward
    asked for its hidden states too (``layout.policy_with_hidden``), so one pass gives logits and values; the
    sampling pass reads the head too (``sampling_head``)."""

    name = "shared"
    on_policy_pass = True
    """its values come out of the policy's own passes: the sampling pass's and the update's"""
    reads = "the policy's last hidden state"

    def __init__(self, head: nn.Linear, policy_with_hidden: Callable):
        self.head, self._policy_with_hidden = head, policy_with_hidden

    @classmethod
    def for_shared_base(cls, layout, sft_dir, rm_dir, adapter_cfg, head_weights, dtype: torch.dtype, shift: float,
                        scale: float) -> "SharedCritic":
        """A head at zero on the policy adapter's last hidden state (the reward model's score head read another
        adapter's: it does not carry over)."""
        return cls(heads.zero_head(layout.config.hidden_size, dtype), layout.policy_with_hidden)

    @classmethod
    def for_copies(cls, layout, sft_dir, rm_dir, load, source: str, shift: float, scale: float) -> "SharedCritic":
        """A head at zero on the policy copy's last hidden state."""
        dtype = layout.policy.get_input_embeddings().weight.dtype
        return cls(heads.zero_head(layout.policy.config.hidden_size, dtype), layout.policy_with_hidden)

    def with_policy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's logits of the last ``keep`` positions (exactly its ``policy_logits``: the same forward)
        and the values of the same positions, from one pass."""
        logits, hidden = self._policy_with_hidden(input_ids, attention_mask, keep)
        return logits, heads.head_values(self.head, hidden)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.with_policy(input_ids, attention_mask, input_ids.shape[1])[1]

    def sampling_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What ``rollout.decode`` reads values with (its ``value_head``): the head on each last hidden state."""
        return lambda hidden: heads.head_values(self.head, hidden)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def modules(self) -> list[nn.Module]:
        return [self.head]

    def train(self, mode: bool = True) -> None:
        self.head.train(mode)

    def trainable_state(self, sharded: bool) -> dict[str, torch.Tensor]:
        return {f"value_head.{k}": v.clone() for k, v in self.head.state_dict().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor], sharded: bool) -> None:
        self.head.load_state_dict({k[len("value_head."):]: v for k, v in state.items() if k.startswith("value_head.")})

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        return [("value/value_head.safetensors",)]

    def save(self, out: Path, sharded: bool) -> None:
        if distributed.is_main():
            heads.save_value_head(self.head, out, self.name, self.reads)


Critic = AdapterCritic | SharedCritic

KINDS = {"adapter": AdapterCritic, "shared": SharedCritic}
"""``ppo.critic`` -> the critic it names"""


def sampling_head(critic: Critic | None, values: bool):
    """What ``rollout.decode`` reads values with: with ``values``, the critic's head on the sampling pass's hidden
    states (a critic whose values come with the policy's pass), else None."""
    if not values:
        return None
    if critic is None or not critic.on_policy_pass:
        raise RuntimeError("values come from the sampling pass with the shared critic only")
    return critic.sampling_head()


def no_critic_state(state: dict[str, torch.Tensor]) -> None:
    """Refuse a resume checkpoint that holds a critic's weights for a run without one."""
    if any(k.startswith(("value_head.", "value.")) for k in state):
        raise UserError("resume checkpoint holds a value head, but this run has no critic (ppo.advantage)")


def load_copy(model: nn.Module, name: str, state: dict[str, torch.Tensor], sharded: bool, strict: bool = False
              ) -> None:
    """Load ``name.*`` of a resume checkpoint's ``state`` into a whole model, each process keeping its shard of
    the whole weights when sharded."""
    weights = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    if sharded:
        own = model.state_dict(keep_vars=True)
        weights = {k: distributed.shard_like(v, own[k]) for k, v in weights.items() if k in own}
    model.load_state_dict(weights, strict=strict)
