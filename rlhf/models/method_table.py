"""The fine-tuning methods as plain data: what each ``adapter.method`` is, which stages support it and why not.

No torch here: the recipe check reads this table, and ``import rlhf.config`` must work without torch. Turning a
method into a trainable model is ``rlhf.models.methods``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.errors import UserError

STAGES = ("sft", "rm", "ppo", "dpo")

_PROMPT_WHY = ("virtual tokens exist only inside peft's own forward pass, while rewards and values are read from "
               "the backbone's hidden state at the last real token")
_PROMPT_DPO_WHY = ("peft refuses to continue training a saved prompt-learning adapter (the SFT run's), which DPO "
                   "starts from")


@dataclass(frozen=True)
class Method:
    kind: str
    """peft | bottleneck | weights"""
    summary: str
    stages: tuple[str, ...] = STAGES
    why_not: dict[str, str] = field(default_factory=dict)
    """stage -> why the method does not support it"""
    quantizable: bool = True
    """whether the base may be loaded quantized (only when no base weight trains)"""
    mergeable: bool = True
    """whether ``rlhf export --merge`` can fold what trained into the base's own weights"""


METHODS: dict[str, Method] = {
    "lora": Method("peft", "low-rank adapters on the frozen base's linear layers"),
    "dora": Method("peft", "LoRA with each weight split into magnitude and direction (weight-decomposed)"),
    "qlora": Method("peft", "LoRA on a 4-bit NF4 base with double quantization (bitsandbytes)"),
    "ia3": Method("peft", "learned scaling vectors on keys, values and the MLP (IA3; Phi-3 needs "
                          "adapter.target_modules)"),
    "adalora": Method("peft", "LoRA whose rank budget is pruned to the important modules during training",
                      stages=("sft", "rm"),
                      why_not={"ppo": "peft trains only one AdaLoRA adapter per model, and PPO trains the policy "
                                      "and the value adapters on one base",
                               "dpo": "peft allows only one AdaLoRA adapter per model that is not in inference mode, "
                                      "and DPO holds the SFT adapter twice on one base (policy and frozen "
                                      "reference)"}),
    "prefix": Method("peft", "prefix tuning: key/value prefixes at every layer, produced by an MLP",
                     stages=("sft",), why_not={"rm": _PROMPT_WHY, "ppo": _PROMPT_WHY, "dpo": _PROMPT_DPO_WHY}, mergeable=False),
    "prompt": Method("peft", "prompt tuning: trainable embeddings prepended to the input",
                     stages=("sft",), why_not={"rm": _PROMPT_WHY, "ppo": _PROMPT_WHY, "dpo": _PROMPT_DPO_WHY}, mergeable=False),
    "ptuning": Method("peft", "P-Tuning: virtual-token embeddings produced by a prompt encoder (MLP or LSTM)",
                      stages=("sft",), why_not={"rm": _PROMPT_WHY, "ppo": _PROMPT_WHY, "dpo": _PROMPT_DPO_WHY}, mergeable=False),
    "ptuning_v2": Method("peft", "P-Tuning v2: deep prompts at every layer, no reparameterisation encoder",
                         stages=("sft",), why_not={"rm": _PROMPT_WHY, "ppo": _PROMPT_WHY, "dpo": _PROMPT_DPO_WHY}, mergeable=False),
    "adapter": Method("bottleneck", "Houlsby bottleneck adapters after each attention and MLP output",
                      stages=("sft", "rm", "dpo"),
                      why_not={"ppo": "bottleneck adapters are not named adapters that can share one base, which "
                                      "the PPO layout (policy, reference, reward, value) needs"},
                      mergeable=False),
    "bitfit": Method("weights", "only the base's bias terms train (needs a base with biases: not Llama, Qwen3, "
                               "Gemma, Phi-3)", quantizable=False),
    "freeze": Method("weights", "only the top adapter.freeze_layers blocks (and adapter.trainable_modules) train",
                     quantizable=False),
    "full": Method("weights", "every weight trains", quantizable=False),
}


def get(name: str) -> Method:
    return METHODS[name]


def kind(name: str) -> str:
    return METHODS[name].kind


def check_stage(method: str, stage: str, where: str) -> None:
    """An unsupported (method, stage) combination is an error that says why and what to use instead."""
    info = METHODS[method]
    if stage not in info.stages:
        ok = ", ".join(n for n, m in METHODS.items() if stage in m.stages)
        raise UserError(f"{where}: adapter.method {method} is not supported by the {stage} stage "
                        f"({info.why_not[stage]}); {stage} supports {ok}")


def support_matrix() -> str:
    """The method x stage table as markdown (``rlhf methods``, the README)."""
    lines = ["| method | kind | " + " | ".join(STAGES) + " | what trains |", "|---|---|" + "---|" * len(STAGES) + "---|"]
    for name, m in METHODS.items():
        marks = " | ".join("yes" if s in m.stages else "no" for s in STAGES)
        lines.append(f"| `{name}` | {m.kind} | {marks} | {m.summary} |")
    return "\n".join(lines)
