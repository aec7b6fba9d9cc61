"""The run manifest: one type every stage hands ``Run.finish``, written as manifest.json and read back as a
``ParentRun``, with what the run itself knows (the command it was given, what was sharded) passed in as values."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT

pytestmark = pytest.mark.fast


def _finish(tmp_path, stage: str, manifest, command: str | None = "rlhf sft --recipe r.yaml"):
    import torch
    from safetensors.torch import save_file

    from rlhf.runs.rundir import Run

    with Run(tmp_path / stage, stage, command=command) as run:
        save_file({"w": torch.zeros(2)}, run.staging / "adapter_model.safetensors")
        written = run.finish(manifest, files=["adapter_model.safetensors"])
    assert json.loads((tmp_path / stage / "manifest.json").read_text()) == json.loads(json.dumps(written))
    return written


def _manifest(**extra):
    from rlhf.config import load_recipe
    from rlhf.runs.manifest import Manifest

    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    return Manifest(base=recipe.model.base, parents={}, data={"train_rows": 3}, metrics={"train_loss": 1.5},
                    seed=7, recipe=recipe.to_dict(), **extra)


def test_a_stages_manifest_is_written_whole_and_read_back(tmp_path):
    """The common fields, the stage's own sections and what the run adds land in manifest.json; ``read_run`` reads
    it back typed. The command is the one the run was given (the CLI passes it), not this process's argv."""
    from rlhf.models import modeling

    written = _finish(tmp_path, "sft", _manifest(
        adapter={"method": "lora", "parameters": {"trainable": 10, "total": 100, "percent": 10.0}},
        untrained_rows_reinitialised=0, sections={"extra": {"a": 1}}))
    assert written["stage"] == "sft" and written["status"] == "complete" and written["extra"] == {"a": 1}
    assert written["command"] == "rlhf sft --recipe r.yaml" and written["seed"] == 7
    weights = tmp_path / "sft" / "adapter_model.safetensors"
    assert written["files"] == {weights.name: weights.stat().st_size}
    assert written["distributed"] == "NO"
    assert "reward_stats" not in written and "shards" not in written  # an SFT run scores nothing, shards nothing
    run = modeling.read_run(tmp_path / "sft", "policy")
    assert run.stage == "sft" and run.method == "lora" and run.reward_stats is None
    assert run.manifest["metrics"] == {"train_loss": 1.5} and run.section("sft") == written["recipe"]["sft"]


def test_scoring_stages_always_say_their_reward_statistics_and_shards_come_from_the_stage(tmp_path):
    """rm and ppo write ``reward_stats`` (null for PPO without a reward model, as readers expect); the shards a
    stage counted are recorded, and a run whose models were sharded says FSDP whatever the launcher called it."""
    shards = {"parameters": 100, "trained": 100, "held_by_process": [100], "trained_held_by_process": [100],
              "loaded_peak_rss_mb": [1.0]}
    ppo = _finish(tmp_path, "ppo", _manifest(shards=shards))
    assert ppo["reward_stats"] is None and ppo["shards"] == shards and ppo["distributed"] == "FSDP"
    rm = _finish(tmp_path, "rm", _manifest(reward_stats={"mean": 0.5, "std": 2.0}))
    assert rm["reward_stats"] == {"mean": 0.5, "std": 2.0} and rm["distributed"] == "NO"
    default = _finish(tmp_path, "eval", _manifest(), command=None)  # not started by the CLI: this process's argv
    assert default["command"] and "adapter" not in default


def test_a_stage_section_cannot_take_a_common_fields_name():
    with pytest.raises(ValueError, match="cannot be named metrics, seed"):
        _manifest(sections={"seed": 1, "metrics": {}, "dpo": {}})
