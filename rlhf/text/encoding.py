"""Encoding: chats into the token ids every stage reads, batches padded, positions counted, and the length gate.

One place decides how a prompt, an exchange and a conversation become token ids (the chat template with the
generation prompt, the response up to and including its first EOS), so that a reward is always read where it was
trained and a policy answers the prompt it was trained on. Padding and positions are here too (left-padded
prompts generate as unpadded ones do), and the one gate that refuses or reports rows longer than a recipe's
limit (RM, DPO, ``rm score``, PPO's and eval's prompts).
"""

from __future__ import annotations

import random
import sys

import torch

from rlhf.errors import UserError


def encode_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """A prompt (a list of messages) as the token ids a policy answers: chat-templated with the generation
    prompt (and ``tools``' JSON schemas, for an environment's episodes), no special tokens added beyond what the
    template writes."""
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, prompts: list[list[dict]], max_length: int, tools: list[dict] | None = None
                   ) -> tuple[list[list[int]], list[int]]:
    """``encode_prompt`` of each prompt; returns those of at most ``max_length`` tokens and the indices of the
    prompts they came from (longer ones are left out)."""
    out, kept = [], []
    for i, messages in enumerate(prompts):
        ids = encode_prompt(tokenizer, messages, tools)
        if len(ids) <= max_length:
            out.append(ids)
            kept.append(i)
    return out, kept


def encode_turns(tokenizer, prompt: list[dict], completion: list[dict], tools: list[dict] | None = None
                 ) -> tuple[list[int], list[int]]:
    """A conversation with tool calls as SFT trains on it: the ids of prompt + completion and the loss mask, 1 on
    what each assistant turn of the completion adds after the generation prompt before it (its text and calls, up
    to its end-of-turn), 0 on the prompt and on what the tools' results add. The same convention as a plain
    response's completion mask, on any template (no generation markers needed). A template that does not render
    the conversation so far as a prefix of the longer one is refused for the row (``ValueError``)."""
    def render(messages, generation: bool) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=generation,
                                            tokenize=True, return_dict=False)
        return list(out)

    conversation = prompt + completion
    ids = render(conversation, False)
    mask = [0] * len(ids)
    for k in range(len(prompt), len(conversation)):
        if conversation[k]["role"] != "assistant":
            continue
        before, upto = render(conversation[:k], True), render(conversation[:k + 1], False)
        if ids[:len(upto)] != upto or upto[:len(before)] != before:
            raise ValueError("the chat template does not render the conversation so far as a prefix of the whole")
        mask[len(before):len(upto)] = [1] * (len(upto) - len(before))
    return ids, mask


def encode_exchange(tokenizer, prompt: list[dict], response: list[dict], tools: list[dict] | None = None
                    ) -> tuple[list[int], list[int]]:
    """A prompt and its response as token ids, laid out as PPO lays out an episode: the prompt rendered with the
    chat template's generation prompt, then the tokens the template puts after it for the response, up to and
    including the first EOS (what a policy samples before it stops). ``response`` is a list of messages ending
    with the assistant's (earlier ones join the prompt).

    The reward model trains on exactly these sequences, and every score (held-out accuracy, reward statistics,
    PPO, eval, ``rlhf rm score``) is read on them, so a reward is always read where it was trained. Where the
    template does not render the prompt as a prefix of the whole conversation, the response is its text followed
    by EOS.

    An episode of an environment (``response``: the assistant's tool calls, the tools' results, its last answer)
    is rendered with the environment's ``tools``, as the policy saw it: the prompt part is everything before the
    last answer, so the reward model reads the whole episode and is read at its end.
    """
    prompt = prompt + response[:-1]
    content = response[-1]["content"]
    tools = tools or None
    prompt_text = tokenizer.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + [response[-1]], tools=tools, tokenize=False)
    completion = full[len(prompt_text):] if full.startswith(prompt_text) else content + tokenizer.eos_token
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids + [eos]
    return prompt_ids, ids


def with_responses(prompts: list[list[dict]], responses: list[str | list[dict]]) -> list[list[dict]]:
    """Each prompt followed by its response as an assistant turn (or an episode's messages): the conversation a
    reward model scores."""
    return [[*p, *([{"role": "assistant", "content": r}] if isinstance(r, str) else r)]
            for p, r in zip(prompts, responses)]


def encode_conversations(tokenizer, conversations: list[list[dict]], tools: list[dict] | None = None
                         ) -> list[list[int]]:
    """Each conversation (ending with the assistant's response) as the token ids a reward is read on:
    ``encode_exchange``'s prompt and response, one after the other (rendered with ``tools`` for an
    environment's episodes)."""
    out = []
    for conv in conversations:
        split = max(i for i, m in enumerate(conv) if m["role"] != "assistant") + 1 if any(
            m["role"] != "assistant" for m in conv) else 0
        prompt_ids, response_ids = encode_exchange(tokenizer, conv[:split], conv[split:], tools)
        out.append(prompt_ids + response_ids)
    return out


def report_dropped(stage: str, dropped: int, total: int, what: str, key: str, limit: int) -> None:
    """Say how many rows a length limit dropped: one line, loud when it is most of them."""
    if not dropped:
        return
    share = 100.0 * dropped / max(total, 1)
    loud = "WARNING: " if share > 50 else ""
    print(f"{stage}: {loud}dropped {dropped} of {total} {what} ({share:.1f}%) longer than {key}={limit} tokens"
          + ("; raise " + key + " to keep them" if loud else ""), file=sys.stderr)


def keep_fitting(encoded, source: str, unit: str, key: str, limit: int, stage: str, on_too_long: str = "drop",
                 held_out: bool = False, advice: str | None = None) -> None:
    """The length gate of the RM, DPO and ``rm score``: ``encoded`` holds the rows that fit (``rows``) and how many
    did not (``dropped``), ``unit`` what a row is ("pairs", "rankings"). Training rows are refused when
    ``on_too_long`` is "error" and any was too long, and when none fits (``advice`` ends that message; default:
    raise ``key``); otherwise, and for ``held_out`` rows always, what was left out is reported in one line by the
    main process."""
    from rlhf.scale import distributed

    total = len(encoded.rows) + encoded.dropped
    if not held_out:
        if encoded.dropped and on_too_long == "error":
            raise UserError(f"{source}: {encoded.dropped} of {total} {unit} are longer than {key}={limit} tokens "
                            f"(raise it, or set {key.split('.')[0]}.on_too_long: drop)")
        if not encoded.rows:
            raise UserError(f"{source}: every {unit[:-1]} is longer than {key}={limit} tokens"
                            + (advice if advice is not None else f"; raise {key}"))
    if distributed.is_main():
        report_dropped(stage, encoded.dropped, total, f"held-out {unit}" if held_out else f"{unit} of {source}", key,
                       limit)


def pad(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as one batch ``(ids, attention_mask)``. ``side="right"`` pads after each sequence, as a
    reward trainer's collator does; ``side="left"`` before it, so that every sequence ends at the last column
    (prompts that generation appends to)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pad(seqs, pad_id, "left")``: every sequence ends at the last column."""
    return pad(seqs, pad_id, "left")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so a left-padded sequence gets the same positions as unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def by_length(sequences: list[list[int]], forward, batch_size: int, pad_id: int, side: str = "right",
              progress: str | None = None) -> list:
    """``forward(ids, mask) -> [b]`` over ``sequences`` in batches of ``batch_size``, sorted by length first so
    that each batch pads little (``pad`` on ``side``), each sequence's value at its own index: the one batching
    loop of reward models, published ones and judges, which keep only their forward. ``progress``: a bar with
    that label."""
    from tqdm.auto import tqdm

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list = [None] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), disable=progress is None, desc=progress):
        idx = order[start:start + batch_size]
        ids, mask = pad([sequences[i] for i in idx], pad_id, side)
        for i, value in zip(idx, forward(ids, mask).tolist()):
            out[i] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# In-context prompts: demonstrations before a prompt (eval's base row, rlhf sample --icl-shots)
# ---------------------------------------------------------------------------------------------------------------

def icl_prompts(prompts: list[list[dict]], demos: list[dict], shots: int, seed: int) -> list[list[dict]]:
    """Each prompt preceded by ``shots`` demonstrations (user/assistant turns) drawn from the SFT data."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        context = []
        for d in rng.sample(demos, shots):
            context += d["prompt"] + d["completion"]
        out.append(context + p)
    return out


def prompt_length(tokenizer, messages: list[dict]) -> int:
    """Tokens of a prompt rendered with the chat template's generation prompt."""
    return len(encode_prompt(tokenizer, messages))


def fit_icl(tokenizer, inputs: list[list[dict]], prompts: list[list[dict]], limit: int) -> tuple[list, int]:
    """In-context prompts that fit ``limit`` tokens: a prompt whose demonstrations make it too long keeps fewer of
    them (the earliest go first); returns the prompts and how many were shortened."""
    out, shortened = [], 0
    for full, own in zip(inputs, prompts):
        context = full[:len(full) - len(own)]
        while context and prompt_length(tokenizer, context + own) > limit:
            context = context[2:]  # one demonstration is a user and an assistant turn
        shortened += len(context) < len(full) - len(own)
        out.append(context + own)
    return out, shortened
