"""Every fine-tuning method: the trainable count each method implies, a few steps lower the loss, the saved output
reloads to the same logits, the stage x method matrix is enforced, and QLoRA runs through SFT, RM and PPO."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT, ran, run_cli, write_recipe
from rlhf.models import method_table, methods, modeling
from rlhf.config import AdapterConfig, ModelConfig, load_recipe
from rlhf.errors import UserError

TINY = str(ROOT / "data" / "tiny-base")
ALL = list(method_table.METHODS)

# small options so that every method trains in a second
OPTIONS = dict(r=4, alpha=8, dropout=0.0, target_r=2, num_virtual_tokens=4, encoder_hidden_size=32,
               bottleneck_size=8, freeze_layers=1)
# base weights want a smaller step, deep prompts a larger one (as in the methods' papers)
LR = {"full": 1e-3, "freeze": 1e-3, "bitfit": 1e-3, "ptuning_v2": 1e-1}


@pytest.fixture(scope="session")
def biased_base(tmp_path_factory):
    """The tiny base with bias terms in attention and MLP (Llama has none), for bitfit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("biased-base")
    model = AutoModelForCausalLM.from_pretrained(TINY, attention_bias=True, mlp_bias=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(out)
    return str(out)


def expected_trainable(method: str, config, total: int) -> int:
    """What each method trains on a Llama block stack, counted by hand from the shapes."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    linears = [(h, h)] * 4 + [(h, inter)] * 2 + [(inter, h)]  # q k v o, gate up, down as (in, out)
    r, n, enc, b = OPTIONS["r"], OPTIONS["num_virtual_tokens"], OPTIONS["encoder_hidden_size"], OPTIONS[
        "bottleneck_size"]
    block = (4 * h * h + 3 * h * inter + 2 * h
             + (4 * h + 2 * inter + h if config.attention_bias else 0))  # weights, two norms, biases
    lora = layers * sum(r * (i + o) for i, o in linears)
    return {
        "lora": lora,
        "qlora": lora,
        "dora": lora + layers * sum(o for _, o in linears),  # one magnitude per output feature
        "adalora": layers * sum(r * (i + o) + r for i, o in linears),  # A, B and the singular values E
        "ia3": layers * (h + h + inter),  # keys and values (output side), MLP down projection (input side)
        "prefix": n * h + (h * enc + enc) + (enc * 2 * layers * h + 2 * layers * h),
        "ptuning_v2": n * 2 * layers * h,  # a key and a value per layer and virtual token
        "prompt": n * h,
        "ptuning": n * h + (h * enc + enc) + (enc * enc + enc) + (enc * h + h),  # embeddings + MLP encoder
        "adapter": layers * 2 * (h * b + b + b * h + h),  # two bottlenecks per block
        "bitfit": layers * (4 * h + 2 * inter + h),  # q k v o biases, gate up down biases
        "freeze": OPTIONS["freeze_layers"] * block,
        "full": total,
    }[method]


def _batch(tokenizer):
    rows = [json.loads(line) for line in (ROOT / "data/tiny/sft.jsonl").read_text().splitlines()[:8]]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["completion"]}], tokenize=False)
             for r in rows]
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc, labels


@pytest.mark.parametrize("method", ALL)
def test_method_trains_saves_and_reloads(method, biased_base, tmp_path):
    base = biased_base if method == "bitfit" else TINY
    model_cfg = ModelConfig(base=base, quantization="4bit" if method == "qlora" else None)
    cfg = AdapterConfig(method=method, **OPTIONS)
    tokenizer = modeling.load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = methods.prepare(modeling.load_base(model_cfg), cfg, "CAUSAL_LM", tokenizer_path=base, total_steps=10)
    counts = modeling.trainable_parameters(model)
    assert counts["trainable"] == expected_trainable(method, methods.unwrap(model).config, counts["total"])

    # a few steps on one batch lower the loss
    enc, labels = _batch(tokenizer)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR.get(method, 1e-2))
    losses = []
    model.train()
    for _ in range(6):
        loss = model(**enc, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.05, losses

    # the saved output loads back (as a stage's run directory does) to the same logits
    model.eval()
    with torch.no_grad():
        before = model(**enc).logits
    methods.save(model, cfg, tmp_path)
    reloaded = methods.load(tmp_path, method, lambda: modeling.load_base(model_cfg),
                            lambda path: type(methods.unwrap(model)).from_pretrained(path))
    reloaded.eval()
    with torch.no_grad():
        after = reloaded(**enc).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_bitfit_on_a_base_without_biases_is_a_clear_error():
    with pytest.raises(UserError, match="bitfit.*no bias terms"):
        methods.prepare(modeling.load_base(ModelConfig(base=TINY)), AdapterConfig(method="bitfit"))


def test_unsupported_combinations_are_refused(tmp_path):
    from stages import rm

    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), adapter={"method": "prefix"})
    with pytest.raises(UserError, match="prefix is not supported by the rm stage.*rm supports lora"):
        rm.main(load_recipe(recipe))
    with pytest.raises(UserError, match="adapter.method adalora is not supported by the ppo stage"):
        method_table.check_stage("adalora", "ppo", "x")
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    bad = write_recipe(tmp_path / "q.yaml", adapter={"method": "full"}, model={"base": TINY, "quantization": "8bit"})
    with pytest.raises(UserError, match="model.quantization.*cannot be used with adapter.method full"):
        load_recipe(bad)
    qlora = load_recipe(write_recipe(tmp_path / "ok.yaml", adapter={"method": "qlora"}))
    assert qlora.model.quantization == "4bit"  # recorded in the resolved recipe of every manifest


def test_methods_command_prints_the_matrix():
    out = run_cli("methods").stdout
    assert "| `qlora` | peft | yes | yes | yes |" in out
    assert "| `prompt` | peft | yes | no | no |" in out
    for name in ALL:
        assert f"`{name}`" in out


@pytest.mark.parametrize("method", [m for m in ALL if m not in ("qlora", "bitfit")])
def test_sft_stage_runs_every_method(method, tmp_path):
    """Through the stage: the manifest records the method and its trainable count, and the run reloads."""
    from stages import sft

    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), adapter={"method": method, **OPTIONS},
                          sft={"max_steps": 2, "eval_fraction": 0.0, "batch_size": 8})
    manifest = sft.main(load_recipe(recipe))
    model, _ = modeling.load_policy(tmp_path / "runs" / "tiny" / "sft")
    params = manifest["adapter"]["parameters"]
    assert manifest["adapter"]["method"] == method
    assert params["trainable"] == expected_trainable(method, methods.unwrap(model).config, params["total"])


def test_qlora_through_sft_rm_and_ppo(tmp_path):
    recipe = str(write_recipe(tmp_path / "q.yaml", run_dir=str(tmp_path / "runs"), adapter={"method": "qlora"}))
    ran("sft", "--recipe", recipe, "--set", "sft.max_steps=4")
    ran("rm", "--recipe", recipe, "--set", "rm.max_steps=4", "--set", "rm.stats_samples=64")
    ran("ppo", "--recipe", recipe, "--set", "ppo.max_steps=2", "--set", "ppo.batch_size=8",
            "--set", "ppo.mini_batch_size=4", "--set", "ppo.micro_batch_size=4", "--set", "ppo.max_new_tokens=12",
            "--set", "ppo.eval_every=0")
    runs = tmp_path / "runs" / "tiny"
    for stage in ("sft", "rm", "ppo"):
        manifest = json.loads((runs / stage / "manifest.json").read_text())
        assert manifest["adapter"]["method"] == "qlora"
        assert manifest["recipe"]["model"]["quantization"] == "4bit"
    ppo = json.loads((runs / "ppo" / "manifest.json").read_text())
    assert ppo["metrics"]["steps"] == 2
    policy, _ = modeling.load_policy(runs / "ppo")
    assert any(type(m).__name__ == "Linear4bit" for m in policy.modules())  # the base really is 4-bit
