"""Full fine-tuning through every stage: SFT and RM save whole models, PPO holds four separate copies."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import ran, write_recipe
from rlhf.models import modeling


def test_full_pipeline_sft_rm_ppo_eval(tmp_path):
    """Every stage in this process (what they leave behind is the subject; the stage tests run the real CLI)."""
    recipe = write_recipe(tmp_path / "full.yaml", run_dir=str(tmp_path / "runs"), adapter={"method": "full"})
    common = ["--set", "sft.lr=1e-4", "--set", "rm.lr=1e-4"]
    ran("sft", "--recipe", str(recipe), "--set", "sft.max_steps=3", *common)
    ran("rm", "--recipe", str(recipe), "--set", "rm.max_steps=3", "--set", "rm.stats_samples=64", *common)
    runs = tmp_path / "runs" / "tiny"
    assert (runs / "rm" / "model.safetensors").is_file() and not (runs / "rm" / "adapter_config.json").exists()
    reward, _ = modeling.load_reward(runs / "rm")
    assert reward.config.num_labels == 1

    ran("ppo", "--recipe", str(recipe), "--set", "ppo.max_steps=1", "--set", "ppo.batch_size=4",
            "--set", "ppo.mini_batch_size=4", "--set", "ppo.micro_batch_size=2", "--set", "ppo.max_new_tokens=8",
            "--set", "ppo.lr=1e-5", "--set", "ppo.eval_every=0")
    out = runs / "ppo"
    m = json.loads((out / "manifest.json").read_text())
    assert m["adapter"]["method"] == "full"
    assert m["adapter"]["parameters"]["trainable"] > 2 * 3_000_000, "policy and value are whole models"
    policy, sft = load_file(out / "model.safetensors"), load_file(runs / "sft" / "model.safetensors")
    assert any(not torch.equal(policy[k], sft[k]) for k in policy)
    assert (out / "value" / "model.safetensors").is_file()
    model, tok = modeling.load_policy(out)
    assert model.training is False

    ran("eval", "--recipe", str(recipe), "--set", "eval.limit=4", "--set", "eval.max_new_tokens=8",
            "--set", "eval.icl_shots=0")
    summary = json.loads((runs / "eval" / "summary.json").read_text())
    assert list(summary) == ["sft", "ppo"] and summary["ppo"]["kl"] is not None
