"""The four models PPO needs: policy, reference, reward and value.

With an adapter method (LoRA, DoRA, QLoRA, IA3) they are four named adapters on ONE base loaded once; every
forward pass selects its adapter first:

- ``policy``     trainable, initialised from the SFT adapter
- ``reference``  the SFT adapter again, frozen
- ``reward``     the reward model's adapter, frozen, read through the reward model's score head
- ``value``      trainable, initialised from the reward model's adapter, read through a value head initialised
                 from the score head

Without a reward model (a reward of scorers alone, ``rlhf.feedback.scorers``) there is no ``reward`` adapter, and the
value adapter starts as the SFT adapter (a fresh one without SFT) under a value head that starts at zero. With the
shared critic (``ppo.critic: shared``, ``critic="shared"``) there is no value adapter either: a value head, starting
at zero, reads the policy's own last hidden state, so one forward pass of the policy gives logits and values
(``policy_and_values``) and the sampling pass gives the rollout's values. With a critic-free advantage estimator
(``ppo.advantage``: grpo, dr_grpo, rloo, reinforce_pp) there is no value adapter or head at all (``critic=None``):
nothing of it is created, trained or saved.

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
from rlhf.ppo import ppo_math, precision
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

    critic: str | None
    """the value model: "adapter" (its own adapter or copy under a value head), "shared" (a value head on the
    policy's last hidden state) or None (a critic-free estimator; ``values`` must not be called)"""

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value head at every position, ``[B, L]`` in float32."""

    def policy_and_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared critic's one pass: the policy's logits of the last ``keep`` positions (as ``policy_logits``)
        and the value head on the same positions' last hidden state, ``([B, keep, vocab], [B, keep])``."""

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward model's score of each whole sequence, ``[B]`` in float32."""

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, values: bool = False,
               **kwargs) -> rollout.Samples:
        """Responses of the policy with their log-probabilities and entropies (``rollout.decode``: sampled with
        per-episode keys, or greedy at temperature 0); with ``values`` (the shared critic) the value of the state
        before each token too."""

    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable parameters of "policy" or "value" (none for "value" without a critic)."""

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


def sampling_head(models, values: bool):
    """What ``rollout.decode`` reads values with (its ``value_head``): with ``values``, the shared critic's head on
    the sampling pass's last hidden states; else None."""
    if values and models.critic != "shared":
        raise RuntimeError("values come from the sampling pass with the shared critic only")
    return (lambda hidden: heads.head_values(models.value_head, hidden)) if values else None


def logits_and_values(models, lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared critic's one pass of the causal LM ``lm`` (the policy): its logits of the last ``keep``
    positions, exactly as ``policy_logits`` computes them (the same forward, asked for its hidden states too), and
    ``models.value_head`` on the same positions' final hidden state (after the last norm: what the LM head
    reads)."""
    with autocast(models.device, models.autocast):
        out = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                 position_ids=encoding.position_ids(attention_mask), logits_to_keep=keep, output_hidden_states=True)
    return (ppo_math.restrict_vocab(out.logits, models.vocab),
            heads.head_values(models.value_head, out.hidden_states[-1][:, -keep:]))


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

    def __init__(self, cfg: ModelConfig, sft_dir: Path | None, rm_dir: Path | None, adapter_cfg=None,
                 value_shift: float = 0.0, value_scale: float = 1.0, critic: str | None = "adapter"):
        from peft import PeftModel, get_peft_model

        base = modeling.load_base(cfg)
        if sft_dir is not None:
            self.model = PeftModel.from_pretrained(base, str(sft_dir), adapter_name="policy", is_trainable=True)
            self.model.load_adapter(str(sft_dir), adapter_name="reference")
        else:  # no SFT: the policy starts as a fresh adapter, the reference is the bare base
            self.model = get_peft_model(base, methods.peft_config(adapter_cfg, "CAUSAL_LM", cfg.base),
                                        adapter_name="policy")
        self.has_reference_adapter = sft_dir is not None
        dtype = base.get_input_embeddings().weight.dtype  # a quantized base keeps its embeddings unquantized
        self.reward_head = self.value_head = None
        self.critic = critic
        if rm_dir is not None:
            with _score_head_apart():
                self.model.load_adapter(str(rm_dir), adapter_name="reward")
            head = heads.score_head_weights(Path(rm_dir))
            self.reward_head = heads.linear_head(head, dtype).requires_grad_(False)
            # the pad token the reward model was trained with: a score is read where its training pooled
            self.reward_pad_id = modeling.load_tokenizer(cfg, str(rm_dir)).pad_token_id
        if critic == "adapter" and rm_dir is not None:
            with _score_head_apart():
                self.model.load_adapter(str(rm_dir), adapter_name="value", is_trainable=True)
            # the value head starts as the score head on the scale PPO's rewards use (normalised when they are)
            self.value_head = heads.linear_head(head, dtype, value_shift, value_scale, bias=True)
        elif critic == "adapter":  # scorers alone: the value model starts from the policy, predicting 0
            if sft_dir is not None:
                self.model.load_adapter(str(sft_dir), adapter_name="value", is_trainable=True)
            else:
                self.model.add_adapter("value", methods.peft_config(adapter_cfg, "CAUSAL_LM", cfg.base))
            self.value_head = heads.zero_head(self.config.hidden_size, dtype)
        elif critic == "shared":  # a head on the policy's hidden state: the score head read another adapter's
            self.value_head = heads.zero_head(self.config.hidden_size, dtype)
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

    def _hidden(self, role, input_ids, attention_mask):
        self.use(role)
        with autocast(self.device, self.autocast):
            return self._backbone()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                    position_ids=encoding.position_ids(attention_mask)).last_hidden_state

    def values(self, input_ids, attention_mask) -> torch.Tensor:
        """Value head output at every position, ``[batch, seq]`` (the head itself in full precision), on the value
        adapter's hidden state, or the policy's with the shared critic."""
        if not self.critic:
            raise RuntimeError("PPO runs without a critic (ppo.advantage is critic-free)")
        hidden = self._hidden("policy" if self.critic == "shared" else "value", input_ids, attention_mask)
        return heads.head_values(self.value_head, hidden)

    def policy_and_values(self, input_ids, attention_mask, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's logits and the shared critic's values of the last ``keep`` positions, from one pass (the
        logits are exactly ``policy_logits``': the same forward, which also returns its hidden states)."""
        self.use("policy")
        return logits_and_values(self, self.model, input_ids, attention_mask, keep)

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        """Reward of each whole sequence, read where the reward model trained (``heads.reward_index``),
        ``[batch]``."""
        if self.reward_head is None:
            raise RuntimeError("PPO runs without a reward model (ppo.reward has no reward_model term)")
        hidden = self._hidden("reward", input_ids, attention_mask)
        index = heads.reward_index(input_ids, attention_mask, self.reward_pad_id)
        last = hidden[torch.arange(len(hidden), device=hidden.device), index]
        return self.reward_head(last.to(self.reward_head.weight.dtype)).squeeze(-1).float()

    def sample(self, input_ids, attention_mask, values: bool = False, **kwargs) -> rollout.Samples:
        """Responses of the policy, with their log-probabilities and entropies (``rollout.decode``), and with
        ``values`` the shared critic's value before each token."""
        self.use("policy")
        with autocast(self.device, self.autocast):
            return rollout.decode(self.model, input_ids, attention_mask, vocab=self.vocab,
                                  value_head=sampling_head(self, values), **kwargs)

    # -- training and saving -----------------------------------------------------------------------------------
    def parameters(self, role: str) -> list[nn.Parameter]:
        """The trainable parameters of ``policy`` or ``value`` (the value head included)."""
        params = [p for n, p in self.model.named_parameters() if f".{role}." in n or n.endswith(f".{role}")]
        if role == "value" and self.critic:
            params += list(self.value_head.parameters())
        return params

    def all_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters()) + (list(self.value_head.parameters()) if self.critic else [])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.critic:
            self.value_head.train(mode)

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
        for head in (self.reward_head, self.value_head):
            if head is not None:
                head.to(device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything PPO changes: the policy and value adapters and the value head (for resume checkpoints)."""
        state = {k: v for k, v in self.model.state_dict().items() if ".policy." in k or ".value." in k}
        if self.critic:
            state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        head = {k[len("value_head."):]: v for k, v in state.items() if k.startswith("value_head.")}
        if self.critic:
            self.value_head.load_state_dict(head)
        elif head:
            raise UserError("resume checkpoint holds a value head, but this run has no critic (ppo.advantage)")
        missing = self.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("value_head.")},
                                             strict=False)
        if missing.unexpected_keys:
            raise UserError(f"resume checkpoint does not fit the model (e.g. {missing.unexpected_keys[0]})")

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        """What ``save`` writes (``Run.finish`` checks it): the policy adapter, and the critic's adapter and head
        or head alone."""
        critic = {"adapter": [*methods.saved_files(method, "value"), ("value/value_head.safetensors",)],
                  "shared": [("value/value_head.safetensors",)]}.get(self.critic, [])
        return [*methods.saved_files(method), *critic]

    def save(self, out: Path) -> None:
        """Policy adapter files at ``out`` (loadable by plain peft on the base); the value adapter and head in
        ``out/value`` with the adapter critic, the head alone with the shared one; written by the main process."""
        if not distributed.is_main():
            return
        tmp = out / ".adapters"
        adapter = self.critic == "adapter"
        self.model.save_pretrained(str(tmp), selected_adapters=["policy", "value"] if adapter else ["policy"])
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp / "policy" / name).replace(out / name)
        if adapter:
            (tmp / "value").replace(out / "value")
        tmp.joinpath("policy").rmdir()
        for leftover in tmp.iterdir():  # peft writes a README next to the adapters
            leftover.unlink() if leftover.is_file() else None
        tmp.rmdir()
        if self.critic:
            heads.save_value_head(self.value_head, out, self.critic)


class SeparateCopies:
    """Policy, reference, reward and value as four full models (full fine-tuning; a ``PPOModels``), each whole on
    every process (data parallel) or, under an FSDP config, sharded over the processes (``shard``)."""

    autocast: torch.dtype | None = None
    bf16_speedup: float | None = None
    repeatable: bool | None = None
    vocab: int | None = None
    sharded = False

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
        self.policy = load(AutoModelForCausalLM, str(sft_dir) if sft_dir else cfg.base, dtype=dtype,
                           use_safetensors=True, **kwargs)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        if shard:  # sharded at once: fewer whole copies held at the same time while loading
            distributed.shard([self.reference], from_main=True)
        self.reward = self.value = self.value_head = None
        self.critic = critic
        if rm_dir is not None:
            self.reward = load(AutoModelForSequenceClassification, str(rm_dir), dtype=dtype, num_labels=1,
                               use_safetensors=True, **kwargs)
            self.reward.requires_grad_(False).eval()
        if critic == "shared":  # a head on the policy's hidden state
            dtype = self.policy.get_input_embeddings().weight.dtype
            self.value_head = heads.zero_head(self.policy.config.hidden_size, dtype)
        elif critic and rm_dir is not None:
            self.value = copy.deepcopy(self.reward).requires_grad_(True)
            head = heads.score_head(self.value)
            weights = {k: v.detach().clone() for k, v in head.state_dict().items()}
            self.value.score = heads.linear_head(weights, head.weight.dtype, value_shift, value_scale, bias=True)
        elif critic:  # scorers alone: the value model starts from the policy, predicting 0
            self.value = load(AutoModelForSequenceClassification, str(sft_dir) if sft_dir else cfg.base, dtype=dtype,
                              num_labels=1, use_safetensors=True, **kwargs)
            if self.value.config.pad_token_id is None:
                self.value.config.pad_token_id = self.policy.config.pad_token_id
            self.value.score = heads.zero_head(self.value.config.hidden_size,
                                          heads.score_head(self.value).weight.dtype)
        if adapter_cfg is not None and adapter_cfg.method != "full":  # bitfit / freeze: the same weights as in SFT
            methods.prepare(self.policy, adapter_cfg, "CAUSAL_LM")
            if self.value is not None:
                methods.prepare(self.value, adapter_cfg, "SEQ_CLS")
        if shard:
            self.shard()

    @property
    def device(self):
        return self.policy.device

    @property
    def config(self):
        return self.policy.config

    def shard(self) -> None:
        """FSDP2 over every process (``distributed.shard``): the policy and value models, whose gradients and Adam
        state are then sharded too, and the frozen reference (sharded as soon as it is copied) and reward copies.
        Each shard goes to this process's device as it is made (``fully_shard`` places it on the mesh's device), so
        no whole copy is ever put on a GPU. The shared critic's head (one row) stays whole on every process, its
        gradient all-reduced. The manifest's ``shards`` counts what each process holds."""
        from torch.distributed.fsdp import FSDPModule

        models = [m for m in (self.policy, self.reference, self.reward, self.value) if m is not None]
        distributed.shard([m for m in models if not isinstance(m, FSDPModule)], from_main=True)
        distributed.record_shards(*models, *([self.value_head] if self.value_head is not None else []))
        self.sharded = True

    def policy_logits(self, input_ids, attention_mask, keep: int, role: str = "policy") -> torch.Tensor:
        model = self.policy if role == "policy" else self.reference
        with autocast(self.device, self.autocast):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           position_ids=encoding.position_ids(attention_mask), logits_to_keep=keep).logits
        return ppo_math.restrict_vocab(logits, self.vocab)

    def values(self, input_ids, attention_mask) -> torch.Tensor:
        if not self.critic:
            raise RuntimeError("PPO runs without a critic (ppo.advantage is critic-free)")
        if self.critic == "shared":
            return self.policy_and_values(input_ids, attention_mask, input_ids.shape[1])[1]
        with autocast(self.device, self.autocast):
            return heads.token_scores(self.value, input_ids, attention_mask).float()

    def policy_and_values(self, input_ids, attention_mask, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_values(self, self.policy, input_ids, attention_mask, keep)

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        if self.reward is None:
            raise RuntimeError("PPO runs without a reward model (ppo.reward has no reward_model term)")
        with autocast(self.device, self.autocast):
            return heads.sequence_scores(self.reward, input_ids, attention_mask).float()

    def sample(self, input_ids, attention_mask, values: bool = False, **kwargs) -> rollout.Samples:
        head = sampling_head(self, values)
        # sharded: the policy's weights gathered once for the whole rollout, not a unit at a time for every token
        with autocast(self.device, self.autocast), distributed.gathered(self.policy):
            return rollout.decode(self.policy, input_ids, attention_mask, vocab=self.vocab, value_head=head,
                                  **kwargs)

    def parameters(self, role: str) -> list[nn.Parameter]:
        model = self.policy if role == "policy" else self.value if self.value is not None else self.value_head
        return [p for p in model.parameters() if p.requires_grad] if model is not None else []

    def all_parameters(self) -> list[nn.Parameter]:
        return [x for m in (self.policy, self.reference, self.reward, self.value, self.value_head) if m is not None
                for x in m.parameters()]

    def train(self, mode: bool = True) -> None:
        for model in (self.policy, self.value, self.value_head):
            if model is not None:
                model.train(mode)

    def keep_frozen_in(self, dtype: torch.dtype) -> None:
        """Nothing: the frozen reference and reward copies keep their dtype (only SharedBase stores its frozen
        base in the autocast dtype)."""

    def to(self, device) -> None:
        for model in (self.policy, self.reference, self.reward, self.value):
            if model is not None and not self.sharded:  # shards are on this process's device already
                modeling.place(model, device)
        if self.value_head is not None:
            self.value_head.to(device)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained weights, whole (sharded ones gathered: every process calls it), so a resume checkpoint
        does not depend on how many processes wrote it."""
        state = {}
        for name, model in (("policy", self.policy), ("value", self.value), ("value_head", self.value_head)):
            if model is not None:
                weights = distributed.full_state_dict(model) if self.sharded else model.state_dict()
                state.update({f"{name}.{k}": v.clone() for k, v in weights.items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, model in (("policy", self.policy), ("value", self.value), ("value_head", self.value_head)):
            if model is None:
                continue
            weights = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if self.sharded:  # each process keeps its shard of the whole weights
                own = model.state_dict(keep_vars=True)
                weights = {k: distributed.shard_like(v, own[k]) for k, v in weights.items() if k in own}
            model.load_state_dict(weights, strict=name == "value_head")

    def saved_files(self, method: str) -> list[tuple[str, ...]]:
        """What ``save`` writes (``Run.finish`` checks it): the policy, and the value model or the shared critic's
        head."""
        critic = (methods.saved_files("full", "value") if self.value is not None else
                  [("value/value_head.safetensors",)] if self.value_head is not None else [])
        return [*methods.saved_files("full"), *critic]

    def save(self, out: Path) -> None:
        for model, where in ((self.policy, out), (self.value, out / "value")):
            if model is not None:
                weights = distributed.full_state_dict(model) if self.sharded else None
                if distributed.is_main():
                    model.save_pretrained(str(where), state_dict=weights)
        if self.value_head is not None and distributed.is_main():
            heads.save_value_head(self.value_head, out, "shared")


def load(cfg: ModelConfig, method: str, sft_dir: Path | None, rm_dir: Path | None, adapter_cfg=None,
         value_shift: float = 0.0, value_scale: float = 1.0, device: torch.device | str = "cpu",
         mixed_precision: str = "no", critic: str | None = "adapter", vocab: int | None = None,
         shard: bool = False) -> PPOModels:
    """The PPO models in the layout ``method`` calls for, on ``device``, every forward pass under the autocast
    that ``mixed_precision`` ("auto", "bf16" or "no") resolves to (``precision.autocast_dtype``; the models' ``autocast``
    and ``bf16_speedup`` say what it resolved to). The value head starts as the reward model's score head mapped
    to ``(score - value_shift) / value_scale``, the scale of the rewards PPO optimises; without a reward model
    (``rm_dir`` None) it starts at zero on the policy's weights; ``critic`` "shared": a head starting at zero on the
    policy's hidden state; None: no value model at all.
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
