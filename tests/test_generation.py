"""The generation engine (``rollout.decode``) against Hugging Face ``generate`` on every model family: greedy and
keyed sampling draw the same tokens (or, where a token differs, the two candidates were a near-tie of kernel
summation order), the log-probabilities it records are the model's, and EOS, ``min_new_tokens``,
``max_new_tokens`` and left padding behave as the rollout needs. Random-initialised small models of each family's
shape (tests/families.py): no training needed, so this is part of the fast tier."""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT
from families import BY_NAME, FAMILIES, build
from rlhf.engine import rollout
from rlhf.models import modeling
from rlhf.text import encoding
from rlhf.config import ModelConfig
from rlhf.ppo.ppo_math import logprobs_from_logits

pytestmark = pytest.mark.fast


class KeyedDraw:
    """A ``generate`` logits processor making the engine's draw: Gumbel-max with each row's key at each position
    (a one-hot score for the drawn token), EOS forbidden for the first ``min_new`` tokens."""

    def __init__(self, keys, temperature, eos, min_new):
        self.keys, self.temperature, self.eos, self.min_new, self.start = keys, temperature, eos, min_new, None

    def __call__(self, input_ids, scores):
        self.start = self.start or input_ids.shape[1]
        t = input_ids.shape[1] - self.start
        scores = scores.float() / self.temperature
        if t < self.min_new:
            scores[:, self.eos] = -torch.inf
        token = rollout.gumbel_max(scores, self.keys, t)
        return torch.full_like(scores, -torch.inf).scatter(1, token[:, None], 0.0)


def reference(model, ids, mask, keys, temperature, max_new, min_new, eos, pad) -> torch.Tensor:
    """Hugging Face ``generate``'s tokens for the same draw (its own loop, cache and masks), pad after EOS."""
    if temperature == 0:
        kwargs = {"do_sample": False, "min_new_tokens": min_new}
    else:
        kwargs = {"do_sample": False, "logits_processor": [KeyedDraw(keys, temperature, eos, min_new)]}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad, **kwargs)
    return out[:, ids.shape[1]:]


def prefix_scores(model, ids, mask, row, tokens, t, temperature, keys) -> torch.Tensor:
    """The scores position ``t`` of ``row`` was drawn from (full forward over prompt + its first ``t`` tokens):
    logits / T minus the row's Gumbel noise (the logits alone for greedy)."""
    seq = torch.cat([ids[row], tokens[:t]])[None]
    m = torch.cat([mask[row], torch.ones(t, dtype=mask.dtype)])[None]
    logits = model(input_ids=seq, attention_mask=m, position_ids=encoding.position_ids(m)).logits[0, -1].float()
    if temperature == 0:
        return logits
    return logits / temperature - rollout.gumbel_noise(rollout.hash_uniform(keys[row:row + 1], t, logits.shape[-1]))[0]


def assert_same_or_near_tie(model, ids, mask, ours, theirs, temperature, keys, tol=1e-4):
    """Row by row: the same tokens, or at the first difference the two tokens' scores within ``tol`` (a near-tie
    that the order of a kernel's sums decides), never a different distribution."""
    width = max(ours.shape[1], theirs.shape[1])
    ours = torch.nn.functional.pad(ours, (0, width - ours.shape[1]), value=-1)
    theirs = torch.nn.functional.pad(theirs, (0, width - theirs.shape[1]), value=-1)
    ties = 0
    for row in range(len(ours)):
        differ = (ours[row] != theirs[row]).nonzero()
        if len(differ) == 0:
            continue
        t = int(differ[0])
        a, b = int(ours[row, t]), int(theirs[row, t])
        assert a >= 0 and b >= 0, f"row {row}: one response ended at {t}, the other did not"
        with torch.no_grad():
            scores = prefix_scores(model, ids, mask, row, ours[row], t, temperature, keys)
        assert abs(float(scores[a] - scores[b])) < tol, f"row {row}, token {t}: {a} vs {b} is no near-tie"
        ties += 1
    assert ties <= len(ours) // 4, f"{ties} rows differ: more than near-ties explain"


def eos_bias(model, eos: int, bias: float):
    """Add ``bias`` to EOS's logit in every forward pass of ``model`` (a hook on its output layer)."""
    def hook(module, inputs, output):
        return output.index_add(-1, torch.tensor([eos]), torch.full((*output.shape[:-1], 1), bias,
                                                                    dtype=output.dtype))
    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_engine_draws_what_generate_draws_on_every_family(name, tmp_path):
    family = BY_NAME[name]
    base = build(family, tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), attn_implementation="eager").eval()
    tok = modeling.load_tokenizer(ModelConfig(base=str(base)))  # with the fallback template where none
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    rows = [[{"role": "user", "content": text}] for text in
            ("What is the answer?", "Name three rivers and explain why the first is long.", "Hi",
             "Sort these words: cities animals colours numbers please then answer the question with care.")]
    encoded = encoding.encode_prompts(tok, rows, 10_000)[0]
    positions = modeling.max_positions(model.config)
    if positions is not None and positions < 1000:  # a prompt near the end of a learned position table
        encoded.append((encoded[1] * 40)[: positions - 12])
    ids, mask = encoding.left_pad(encoded, pad)
    keys = rollout.episode_keys(5, 2, torch.arange(len(encoded)))
    eos_bias(model, eos, 5.0)  # EOS made likely, so that responses end mid-batch at different lengths
    for temperature, min_new, max_new in ((0.0, 0, 10), (1.0, 0, 10), (1.0, 3, 10), (2.0, 0, 6)):
        ours = rollout.decode(model, ids, mask, keys=keys, temperature=temperature, max_new_tokens=max_new,
                              min_new_tokens=min_new, eos_token_id=eos, pad_token_id=pad)
        assert ours.static, "every family of the matrix runs over the preallocated cache"
        theirs = reference(model, ids, mask, keys, temperature, max_new, min_new, eos, pad)
        theirs = theirs.masked_fill(torch.cumsum((theirs == eos).long(), 1).roll(1, 1).index_fill(
            1, torch.tensor([0]), 0) > 0, pad)  # pad after the first EOS, as the engine leaves it
        assert_same_or_near_tie(model, ids, mask, ours.tokens, theirs, temperature, keys)
        assert ours.tokens.shape[1] <= max_new
        ended = (ours.tokens == eos).any(1)
        assert temperature != 1.0 or ended.any()  # sampled responses end mid-batch (EOS is made likely)
        assert min_new == 0 or not (ours.tokens[:, :min_new] == eos).any()
        # the recorded log-probs are the model's own, from a full forward pass over prompt + response
        full_ids, full_mask = torch.cat([ids, ours.tokens], 1), torch.cat([mask, torch.ones_like(ours.tokens)], 1)
        with torch.no_grad():
            logits = model(input_ids=full_ids, attention_mask=full_mask,
                           position_ids=encoding.position_ids(full_mask)).logits[:, ids.shape[1] - 1:-1]
        expected = logprobs_from_logits(logits, ours.tokens, temperature or 1.0)
        stopped = (ours.tokens == eos).cumsum(1)
        live = (stopped - (ours.tokens == eos).long()) == 0  # up to and including each row's first EOS
        torch.testing.assert_close(ours.logprobs[live], expected[live], rtol=1e-5, atol=1e-5)


def test_responses_end_at_eos_or_max_new_tokens_and_keep_their_slots(tmp_path):
    """A row that ends keeps its slot and decodes pad after its EOS; the output is as wide as the longest
    response; rows that never draw EOS run to max_new_tokens; EOS everywhere gives one column."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build(BY_NAME["qwen2"], tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, mask = encoding.left_pad([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]], pad)
    keys = rollout.episode_keys(0, 1, torch.arange(5))
    kwargs = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=pad)
    hook = eos_bias(model, eos, 4.0)
    out = rollout.decode(model, ids, mask, keys=keys, temperature=1.0, **kwargs)
    is_eos = out.tokens == eos
    firsts = [int(r.float().argmax()) if r.any() else None for r in is_eos]
    for row, first in enumerate(firsts):
        if first is not None:
            assert (out.tokens[row, first + 1:] == pad).all()
    assert len({f for f in firsts if f is not None}) > 1, "responses should end at different lengths"
    assert out.tokens.shape[1] == (12 if None in firsts else max(firsts) + 1)
    hook.remove()
    hook = eos_bias(model, eos, -1e4)
    assert rollout.decode(model, ids, mask, keys=keys, temperature=1.0, **kwargs).tokens.shape == (5, 12)
    hook.remove()
    eos_bias(model, eos, 1e4)
    assert rollout.decode(model, ids, mask, temperature=0.0, **kwargs).tokens.tolist() == [[eos]] * 5


def test_the_engine_reads_adapter_weights_changed_in_place(tmp_path):
    """PPO changes the policy's adapter every step without rebuilding anything: the next decode must see the new
    values (a cached or captured step that kept the old ones would fail here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build(BY_NAME["llama3"], tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(str(base))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    ids, mask = encoding.left_pad([[5, 6, 7, 8], [9, 10]], tok.eos_token_id)
    kwargs = dict(temperature=0.0, max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    before = rollout.decode(model, ids, mask, **kwargs)
    assert torch.equal(rollout.decode(model, ids, mask, **kwargs).tokens, before.tokens)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-40.0)
    after = rollout.decode(model, ids, mask, **kwargs)
    assert not torch.equal(after.logprobs[:, 0], before.logprobs[:, 0])
    assert not torch.equal(after.tokens, before.tokens)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_models_decode_from_their_training_forward(kind, tmp_path):
    """A prompt-learning adapter (an SFT-only method that eval and sample still read) prepends virtual tokens or
    key/value prefixes in its own forward: the engine decodes it without a cache, each token the argmax of the very
    forward the adapter was trained with (prompt + response so far), and records that forward's log-probs; the
    virtual tokens change what is drawn. (Hugging Face ``generate`` ignored the prefixes here, and drifted from
    this forward after a few tokens of prompt tuning.)"""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = build(BY_NAME["llama3"], tmp_path / "base")
    config = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=4)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), config).eval()
    with torch.no_grad():  # virtual tokens that matter
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    assert rollout.prompt_learning(model)
    ids, mask = encoding.left_pad([[5, 6, 7, 8, 9], [10, 11, 12]], 0)
    kwargs = dict(temperature=0.0, max_new_tokens=6, eos_token_id=1, pad_token_id=0)
    ours = rollout.decode(model, ids, mask, **kwargs)
    assert not ours.static and ours.tokens.shape == (2, 6)
    for t in range(6):
        seq = torch.cat([ids, ours.tokens[:, :t]], 1)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=torch.cat([mask, torch.ones_like(ours.tokens[:, :t])], 1),
                           use_cache=False).logits[:, -1]
        assert torch.equal(ours.tokens[:, t], logits.argmax(-1))
        torch.testing.assert_close(ours.logprobs[:, t], logprobs_from_logits(logits, ours.tokens[:, t]))
    with model.disable_adapter():
        plain = rollout.decode(model, ids, mask, **kwargs)
    assert not torch.equal(plain.tokens, ours.tokens)


def test_ids_the_tokenizer_does_not_have_are_never_drawn_and_take_no_probability():
    """The tiny base's embedding has 512 rows for a 430-token tokenizer: the engine draws only real ids, greedy or
    sampled, and its log-probs are renormalised over them, the same as PPO's scoring pass computes."""
    from rlhf.ppo.ppo_math import entropy_from_logits, restrict_vocab

    base = str(ROOT / "data" / "tiny-base")
    model = modeling.load_base(ModelConfig(base=base)).eval()
    tok = modeling.load_tokenizer(ModelConfig(base=base))
    vocab = len(tok)
    assert vocab < model.get_input_embeddings().weight.shape[0]
    # make the padded rows the most likely: without the restriction they would be drawn at every step
    with torch.no_grad():
        model.lm_head.weight[vocab:] = model.lm_head.weight[:vocab].abs().mean() * 50
    ids, mask = encoding.left_pad([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], tok.pad_token_id)
    keys = rollout.episode_keys(0, 1, torch.arange(4))
    kwargs = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, vocab=vocab)
    for temperature in (0.0, 1.0, 0.5):
        out = rollout.decode(model, ids, mask, keys=keys, temperature=temperature, **kwargs)
        assert int(out.tokens.max()) < vocab
        assert bool(torch.isfinite(out.logprobs).all() and torch.isfinite(out.entropy).all())
        # the recorded log-prob of each token is the scoring pass's, over the same support
        full = torch.cat([ids, out.tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(out.tokens)], 1)
        logits = model(input_ids=full, attention_mask=full_mask,
                       position_ids=encoding.position_ids(full_mask)).logits[:, ids.shape[1] - 1:-1]
        scale = 1.0 if temperature == 0 else temperature
        scored = logprobs_from_logits(restrict_vocab(logits, vocab), out.tokens, scale)
        real = out.tokens != tok.pad_token_id
        torch.testing.assert_close(out.logprobs[real], scored[real], atol=2e-5, rtol=0)
        torch.testing.assert_close(out.entropy[real], entropy_from_logits(restrict_vocab(logits, vocab), scale)[real],
                                   atol=2e-4, rtol=0)
    assert int(rollout.decode(model, ids, mask, temperature=0.0, **{**kwargs, "vocab": None}).tokens.max()) >= vocab


def test_restrict_vocab_by_hand():
    from rlhf.ppo.ppo_math import entropy_from_logits, restrict_vocab

    logits = torch.tensor([[1.0, 2.0, 9.0, 9.0]])  # ids 2 and 3 are past a 2-token tokenizer
    restricted = restrict_vocab(logits, 2)
    # over ids 0 and 1 only: p = softmax([1, 2]) = [0.2689, 0.7311]
    assert logprobs_from_logits(restricted, torch.tensor([1])).item() == pytest.approx(-0.31326, abs=1e-5)
    assert entropy_from_logits(restricted).item() == pytest.approx(0.58220, abs=1e-5)
    assert entropy_from_logits(restricted / 1e-3).isfinite().all()
    assert restrict_vocab(logits, 4) is logits and restrict_vocab(logits, None) is logits
