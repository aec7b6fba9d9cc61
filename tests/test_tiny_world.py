"""The tiny world: the gold scorer on hand-made cases, the data's promises, and deterministic regeneration."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from conftest import ROOT
from rlhf.tiny import data, world

pytestmark = pytest.mark.fast  # the fast tier (make test-fast)

DATA = ROOT / "data" / "tiny"


@pytest.mark.parametrize("prompt,response,gold", [
    ("What is 37 + 48?", "The answer is 85.", 1.0),
    ("What is 37 + 48?", "Let me think. 37 plus 48 makes 85. So the answer is 85.", 0.5),
    ("What is 37 + 48?", "I am not sure, but maybe 85.", 0.5),
    ("What is 37 + 48?", "The answer is 84.", 0.5),
    ("What is 37 + 48?", "I am not sure, but maybe 84.", 0.0),
    ("What is 37 + 48?", "85", 0.0),
    ("What is 37 + 48?", "", 0.0),
    ("What is 37 + 48?", "The answer is 85. The answer is 85.", 0.5),
    ("Sort these numbers: 5 3 9 1", "The answer is 1 3 5 9.", 1.0),
    ("Sort these numbers: 5 3 9 1", "The answer is 1 3 9 5.", 0.5 + 0.5 * 0.5),
    ("Sort these numbers: 5 3 9 1", "The answer is 1 3 5.", 0.5),
    ("Reverse the words: red cat blue", "So the answer is blue cat red.", 0.5),
    ("Reverse the words: red cat blue", "The answer is blue red cat.", 0.5 + 0.5 / 3),
    ("How many times does red appear in: red cat red dog?", "The answer is 2.", 1.0),
    ("How many times does red appear in: red cat red dog?", "The answer is 3.", 0.5),
])
def test_gold_score_by_hand(prompt, response, gold):
    assert world.score(prompt, response) == pytest.approx(gold)


def test_gold_rejects_foreign_prompts():
    assert world.parse_prompt("Write a poem") is None
    with pytest.raises(ValueError):
        world.score("Write a poem", "The answer is 1.")


def test_every_kind_and_style_renders_and_scores():
    rng = random.Random(1)
    for kind in world.KINDS:
        for _ in range(50):
            task = world.make_task(rng, kind)
            assert world.parse_prompt(task.prompt) == (kind, task.answer)
            scores = {s: world.score(task.prompt, world.render(task, s)) for s in world.STYLES}
            assert scores == {"concise": 1.0, "verbose": 0.5, "hedged": 0.5}
            wrong = world.wrong_answer(rng, task)
            assert wrong != task.answer
            assert world.score(task.prompt, world.render(task, "concise", wrong)) < 1.0


def _read(name):
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


def test_committed_data_matches_regeneration(tmp_path):
    paths = data.write(tmp_path, seed=0)
    for name, path in paths.items():
        assert path.read_bytes() == (DATA / f"{name}.jsonl").read_bytes(), f"{name}.jsonl differs: regenerate it"
    again = data.write(tmp_path / "again", seed=0)
    assert all(again[n].read_bytes() == p.read_bytes() for n, p in paths.items())
    assert data.write(tmp_path / "other", seed=1)["sft"].read_bytes() != paths["sft"].read_bytes()


def test_heldout_prompts_are_never_trained_on():
    heldout = {r["prompt"] for r in _read("heldout_prompts")} | {r["prompt"] for r in _read("heldout_preference")}
    for name in ("sft", "preference", "prompts"):
        assert not heldout & {r["prompt"] for r in _read(name)}, name


def test_tool_demonstrations_call_the_calculator_for_most_sums_and_answer_the_rest_directly():
    """sft_tools.jsonl (recipes/tiny-agent.yaml): OpenAI-style conversations with the calculator's tools; about
    three quarters of the `add` tasks call add with the prompt's own numbers and answer with its result, every
    other task is answered directly; all answers correct; no held-out prompt."""
    from rlhf.text import formats
    from rlhf.tiny.environments import schemas

    rows = formats.load(str(DATA / "sft_tools.jsonl"), "sft").rows
    heldout = {r["prompt"] for r in _read("heldout_prompts")} | {r["prompt"] for r in _read("heldout_preference")}
    calls = {"add": 0, "other": 0}
    adds = 0
    for row in rows:
        prompt = row["prompt"][-1]["content"]
        assert prompt not in heldout and row["tools"] == schemas()
        assert world.gold_parts(prompt, row["completion"][-1]["content"])["correct"] == 1.0
        kind = world.parse_prompt(prompt)[0]
        adds += kind == "add"
        if len(row["completion"]) > 1:
            call, result = row["completion"][0]["tool_calls"][0]["function"], row["completion"][1]["content"]
            calls["add" if kind == "add" else "other"] += 1
            assert f"What is {call['arguments']['a']} + {call['arguments']['b']}?" == prompt
            assert result == world.parse_prompt(prompt)[1]
    assert calls["other"] == 0 and 0.7 < calls["add"] / adds < 0.8 and len(rows) == 4000


def test_demonstrations_are_correct_but_mixed_in_style():
    rows = _read("sft")
    parts = [world.gold_parts(r["prompt"], r["completion"]) for r in rows]
    assert all(p["correct"] == 1.0 for p in parts)
    concise = sum(p["style"] for p in parts) / len(parts)
    assert 0.2 < concise < 0.3, "the preferred style is a minority of demonstrations"
    kinds = Counter(world.parse_prompt(r["prompt"])[0] for r in rows)
    assert set(kinds) == set(world.KINDS)


def test_preference_pairs_are_ranked_by_gold():
    for r in _read("preference") + _read("heldout_preference"):
        assert world.score(r["prompt"], r["chosen"]) > world.score(r["prompt"], r["rejected"])


# ---------------------------------------------------------------------------------------------------------------
# Embedding rows the base never trained
# ---------------------------------------------------------------------------------------------------------------

def test_untrained_rows_by_hand():
    import torch

    from rlhf.models.modeling import untrained_rows

    g = torch.Generator().manual_seed(0)
    trained = torch.randn(8, 16, generator=g)
    point = torch.full((16,), 0.7)
    cluster = point + 0.01 * torch.randn(5, 16, generator=g)  # rows 9-13: 2 tokenizer rows, 3 padding rows
    w = torch.cat([trained[:3], torch.zeros(1, 16), trained[3:], cluster])  # row 3: a zero row (Llama 3 markers)
    assert untrained_rows(w, vocab=11).tolist() == [3, 9, 10, 11, 12, 13]
    assert untrained_rows(w, vocab=14).tolist() == [3]  # no padding rows: only the zero row
    random_rows = torch.randn(20, 16, generator=g)  # random initialisation forms no cluster
    assert untrained_rows(random_rows, vocab=15).tolist() == []


def test_untrained_rows_are_reinitialised_the_same_way_at_every_load(tmp_path):
    """The tiny base as pretraining left it (its chat markers and padding rows in one tight cluster): load_base
    finds them, re-initialises them the same way at every load, touches nothing else, and leaves nothing to find;
    `keep` leaves them. The shipped base had this done when it was built, so nothing is left in it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from rlhf.models import modeling
    from rlhf.config import ModelConfig

    shipped = ROOT / "data" / "tiny-base"
    vocab = len(modeling.load_tokenizer(ModelConfig(base=str(shipped))))
    weight = load_file(shipped / "model.safetensors")["model.embed_tokens.weight"]
    assert modeling.untrained_rows(weight, vocab).numel() == 0
    raw = tmp_path / "raw-base"
    shutil.copytree(shipped, raw)
    tok = modeling.load_tokenizer(ModelConfig(base=str(raw)))
    markers = tok.convert_tokens_to_ids(["<|system|>", "<|user|>", "<|assistant|>"])
    collapsed = markers + list(range(vocab, weight.shape[0]))
    point = torch.full((weight.shape[1],), 0.16)  # norm 2.56, where the tiny base's untrained rows had gathered
    raw_weight = weight.clone()
    raw_weight[collapsed] = point + 0.01 * torch.randn(len(collapsed), weight.shape[1],
                                                       generator=torch.Generator().manual_seed(1))
    tensors = load_file(shipped / "model.safetensors")
    tensors["model.embed_tokens.weight"] = raw_weight
    save_file(tensors, raw / "model.safetensors", metadata={"format": "pt"})

    kept = modeling.load_base(ModelConfig(base=str(raw), untrained_rows="keep")).get_input_embeddings().weight
    assert modeling.untrained_rows(kept, vocab).tolist() == sorted(collapsed)
    loaded = [modeling.load_base(ModelConfig(base=str(raw))) for _ in range(2)]
    a, b = (m.get_input_embeddings().weight.detach() for m in loaded)
    assert modeling.reinitialised(loaded[0]) == sorted(collapsed)
    assert torch.equal(a, b)  # the same base at every load: adapters trained on it stay valid
    assert modeling.untrained_rows(a, vocab).numel() == 0  # and nothing is left to find (idempotent)
    untouched = [i for i in range(weight.shape[0]) if i not in collapsed]
    assert torch.equal(a[untouched], raw_weight[untouched])
    assert torch.pdist(a[markers]).min() > 4 * torch.pdist(raw_weight[markers]).min()  # told apart


def test_a_base_whose_chat_markers_were_never_trained(tmp_path):
    """A Llama 3 *base* checkpoint ships its chat markers (<|start_header_id|>, <|end_header_id|>, <|eot_id|>) as
    rows that pretraining never touched (near zero); an adapter cannot train them. load_base finds exactly those
    rows and gives them distinct, typical embeddings; the output head (untied in Llama 3) likewise."""
    import torch
    from safetensors.torch import load_file, save_file

    from families import BY_NAME, build
    from rlhf.models import modeling
    from rlhf.config import ModelConfig

    base = build(BY_NAME["llama3"], tmp_path / "llama3-base")
    tok = modeling.load_tokenizer(ModelConfig(base=str(base)))
    markers = tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    weights = load_file(base / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][markers] = 1e-9 * torch.randn(len(markers), weights[name].shape[1])
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    model = modeling.load_base(ModelConfig(base=str(base)))
    assert modeling.reinitialised(model) == sorted(markers)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        rows = module.weight.detach()[markers]
        typical = module.weight.detach().norm(dim=-1).median()
        assert (rows.norm(dim=-1) > 0.5 * typical).all() and torch.pdist(rows).min() > 0.1 * typical
