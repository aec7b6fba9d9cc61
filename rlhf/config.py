"""Recipes: one YAML file describes a whole run; each section maps onto one dataclass below.

Loading checks every key and type against these dataclasses, then each section's values (its ``validate``) and the
combinations between sections (``Recipe.validate``); any problem is a ``UserError`` naming the file and the key.
Where a default differs from the upstream library's, the field's docstring names the upstream one. This module
needs no torch (the method table it checks against is plain data, ``rlhf.models.method_table``).

``--set section.key=value`` overrides one key (the value is read as YAML, so ``--set sft.lr=1e-4`` is a number and
``--set adapter.target_modules=[q_proj,v_proj]`` a list).
Relative paths in a recipe are resolved against the current directory, as they are on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.models import method_table
from rlhf.names import is_local
from rlhf.errors import UserError

TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass
class ModelConfig:
    base: str = "data/tiny-base"
    """the base causal LM: a local directory or a hub id (the hub is only reached when the id is not a local path)"""
    revision: str | None = None
    """hub revision (branch, tag or commit) of the base; None for the default branch"""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """dtype the base weights are loaded in; "auto" uses the checkpoint's own dtype"""
    trust_remote_code: bool = False
    """allow the base to run code from its repository; off unless you trust the source"""
    attn_implementation: str | None = None
    """attention kernel passed to transformers ("sdpa", "eager", "flash_attention_2"); None lets it choose"""
    quantization: Literal["4bit", "8bit"] | None = None
    """load the frozen base quantized through bitsandbytes: "4bit" (NF4, double quantization; adapter.method qlora
    sets it), "8bit" (LLM.int8), or None for full precision. Only methods that keep the base frozen allow it"""
    untrained_rows: Literal["reinit", "keep"] = "reinit"
    """embedding rows the base never trained (a Llama 3 base's chat markers are zero rows; the tiny base's markers,
    unused bytes and padding rows sit in one cluster): "reinit" sets them, at every load, to the mean of the
    trained rows plus their spread (``modeling.reinit_untrained_rows``), "keep" leaves them. Adapters (LoRA) never
    train these rows, and left as they are they take probability at positions the base never saw"""


def model_config_of(manifest: dict, **override) -> ModelConfig:
    """The model configuration a run was trained with (runs from before ``untrained_rows`` existed: "keep")."""
    return ModelConfig(**{"untrained_rows": "keep", **manifest["recipe"]["model"], **override})


@dataclass
class AdapterConfig:
    """How the base is fine-tuned. ``rlhf methods`` prints which method each stage supports."""

    method: Literal["lora", "dora", "qlora", "ia3", "adalora", "prefix", "prompt", "ptuning", "ptuning_v2",
                    "adapter", "bitfit", "freeze", "full"] = "lora"
    """lora | dora (weight-decomposed LoRA) | qlora (LoRA on a 4-bit NF4 base) | ia3 | adalora | prefix (prefix
    tuning, reparameterised) | prompt (prompt tuning) | ptuning (P-Tuning prompt encoder) | ptuning_v2 (deep
    prompts, no encoder) | adapter (Houlsby bottleneck adapters) | bitfit (biases only) | freeze (top layers only)
    | full (every weight). LoRA on an 8-bit base is lora with model.quantization: 8bit"""
    r: int = 16
    """LoRA/DoRA/QLoRA rank; AdaLoRA's starting rank"""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)"""
    dropout: float = 0.05
    """dropout on the adapter input (LoRA family, adapter); peft's default is 0.0"""
    target_modules: str | list[str] = "all-linear"
    """modules that get adapters (LoRA family, ia3, adalora): "all-linear" (every Linear but the output head) or a
    list of module names. For method adapter, "all-linear" means each block's attention output and MLP output"""
    target_r: int = 8
    """AdaLoRA: average rank left after the rank budget is pruned (starts from r)"""
    num_virtual_tokens: int = 16
    """prefix, prompt, ptuning, ptuning_v2: number of virtual tokens"""
    prompt_init: Literal["random", "text"] = "random"
    """prompt: initialise the soft prompt randomly, or from the embeddings of prompt_init_text"""
    prompt_init_text: str | None = None
    """prompt with prompt_init text: the text whose token embeddings start the soft prompt"""
    encoder: Literal["mlp", "lstm"] = "mlp"
    """ptuning: the prompt encoder that reparameterises the virtual tokens"""
    encoder_hidden_size: int | None = None
    """prefix, ptuning: hidden width of the reparameterisation network; None uses the model's hidden size"""
    bottleneck_size: int = 64
    """adapter: width of each Houlsby bottleneck (down-projection size)"""
    freeze_layers: int = 2
    """freeze: number of top transformer blocks that train (the rest stay frozen)"""
    trainable_modules: list[str] = field(default_factory=list)
    """freeze: names (or name fragments) of further modules that train, e.g. [norm, lm_head]"""

    def validate(self, where: str) -> None:
        """This method's options (the fit with model.quantization is ``Recipe.validate``'s)."""
        fail = _failer(where, "adapter")
        if self.method in ("lora", "dora", "qlora", "adalora"):
            _require(fail, self, ("r", "alpha"))
        if self.method == "adalora" and not 0 < self.target_r <= self.r:
            fail("target_r", f"must be between 1 and adapter.r ({self.r}), got {self.target_r}")
        if not 0 <= self.dropout < 1:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            fail("target_modules", f'must be "all-linear" or a list of module names, got {self.target_modules!r}')
        if isinstance(self.target_modules, list) and not self.target_modules:
            fail("target_modules", "must not be empty")
        _require(fail, self, ("num_virtual_tokens", "bottleneck_size", "freeze_layers"))
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            fail("encoder_hidden_size", f"must be positive (or null), got {self.encoder_hidden_size}")
        if self.method == "prompt" and self.prompt_init == "text" and not self.prompt_init_text:
            fail("prompt_init_text", "is required when adapter.prompt_init is text")


@dataclass
class DataConfig:
    sft: str | None = None
    """SFT demonstrations: a .jsonl/.json/.csv/.parquet file, a folder of them, or a hub dataset id"""
    sft_format: Literal["auto", "prompt_completion", "messages", "alpaca", "sharegpt"] = "auto"
    """format of the SFT rows; "auto" detects it from the first row's fields"""
    preference: str | None = None
    """the reward model's data: ranked pairs, or rankings of K responses per prompt (same kinds of source as
    data.sft; rlhf/text/formats.py lists the formats)"""
    preference_format: Literal["auto", "prompt_chosen_rejected", "implicit_prompt", "alpaca", "sharegpt",
                               "responses", "completions", "argilla"] = "auto"
    """format of the preference rows (pairs or rankings); "auto" detects it from the first row's fields"""
    eval_preference: str | None = None
    """held-out pairs or rankings for reward-model accuracy; without it, rm.eval_fraction of data.preference is
    held out"""
    prompts: str | None = None
    """prompts for PPO rollouts (same kinds of source as data.sft)"""
    eval_prompts: str | None = None
    """held-out prompts for evaluation, never trained on"""
    columns: dict[str, str] = field(default_factory=dict)
    """renames applied to every row before format detection, source name -> expected name (e.g. {question: prompt})"""
    split: str = "train"
    """split read from hub datasets"""
    on_bad_row: Literal["error", "drop"] = "error"
    """a malformed row stops the run with its file and line ("error"), or is dropped and counted ("drop")"""


@dataclass
class TrainConfig:
    """The optimisation loop every trainer-based stage shares; each stage's section extends it."""

    lr: float = 2e-4
    """peak learning rate (AdamW); TRL's SFTConfig default is 2e-5, for full fine-tuning: LoRA wants ~10x more"""
    batch_size: int = 16
    """sequences (SFT), pairs or rankings (RM) per optimizer step on one process, before gradient accumulation"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step"""
    epochs: float = 1.0
    """passes over the training rows (ignored when max_steps is set)"""
    max_steps: int | None = None
    """optimizer steps to run; overrides epochs"""
    max_length: int = 512
    """prompt + response tokens kept per sequence (at most the model's positions). SFT truncates longer rows; the
    reward model leaves out longer pairs (rm.on_too_long), in training and in every later score. TRL's SFTConfig
    and RewardConfig default to 1024"""
    warmup_ratio: float = 0.03
    """fraction of the steps spent warming the learning rate up from 0"""
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    """learning-rate schedule after warm-up (transformers' TrainingArguments default: linear)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (global L2 norm)"""
    eval_fraction: float = 0.05
    """fraction of the rows held out for evaluation when no separate evaluation file is given (0 to disable)"""
    eval_every: int = 50
    """optimizer steps between evaluations"""
    logging_every: int = 10
    """optimizer steps between lines in metrics.jsonl"""
    save_every: int = 0
    """optimizer steps between resume checkpoints (optimizer, scheduler, RNG, data position); 0 keeps none"""
    keep_checkpoints: int = 2
    """resume checkpoints kept (older ones are pruned)"""
    max_nonfinite: int = 3
    """optimizer steps in a row whose loss or gradient is NaN/inf that are skipped before the run stops"""
    seed: int = 42
    """seed for initialisation, data order and the held-out split"""

    def validate(self, where: str, section: str) -> None:
        fail = _failer(where, section)
        _require(fail, self, ("batch_size", "grad_accum", "max_length", "eval_every", "logging_every", "lr", "epochs",
                              "max_grad_norm", "keep_checkpoints", "max_nonfinite"))
        if self.max_steps is not None and self.max_steps <= 0:
            fail("max_steps", f"must be positive (or null to use epochs), got {self.max_steps}")
        if self.save_every < 0:
            fail("save_every", f"must be 0 (no resume checkpoints) or positive, got {self.save_every}")
        if not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 0.5:
            fail("eval_fraction", f"must be in [0, 0.5), got {self.eval_fraction}")


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: TrainConfig's loop, loss on response tokens only (longer rows are truncated)."""


@dataclass
class RMConfig(TrainConfig):
    """Reward-model training: TrainConfig's loop with the Bradley-Terry pairwise loss, or on rankings the
    InstructGPT loss over all comparisons of a prompt."""

    lr: float = 1e-4
    """peak learning rate (AdamW); TRL's RewardConfig default too"""
    center_rewards_coefficient: float | None = None
    """weight of the auxiliary loss that pulls mean rewards to 0 (Eisenstein et al. 2023); None disables it"""
    comparisons: Literal["grouped", "shuffled"] = "grouped"
    """rankings of K responses: all C(K,2) comparisons of a prompt as one batch element, K forward passes
    (InstructGPT, Ouyang et al. 2022 section 3.5), or each comparison as an independent shuffled pair. Pair data
    is the same either way"""
    on_too_long: Literal["error", "drop"] = "drop"
    """pairs longer than max_length: stop with an error, or drop them (they are counted in the manifest)"""
    stats_samples: int = 2000
    """training responses scored after training for the reward mean and std that PPO normalises with (a fixed
    random sample; 0 for all of them)"""


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation (Rafailov et al. 2023) of the SFT policy on preference pairs (a ranking of K
    gives its C(K,2) comparisons as pairs), against the frozen SFT policy as the reference: TRL's DPOTrainer for
    the losses with a reference, TRL's CPOTrainer for SimPO (reference-free). ``batch_size`` counts pairs."""

    lr: float = 5e-5
    """peak learning rate (AdamW); TRL's DPOConfig default is 1e-6, for full fine-tuning: LoRA wants more"""
    max_length: int = 512
    """prompt + response tokens; pairs with either side longer are left out (counted; dpo.on_too_long)"""
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = "sigmoid"
    """sigmoid = DPO's -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)); ipo = IPO's squared loss
    towards 1 / (2 beta) on per-token log-ratios (Azar et al. 2023); hinge = SLiC's max(0, 1 - beta * delta);
    robust = DPO assuming labels flip with probability label_smoothing (Chowdhury et al. 2024); simpo = SimPO,
    reference-free: -log sigmoid(beta * (mean chosen log-prob - mean rejected log-prob) - simpo_gamma) (Meng et
    al. 2024; no reference model is used)"""
    beta: float = 0.1
    """the inverse temperature of the implicit reward (IPO: its regularisation tau; SimPO: its reward scale, the
    paper uses 2-10); TRL's default too"""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin (TRL's default)"""
    label_smoothing: float = 0.0
    """robust: the assumed probability that a preference label is flipped, in [0, 0.5)"""
    on_too_long: Literal["error", "drop"] = "drop"
    """pairs longer than max_length: stop with an error, or drop them (they are counted in the manifest)"""

    def validate(self, where: str, section: str = "dpo") -> None:
        super().validate(where, section)
        fail = _failer(where, section)
        _require(fail, self, ("beta",))
        if not 0 <= self.label_smoothing < 0.5:
            fail("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "robust":
            fail("label_smoothing", f"applies to loss robust only (dpo.loss is {self.loss})")

    @property
    def reference_free(self) -> bool:
        """Whether the loss uses no reference model (SimPO)."""
        return self.loss == "simpo"


VF_COEF = {"adapter": 0.1, "shared": 0.01}
"""each critic's own value-loss weight (``ppo.vf_coef`` unset): the shared critic's value gradient shares the
policy adapter and its clipping budget, so it takes less (docs/ppo.md)"""


@dataclass
class PPOConfig:
    """PPO against the reward model, with a KL penalty to the frozen SFT reference.

    Sizes: each step samples ``batch_size`` episodes (the rollout: ``batch_size / samples_per_prompt`` prompts,
    ``samples_per_prompt`` responses each), then makes ``ppo_epochs`` passes over it in mini-batches of
    ``mini_batch_size`` (one optimizer step each), each mini-batch split into micro-batches of
    ``micro_batch_size`` for gradient accumulation. All three sizes count episodes on ONE process: with N
    processes a step has N x batch_size episodes, and each optimizer step sees N x mini_batch_size of them.
    Defaults follow the reference implementations (clip 0.2, value clip 0.2, gamma 1, lambda 0.95, 4 PPO epochs).

    ``advantage`` picks the estimator: ``gae`` is PPO with a critic (``critic``: a value adapter + head, or a
    head on the policy's hidden state; GAE); ``grpo``, ``dr_grpo``, ``rloo`` and ``reinforce_pp`` are critic-free
    (no value model is created, trained or saved; value_clip, vf_coef and lam do not apply). The maths of each is
    in ``rlhf.ppo.ppo_math``.
    """

    # -- sizes: what a step samples and how the update splits it
    batch_size: int = 64
    """episodes (responses) per PPO step on one process (N processes: N x batch_size per step), drawn for
    batch_size / samples_per_prompt prompts"""
    samples_per_prompt: int = 1
    """K: responses sampled for each prompt of a step, each with its own key (deterministic: resume and several
    processes sample the same ones); must divide batch_size. grpo, dr_grpo and rloo compare a prompt's K responses with
    each other and need K >= 2 (4 to 16 in the papers)"""
    mini_batch_size: int = 16
    """episodes per optimizer step on one process; must divide batch_size"""
    micro_batch_size: int = 8
    """episodes per forward/backward pass (gradient accumulation); must divide mini_batch_size"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""

    # -- sampling: what each step generates
    max_new_tokens: int = 48
    """longest response sampled"""
    min_new_tokens: int = 0
    """EOS is not sampled before this many response tokens (0: off). For fixed-length benchmarks like TRL's
    (`response_length`); the tokens are then drawn from the policy with EOS masked out, a small departure from
    on-policy sampling"""
    max_prompt_length: int = 256
    """longest prompt in tokens; longer prompts are left out (counted, and the manifest records how many).
    max_prompt_length + max_new_tokens must fit the model's positions"""
    temperature: float = 1.0
    """sampling temperature; log-probabilities are computed at the same temperature"""
    drop_flat_groups: bool = False
    """DAPO's dynamic sampling: a prompt whose K responses all got the same score carries no signal for a group
    estimator; its slot in the step is refilled with the next prompt's K responses (sampled and scored), up to
    resample_rounds times, so the step trains on batch_size episodes from informative groups. Slots still flat
    after that train as they are (objective/flat_groups counts them, objective/resampled the refills). Needs
    samples_per_prompt >= 2; resume and several processes sample what one uninterrupted process would"""
    resample_rounds: int = 3
    """the most refill rounds per step with drop_flat_groups (each samples only the slots still flat), at most 100;
    a step also stops refilling once it has tried every prompt of the set, and a step left with every group flat
    says that it trains on nothing"""

    # -- reward: what PPO maximises, and how the score is shaped
    reward: dict[str, float] = field(default_factory=lambda: {"reward_model": 1.0})
    """what PPO maximises, a weighted sum: ``reward_model`` weighs the reward model's score (normalised when
    ppo.normalize_reward), any other key is a scorer (rlhf/feedback/scorers.py: a built-in name such as gold, or
    package.module:function, or file.py:function) weighing its value as it is. Without a reward_model term PPO
    needs no reward model (RL against verifiable rewards). A scorer's None ("does not apply") adds 0"""
    normalize_reward: bool = True
    """standardise the reward model's score with its stored mean and std (from its manifest)"""
    reward_clip: float | None = 5.0
    """clip the total score to [-reward_clip, reward_clip] (after the missing-EOS penalty); None to disable"""
    missing_eos_penalty: float | None = 1.0
    """subtracted from the total score of a response that never emits EOS; None to disable. TRL 0.28's PPOConfig
    default is None (its examples pass 1.0)"""
    overlong_buffer: int = 0
    """DAPO's overlong shaping: the last this many tokens before max_new_tokens cost a penalty growing linearly to
    overlong_penalty at the limit, added to the score (0: off). Separate from missing_eos_penalty, which is flat
    and for responses that never end"""
    overlong_penalty: float = 1.0
    """the overlong shaping's penalty at max_new_tokens"""

    # -- KL to the reference
    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty (initial value when adaptive)"""
    kl_estimator: Literal["k1", "k3"] | None = None
    """the per-token KL estimate: k1 = log pi - log pi_ref, k3 = (r - 1) - log r with r = pi_ref / pi; None
    picks k1 for the KL in the reward and k3 for the KL as a loss term (k1's gradient as a loss is zero in
    expectation, so k1 with kl_in: loss is refused)"""
    kl_in: Literal["reward", "loss"] | None = None
    """where the KL penalty acts: "reward" subtracts beta * KL from the rewards (per token for gae and
    reinforce_pp, summed over the response for grpo, dr_grpo and rloo); "loss" adds beta * the KL, aggregated
    like the policy loss, differentiated through the policy (GRPO's way). None: the estimator's own (loss for
    grpo and dr_grpo, reward for the others)"""
    adaptive_kl: bool = False
    """adapt beta towards kl_target (Ziegler et al.); fixed when false"""
    kl_target: float = 6.0
    """target sequence KL for the adaptive controller, in nats"""
    kl_horizon: float = 10000.0
    """horizon of the adaptive controller, in episodes"""
    kl_budget: float | None = None
    """the mean sequence KL to the reference the run is meant to end within, in nats: the manifest records
    whether it did and a warning is printed when not; None for no budget"""

    # -- estimator and objective
    advantage: Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"] = "gae"
    """the advantage estimator: gae = PPO with a critic (Schulman et al. 2016); grpo = a response's reward
    standardised within its prompt's group of K (Shao et al. 2024); dr_grpo = its reward minus the group's mean,
    without GRPO's division by the group's std (Liu et al. 2025); rloo = its reward minus the mean reward of
    the K - 1 others (Ahmadian et al. 2024); reinforce_pp = per-token KL-shaped returns normalised over the whole
    batch, minus the group's mean score first when K > 1 (Hu 2025). Critic-free estimators need no value model:
    less memory and about half the update work"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0, std 1 over the batch's response tokens (gae and rloo; grpo standardises
    within each group, dr_grpo deliberately does not, and reinforce_pp normalises over the batch by
    definition)"""
    policy_loss: Literal["ppo", "gspo", "cispo"] = "ppo"
    """the policy objective: ppo = the clipped surrogate on token ratios; gspo = the same on each response's
    length-normalised sequence ratio (Zheng et al. 2025; its epsilons are a few 1e-4: clip_low/clip_high default
    to the paper's 3e-4/4e-4); cispo = a clipped, non-differentiated importance weight times A times log pi, so no
    token's gradient is dropped (MiniMax-M1 2025; clip_low defaults to 1, no lower bound, clip_high to 4, a
    weight of at most 5 as in ScaleRL). The equations are in rlhf/ppo/ppo_math.py and docs/ppo.md"""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                              "seq_mean_token_sum_norm"] | None = None
    """how per-token losses (policy, entropy, KL as a loss) become one: token_mean = over all tokens of the
    mini-batch (DAPO); seq_mean_token_mean = each response's token mean, averaged (GRPO's paper, GSPO);
    seq_mean_token_sum = each response's token sum, averaged; seq_mean_token_sum_norm = that over the constant
    max_new_tokens (Dr. GRPO). None: the objective's own (seq_mean_token_mean for gspo,
    seq_mean_token_sum_norm for dr_grpo, token_mean otherwise). Over micro-batches and processes it is what one
    process holding the mini-batch would compute"""
    clip: float = 0.2
    """surrogate clipping epsilon"""
    clip_low: float | None = None
    """the surrogate's lower clip, ratio >= 1 - clip_low, at most 1; None: ppo.clip (gspo: 3e-4, cispo: 1, no lower
    bound). Each of clip_low and clip_high left null keeps the objective's own default: setting clip_low alone
    leaves clip_high at ppo.clip (gspo: 4e-4, cispo: 4), not at clip_low"""
    clip_high: float | None = None
    """the upper clip, ratio <= 1 + clip_high, at most 100; above clip_low it is DAPO's clip-higher (0.28 with
    clip_low 0.2); None: ppo.clip (gspo: 4e-4, cispo: 4)"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus"""
    early_stop_kl: float | None = None
    """stop the remaining PPO epochs of a step once the mean approximate KL passes this; None to disable"""

    # -- critic (gae only)
    critic: Literal["adapter", "shared"] = "adapter"
    """gae's critic: adapter = a value adapter of its own on the base, under a value head (started from the reward
    model's adapter and score head), with its own forward and backward passes; shared = a value head on the
    policy's own last hidden state (TRL <= 0.11's value-head model): the policy's forward gives logits and values
    at once, the rollout's values come from the sampling pass, and the value loss (times vf_coef) trains the
    policy adapter too. About half the update's work; the head starts at zero. Ignored by critic-free
    estimators"""
    vf_coef: float | None = None
    """weight of the value loss; None: the critic's own, 0.1 with the adapter critic (the weight scales only the
    value adapter's gradient) and 0.01 with the shared critic, whose value-loss gradient shares the policy
    adapter and its clipping budget (on the tiny world 0.1 there cost style and doubled the KL; docs/ppo.md)"""
    value_clip: float = 0.2
    """value clipping epsilon"""

    # -- agents: multi-turn episodes with tools (docs/agents.md)
    environment: str | None = None
    """an environment whose tools the policy may call over several turns: FILE.py:Class, package.module:Class or a
    built-in (tiny:calculator), a class written to TRL's environment_factory contract (rlhf/engine/environments.py).
    null: one response per prompt. max_new_tokens then bounds each turn"""
    max_turns: int = 4
    """assistant turns per episode at most (a call in the last one is not run)"""
    max_episode_tokens: int = 256
    """tokens after the prompt per episode at most, sampled and written by the environment together"""
    tool_timeout: float = 5.0
    """seconds a tool call may take; past it the model reads that it timed out (counted as agent/tool_timeout)"""
    max_tool_output: int = 1000
    """characters of a tool's result the model reads; the rest is cut and said to be cut"""
    turn_gamma: float = 1.0
    """the discount from one turn of an episode to the next: each turn's advantage reads the rewards of the turns
    after it discounted by this per turn. With an environment that rewards turns (get_turn_reward), or below 1, the
    critic-free estimators work per turn with a baseline at each turn index (docs/agents.md)"""

    # -- schedule, optimisation, precision and checkpoints
    lr: float = 1e-5
    """learning rate for the policy and value adapters (AdamW, constant); TRL 0.28's PPOConfig default is 3e-6,
    for full fine-tuning"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold, applied to the policy and the value parameters separately"""
    epochs: float = 1.0
    """passes over the prompt set (ignored when max_steps is set)"""
    max_steps: int | None = None
    """PPO steps (rollout + update) to run; overrides epochs"""
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    """bf16 autocast for every forward and backward pass of the loop (weights and optimizer stay fp32): "auto"
    uses it for an fp32, unquantized base on a GPU with bf16, or on a CPU where bf16 matrix products measured at
    least 1.3x faster than fp32 (AMX CPUs: ~4x; AVX512-BF16 without AMX: 0.55x-2.3x; measured once per machine and
    kept in ~/.cache/rlhf), and only where PPO's passes in bf16 give the same bits twice (checked before the first
    step; else fp32, so runs repeat and resume bit for bit); "bf16" forces it; "no" keeps everything fp32. The
    manifest records the choice, the measurement and whether the passes repeat (``repeatable``)"""
    eval_every: int = 10
    """PPO steps between reward and gold evaluations on a sample of held-out prompts (0 to disable)"""
    eval_samples: int = 64
    """held-out prompts used by those evaluations (greedy)"""
    save_every: int = 0
    """PPO steps between resume checkpoints (adapters, optimizer, KL controller, RNG, data position), each also
    saving the policy under checkpoints/ in the output for later evaluation; 0 keeps none"""
    keep_checkpoints: int = 2
    """resume checkpoints kept (older ones are pruned; the policy snapshots under checkpoints/ all stay)"""
    max_nonfinite: int = 3
    """PPO steps in a row with a NaN/inf reward, loss or gradient (whose updates are skipped) before the run
    stops"""
    seed: int = 42
    """seed for sampling, shuffling and initialisation"""

    def global_batch(self, processes: int = 1) -> int:
        """Episodes per PPO step on ``processes`` processes (each samples batch_size)."""
        return self.batch_size * processes

    def prompts_per_step(self, processes: int = 1) -> int:
        """Prompts per PPO step on ``processes`` processes (each answered samples_per_prompt times)."""
        return self.batch_size // self.samples_per_prompt * processes

    @property
    def value_model(self) -> str | None:
        """The critic the run trains: "adapter" or "shared" (``critic``) with gae, None with a critic-free
        estimator."""
        return self.critic if self.advantage == "gae" else None

    @property
    def value_coef(self) -> float:
        """The value loss's weight: ``vf_coef``, or the critic's own."""
        return self.vf_coef if self.vf_coef is not None else VF_COEF[self.critic]

    @property
    def kl_where(self) -> str:
        """Where the KL penalty acts: ``kl_in``, or the estimator's own."""
        return self.kl_in or ("loss" if self.advantage in ("grpo", "dr_grpo") else "reward")

    @property
    def aggregation(self) -> str:
        """How per-token losses become one: ``loss_aggregation``, or the objective's own."""
        return self.loss_aggregation or ("seq_mean_token_mean" if self.policy_loss == "gspo" else
                                         "seq_mean_token_sum_norm" if self.advantage == "dr_grpo" else "token_mean")

    @property
    def clip_range(self) -> tuple[float, float]:
        """(eps_low, eps_high): ``clip_low`` and ``clip_high``, or the objective's own defaults."""
        low, high = {"gspo": (3e-4, 4e-4), "cispo": (1.0, 4.0)}.get(self.policy_loss, (self.clip, self.clip))
        return (low if self.clip_low is None else self.clip_low, high if self.clip_high is None else self.clip_high)

    @property
    def kl_kind(self) -> str:
        """The KL estimate: ``kl_estimator``, or k3 as a loss term and k1 in the reward."""
        return self.kl_estimator or ("k3" if self.kl_where == "loss" else "k1")

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per PPO step: ppo_epochs passes of batch_size / mini_batch_size mini-batches."""
        return self.ppo_epochs * (self.batch_size // self.mini_batch_size)

    def total_steps(self, prompts: int, processes: int = 1) -> int:
        """PPO steps of the run: max_steps, or enough for ``epochs`` passes over ``prompts`` prompts."""
        return self.max_steps or max(1, math.ceil(self.epochs * prompts / self.prompts_per_step(processes)))

    def validate(self, where: str) -> None:
        fail = _failer(where, "ppo")
        _require(fail, self, ("batch_size", "samples_per_prompt", "mini_batch_size", "micro_batch_size",
                              "ppo_epochs", "max_new_tokens",
                              "max_prompt_length", "eval_samples", "keep_checkpoints", "max_nonfinite", "lr",
                              "temperature", "kl_target", "kl_horizon", "max_grad_norm", "clip", "value_clip",
                              "epochs"))
        _require(fail, self, ("kl_coef", "entropy_coef"), inclusive=True)
        if self.vf_coef is not None and not 0 <= self.vf_coef < math.inf:
            fail("vf_coef", f"must not be negative (or null for the critic's own), got {self.vf_coef}")
        if not 0 < self.gamma <= 1:
            fail("gamma", f"must be in (0, 1], got {self.gamma}")
        if not 0 <= self.lam <= 1:
            fail("lam", f"must be in [0, 1], got {self.lam}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            fail("min_new_tokens", f"must be in [0, ppo.max_new_tokens={self.max_new_tokens}], got "
                                   f"{self.min_new_tokens}")
        if self.max_steps is not None and self.max_steps <= 0:
            fail("max_steps", f"must be positive (or null to use epochs), got {self.max_steps}")
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                fail(key, f"must be 0 (off) or positive, got {getattr(self, key)}")
        for key in ("reward_clip", "early_stop_kl", "kl_budget"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                fail(key, f"must be positive (or null to disable), got {getattr(self, key)}")
        if self.batch_size % self.samples_per_prompt:
            fail("samples_per_prompt", f"({self.samples_per_prompt}) must divide ppo.batch_size ({self.batch_size})")
        for key in ("clip_low", "clip_high"):
            value = getattr(self, key)
            if value is not None and not (0 < value < math.inf):
                fail(key, f"must be positive (or null for the objective's default), got {value}")
        if self.clip_low is not None and self.clip_low > 1:
            fail("clip_low", f"must be at most 1 (a ratio is never below 0), got {self.clip_low}")
        for key in ("clip", "clip_high"):  # a ratio of 1 + 100 is e^4.6 per token: a wider bound never binds
            if (getattr(self, key) or 0) > MAX_RATIO_EPSILON:
                fail(key, f"must be at most {MAX_RATIO_EPSILON:g} (a ratio bound of {1 + MAX_RATIO_EPSILON:g}), got "
                          f"{getattr(self, key)}")
        for f in dataclasses.fields(self):  # every number meets float32 tensors in the loop
            value = getattr(self, f.name)
            if isinstance(value, float) and abs(value) > FLOAT32_MAX:
                fail(f.name, f"must be at most {FLOAT32_MAX:.3g} in size (what a float32 holds), got {value}")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            fail("overlong_buffer", f"must be in [0, ppo.max_new_tokens={self.max_new_tokens}] (0: off), got "
                                    f"{self.overlong_buffer}")
        if not (0 <= self.overlong_penalty < math.inf):
            fail("overlong_penalty", f"must be 0 or positive, got {self.overlong_penalty}")
        if not 0 <= self.resample_rounds <= MAX_RESAMPLE_ROUNDS:
            fail("resample_rounds", f"must be from 0 to {MAX_RESAMPLE_ROUNDS} (each round samples the slots still "
                                    f"flat again; a reward that flat needs another reward), got "
                                    f"{self.resample_rounds}")
        if self.drop_flat_groups and self.samples_per_prompt < 2:
            fail("drop_flat_groups", f"needs ppo.samples_per_prompt of at least 2 (a group to be flat), got "
                                     f"{self.samples_per_prompt}")
        if self.advantage in ("grpo", "dr_grpo", "rloo") and self.samples_per_prompt < 2:
            fail("samples_per_prompt", f"must be at least 2 for ppo.advantage={self.advantage} (it compares the "
                                       f"responses to one prompt), got {self.samples_per_prompt}")
        if self.kl_where == "loss" and self.kl_estimator == "k1":
            fail("kl_estimator", "k1 as a loss term has zero gradient in expectation; use k3 (or kl_in: reward)")
        for key in ("max_turns", "max_episode_tokens", "max_tool_output"):
            if getattr(self, key) < 1:
                fail(key, f"must be at least 1, got {getattr(self, key)}")
        if not 0 < self.tool_timeout < math.inf:
            fail("tool_timeout", f"must be a positive number of seconds, got {self.tool_timeout}")
        if not 0 < self.turn_gamma <= 1:
            fail("turn_gamma", f"must be in (0, 1], got {self.turn_gamma}")
        if self.batch_size % self.mini_batch_size:
            fail("mini_batch_size", f"({self.mini_batch_size}) must divide ppo.batch_size ({self.batch_size})")
        if self.mini_batch_size % self.micro_batch_size:
            fail("micro_batch_size", f"({self.micro_batch_size}) must divide ppo.mini_batch_size "
                                     f"({self.mini_batch_size})")
        if not any(w != 0 for w in self.reward.values()):
            fail("reward", "needs a term with a non-zero weight (reward_model: 1.0, or a scorer such as gold: 1.0)")
        for key, weight in self.reward.items():
            if not math.isfinite(weight):
                fail(f"reward.{key}", f"must be a finite weight, got {weight}")


@dataclass
class EvalConfig:
    """Evaluation on held-out prompts (``data.eval_prompts``): reward, gold where known, win rate, KL, length."""

    policies: list[str] = field(default_factory=lambda: ["sft", "ppo"])
    """policies to compare: a stage of this recipe ("sft", "ppo"), a run directory, or "base" (the untuned base)"""
    icl_shots: int = 3
    """also evaluate the untuned base prompted with this many demonstrations from data.sft, as the first row (0: no
    such row); win rates are against the first row"""
    samples: int = 1
    """responses per prompt: 1 is greedy decoding, more are sampled at eval.temperature"""
    temperature: float = 0.7
    """sampling temperature when eval.samples > 1"""
    max_new_tokens: int = 64
    """longest response generated"""
    batch_size: int = 32
    """prompts per generation batch"""
    limit: int | None = None
    """evaluate only the first N prompts (None: all)"""
    bootstrap: int = 2000
    """bootstrap resamples for the 95% intervals"""
    seed: int = 0
    """seed for sampling, demonstration choice and the bootstrap"""
    scorers: list[str] = field(default_factory=list)
    """scorers whose means (with 95% intervals) are columns beside the reward, here and in PPO's held-out
    evaluations: built-in names (gold, correctness, style: the tiny world's), package.module:function,
    file.py:function, or label=any of those (rlhf/feedback/scorers.py)"""
    environment: str | None = None
    """an environment (as ppo.environment names one) every policy answers with: each answer is a multi-turn episode
    under ppo's limits (ppo.max_turns, ppo.max_episode_tokens, ...), eval.max_new_tokens per turn; the table adds
    turns, tool calls and failed calls per episode. The reward model scores whole episodes, scorers the last
    answer, the KL the policy's own tokens (docs/agents.md)"""

    def validate(self, where: str) -> None:
        fail = _failer(where, "eval")
        _require(fail, self, ("samples", "max_new_tokens", "batch_size", "bootstrap"))
        if self.icl_shots < 0:
            fail("icl_shots", f"must be 0 or positive, got {self.icl_shots}")
        if self.temperature <= 0:
            fail("temperature", f"must be positive, got {self.temperature}")
        if self.limit is not None and self.limit <= 0:
            fail("limit", f"must be positive (or null for all prompts), got {self.limit}")


@dataclass
class LoggingConfig:
    report_to: list[str] = field(default_factory=list)
    """trackers besides metrics.jsonl, through accelerate: tensorboard, wandb (WANDB_MODE=offline works without a
    network), mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio; empty for none. Local files go to
    <run>/logs/"""
    progress: Literal["auto", "on", "off"] = "auto"
    """progress bars: "auto" shows them only on an interactive terminal"""

    def validate(self, where: str) -> None:
        for name in self.report_to:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1)
                raise UserError(f"{where}: logging.report_to has unknown tracker {name!r}" + (
                    f" (did you mean {close[0]!r}?)" if close else f"; choose from {', '.join(TRACKERS)}"))


@dataclass
class Recipe:
    name: str = ""
    """run name: outputs go to <run_dir>/<name>/<stage>; defaults to the recipe file's stem"""
    run_dir: str = "runs"
    """folder that holds the run directories"""
    model: ModelConfig = field(default_factory=ModelConfig)
    """the base model"""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """how the base is fine-tuned (shared by every stage)"""
    data: DataConfig = field(default_factory=DataConfig)
    """where each stage's data comes from"""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """supervised fine-tuning"""
    rm: RMConfig = field(default_factory=RMConfig)
    """reward-model training"""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO against the reward model"""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """DPO (and its variants) on the preference data, from the SFT policy"""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """evaluation on held-out prompts"""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """trackers and progress bars"""
    source: str = field(default="<defaults>", metadata={"internal": True})
    """where this recipe was read from (set by the loader, not a recipe key)"""

    def stage_dir(self, stage: str) -> Path:
        """The run directory a stage writes by default."""
        return Path(self.run_dir) / self.name / stage

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what manifests record)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def written_by_pipeline(self, path: str) -> bool:
        """Whether a data path lies under the recipe's run_dir (a file an earlier step writes, such as the
        rankings of ``rlhf label``): checked when a stage reads it, not when the recipe loads."""
        run_dir = Path(self.run_dir).expanduser().resolve()
        return run_dir in Path(path).expanduser().resolve().parents

    def validate(self) -> None:
        """Every section's own checks, then those that span sections or need the filesystem. A qlora recipe gets
        ``model.quantization: 4bit`` here, so the resolved recipe in every manifest says so."""
        where = self.source
        if not self.name or "/" in self.name:
            raise UserError(f"{where}: name must be a plain name without '/', got {self.name!r}")
        for key in ("sft", "preference", "eval_preference", "prompts", "eval_prompts"):
            value = getattr(self.data, key)
            if value is not None and is_local(value) and not Path(value).expanduser().exists() \
                    and not self.written_by_pipeline(value):
                raise UserError(f"{where}: data.{key} names {value!r}, which does not exist")
        if is_local(self.model.base) and not Path(self.model.base).expanduser().exists():
            raise UserError(f"{where}: model.base names {self.model.base!r}, which does not exist")
        method, m = method_table.get(self.adapter.method), self.model
        if self.adapter.method == "qlora":
            if m.quantization not in (None, "4bit"):
                raise UserError(f"{where}: model.quantization must be 4bit (or unset) for adapter.method qlora, "
                                f"got {m.quantization!r}")
            m.quantization = "4bit"
        if m.quantization and not method.quantizable:
            raise UserError(f"{where}: model.quantization ({m.quantization}) cannot be used with adapter.method "
                            f"{self.adapter.method}: it trains base weights, and quantized weights cannot be "
                            "trained")
        self.adapter.validate(where)
        self.logging.validate(where)
        self.sft.validate(where, "sft")
        self.rm.validate(where, "rm")
        self.ppo.validate(where)
        self.dpo.validate(where, "dpo")
        self.eval.validate(where)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        item = typing.get_args(tp)[1]
        return "a mapping of names to " + {float: "numbers", int: "integers", str: "strings"}.get(item, str(item))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """Return (ok, value) for ``value`` read as type ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(tp)):
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        elif value is False and "no" in typing.get_args(tp):
            value = "no"  # and a bare no as false
        return value in typing.get_args(tp), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        (item,) = typing.get_args(tp)
        out = []
        for v in value:
            ok, v = _coerce(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return False, value
        item = typing.get_args(tp)[1]
        out = {}
        for k, v in value.items():
            ok, out[k] = _coerce(v, item)
            if not ok:
                return False, value
        return True, out
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return True, float(value)
            except OverflowError:  # an integer past a float's range: not a finite number
                return True, math.inf
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return True, float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _recipe_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls, raw: Any, where: str, prefix: str):
    """Make dataclass ``cls`` from the mapping ``raw``, checking keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {prefix or 'the recipe'} must be a mapping of keys, got {type(raw).__name__}")
    keys = _recipe_keys(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known keys: {', '.join(keys)})"
            raise UserError(f"{where}: unknown key {name}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, where, f"{name}.")
            continue
        ok, coerced = _coerce(value, tp)
        if not ok:
            raise UserError(f"{where}: {name} must be {_type_name(tp)}, got {value!r}")
        if not _finite(coerced):
            raise UserError(f"{where}: {name} must be a finite number, got {value!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _finite(value: Any) -> bool:
    """No infinity or NaN anywhere in a recipe value (a number, or one inside a list or mapping)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML itself keeps the last one silently,
    and a repeated key is almost always an editing mistake)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int):
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


def _apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` to the raw recipe mapping."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment}: expected section.key=value")
    path, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = path.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {assignment}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _failer(where: str, section: str):
    """A function that raises the ``UserError`` for ``section.key`` of the recipe read from ``where``."""
    def fail(key: str, message: str):
        raise UserError(f"{where}: {section}.{key} {message}")
    return fail


FLOAT32_MAX = 3.4028234663852886e38
MAX_RATIO_EPSILON = 100.0
"""the widest clip a recipe may ask of a probability ratio (ppo.clip, ppo.clip_high)"""
MAX_RESAMPLE_ROUNDS = 100
"""the most refill rounds per step of DAPO's dynamic sampling (ppo.resample_rounds; verl's DAPO recipe stops at
10 generation batches)"""


def _require(fail, obj, keys, inclusive: bool = False) -> None:
    """Each of ``keys`` must be positive (or, when ``inclusive``, not negative); ``fail`` from ``_failer``."""
    for key in keys:
        value = getattr(obj, key)
        if value < 0 or (value == 0 and not inclusive):
            fail(key, f"{'must not be negative' if inclusive else 'must be positive'}, got {value}")


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or the defaults when ``path`` is None), apply ``--set`` overrides, and check it."""
    raw: Any = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{where}: recipe file not found")
        try:
            raw = yaml.load(p.read_text(encoding="utf-8-sig"), Loader=_RecipeLoader) or {}  # -sig: a BOM is fine
        except _DuplicateKey as e:
            raise UserError(f"{where}:{e.second}: key {e.key!r} is written twice in one section (first at line "
                            f"{e.first}); keep one") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise UserError(f"{where}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{where}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    for assignment in overrides:
        _apply_override(raw, assignment)
    label = where + (" (with --set " + ", ".join(overrides) + ")" if overrides else "")
    recipe = _build(Recipe, raw, label, "")
    recipe.source = label
    if not recipe.name:
        recipe.name = Path(path).stem if path is not None else "default"
    recipe.validate()
    return recipe


def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), for docs and tests."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # subclasses win
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = nxt.value.value
    return docs
