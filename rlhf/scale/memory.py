"""How much memory a stage needs per process before activations, computed from a model's shapes: the weights of
every model the stage holds, and the gradients and Adam state of what trains, for LoRA, QLoRA and full
fine-tuning, on one process or sharded over several (FSDP's full shard). ``rlhf memory`` prints it; the scaling
table in docs/operations.md is made from it (``decision_table``).

The byte counts per parameter are the usual ones for mixed-precision training on GPUs:
- a frozen weight in bf16: 2 bytes; a 4-bit NF4 weight with double-quantized block constants (QLoRA): 0.52 bytes
  (embeddings and the output head stay bf16);
- a trained full weight: 16 bytes (bf16 weight and gradient, fp32 master weight and Adam's two moments);
- a trained adapter weight: 16 bytes too (fp32 weight and gradient, Adam's two moments), a frozen one 4.

Each stage holds (``HOLDS``): SFT and RM one trained model; DPO a trained policy and a frozen reference; PPO a
trained policy, a frozen reference and reward model, and a trained value model (``critic`` "adapter") or a value
head on the policy ("shared", a few KB). With an adapter method the models are adapters on one base, so the base
is counted once. Activations come on top and depend on batch and sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9

FROZEN_BF16 = 2.0
NF4 = 0.52
TRAINED_FULL = 16.0
TRAINED_ADAPTER = 16.0
FROZEN_ADAPTER = 4.0

HOLDS = {  # stage -> (trained models, frozen models) besides the shared base
    "sft": (1, 0), "rm": (1, 0), "dpo": (1, 1),
    "ppo": (2, 2), "ppo-shared": (1, 2),
}
"""trained and frozen models each stage holds; "ppo-shared" is PPO with the shared critic (no value model)"""

@dataclass(frozen=True)
class Shapes:
    """What the count needs of a causal LM: its parameters, the share that is embeddings and head (never
    quantized), the largest decoder layer (what FSDP gathers at once) and LoRA's parameters per rank."""

    parameters: int
    embeddings: int
    """input embeddings plus an untied output head"""
    largest_layer: int
    lora_per_rank: int
    """sum of (in + out) over every linear layer of the decoder: LoRA on all of them has r times this"""


def shapes(config) -> Shapes:
    """The ``Shapes`` of a transformers configuration, from a model built on the meta device (no memory, no
    download beyond the configuration)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is None or head.weight is embed.weight
    embeddings = embed.weight.numel() + (0 if tied else head.weight.numel())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    largest = max((sum(p.numel() for p in m.parameters()) for m in layers), default=0)
    return Shapes(parameters=sum(p.numel() for p in model.parameters()), embeddings=embeddings,
                  largest_layer=largest, lora_per_rank=sum(m.in_features + m.out_features for m in linears))


def load_shapes(base: str) -> Shapes:
    """``shapes`` of a model directory or hub id (its config.json alone is read), refusing in one line what is not
    a causal language model transformers can build from that configuration alone: a configuration that needs the
    repository's own code (never run, never asked about), an encoder-only or other non-causal architecture, and
    impossible sizes (zero heads, negative or fractional counts), which transformers would take or crash on."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from rlhf.errors import UserError

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=False)
    except (OSError, ValueError) as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise UserError(f"{base}: its configuration is the repository's own code (auto_map); rlhf memory "
                            "never runs it: count a published architecture of the same shapes instead") from None
        raise UserError(f"{base}: no model configuration to read ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - a value transformers' own checks refuse (a fractional count)
        raise UserError(f"{base}: an impossible model configuration ({_first_line(e)})") from None
    architectures = list(getattr(config, "architectures", None) or [])
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
                                 for a in architectures))
    if not causal or getattr(config, "is_encoder_decoder", False):
        what = ", ".join(architectures) or config.model_type
        raise UserError(f"{base}: is {what}, not a causal language model (this project trains decoder-only models)")
    try:
        s = shapes(config)
    except Exception as e:  # noqa: BLE001 - zero heads, negative sizes: transformers fails somewhere inside
        raise UserError(f"{base}: an impossible model configuration ({_first_line(e)})") from None
    if s.parameters <= 0 or s.largest_layer <= 0:
        raise UserError(f"{base}: an impossible model configuration ({s.parameters} parameters, no decoder layer)")
    return s


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


def per_process(s: Shapes, method: str, stage: str, processes: int = 1, sharded: bool = False,
                rank: int = 16) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer state each process holds for ``stage`` ("sft", "rm", "dpo",
    "ppo", "ppo-shared") with ``method`` ("lora", "qlora" or "full"), data parallel (every process holds it all)
    or ``sharded`` over ``processes`` (FSDP full shard: everything divided, plus the largest layer gathered in
    bf16 twice, the one computing and the one prefetched; PPO's rollout gathers the whole policy in bf16 once
    instead, so that decoding does not gather every layer for every token). LoRA is r = ``rank`` on every linear
    layer."""
    trained, frozen = HOLDS[stage]
    if method == "full":
        weights = frozen * FROZEN_BF16 * s.parameters
        training = trained * TRAINED_FULL * s.parameters
    elif method in ("lora", "qlora"):
        body = s.parameters - s.embeddings
        weights = (NF4 * body if method == "qlora" else FROZEN_BF16 * body) + FROZEN_BF16 * s.embeddings
        adapter = rank * s.lora_per_rank
        weights += frozen * FROZEN_ADAPTER * adapter
        training = trained * TRAINED_ADAPTER * adapter
    else:
        raise ValueError(f"method {method!r}: lora, qlora or full")
    if sharded and processes > 1:
        gathered = FROZEN_BF16 * (s.parameters if stage.startswith("ppo") else 2 * s.largest_layer)
        weights, training = weights / processes + gathered, training / processes
    return {"weights": weights, "training": training, "total": weights + training}


def fits(s: Shapes, method: str, stage: str, gpu_gb: float, processes: int, headroom: float = 0.75) -> str:
    """How the stage fits in ``headroom`` of each GPU's memory (the rest for activations): on one GPU (and so data
    parallel on several), sharded over ``processes`` GPUs (full fine-tuning of a stage that shards), or not."""
    budget = headroom * gpu_gb * GB
    if per_process(s, method, stage)["total"] <= budget:
        return "one GPU each (data parallel)"
    if method != "full" or per_process(s, method, stage, processes, sharded=True)["total"] > budget:
        return "does not fit"
    return f"FSDP over {processes} (fsdp.yaml)"


# Published shapes (from each model's config.json), so that the docs' table needs no download.
PUBLISHED = {
    "Qwen2.5-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "Qwen2.5-72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}


def published(name: str) -> Shapes:
    from transformers import Qwen2Config

    return shapes(Qwen2Config(**PUBLISHED[name]))


def decision_table(gpu_gb: float = 80.0, gpus: int = 8) -> str:
    """A markdown table: for each published size, each method's PPO (adapter critic) state per GPU, data parallel
    and sharded over ``gpus``, and which layout fits ``gpu_gb`` GB cards."""
    lines = [f"| base | method | PPO state per GPU, data parallel | sharded over {gpus} (FSDP) | on {gpu_gb:g} GB "
             "GPUs |", "|---|---|---|---|---|"]
    for name in PUBLISHED:
        s = published(name)
        for method in ("lora", "qlora", "full"):
            alone = per_process(s, method, "ppo")["total"] / GB
            shard = per_process(s, method, "ppo", gpus, sharded=True)["total"] / GB
            way = fits(s, method, "ppo", gpu_gb, gpus)
            lines.append(f"| {name} ({s.parameters / 1e9:.1f}B) | {method} | {alone:,.1f} GB | "
                         + (f"{shard:,.1f} GB" if method == "full" else "- (data parallel)") + f" | {way} |")
    return "\n".join(lines)


def describe(base: str, s: Shapes, method: str, stage: str, processes: int, rank: int, gpu_gb: float) -> str:
    """``rlhf memory``'s report: each stage's state per process for ``method``, alone and sharded."""
    lines = [f"{base}: {s.parameters:,} parameters ({s.embeddings:,} in embeddings and head), LoRA r={rank}: "
             f"{rank * s.lora_per_rank:,} per adapter; weights + gradients + optimizer state per process, before "
             "activations:"]
    stages = [stage] if stage else list(HOLDS)
    for st in stages:
        one = per_process(s, method, st, rank=rank)
        line = f"  {st:<10} {method:<5}  one process or data parallel: {one['total'] / GB:8.2f} GB"
        if method == "full" and processes > 1:
            line += (f"   FSDP over {processes}: "
                     f"{per_process(s, method, st, processes, sharded=True, rank=rank)['total'] / GB:8.2f} GB")
        lines.append(line + f"   on {gpu_gb:g} GB GPUs: {fits(s, method, st, gpu_gb, processes)}")
    return "\n".join(lines)

