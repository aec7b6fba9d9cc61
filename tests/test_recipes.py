"""Recipes: every shipped file loads; mistakes are errors that name the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, run_cli
from rlhf import config
from rlhf.config import Recipe, field_docs, load_recipe
from rlhf.errors import UserError

pytestmark = pytest.mark.fast  # the fast tier (make test-fast)

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_folder_is_not_empty():
    assert TINY in RECIPES and len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_documents_its_command(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe.name
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), "a recipe starts with a comment saying how it is run"
    assert "rlhf " in path.read_text().split("\nname:")[0] or "make " in path.read_text().split("\nname:")[0]


@pytest.mark.parametrize("cls", [Recipe, config.ModelConfig, config.AdapterConfig, config.DataConfig,
                                 config.SFTConfig, config.RMConfig, config.PPOConfig, config.EvalConfig, config.LoggingConfig])
def test_every_field_has_a_docstring(cls):
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]
    assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def _error(tmp_path, text, overrides=()):
    with pytest.raises(UserError) as e:
        load_recipe(_write(tmp_path, text), overrides)
    return str(e.value)


def test_unknown_key_suggests_the_close_one(tmp_path):
    msg = _error(tmp_path, "sft:\n  learning_rate: 0.1\n  lrr: 0.1\n")
    assert "r.yaml" in msg and "unknown key sft.learning_rate" in msg
    msg = _error(tmp_path, "sft:\n  bach_size: 4\n")
    assert "sft.bach_size" in msg and "did you mean sft.batch_size" in msg


def test_unknown_section(tmp_path):
    msg = _error(tmp_path, "stf:\n  lr: 0.1\n")
    assert "unknown key stf" in msg and "did you mean sft" in msg


@pytest.mark.parametrize("text,key", [
    ("sft:\n  lr: fast\n", "sft.lr"),
    ("sft:\n  batch_size: 2.5\n", "sft.batch_size"),
    ("sft:\n  batch_size: true\n", "sft.batch_size"),
    ("adapter:\n  method: qlorax\n", "adapter.method"),
    ("model:\n  trust_remote_code: 'yes'\n", "model.trust_remote_code"),
    ("data:\n  columns: [a, b]\n", "data.columns"),
    ("sft: 3\n", "sft"),
])
def test_wrong_types_name_the_key(tmp_path, text, key):
    msg = _error(tmp_path, text)
    assert "r.yaml" in msg and key in msg


@pytest.mark.parametrize("text,key", [
    ("sft:\n  batch_size: 0\n", "sft.batch_size"),
    ("sft:\n  lr: -1.0\n", "sft.lr"),
    ("sft:\n  max_steps: 0\n", "sft.max_steps"),
    ("sft:\n  epochs: 0\n", "sft.epochs"),
    ("sft:\n  eval_fraction: 0.9\n", "sft.eval_fraction"),
    ("adapter:\n  r: 0\n", "adapter.r"),
    ("adapter:\n  target_modules: q_proj\n", "adapter.target_modules"),
    ("data:\n  sft: no/such/file.jsonl\n", "data.sft"),
    ("model:\n  base: ./no-such-model\n", "model.base"),
    ("name: a/b\n", "name"),
    ("ppo:\n  batch_size: 64\n  mini_batch_size: 24\n", "ppo.mini_batch_size"),
    ("ppo:\n  mini_batch_size: 16\n  micro_batch_size: 5\n", "ppo.micro_batch_size"),
    ("ppo:\n  gamma: 1.5\n", "ppo.gamma"),
    ("ppo:\n  kl_coef: -0.1\n", "ppo.kl_coef"),
    ("ppo:\n  kl_estimator: k2\n", "ppo.kl_estimator"),
    ("ppo:\n  advantage: ppo2\n", "ppo.advantage"),
    ("ppo:\n  batch_size: 64\n  samples_per_prompt: 3\n", "ppo.samples_per_prompt"),
    ("ppo:\n  advantage: grpo\n  samples_per_prompt: 1\n", "ppo.samples_per_prompt"),
    ("ppo:\n  advantage: rloo\n  samples_per_prompt: 4\n  kl_in: loss\n  kl_estimator: k1\n", "ppo.kl_estimator"),
    ("ppo:\n  clip_high: 1.0e+300\n", "ppo.clip_high"),
    ("ppo:\n  clip: 1000\n", "ppo.clip"),
    ("ppo:\n  value_clip: 1.0e+300\n", "ppo.value_clip"),
    ("ppo:\n  reward_clip: 1" + "0" * 400 + "\n", "ppo.reward_clip"),
    ("ppo:\n  resample_rounds: 1000000000\n", "ppo.resample_rounds"),
    ("rm:\n  batch_size: 0\n", "rm.batch_size"),
    ("eval:\n  samples: 0\n", "eval.samples"),
    ("eval:\n  icl_shots: -1\n", "eval.icl_shots"),
])
def test_impossible_values_name_the_key(tmp_path, text, key):
    msg = _error(tmp_path, text)
    assert key in msg


def test_bad_yaml_names_the_line(tmp_path):
    msg = _error(tmp_path, "sft:\n  lr: [1, 2\n")
    assert "r.yaml:" in msg and "not valid YAML" in msg


def test_set_overrides_with_yaml_values(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe(TINY, ["sft.lr=1e-4", "adapter.target_modules=[q_proj, v_proj]", "sft.max_steps=7"])
    assert r.sft.lr == 1e-4 and r.adapter.target_modules == ["q_proj", "v_proj"] and r.sft.max_steps == 7
    with pytest.raises(UserError, match=r"--set sft.lr=abc.*sft.lr must be a number"):
        load_recipe(TINY, ["sft.lr=abc"])
    with pytest.raises(UserError, match="did you mean sft.lr"):
        load_recipe(TINY, ["sft.lrr=0.1"])


def test_name_defaults_to_file_stem(tmp_path):
    r = load_recipe(_write(tmp_path, "sft:\n  lr: 0.001\n"))
    assert r.name == "r" and r.stage_dir("sft") == Path("runs/r/sft")


def test_resolved_recipe_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = load_recipe(TINY)
    again = load_recipe(_write(tmp_path, yaml.safe_dump(r.to_dict())))
    assert again.to_dict() == r.to_dict()


def test_cli_reports_recipe_errors_in_one_line(tmp_path):
    bad = _write(tmp_path, "sft:\n  bach_size: 4\n")
    proc = run_cli("sft", "--recipe", str(bad), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "did you mean sft.batch_size" in proc.stderr
    proc = run_cli("--debug", "sft", "--recipe", str(bad), check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
