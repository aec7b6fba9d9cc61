"""A run's base and parents are recorded where they were and what they were: read from another directory the run
still finds them, and a base or parent that changed since is refused in one line naming both (unless
``--allow-changed-base``), never silently loaded in its place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, TINY, ran, refused
from rlhf.models import modeling
from rlhf.runs import provenance


def _checkout(where: Path, perturb: float = 0.0) -> Path:
    """A directory standing for a checkout: the tiny base (its weights nudged by ``perturb``: a rebuilt base of
    the same shapes and sizes) and the data, with the tiny recipe naming them relative to it, as the shipped one
    does."""
    base = where / "data" / "tiny-base"
    shutil.copytree(ROOT / "data" / "tiny-base", base)
    if perturb:
        weights = load_file(base / "model.safetensors")
        gen = torch.Generator().manual_seed(1)
        save_file({k: v + perturb * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
                  str(base / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(ROOT / "data" / "tiny", where / "data" / "tiny")
    recipe = yaml.safe_load(TINY.read_text())
    (where / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return where


def test_a_run_finds_its_own_base_from_anywhere_and_refuses_a_changed_one(tmp_path, monkeypatch):
    old, new = _checkout(tmp_path / "old"), _checkout(tmp_path / "new", perturb=0.05)
    monkeypatch.setenv(provenance.ALLOW_ENV, "0")  # restored after the test (the flag sets it in this process)
    monkeypatch.chdir(old)
    ran("sft", "--recipe", "tiny.yaml", "--set", "sft.max_steps=1", "--set", "sft.eval_fraction=0")
    run = old / "runs" / "tiny" / "sft"
    m = json.loads((run / "manifest.json").read_text())
    assert m["base"] == "data/tiny-base"  # as typed, for display
    rec = m["resolved"]["base"]
    assert rec["path"] == str(old / "data" / "tiny-base") and rec["fingerprint"].startswith("sha256:")

    # from the other checkout, whose data/tiny-base is another model of the same shapes and sizes: the run still
    # loads the base it trained on (before, it silently put its adapter on the new one)
    monkeypatch.chdir(new)
    assert modeling.read_run(run).model.base == str(old / "data" / "tiny-base")
    assert provenance.fingerprint(new / "data" / "tiny-base") != rec["fingerprint"]

    # the base it trained on rebuilt in place: refused, naming both, unless allowed
    shutil.copy(new / "data" / "tiny-base" / "model.safetensors", old / "data" / "tiny-base" / "model.safetensors")
    line = refused("sample", str(run), "--prompts", "data/tiny/heldout_prompts.jsonl", "--limit", "2",
                   expect="its base changed since it was trained")
    assert str(old / "data" / "tiny-base") in line and "--allow-changed-base" in line
    ran("--allow-changed-base", "sample", str(run), "--prompts", "data/tiny/heldout_prompts.jsonl", "--limit", "1")
    monkeypatch.setenv(provenance.ALLOW_ENV, "0")

    # the recorded base gone: found as typed from the current directory, and checked there too
    shutil.rmtree(old / "data" / "tiny-base")
    refused("sample", str(run), "--prompts", "data/tiny/heldout_prompts.jsonl", "--limit", "2",
            expect=f"its base changed since it was trained: {Path('data/tiny-base')} is fingerprint")
    shutil.copytree(ROOT / "data" / "tiny-base", new / "data" / "tiny-base", dirs_exist_ok=True)
    assert modeling.read_run(run).model.base == "data/tiny-base"  # the same model as trained on: accepted
    monkeypatch.chdir(tmp_path)
    refused("sample", str(run), "--prompts", str(ROOT / "data/tiny/heldout_prompts.jsonl"),
            expect="its base 'data/tiny-base' is not there any more")


def test_a_parent_is_found_where_it_was_and_refused_when_replaced(tmp_path, monkeypatch):
    """A PPO or DPO run's SFT parent (eval's KL reference) recorded as typed relative to another directory is
    found where it was; a parent retrained since is not taken for the one the run started from."""
    parent = tmp_path / "a" / "runs" / "sft"
    parent.mkdir(parents=True)
    (parent / "manifest.json").write_text(json.dumps({"stage": "sft", "finished": "1"}))
    monkeypatch.chdir(tmp_path / "a")
    manifest = {"parents": {"sft": "runs/sft"}, **{"resolved": provenance.record(None, {"sft": "runs/sft"})}}
    monkeypatch.chdir(tmp_path)  # "runs/sft" names nothing here
    assert provenance.parent_of(manifest, "ppo", "sft") == parent
    assert provenance.where(manifest, "sft") == [str(parent)]
    (parent / "manifest.json").write_text(json.dumps({"stage": "sft", "finished": "2"}))  # retrained
    with pytest.raises(Exception, match="its sft run .* is not the run it was trained from"):
        provenance.parent_of(manifest, "ppo", "sft")
    monkeypatch.setenv(provenance.ALLOW_ENV, "1")
    assert provenance.parent_of(manifest, "ppo", "sft") == parent
