"""The four models PPO needs: policy, reference, reward and value.

With an adapter method (LoRA, DoRA, QLoRA, IA3) they are four named adapters on ONE base loaded once; every
forward pass selects its adapter first:

- ``policy``     trainable, initialised from the SFT adapter
- ``reference``  the SFT adapter again, frozen
- ``reward``     the reward model's adapter, frozen, read through the reward model's score head
- ``value``      the adapter critic's (``rlhf.ppo.critics``): trainable, initialised from the reward model's
                 adapter, read through a value head initialised from the score head

Without a reward model (a reward of scorers alone, ``rlhf.feedback.scorers``) there is no ``reward`` adapter. The
critic is an object of its own (``models.critic``, ``rlhf.ppo.critics``): the value adapter above, or the shared
critic's value head on the policy's own last hidden state (``ppo.critic: shared``: no value adapter, and the policy's
passes give the values too), or None with a critic-free advantage estimator (``ppo.advantage``: grpo, dr_grpo,
rloo, reinforce_pp), when nothing of a critic is created, trained or saved.

With a method that trains base weights (full, bitfit, freeze) they are separate model copies. Both layouts are
``PPOModels`` (the interface the PPO loop is written against), so the loop does not know which one it runs on.
"""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from rlhf.engine import rollout
from rlhf.models import heads, method_table, methods, modeling
from rlhf.ppo import critics, ppo_math, precision
from rlhf.scale import distributed
from rlhf.text import encoding
from rlhf.config import ModelConfig
from rlhf.errors import UserError
from rlhf.names import torch_dtype
from rlhf.ppo.precision import autocast

class PPOModels(Protocol):
    """What the PPO loop needs of its four models (policy, reference, reward, value), whichever layout holds them.

    Every forward pass runs under the autocast ``autocast`` names (None: the weights' own precision)."""

    autocast: torch.dtype | None
    """the autocast dtype of every forward pass, or None"""
    bf16_speedup: float | None
    """bf16 over fp32 matrix-product speed measured on a CPU when ``mixed_precision: auto`` looked, else None"""
    repeatable: bool | None
    """whether PPO's passes gave the same bits twice in this precision when checked (``precision.repeats``),
    None when not checked"""
    sharded: bool
    """whether the models are FSDP2 shards over the processes (``SeparateCopies.shard``): every pass and save is
    then collective, run by every process alike"""
    shards: dict | None
    """what each process holds of the sharded models (``distributed.record_shards``; the manifest's ``shards``),
    None when not sharded"""

    @property
    def device(self) -> torch.device: ...

    @property
    def config(self):
        """The base model's transformers configuration."""

    def policy_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                      role: str = "policy") -> torch.Tensor:
        """Logits of the last ``keep`` positions under ``role`` ("policy" or "reference"), ``[B, keep, vocab]``."""

    vocab: int | None
    """the tokenizer's size: ids at or above it (a padded embedding's rows) are never sampled and take no
    probability in ``sample`` and ``policy_logits`` alike (``ppo_math.restrict_vocab``); None: every id"""

    critic: critics.Critic | None
    """the critic (``rlhf.ppo.critics``): its values, parameters, saving and loading, and whether its values come
    with the policy's passes; None for a critic-free estimator"""

    def policy_with_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the policy: its logits of the last ``keep`` positions (as ``policy_logits``) and the same
        positions' last hidden states (what the shared critic's head reads), ``([B, keep, vocab], [B, keep, H])``."""

    has_reward: bool
    """whether the models hold a reward model (a reward-model run's adapter or copy)"""

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward model's score of each whole sequence, ``[B]`` in float32."""

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, values: bool = False,
               **kwargs) -> rollout.Samples:
        """Responses of the policy with their log-probabilities and entropies (``rollout.decode``: sampled with
        per-episode keys, or greedy at temperature 0); with ``values`` (the shared critic) the value of the state
        before each token too."""

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable parameters of "policy" or "value" (the critic's; none without a critic)."""

    def all_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the four models, each once (for the manifest's parameter count)."""

    def train(self, mode: bool = True) -> None: ...

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything PPO changes, for resume checkpoints."""

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, out: Path) -> None:
        """The policy at ``out`` (loadable like an SFT run's), the value model (when there is one) under
        ``out/value``. Every process calls it (sharded weights are gathered); the main process writes."""

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        """The files ``save`` writes for a run of ``method`` (``methods.saved_files``' entries), which the
        finished run must hold."""


# ---------------------------------------------------------------------------------------------------------------
# A leaner forward for plain LoRA layers
# ---------------------------------------------------------------------------------------------------------------

def _lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA ``Linear.forward`` for plain LoRA: ``W x + B (s A x)``, with the scaling ``s`` applied to the
    rank-r product and ``B``'s product accumulated into the base output in place. The same maths as peft's
    ``W x + (B A x) s`` without its two full-width passes (scale, add) and per-call checks; every other case
    (disabled or merged adapters, extra arguments) goes to peft's own forward."""
    if self.disable_adapters or self.merged or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    shape = x.shape
    x = x.reshape(-1, x.shape[-1])  # 2-D from here: ``addmm_`` then updates the base output itself, not a view
    # of it (in place on a view, autograd would clone the gradient and copy it back into the view in backward)
    result = self.base_layer(x)
    cast = not torch.is_autocast_enabled(x.device.type)
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        h = nn.functional.linear(self.lora_dropout[name](x.to(a.dtype) if cast else x), a) * self.scaling[name]
        result.addmm_(h.to(result.dtype), b.t().to(result.dtype))
    return result.view(*shape[:-1], result.shape[-1])


def use_lean_lora(model: nn.Module) -> int:
    """Give every LoRA layer of ``model`` the lean forward when all of them are plain LoRA on ``nn.Linear`` (no
    DoRA or other variant, no quantized base, no LoRA bias); returns how many layers got it (0: left to peft)."""
    from peft.tuners.lora import Linear, LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    plain = all(type(m) is Linear and type(m.base_layer) is nn.Linear and not m.lora_variant
                and all(b.bias is None for b in m.lora_B.values()) for m in layers)
    if not layers or not plain:
        return 0
    for m in layers:
        m.forward = types.MethodType(_lean_lora_forward, m)
    return len(layers)


def logits_and_hidden(models, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the causal LM ``lm`` (the policy): its logits of the last ``keep`` positions, exactly as
    ``policy_logits`` computes them (the same forward, asked for its hidden states too), and the same positions'
    final hidden state (after the last norm: what the LM head reads), which the shared critic's head reads."""
    with autocast(models.device, models.autocast):
        out = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                 position_ids=encoding.position_ids(attention_mask), logits_to_keep=keep, output_hidden_states=True)
    return ppo_math.restrict_vocab(out.logits, models.vocab), out.hidden_states[-1][:, -keep:]


@contextmanager
def _score_head_apart():
    """Loading a reward-model run's adapter onto the causal LM: its file also holds the score head (peft saves it
    with a SEQ_CLS adapter), which has no place there and which PPO reads itself (``score_head_weights``); peft
    warns about it ("Found unexpected adapter keys: [...score.weight]") every time, and nothing is wrong."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Found unexpected adapter keys: \['[^,\]]*score\.weight'\]")
        yield


class SharedBase:
    """Policy, reference, reward and value as four adapters on one base model (a ``PPOModels``)."""

    autocast: torch.dtype | None = None
    bf16_speedup: float | None = None
    repeatable: bool | None = None
    vocab: int | None = None
    sharded = False  # LoRA PPO runs data-parallel: a whole base on every process
    shards: dict | None = None

    def __init__(self, cfg: ModelConfig, sft_dir: Path | None, rm_dir: Path | None, adapter_cfg=None,
                 value_shift: float = 0.0, value_scale: float = 1.0, critic: str | None = "adapter"):
        from peft import PeftModel, get_peft_model

        base = modeling.load_base(cfg)
        self.base_name = cfg.base
        if sft_dir is not None:
            self.model = PeftModel.from_pretrained(base, str(sft_dir), adapter_name="policy", is_trainable=True)
            self.model.load_adapter(str(sft_dir), adapter_name="reference")
        else:  # no SFT: the policy starts as a fresh adapter, the reference is the bare base
            self.model = get_peft_model(base, methods.peft_config(adapter_cfg, "CAUSAL_LM", cfg.base),
                                        adapter_name="policy")
        self.has_reference_adapter = sft_dir is not None
        dtype = base.get_input_embeddings().weight.dtype  # a quantized base keeps its embeddings unquantized
        self.reward_head, head = None, None
        if rm_dir is not None:
            self.load_reward_adapter(rm_dir, "reward")
            head = heads.score_head_weights(Path(rm_dir))
            self.reward_head = heads.linear_head(head, dtype).requires_grad_(False)
            # the pad token the reward model was trained with: a score is read where its training pooled
            self.reward_pad_id = modeling.load_tokenizer(cfg, str(rm_dir)).pad_token_id
        self.critic = critics.KINDS[critic].for_shared_base(self, sft_dir, rm_dir, adapter_cfg, head, dtype,
                                                            value_shift, value_scale) if critic else None
        # peft's set_adapter walks every module and resets requires_grad (~5 ms a switch here, a dozen switches a
        # step): switch once through it, fix trainability for good (policy and value train; reference and reward
        # never do), and from then on only repoint the adapter layers
        self.model.set_adapter("policy")
        for name, param in self.model.named_parameters():
            if ".value." in name:
                param.requires_grad_(True)
        self._switchable = [m for m in self.model.modules() if hasattr(m, "_active_adapter") and m is not self.model
                            and m is not self.model.base_model]
        self._active = "policy"
        self.lean_lora_layers = use_lean_lora(self.model)

    @property
    def has_reward(self) -> bool:
        return self.reward_head is not None

    def load_reward_adapter(self, rm_dir: Path, name: str, trainable: bool = False) -> None:
        """A reward-model run's adapter as adapter ``name`` (its file's score head set apart: PPO reads it itself)."""
        with _score_head_apart():
            self.model.load_adapter(str(rm_dir), adapter_name=name, is_trainable=trainable)

    # -- adapter switching -----------------------------------------------------------------------------------
    def use(self, role: str) -> None:
        """Select the adapter of ``role`` for the next forward passes (what peft's set_adapter does, without
        touching requires_grad)."""
        if role != self._active:
            for module in self._switchable:
                module._active_adapter = [role]
            self.model.base_model.active_adapter = role
            self._active = role

    @property
    def device(self):
        return self.model.device

    @property
    def config(self):
        """The base model's configuration."""
        return methods.unwrap(self.model).config

    def _backbone(self):
        core = methods.unwrap(self.model)
        return getattr(core, core.base_model_prefix)

    # -- the forward passes the loop needs ---------------------------------------------------------------------
    def policy_logits(self, input_ids, attention_mask, keep: int, role: str = "policy") -> torch.Tensor:
        """Logits of the last ``keep`` positions under ``role`` ("policy" or "reference")."""
        if role == "reference" and not self.has_reference_adapter:
            with self.bare():
                return ppo_math.restrict_vocab(self._lm(input_ids, attention_mask, keep), self.vocab)
        self.use(role)
        return ppo_math.restrict_vocab(self._lm(input_ids, attention_mask, keep), self.vocab)

    @contextmanager
    def bare(self):
        """Forward passes of the base alone, every adapter off. peft's ``disable_adapter()`` would do it but also
        set ``requires_grad`` on its way out (every adapter frozen, then only the active one trainable again),
        which would stop the policy or value adapter from training; this flips only the layers' switch."""
        for module in self._switchable:
            module._disable_adapters = True
        try:
            yield
        finally:
            for module in self._switchable:
                module._disable_adapters = False

    def _lm(self, input_ids, attention_mask, keep):
        with autocast(self.device, self.autocast):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              position_ids=encoding.position_ids(attention_mask), logits_to_keep=keep).logits

    def hidden(self, role: str, input_ids, attention_mask) -> torch.Tensor:
        """The backbone's last hidden state at every position under the adapter of ``role``."""
        self.use(role)
        with autocast(self.device, self.autocast):
            return self._backbone()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    position_ids=encoding.position_ids(attention_mask)).last_hidden_state

    def policy_with_hidden(self, input_ids, attention_mask, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's logits of the last ``keep`` positions and their last hidden states, from one pass."""
        self.use("policy")
        return logits_and_hidden(self, self.model, input_ids, attention_mask, keep)

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        """Reward of each whole sequence, read where the reward model trained (``heads.reward_index``),
        ``[batch]``."""
        if self.reward_head is None:
            raise RuntimeError("PPO runs without a reward model (ppo.reward has no reward_model term)")
        hidden = self.hidden("reward", input_ids, attention_mask)
        index = heads.reward_index(input_ids, attention_mask, self.reward_pad_id)
        last = hidden[torch.arange(len(hidden), device=hidden.device), index]
        return self.reward_head(last.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    def sample(self, input_ids, attention_mask, values: bool = False, **kwargs) -> rollout.Samples:
        """Responses of the policy, with their log-probabilities and entropies (``rollout.decode``), and with
        ``values`` the shared critic's value before each token."""
        self.use("policy")
        with autocast(self.device, self.autocast):
            return rollout.decode(self.model, input_ids, attention_mask, vocab=self.vocab,
                                  value_head=critics.sampling_head(self.critic, values), **kwargs)

    # -- training and saving -----------------------------------------------------------------------------------
    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable parameters of ``policy`` or ``value`` (the critic's: its adapter and head)."""
        if role == "value":
            return self.critic.parameters() if self.critic is not None else []
        return [p for n, p in self.model.named_parameters() if f".{role}." in n or n.endswith(f".{role}")]

    def all_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + [x for m in _critic_modules(self) for x in m.parameters()]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.critic is not None:
            self.critic.train(mode)

    def keep_frozen_in(self, dtype: torch.dtype) -> None:
        """Store the frozen base's linear weights in ``dtype`` (bf16 under bf16 autocast: the products are the same,
        as autocast would cast them anyway, without a cast per forward pass, in half the memory). Adapters, norms,
        embeddings and the heads keep their precision."""
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith("base_layer") and not module.weight.requires_grad:
                module.to(dtype)

    def to(self, device) -> None:
        """Move everything to ``device`` (a quantized base was already placed there when it was loaded)."""
        modeling.place(self.model, device)
        for head in (self.reward_head, *_critic_modules(self)):
            if head is not None:
                head.to(device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything PPO changes: the policy adapter and the critic's weights (for resume checkpoints)."""
        state = {k: v for k, v in self.model.state_dict().items() if ".policy." in k}
        return {**state, **(self.critic.trainable_state(False) if self.critic is not None else {})}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.critic is not None:
            self.critic.load_trainable_state(state, False)
        else:
            critics.no_critic_state(state)
        missing = self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("value_head.")},
                                             strict=False)
        if missing.unexpected_keys:
            raise UserError(f"resume checkpoint does not fit the model (e.g. {missing.unexpected_keys[0]})")

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        """What ``save`` writes (``Run.finish`` checks it): the policy adapter, and the critic's files."""
        return [*methods.saved_files(method), *(self.critic.saved_files(method) if self.critic is not None else [])]

    def save(self, out: Path) -> None:
        """Policy adapter files at ``out`` (loadable by plain peft on the base), the critic's under ``out/value``;
        written by the main process."""
        if distributed.is_main():
            tmp = out / ".adapters"
            self.model.save_pretrained(str(tmp), selected_adapters=["policy"])
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                (tmp / "policy" / name).replace(out / name)
            tmp.joinpath("policy").rmdir()
            for leftover in tmp.iterdir():  # peft writes a README next to the adapters
                leftover.unlink() if leftover.is_file() else None
            tmp.rmdir()
        if self.critic is not None:
            self.critic.save(out, False)


def _critic_modules(models) -> list[nn.Module]:
    """The modules a layout's critic holds beside the layout's own models (none without a critic)."""
    return models.critic.modules() if models.critic is not None else []


class SeparateCopies:
    """Policy, reference, reward and value as four full models (full fine-tuning; a ``PPOModels``), each whole on
    every process (data parallel) or, under an FSDP config, sharded over the processes (``shard``)."""

    autocast: torch.dtype | None = None
    bf16_speedup: float | None = None
    repeatable: bool | None = None
    vocab: int | None = None
    sharded = False
    shards: dict | None = None

    def __init__(self, cfg: ModelConfig, sft_dir: Path | None, rm_dir: Path | None, adapter_cfg=None,
                 value_shift: float = 0.0, value_scale: float = 1.0, critic: str | None = "adapter",
                 shard: bool = False):
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        dtype = torch_dtype(cfg.dtype)
        kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        kwargs["trust_remote_code"] = cfg.trust_remote_code  # never asked at a prompt
        # sharded: only the main process reads the weights; the others build each model's shapes on the meta device
        # (no memory) and receive their shards from it when it is sharded (``distributed.shard``'s from_main)
        load = distributed.loader(from_main=shard)
        source = str(sft_dir) if sft_dir else cfg.base
        self.policy = load(AutoModelForCausalLM, source, dtype=dtype, use_safetensors=True, **kwargs)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if shard:  # sharded at once: fewer whole copies held at the same time while loading
            distributed.shard([self.reference], from_main=True)
        self.reward = None
        if rm_dir is not None:
            self.reward = load(AutoModelForSequenceClassification, str(rm_dir), dtype=dtype, num_labels=1,
                               use_safetensors=True, **kwargs)
            self.reward.requires_grad_(False).eval()

        def value(path: str):  # the value model of a critic started from the policy's weights
            return load(AutoModelForSequenceClassification, path, dtype=dtype, num_labels=1, use_safetensors=True,
                        **kwargs)

        self.critic = critics.KINDS[critic].for_copies(self, sft_dir, rm_dir, value, source, value_shift,
                                                       value_scale) if critic else None
        if adapter_cfg is not None and adapter_cfg.method != "full":  # bitfit / freeze: the same weights as in SFT
            methods.prepare(self.policy, adapter_cfg, "CAUSAL_LM")
            if getattr(self.critic, "copy", None) is not None:
                methods.prepare(self.critic.copy, adapter_cfg, "SEQ_CLS")
        if shard:
            self.shard()

    @property
    def device(self):
        return self.policy.device

    @property
    def config(self):
        return self.policy.config

    @property
    def has_reward(self) -> bool:
        return self.reward is not None

    def autocasting(self):
        """The autocast every forward pass of these models runs under."""
        return autocast(self.device, self.autocast)

    def _models(self) -> list[nn.Module]:
        """The whole models: policy, reference, reward (when there is one) and the critic's value model."""
        return [m for m in (self.policy, self.reference, self.reward, getattr(self.critic, "copy", None))
                if m is not None]

    def shard(self) -> None:
        """FSDP2 over every process (``distributed.shard``): the policy and value models, whose gradients and Adam
        state are then sharded too, and the frozen reference (sharded as soon as it is copied) and reward copies.
        Each shard goes to this process's device as it is made (``fully_shard`` places it on the mesh's device), so
        no whole copy is ever put on a GPU. The shared critic's head (one row) stays whole on every process, its
        gradient all-reduced. The manifest's ``shards`` counts what each process holds."""
        from torch.distributed.fsdp import FSDPModule

        models = self._models()
        distributed.shard([m for m in models if not isinstance(m, FSDPModule)], from_main=True)
        self.shards = distributed.record_shards(*models, *[m for m in _critic_modules(self) if m not in models])
        self.sharded = True

    def policy_logits(self, input_ids, attention_mask, keep: int, role: str = "policy") -> torch.Tensor:
        model = self.policy if role == "policy" else self.reference
        with autocast(self.device, self.autocast):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           position_ids=encoding.position_ids(attention_mask), logits_to_keep=keep).logits
        return ppo_math.restrict_vocab(logits, self.vocab)

    def policy_with_hidden(self, input_ids, attention_mask, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_hidden(self, self.policy, input_ids, attention_mask, keep)

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        if self.reward is None:
            raise RuntimeError("PPO runs without a reward model (ppo.reward has no reward_model term)")
        with autocast(self.device, self.autocast):
            return heads.sequence_scores(self.reward, input_ids, attention_mask).float()

    def sample(self, input_ids, attention_mask, values: bool = False, **kwargs) -> rollout.Samples:
        head = critics.sampling_head(self.critic, values)
        # sharded: the policy's weights gathered once for the whole rollout, not a unit at a time for every token
        with autocast(self.device, self.autocast), distributed.gathered(self.policy):
            return rollout.decode(self.policy, input_ids, attention_mask, vocab=self.vocab, value_head=head,
                                  **kwargs)

    def parameters(self, role: str) -> list[nn.Parameter]:
        if role == "value":
            return self.critic.parameters() if self.critic is not None else []
        return [p for p in self.policy.parameters() if p.requires_grad]

    def all_parameters(self) -> list[nn.Parameter]:
        models = self._models()
        return [x for m in models + [m for m in _critic_modules(self) if m not in models] for x in m.parameters()]

    def train(self, mode: bool = True) -> None:
        self.policy.train(mode)
        if self.critic is not None:
            self.critic.train(mode)

    def keep_frozen_in(self, dtype: torch.dtype) -> None:
        """Nothing: the frozen reference and reward copies keep their dtype (only SharedBase stores its frozen
        base in the autocast dtype)."""

    def to(self, device) -> None:
        models = self._models()
        for model in models:
            if not self.sharded:  # shards are on this process's device already
                modeling.place(model, device)
        for module in _critic_modules(self):
            if module not in models:  # a head
                module.to(device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights, whole (sharded ones gathered: every process calls it), so a resume checkpoint
        does not depend on how many processes wrote it."""
        weights = distributed.full_state_dict(self.policy) if self.sharded else self.policy.state_dict()
        state = {f"policy.{k}": v.clone() for k, v in weights.items()}
        return {**state, **(self.critic.trainable_state(self.sharded) if self.critic is not None else {})}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        critics.load_copy(self.policy, "policy", state, self.sharded)
        if self.critic is not None:
            self.critic.load_trainable_state(state, self.sharded)
        else:
            critics.no_critic_state(state)

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        """What ``save`` writes (``Run.finish`` checks it): the policy, and the critic's files."""
        return [*methods.saved_files("full"), *(self.critic.saved_files(method) if self.critic is not None else [])]

    def save(self, out: Path) -> None:
        weights = distributed.full_state_dict(self.policy) if self.sharded else None
        if distributed.is_main():
            self.policy.save_pretrained(str(out), state_dict=weights)
        if self.critic is not None:
            self.critic.save(out, self.sharded)


def load(cfg: ModelConfig, method: str, sft_dir: Path | None, rm_dir: Path | None, adapter_cfg=None,
         value_shift: float = 0.0, value_scale: float = 1.0, device: torch.device | str = "cpu",
         mixed_precision: str = "no", critic: str | None = "adapter", vocab: int | None = None,
         shard: bool = False) -> PPOModels:
    """The PPO models in the layout ``method`` calls for, on ``device``, every forward pass under the autocast
    that ``mixed_precision`` ("auto", "bf16" or "no") resolves to (``precision.autocast_dtype``; the models'
    ``autocast`` and ``bf16_speedup`` say what it resolved to). The value head starts as the reward model's score head mapped
    to ``(score - value_shift) / value_scale``, the scale of the rewards PPO optimises; without a reward model
    (``rm_dir`` None) it starts at zero on the policy's weights; ``critic`` names the critic (``critics.KINDS``:
    "shared", a head starting at zero on the policy's hidden state), None for no critic at all.
    ``vocab``: the tokenizer's size (``PPOModels.vocab``). ``shard``: FSDP2 over the processes (full fine-tuning
    only, ``SeparateCopies.shard``)."""
    device = torch.device(device)
    with modeling.loading(f"{sft_dir or 'base'}" + (f" / {rm_dir}" if rm_dir else ""), cfg.base):
        if method_table.kind(method) == "weights":
            models = SeparateCopies(cfg, sft_dir, rm_dir, adapter_cfg, value_shift, value_scale, critic, shard)
        elif shard:
            raise ValueError(f"{method}: PPO shards full copies only (SeparateCopies)")
        else:
            models = SharedBase(cfg, sft_dir, rm_dir, adapter_cfg, value_shift, value_scale, critic)
    models.to(device)
    models.vocab = vocab
    width = getattr(models.config, "hidden_size", 1024)
    models.autocast, models.bf16_speedup = precision.autocast_dtype(
        mixed_precision, bool(cfg.quantization) or cfg.dtype != "float32", device, width)
    if models.autocast is not None:
        models.keep_frozen_in(models.autocast)
    return models
