"""Build the tiny base model (``data/tiny-base/``): a local BPE tokenizer and a small pretrained Llama.

The tokenizer is a byte-level BPE trained on the world's text, with every digit its own token (merged numbers
make arithmetic unlearnable for a small model), special tokens for the chat format, and a chat template with
``{% generation %}`` markers. The model is a Llama whose every Linear width is a multiple of 32 (bitsandbytes
4-bit kernels on CPU need it), pretrained on freshly generated prose about the world (a fixed corpus gets
memorised), so it knows the world's language but has never seen the chat format.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from rlhf.tiny import world

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, EOS = "<|pad|>", "<|end|>"

# Roles map to their marker token; the assistant turn is wrapped in generation markers so that TRL's
# assistant-only loss can find it. The prompt rendered alone is a prefix of prompt + response. With tools (TRL's
# environment contract, rlhf.engine.environments), a system turn lists them by name and parameters (the tiny
# base's positions are few: no JSON schemas), an assistant turn writes each call as Hermes / Qwen2.5 do
# (<tool_call>{"name": ..., "arguments": {...}}</tool_call>, inside its generation markers: calls are trained on),
# and a tool's result is a user turn in <tool_response> tags (never trained on).
# A conversation without tools renders exactly as before.
CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "<|system|>Tools:{%- for tool in tools -%}"
    "{%- set f = tool['function'] if tool['function'] is defined else tool -%}"
    "{%- set names = f['parameters']['properties'] if f['parameters'] is defined else {} -%}"
    "{{ '\\n' }}{{ f['name'] }}({{ names | join(', ') }})"
    "{%- endfor -%}"
    "{{ '\\n' }}Call one as <tool_call>{\"name\": NAME, \"arguments\": {...}}</tool_call><|end|>"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] or '' }}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set call = call['function'] if call['function'] is defined else call -%}"
    "<tool_call>{\"name\": \"{{ call['name'] }}\", \"arguments\": {{ call['arguments'] | tojson }}}</tool_call>"
    "{%- endfor -%}"
    "<|end|>{% endgeneration %}"
    "{%- elif message['role'] == 'tool' -%}"
    "<|user|><tool_response>{{ message['content'] }}</tool_response><|end|>"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

MODEL_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512)
VOCAB_SIZE = 512  # a multiple of 32, like every Linear width


def tokenizer_corpus(rng: random.Random, n: int = 20000) -> list[str]:
    """Text the tokenizer is trained on: prompts, responses in every style, and pretraining prose."""
    texts = []
    for _ in range(n):
        task = world.make_task(rng)
        texts.append(task.prompt)
        texts.append(world.render(task, rng.choice(world.STYLES)))
        texts.append(world.pretraining_document(rng))
    return texts


def build_tokenizer(seed: int = 0):
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast`` with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(random.Random(seed)), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                 additional_special_tokens=SPECIAL_TOKENS[2:])
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "right"
    return hf


def build_model(tokenizer, seed: int = 0):
    """A freshly initialised Llama of ``MODEL_SHAPE`` for ``tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = max(VOCAB_SIZE, math.ceil(len(tokenizer) / 32) * 32)
    config = LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **MODEL_SHAPE)
    return LlamaForCausalLM(config)


def _batch(rng: random.Random, tokenizer, batch_size: int, block: int) -> torch.Tensor:
    """``batch_size`` blocks of ``block`` tokens cut from a stream of fresh documents, each ending with EOS."""
    need = batch_size * block
    ids: list[int] = []
    while len(ids) < need:
        ids += tokenizer.encode(world.pretraining_document(rng)) + [tokenizer.eos_token_id]
    return torch.tensor(ids[:need]).view(batch_size, block)


def pretrain(model, tokenizer, minutes: float, seed: int = 0, batch_size: int = 32, block: int = 128,
             lr: float = 2e-3, log=print) -> dict:
    """Train on fresh documents for ``minutes`` of wall time; returns the held-out loss and statistics."""
    rng = random.Random(seed + 1)
    heldout = [_batch(random.Random(10_000 + i), tokenizer, batch_size, block) for i in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget, warmup = minutes * 60.0, 50
    start, step, tokens = time.time(), 0, 0
    model.train()
    while time.time() - start < budget:
        frac = (time.time() - start) / budget
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x = _batch(rng, tokenizer, batch_size, block)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        if step % 50 == 0:
            log(f"step {step}  loss {loss.item():.4f}  {tokens / (time.time() - start):.0f} tok/s")
    model.eval()
    with torch.no_grad():
        heldout_loss = sum(model(input_ids=x, labels=x).loss.item() for x in heldout) / len(heldout)
    return {"steps": step, "tokens": tokens, "seconds": round(time.time() - start, 1),
            "heldout_loss": round(heldout_loss, 4), "final_train_loss": round(loss.item(), 4)}


def build_base(out_dir: str | Path, minutes: float = 8.0, seed: int = 0, log=print) -> dict:
    """Train the tokenizer, pretrain the model, and save both (safetensors) with a README of the facts."""
    out = Path(out_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"tokenizer: {len(tokenizer)} tokens; model: {n_params / 1e6:.2f}M parameters")
    stats = pretrain(model, tokenizer, minutes, seed, log=log)
    # pretraining never sees the chat markers, most bytes or the padding rows: they stay in one cluster that
    # adapters cannot move; the shipped base has them re-initialised (rlhf.models.modeling.reinit_untrained_rows), so
    # that plain peft and every loader see the same base
    from rlhf.models.modeling import reinit_untrained_rows

    reinitialised = len(reinit_untrained_rows(model, len(tokenizer)))
    stats.update(parameters=n_params, vocab=len(tokenizer), seed=seed, shape=MODEL_SHAPE,
                 untrained_rows_reinitialised=reinitialised)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "build.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_card(out, stats)
    log(json.dumps(stats))
    return stats


def write_card(out: Path, stats: dict) -> None:
    """``README.md`` beside the weights: what the model is, how it was built, how well it learned."""
    shape = stats["shape"]
    (Path(out) / "README.md").write_text(f"""# The tiny base

A {stats['parameters'] / 1e6:.2f}M-parameter Llama built by `rlhf tiny build-base` (`rlhf/tiny/base.py`) for the
tiny world (`data/tiny/README.md`), so that the whole pipeline runs on a CPU with no download.

| | |
|---|---|
| architecture | Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, \
{shape['num_attention_heads']} heads, MLP {shape['intermediate_size']}, tied embeddings |
| Linear widths | all multiples of 32 (bitsandbytes 4-bit kernels on CPU need it) |
| tokenizer | byte-level BPE trained on the world's text, {stats['vocab']} tokens (embedding padded to \
{max(VOCAB_SIZE, math.ceil(stats['vocab'] / 32) * 32)}), every digit its own token, \
special tokens {', '.join(f'`{t}`' for t in SPECIAL_TOKENS)}, a chat template with generation markers |
| pretraining | {stats['seconds'] / 60:.1f} minutes on 2 CPU cores, {stats['steps']} steps, {stats['tokens'] / 1e6:.1f}M \
tokens of freshly generated prose about the world (no fixed corpus, so nothing to memorise), seed {stats['seed']} |
| held-out loss | {stats['heldout_loss']} nats/token (final training loss {stats['final_train_loss']}) |

It knows the world's language (facts, questions and answers in every style) but has never seen the chat markers
and never learned to stop after an answer: both come from SFT. The embedding rows pretraining never moved (the
chat markers, unused bytes and the padding rows past the 430 tokens: one cluster that adapters cannot train) are
re-initialised to the trained rows' mean plus their spread before saving (`untrained_rows_reinitialised` in
build.json). Rebuild with `rlhf tiny build-base` (the numbers above are written by that command).
""")
