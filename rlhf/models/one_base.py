"""Several runs' adapters on ONE copy of their base, for commands that only read models (``rlhf eval``).

PPO holds its policy, reference, reward and value as adapters on one base (``ppo_models.SharedBase``); evaluation
compares the untuned base, SFT and PPO policies, each against its reference, scored by the reward model: with a
copy of the base per model that is three or more copies of a 7B model at once. Here the base is loaded once, each
run's adapter is loaded under its own name, and every use names the adapter it needs:

- ``policy(run_dir)`` (or ``policy(None)`` for the bare base) is a model ``rollout.generate`` and
  ``rollout.response_logprobs`` can take: it selects its adapter before each call;
- ``reward`` is a model ``rewards.score_conversations`` can take: the backbone under the reward model's adapter,
  read through its score head.

An adapter with one active name computes exactly what the run's own model computes, so the numbers are those of
separate copies. Runs that cannot share the base (another base or dtype, full fine-tuning, another adapter type
than the reward model's) are left to ``can_hold``'s caller to load on their own.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from rlhf.models import heads, method_table, methods, modeling
from rlhf.config import ModelConfig

SAME_BASE_KEYS = ("dtype", "quantization", "revision", "untrained_rows")
"""the model settings two runs must share to be adapters on one copy of the base"""


class OneBase:
    """The reward model's base, loaded once, with the reward adapter and any number of policy adapters."""

    def __init__(self, reward_dir: Path, device: torch.device | str | None = None):
        from peft import PeftConfig, PeftModel

        rm = modeling.read_run(reward_dir, "reward model")
        self.reward_dir, self.method, self.cfg = rm.dir, rm.method, rm.model
        self.reward_tokenizer = modeling.load_tokenizer(self.cfg, str(reward_dir))
        base = modeling.load_base(self.cfg, device=device or modeling.accelerator())
        with modeling.loading(reward_dir, self.cfg.base):
            # a causal LM wrapper (the reward adapter's own task type would wrap the base for classification);
            # the reward adapter's score head is read from its file, as PPO reads it
            config = PeftConfig.from_pretrained(str(reward_dir))
            config.task_type = "CAUSAL_LM"
            self.model = PeftModel.from_pretrained(base, str(reward_dir), adapter_name="reward", config=config)
        self.model.eval()
        self.names: dict[str, str] = {}
        """run directory -> adapter name"""
        head = heads.linear_head(heads.score_head_weights(self.reward_dir), base.get_input_embeddings().weight.dtype)
        head = head.requires_grad_(False).to(base.device)
        config = copy.copy(methods.unwrap(self.model).config)
        config.pad_token_id = self.reward_tokenizer.pad_token_id  # where the reward model's forward pools
        self.reward = _RewardView(self, head, config)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def config(self):
        return methods.unwrap(self.model).config

    def can_hold(self, run_dir: Path | None) -> bool:
        """Whether the policy of ``run_dir`` (None: the bare base) can be an adapter here: the same base and model
        settings as the reward model, and the same adapter method."""
        if run_dir is None:
            return True
        policy = modeling.read_run(run_dir, "policy")
        return (policy.method == self.method and method_table.kind(self.method) == "peft"
                and modeling.same_base(policy.model.base, self.cfg.base)
                and all(getattr(policy.model, k) == getattr(self.cfg, k) for k in SAME_BASE_KEYS))

    def can_hold_base(self, cfg: ModelConfig) -> bool:
        """Whether the bare base of ``cfg`` is this one (the same model and settings)."""
        return modeling.same_base(cfg.base, self.cfg.base) and all(getattr(cfg, k) == getattr(self.cfg, k)
                                                           for k in SAME_BASE_KEYS)

    def policy(self, run_dir: Path | None) -> "_PolicyView":
        """The policy of a run directory (its adapter, loaded once) or the bare base (None)."""
        if run_dir is None:
            return _PolicyView(self, None)
        key = str(Path(run_dir).resolve())
        if key not in self.names:
            name = f"policy{len(self.names)}"
            with modeling.loading(run_dir, self.cfg.base):
                self.model.load_adapter(str(run_dir), adapter_name=name)
            self.names[key] = name
        return _PolicyView(self, self.names[key])

    @contextmanager
    def active(self, name: str | None):
        """Forward passes under adapter ``name``, or the bare base (every adapter off) for None."""
        if name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield

    def backbone(self) -> nn.Module:
        core = methods.unwrap(self.model)
        return getattr(core, core.base_model_prefix)


class _PolicyView:
    """One policy of a ``OneBase``: what ``rollout.generate`` and ``rollout.response_logprobs`` call on a model."""

    def __init__(self, owner: OneBase, name: str | None):
        self.owner, self.name = owner, name

    @property
    def device(self) -> torch.device:
        return self.owner.device

    @property
    def config(self):
        return self.owner.config

    @property
    def wrapped(self) -> nn.Module:
        """The shared model whose forward every call reaches (``rollout`` reads its signature)."""
        return self.owner.model

    def __call__(self, **kwargs):
        with self.owner.active(self.name):
            return self.owner.model(**kwargs)


class _RewardView(nn.Module):
    """The reward model as ``heads.sequence_scores`` reads one: a backbone (the shared one, under the reward
    adapter) and a score head, with the reward model's pad token in its config."""

    base_model_prefix = "backbone_under_reward"

    def __init__(self, owner: OneBase, head: nn.Linear, config):
        super().__init__()
        self.score = head
        self.config = config
        self.__dict__["_owner"] = owner  # not a submodule: the base belongs to the OneBase

    @property
    def backbone_under_reward(self) -> nn.Module:
        owner = self.__dict__["_owner"]
        owner.model.set_adapter("reward")
        return owner.backbone()

