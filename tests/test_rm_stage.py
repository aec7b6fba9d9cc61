"""The reward-model stage through the real CLI, and the one scoring function (padding-side invariant)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import ROOT, refused, run_cli, write_recipe
from rlhf.feedback import rewards
from rlhf.models import heads, modeling
from rlhf.text import formats
from rlhf.config import ModelConfig

HELDOUT = ROOT / "data" / "tiny" / "heldout_preference.jsonl"


def test_scores_do_not_depend_on_padding_side():
    cfg = ModelConfig(base=str(ROOT / "data" / "tiny-base"))
    tok = modeling.load_tokenizer(cfg)
    torch.manual_seed(0)
    model = modeling.load_base(cfg, kind="score").eval()
    pairs = formats.load(str(HELDOUT), "preference").rows[:6]
    texts = [tok.apply_chat_template(p["prompt"] + p["chosen"], tokenize=False) for p in pairs]
    scores = {}
    for side in ("left", "right"):
        tok.padding_side = side
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert (batch["attention_mask"] == 0).any(), "the batch must actually be padded"
        with torch.no_grad():
            scores[side] = heads.sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    singles = []
    for t in texts:  # no padding at all
        b = tok([t], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            singles.append(heads.sequence_scores(model, b["input_ids"], b["attention_mask"]))
    torch.testing.assert_close(scores["left"], scores["right"], rtol=0, atol=1e-5)
    torch.testing.assert_close(scores["right"], torch.cat(singles), rtol=0, atol=1e-5)


def test_rm_cli_writes_a_complete_run(tiny_recipe, tmp_path):
    proc = run_cli("rm", "--recipe", str(tiny_recipe), "--set", "rm.max_steps=6", "--set", "rm.eval_every=3",
                   "--set", "rm.logging_every=1")
    out = tmp_path / "runs" / "tiny" / "rm"
    assert str(out) in proc.stdout and "held-out accuracy" in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "metrics.jsonl",
                 "manifest.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "rm" and m["status"] == "complete" and m["metrics"]["steps"] == 6
    assert m["data"]["preference"]["rows_kept"] == 4000 and m["data"]["eval_rows"] == 400
    assert m["data"]["preference"]["files"][0]["sha256"] == formats.sha256(ROOT / "data/tiny/preference.jsonl")
    assert 0 <= m["metrics"]["eval_accuracy"] <= 1 and m["metrics"]["eval_pairs"] == 400
    stats = m["reward_stats"]
    assert stats["responses"] == 2000 and stats["std"] > 0

    weights = load_file(out / "adapter_model.safetensors")
    assert any("score" in k for k in weights), "the score head is saved with the adapter"
    assert all(weights[k].abs().sum() > 0 for k in weights if "lora_B" in k)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/accuracy" in x for x in lines) and any("eval/accuracy" in x for x in lines)

    # the documented loader (plain peft) and ours agree, and reloads give identical scores
    from peft import AutoPeftModelForSequenceClassification

    model, tok = modeling.load_reward(out)
    pairs = formats.load(str(HELDOUT), "preference").rows[:8]
    convs = [p["prompt"] + p["chosen"] for p in pairs]
    ours = rewards.score_conversations(model, tok, convs)
    again = rewards.score_conversations(modeling.load_reward(out)[0], tok, convs)
    assert torch.equal(ours, again)
    plain = AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=1).eval()
    plain.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    batch = tok([tok.apply_chat_template(c, tokenize=False) for c in convs], return_tensors="pt", padding=True,
                add_special_tokens=False)
    with torch.no_grad():
        hf = plain(**batch).logits.squeeze(-1)
    torch.testing.assert_close(hf, ours, rtol=0, atol=1e-5)

    # rlhf rm score on any pair file
    scored = tmp_path / "scored.jsonl"
    proc = run_cli("rm", "score", "--reward", str(out), "--data", str(HELDOUT), "--out", str(scored))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 400 and abs(summary["accuracy"] - m["metrics"]["eval_accuracy"]) < 1e-9
    assert len(scored.read_text().splitlines()) == 400


def test_rm_needs_preference_data_and_refuses_a_policy_as_reward(parents, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), data={"preference": None})
    refused("rm", "--recipe", str(recipe), expect="data.preference is required")
    refused("rm", "score", "--reward", str(parents[1] / "sft"), "--data", str(HELDOUT), expect="not a reward model")
