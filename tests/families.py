"""Small random-initialised models of real families, built here from their transformers configs (no download),
each with a tokenizer that carries the family's special tokens, pad convention and chat template; and data files
shaped like real ones (multi-turn sharegpt with a system prompt, alpaca with input and history, preference rows
longer than the limits).

The tokenizers are byte-level BPEs trained on a few kilobytes of text: small vocabularies, but the special tokens,
the EOS / pad / BOS conventions and the templates are the families' own, which is what the pipeline depends on.
To add a family: a ``Family`` entry below with its config class and arguments, its special tokens and template.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

# -- chat templates as the families ship them (Qwen3's reasoning branch simplified to its empty-thinking output) --

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message.content.lstrip('\n') + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Qwen2.5-Instruct's template as it ships, tools included: Hermes-style <tool_call> JSON in the assistant turn, tool
# results as <tool_response> blocks in a user turn
QWEN25_TOOLS_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

@dataclass
class Family:
    name: str
    model_type: str
    """transformers config class name"""
    config: dict
    specials: list[str]
    """special tokens, first ids in this order"""
    tokens: dict
    """bos/eos/pad/unk token strings (missing: the tokenizer has none)"""
    template: str | None
    notes: str = ""
    extra: dict = field(default_factory=dict)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

FAMILIES = [
    Family("llama3", "LlamaConfig", {**_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False,
                                     "max_position_embeddings": 2048},
           ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
           {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3_TEMPLATE,
           "bos, <|eot_id|> eos, no pad token, untied embeddings"),
    Family("qwen2", "Qwen2Config", {**_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True,
                                    "max_position_embeddings": 2048},
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
           {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, QWEN2_TEMPLATE,
           "ChatML, <|im_end|> eos, <|endoftext|> pad, qkv bias, default system prompt"),
    Family("qwen3", "Qwen3Config", {**_SMALL, "num_key_value_heads": 2, "head_dim": 16, "tie_word_embeddings": True,
                                    "max_position_embeddings": 2048},
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
           {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, QWEN3_TEMPLATE,
           "ChatML with an empty <think> block, q/k norms"),
    Family("gemma2", "Gemma2Config", {**_SMALL, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 32,
                                      "query_pre_attn_scalar": 16, "max_position_embeddings": 2048},
           ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
           {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}, GEMMA_TEMPLATE,
           "soft-capping, sliding window, no system role, turns end with <end_of_turn> (not the <eos> token)"),
    Family("phi3", "Phi3Config", {**_SMALL, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                                  "original_max_position_embeddings": 2048},
           ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
           {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
           PHI3_TEMPLATE, "fused qkv_proj and gate_up_proj; pad == eos; the template ends a conversation with eos"),
    Family("gpt_neox", "GPTNeoXConfig", {**_SMALL, "rotary_pct": 0.25, "max_position_embeddings": 2048},
           ["<|endoftext|>", "<|padding|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, None,
           "fused query_key_value, partial rotary, no pad token, no chat template"),
    Family("gpt2", "GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 320},
           ["<|endoftext|>"], {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                               "unk_token": "<|endoftext|>"}, None,
           "Conv1D layers, learned absolute positions, bos = eos = unk, no pad, no chat template"),
    Family("opt", "OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "word_embed_proj_dim": 64, "max_position_embeddings": 320},
           ["<s>", "<pad>", "</s>", "<unk>"],
           {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, None,
           "learned positions with an offset of 2, </s> as bos and eos, no chat template"),
]
BY_NAME = {f.name: f for f in FAMILIES}

# -- text ------------------------------------------------------------------------------------------------------

_WORDS = ("the model answers each question with care and a short clear sentence about numbers words colours "
          "animals rivers cities lists sorting reversing counting adding what is how many name please explain "
          "why because then so first second third answer question system user assistant helpful you are a an "
          "of to in on for with is it this that be by from at as or not").split()


def sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice([".", "?", "!"])


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, rng.randint(4, 14)) for _ in range(600)] + [str(i) for i in range(100)]


def make_tokenizer(family: Family, seed: int = 0, template: str | None = None):
    """``family``'s tokenizer (a small byte-level BPE with the family's special tokens), with its chat template or
    ``template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400 + len(family.specials), special_tokens=family.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(seed), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **family.tokens,
                                        additional_special_tokens=[t for t in family.specials
                                                                   if t not in family.tokens.values()])
    if template or family.template:
        tokenizer.chat_template = template or family.template
    return tokenizer


def build(family: Family, out: Path, seed: int = 0, config: dict | None = None, dtype=None,
          device: str = "cpu", template: str | None = None) -> Path:
    """Write ``family``'s tokenizer and a random-initialised model (safetensors) to ``out``; returns ``out``.
    ``config`` overrides the family's small shape (e.g. a real model's sizes and vocabulary); the weights are made
    on ``device`` and saved in ``dtype`` (default float32); ``template`` replaces the family's chat template."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(family, seed, template)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))

    ids = {k.replace("_token", "_token_id"): tokenizer.convert_tokens_to_ids(v) for k, v in family.tokens.items()
           if k in ("bos_token", "eos_token", "pad_token")}
    vocab = -(-len(tokenizer) // 64) * 64 + 64  # padded past the tokenizer, as real checkpoints are
    settings = {"vocab_size": vocab, **family.config, **(config or {})}
    config = getattr(transformers, family.model_type)(**settings, **{"pad_token_id": None, **ids})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


# -- data shaped like real files -------------------------------------------------------------------------------

def write_data(out: Path, seed: int = 0) -> dict[str, Path]:
    """sharegpt SFT (multi-turn, system prompts), alpaca SFT (input, history, system), preference pairs (some far
    longer than any limit), alpaca prompts; returns their paths."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    s = lambda n=8: sentence(rng, n)  # noqa: E731
    sharegpt = []
    for i in range(24):
        turns = [{"from": "system", "value": "You are a careful assistant. " + s(6)}] if i % 2 == 0 else []
        for _ in range(rng.randint(1, 3)):
            turns += [{"from": "human", "value": s(rng.randint(5, 15))},
                      {"from": "gpt", "value": s(rng.randint(4, 12))}]
        sharegpt.append({"id": f"conv-{i}", "conversations": turns})
    alpaca = [{"instruction": s(8), "input": s(10) if i % 2 else "", "output": s(9),
               **({"history": [[s(6), s(6)]]} if i % 3 == 0 else {}),
               **({"system": "Answer briefly."} if i % 4 == 0 else {})} for i in range(24)]
    preference = []
    for i in range(40):
        long = i % 5 == 0  # far past every limit: 250 sentences
        prompt = " ".join(s() for _ in range(250)) if long else s(12)
        preference.append({"prompt": prompt, "chosen": s(8), "rejected": s(rng.randint(3, 14))})
    hh = []
    for _ in range(8):  # HH-RLHF: two full dialogues that share everything but the last reply
        shared = f"\n\nHuman: {s()}\n\nAssistant: {s()}\n\nHuman: {s()}\n\nAssistant:"
        hh.append({"chosen": f"{shared} {s(9)}", "rejected": f"{shared} {s(4)}"})
    prompts = [{"instruction": s(9), "input": s(40) if i % 7 == 0 else ""} for i in range(24)]
    (out / "sft").mkdir(exist_ok=True)
    (out / "preference").mkdir(exist_ok=True)
    paths = {"sharegpt": out / "sft" / "sharegpt.json", "alpaca": out / "sft" / "alpaca.json",
             "pairs": out / "preference" / "pairs.jsonl", "hh": out / "preference" / "hh.jsonl",
             "prompts": out / "prompts.jsonl", "sft": out / "sft", "preference": out / "preference"}
    paths["sharegpt"].write_text(json.dumps(sharegpt, indent=1))
    paths["alpaca"].write_text(json.dumps(alpaca, indent=1))
    paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in preference))
    paths["hh"].write_text("".join(json.dumps(r) + "\n" for r in hh))
    paths["prompts"].write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return paths
