"""The DPO stage through the CLI: the policy moves, the SFT reference stays as it was, the output loads with plain
peft, every loss variant offered trains (each one's first loss by hand: policy = reference there), eval takes the
run as a row with its KL to the SFT reference, and what DPO cannot do is refused cleanly."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ran, refused, run_cli, write_recipe

SMALL = ["dpo.max_steps=3", "dpo.batch_size=8", "dpo.logging_every=1", "dpo.eval_every=100"]


def _sets(*kv: str) -> list[str]:
    return [x for item in SMALL + list(kv) for x in ("--set", item)]


def _digest(run_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _rows(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_moves_the_policy_and_leaves_the_sft_reference_alone(parents, tmp_path):
    recipe, runs = parents
    before = _digest(runs / "sft")
    out = tmp_path / "dpo"
    proc = run_cli("dpo", "--recipe", str(recipe), "--out", str(out), *_sets())
    assert "reference the SFT policy (a frozen copy of its adapter on the same base)" in proc.stderr
    assert str(out) in proc.stdout and "held-out implicit-reward accuracy" in proc.stdout
    assert _digest(runs / "sft") == before, "the SFT run (the reference) was changed"
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "dpo" and m["status"] == "complete" and m["parents"] == {"sft": str(runs / "sft")}
    assert m["dpo"]["loss"] == "sigmoid" and m["data"]["train_pairs"] == 4000 and m["data"]["eval_pairs"] == 400
    assert 0.0 <= m["metrics"]["eval_rewards/accuracies"] <= 1.0 and m["metrics"]["steps"] == 3
    # only the policy adapter is saved (TRL's frozen "ref" copy is not), and every tensor of it moved
    sft, pol = load_file(runs / "sft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(pol) == set(sft) and not (out / "ref").exists()
    assert sum(not torch.equal(pol[k], sft[k]) for k in pol) > len(pol) // 2
    # the first loss is DPO's at policy = reference: -log sigmoid(0) = log 2 (against the base it would not be)
    rows = _rows(out)
    assert rows[0]["step"] == 1 and rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "curves.png").is_file() and "DPO" in (out / "README.md").read_text()
    # plain peft loads it on the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT / "data" / "tiny-base"), out)


# the first loss of each variant at policy = reference (chosen and rejected log-ratios both 0), by hand
FIRST_LOSS = {
    "ipo": (["dpo.beta=0.1"], (0 - 1 / (2 * 0.1)) ** 2),         # (delta - 1/(2 tau))^2 = 25
    "hinge": (["dpo.beta=0.1"], 1.0),                              # max(0, 1 - beta * 0)
    "robust": (["dpo.label_smoothing=0.1"], math.log(2)),          # ((1-e) log 2 - e log 2) / (1 - 2e)
    # no reference: checked against the logged mean log-probs of the step's one pair
    "simpo": (["dpo.beta=2.0", "dpo.simpo_gamma=0.5", "dpo.batch_size=1"], None),
}


@pytest.mark.parametrize("loss", list(FIRST_LOSS))
def test_every_loss_variant_trains(parents, tmp_path, loss):
    """In this process (the CLI's process is the first test's) and without a held-out set: what is checked here
    is the training loss."""
    recipe, runs = parents
    extra, first = FIRST_LOSS[loss]
    out = tmp_path / loss
    ran("dpo", "--recipe", str(recipe), "--out", str(out),
        *_sets(f"dpo.loss={loss}", "data.eval_preference=null", "dpo.eval_fraction=0", *extra))
    m = json.loads((out / "manifest.json").read_text())
    assert m["dpo"]["loss"] == loss and math.isfinite(m["metrics"]["train_loss"])
    rows = [r for r in _rows(out) if "train/loss" in r]
    if first is not None:
        assert rows[0]["train/loss"] == pytest.approx(first, rel=1e-4)
    else:  # SimPO: -log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma) for the one pair
        assert m["dpo"]["reference"] == "none (reference-free)" and m["dpo"]["simpo_gamma"] == 0.5
        r = rows[0]
        expected = -torch.nn.functional.logsigmoid(torch.tensor(
            2.0 * (r["train/logps/chosen"] - r["train/logps/rejected"]) - 0.5)).item()
        assert r["train/loss"] == pytest.approx(expected, rel=1e-3)
    sft, pol = load_file(runs / "sft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(pol[k], sft[k]) for k in pol)


def test_dpo_on_rankings_and_with_full_finetuning(tiny_recipe, tmp_path):
    """Rankings train on their comparisons as pairs; full fine-tuning holds a second copy as the reference."""
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "responses": [
        f"The answer is {i + 1}.", f"I think it is {i + 1}.", f"maybe {i}."]}) + "\n" for i in range(12)))
    sets = ["sft.max_steps=2", "sft.eval_fraction=0", "adapter.method=full", "sft.lr=1e-4"]
    run_cli("sft", "--recipe", str(tiny_recipe), *[x for kv in sets for x in ("--set", kv)])
    out = tmp_path / "dpo"
    proc = run_cli("dpo", "--recipe", str(tiny_recipe), "--out", str(out), *_sets(
        f"data.preference={rankings}", "data.eval_preference=null", "dpo.eval_fraction=0.25", "dpo.lr=1e-5"))
    assert "reference the SFT policy (a second copy)" in proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["data"]["train_pairs"] == 9 * 3 and m["data"]["eval_pairs"] == 3 * 3  # C(3,2) pairs per ranking
    assert m["adapter"]["method"] == "full" and (out / "model.safetensors").is_file()
    assert _rows(out)[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_eval_takes_a_dpo_run_as_a_row_with_its_kl(parents, tmp_path):
    recipe, runs = parents
    out = tmp_path / "dpo"
    ran("dpo", "--recipe", str(recipe), "--out", str(out), *_sets("data.eval_preference=null", "dpo.eval_fraction=0"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?"}) + "\n" for i in range(4)))
    ran("eval", "--recipe", str(recipe), "--policy", "sft", "--policy", str(out), "--prompts", str(prompts),
            "--icl-shots", "0", "--out", str(tmp_path / "eval"))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    row = summary[str(out)]
    assert row["kl"] >= 0.0 and "gold" in row and row["responses"] == 4


def test_what_dpo_cannot_do_is_refused_cleanly(parents, tmp_path):
    recipe, runs = parents
    refused("dpo", "--recipe", str(recipe), "--policy", str(runs / "rm"), "--out", str(tmp_path / "x"),
            expect="not a policy")
    refused("dpo", "--recipe", str(recipe), "--out", str(tmp_path / "x"), "--set", "dpo.loss=kto", expect="dpo.loss")
    refused("dpo", "--recipe", str(recipe), "--out", str(tmp_path / "x"), "--set", "dpo.label_smoothing=0.1",
            expect="applies to loss robust only")
    refused("dpo", "--recipe", str(recipe), "--out", str(tmp_path / "x"), "--set", "dpo.max_length=8",
            expect="every pair is longer than dpo.max_length=8")
    assert not (tmp_path / "x").exists()
    recipe_prefix = write_recipe(tmp_path / "p.yaml", run_dir=str(tmp_path / "runs"), adapter={"method": "adalora"})
    refused("dpo", "--recipe", str(recipe_prefix), "--policy", "base", "--out", str(tmp_path / "y"),
            expect="not supported by the dpo stage")


@pytest.mark.fast
@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_the_reference_adapter_is_an_exact_copy_of_the_sft_adapter(method):
    """TRL copies parameters named *.default.* into its "ref" adapter; IA3 names its vectors *.ia3_l.default, which
    that misses (the reference would have been the bare base). After copy_reference_adapter the two adapters give
    the same logits, and differ from the base's."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.models import methods
    from rlhf.config import AdapterConfig
    from stages.dpo import copy_reference_adapter

    cfg = AdapterConfig(method=method, r=4, alpha=8)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ROOT / "data" / "tiny-base"),
                           methods.peft_config(cfg, "CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "default" in name.split("."):
                p.add_(0.05 * torch.randn_like(p))  # a trained SFT adapter, not the identity
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():  # what TRL does
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
    copied = copy_reference_adapter(model)
    assert (copied > 0) == (method == "ia3")
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    model.eval()  # adapter dropout off, as in DPO (disable_dropout)
    with torch.no_grad():
        model.set_adapter("default")
        policy = model(input_ids=ids).logits
        model.set_adapter("ref")
        reference = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(reference, policy, rtol=0, atol=0)
    assert not torch.allclose(reference, base)


@pytest.mark.fast
def test_disable_dropout_reaches_functional_dropout():
    """OPT passes float rates to nn.functional.dropout (TRL's disable_dropout sees only nn.Dropout modules): in
    train mode two passes differ until modeling.disable_dropout zeroes them; the config keeps its rates."""
    from transformers import OPTConfig, OPTForCausalLM

    from rlhf.models import modeling

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                     dropout=0.3, attention_dropout=0.2, activation_dropout=0.1)).train()
    ids = torch.tensor([[2, 5, 9, 13, 7]])
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
        assert modeling.disable_dropout(model) > 0
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert model.training and model.config.dropout == 0.3
