"""The PPO stage: one base with four adapters (reference = the SFT policy, reward = the RM), and a few real steps
through the CLI that move the policy and value but leave the reference and the reward untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_cli, write_recipe
from rlhf import formats, modeling, ppo_models, rollout
from rlhf.config import ModelConfig, load_recipe

SMALL = ["ppo.max_steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
         "ppo.max_new_tokens=16", "ppo.eval_every=1", "ppo.eval_samples=4"]


def _batch(tok):
    prompts = formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:5]
    convs = rollout.with_responses(prompts, ["The answer is 4.", "Let me think. So the answer is 1 2.",
                                             "maybe 3.", "The answer is red.", "x"])
    texts = [tok.apply_chat_template(c, tokenize=False) for c in convs]
    tok.padding_side = "left"
    return texts, tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_one_base_four_adapters_match_the_separate_models(parents):
    _, runs = parents
    cfg = ModelConfig(base=str(ROOT / "data" / "tiny-base"))
    models = ppo_models.load(cfg, "lora", runs / "sft", runs / "rm")
    tok = modeling.load_tokenizer(cfg, str(runs / "sft"))
    texts, b = _batch(tok)
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        ref = models.policy_logits(ids, mask, keep=0, role="reference")
        pol = models.policy_logits(ids, mask, keep=0)
        sft, _ = modeling.load_policy(runs / "sft")
        separate = sft(input_ids=ids, attention_mask=mask, position_ids=modeling.position_ids(mask)).logits
        scores = models.scores(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ref[real], separate[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(pol[real], ref[real], rtol=0, atol=1e-5)  # the policy starts as the SFT policy
    # the reward adapter + score head on the shared base score like the separately loaded reward model
    rm, rm_tok = modeling.load_reward(runs / "rm")
    convs = rollout.with_responses(formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:5],
                                   ["The answer is 4.", "Let me think. So the answer is 1 2.", "maybe 3.",
                                    "The answer is red.", "x"])
    torch.testing.assert_close(scores, rollout.score_conversations(rm, rm_tok, convs), rtol=0, atol=1e-4)
    # the value head starts as the score head on the normalised scale
    models = ppo_models.load(cfg, "lora", runs / "sft", runs / "rm", value_shift=1.5, value_scale=2.0)
    with torch.no_grad():
        values = models.values(ids, mask)[torch.arange(len(ids)), modeling.last_index(mask)]
    torch.testing.assert_close(values, (scores - 1.5) / 2.0, rtol=0, atol=1e-4)


def test_ppo_cli_moves_policy_and_value_only(parents, tmp_path, monkeypatch):
    recipe, runs = parents
    out = tmp_path / "ppo"
    args = [x for kv in SMALL + ["ppo.save_every=1"] for x in ("--set", kv)]
    proc = run_cli("ppo", "--recipe", str(recipe), "--out", str(out), *args)
    assert str(out) in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "manifest.json", "value/adapter_model.safetensors", "value/value_head.safetensors",
                 "checkpoints/step_000001/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "ppo" and m["parents"] == {"sft": str(runs / "sft"), "rm": str(runs / "rm")}
    assert m["metrics"]["episodes"] == 16 and m["data"]["prompts"]["rows_kept"] == 2000
    assert m["mixed_precision"] == ("bf16" if ppo_models.fast_bf16(torch.device("cpu")) else "no")  # "auto"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("objective/score", "objective/kl", "objective/non_score_reward", "objective/entropy",
                "policy/approxkl", "policy/clipfrac", "value/loss", "value/clipfrac", "ppo/kl_coef",
                "response/length", "response/eos_rate", "time/generation_s", "time/update_s", "eval/score",
                "eval/gold"):
        assert all(key in r for r in rows), key
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4), "the first rollout is the reference policy"

    # policy and value moved away from their parents
    sft, rm = load_file(runs / "sft" / "adapter_model.safetensors"), load_file(runs / "rm" / "adapter_model.safetensors")
    pol, val = load_file(out / "adapter_model.safetensors"), load_file(out / "value" / "adapter_model.safetensors")
    assert set(pol) == set(sft) and any(not torch.equal(pol[k], sft[k]) for k in pol)
    lora = [k for k in val if "lora_" in k]
    assert lora and all(k in rm for k in lora) and any(not torch.equal(val[k], rm[k]) for k in lora)
    # plain peft loads the PPO policy on the base
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ROOT / "data" / "tiny-base"), out)


def test_reference_and_reward_stay_frozen(parents, tmp_path, monkeypatch):
    from stages import ppo

    recipe_path, runs = parents
    kept = []
    original = ppo_models.load

    def keep(*a, **k):
        kept.append(original(*a, **k))
        return kept[-1]

    monkeypatch.setattr(ppo_models, "load", keep)
    recipe = load_recipe(recipe_path, SMALL + ["ppo.eval_every=0"])
    ppo.main(recipe, out=tmp_path / "ppo")
    models = kept[0]
    state = {k: v for k, v in models.model.state_dict().items()}
    for adapter, run in (("reference", "sft"), ("reward", "rm"), ("policy", "sft")):
        saved = load_file(runs / run / "adapter_model.safetensors")
        ours = {k.replace(f".{adapter}.", "."): v for k, v in state.items() if f".{adapter}." in k}
        same = [torch.equal(ours[k], v) for k, v in saved.items() if k in ours]
        assert same, adapter
        if adapter == "policy":
            assert not all(same), "the policy adapter trained"
        else:
            assert all(same), f"the {adapter} adapter must not change"
    head = load_file(runs / "rm" / "adapter_model.safetensors")
    score = next(v for k, v in head.items() if ".score." in k)
    assert torch.equal(models.reward_head.weight, score)


def test_ppo_from_the_bare_base_trains_policy_and_value(parents, tmp_path):
    """Without SFT the reference is the base with every adapter off, and both trained adapters keep training."""
    recipe, runs = parents
    out = tmp_path / "ppo"
    args = [x for kv in SMALL + ["ppo.eval_every=0", "ppo.max_steps=3"] for x in ("--set", kv)]
    run_cli("ppo", "--recipe", str(recipe), "--policy", "base", "--out", str(out), *args)
    m = json.loads((out / "manifest.json").read_text())
    assert m["parents"]["sft"] is None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # a fresh LoRA adapter is the base
    assert all(r["value/grad_norm"] > 0 and r["policy/grad_norm"] > 0 for r in rows)
    pol = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in pol.items())  # B starts at zero
    val, rm = load_file(out / "value" / "adapter_model.safetensors"), load_file(runs / "rm" / "adapter_model.safetensors")
    lora = [k for k in val if "lora_" in k]
    assert lora and all(k in rm for k in lora)
    moved = sum(not torch.equal(val[k], rm[k]) for k in lora)
    assert moved == len(lora), f"only {moved} of {len(lora)} value LoRA tensors trained"


def test_ppo_refuses_wrong_parents(parents, tmp_path):
    recipe, runs = parents
    proc = run_cli("ppo", "--recipe", str(recipe), "--policy", str(runs / "rm"), "--reward", str(runs / "rm"),
                   "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "not a policy" in proc.stderr
    proc = run_cli("ppo", "--recipe", str(recipe), "--reward", str(runs / "sft"), "--out", str(tmp_path / "x"),
                   check=False)
    assert proc.returncode == 2 and "not a reward model" in proc.stderr
    proc = run_cli("ppo", "--recipe", str(recipe), "--reward", str(tmp_path / "nothing"), "--out",
                   str(tmp_path / "x"), check=False)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_min_new_tokens_fixes_the_response_length(parents, tmp_path):
    recipe, _ = parents
    args = [x for kv in SMALL + ["ppo.eval_every=0", "ppo.min_new_tokens=16", "ppo.mixed_precision=no"]
            for x in ("--set", kv)]
    run_cli("ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"), *args)
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["response/length"] == 16 and r["response/eos_rate"] == 0 for r in rows)
    assert json.loads((tmp_path / "ppo" / "manifest.json").read_text())["mixed_precision"] == "no"


def test_mixed_precision_resolution():
    from stages.ppo import autocast_dtype

    cpu = torch.device("cpu")
    plain = ModelConfig(base="b")
    assert autocast_dtype("no", plain, cpu) is None
    assert autocast_dtype("bf16", plain, cpu) is torch.bfloat16
    assert autocast_dtype("auto", plain, cpu) is (torch.bfloat16 if ppo_models.fast_bf16(cpu) else None)
    assert autocast_dtype("auto", ModelConfig(base="b", dtype="bfloat16"), cpu) is None  # already bf16 weights
    assert autocast_dtype("auto", ModelConfig(base="b", quantization="4bit"), cpu) is None
