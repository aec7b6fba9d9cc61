"""The SFT stage through its real entry points on the tiny base: outputs, manifest, reload, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, ran, refused, run_cli, write_recipe
from rlhf.models import modeling
from rlhf.text import formats
from rlhf.config import load_recipe

FEW = ("--set", "sft.max_steps=4", "--set", "sft.eval_every=2", "--set", "sft.logging_every=1")


def _probe(tokenizer):
    msgs = [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "The answer is 42."}]
    return tokenizer.apply_chat_template(msgs, return_tensors="pt", return_dict=True)["input_ids"]


def test_sft_cli_writes_a_complete_run(tiny_recipe, tmp_path):
    proc = run_cli("sft", "--recipe", str(tiny_recipe), *FEW)
    out = tmp_path / "runs" / "tiny" / "sft"
    assert str(out) in proc.stdout
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "metrics.jsonl", "manifest.json"):
        assert (out / name).is_file(), name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging or work dirs left behind"

    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "sft" and m["status"] == "complete" and m["parents"] == {}
    assert m["base"] == str(ROOT / "data" / "tiny-base")
    assert m["seed"] == 42 and m["recipe"]["sft"]["max_steps"] == 4
    assert m["metrics"]["steps"] == 4 and m["metrics"]["eval_loss"] > 0
    sft_data = m["data"]["sft"]
    assert sft_data["files"][0]["sha256"] == formats.sha256(ROOT / "data" / "tiny" / "sft.jsonl")
    assert sft_data["rows_read"] == 4000 and sft_data["rows_kept"] == 4000 and sft_data["rows_dropped"] == 0
    assert m["data"]["train_rows"] + m["data"]["eval_rows"] == 4000
    assert {"torch", "transformers", "trl", "peft", "python"} <= set(m["versions"])
    assert m["started"] <= m["finished"] and "rlhf" in m["command"]
    assert 0 < m["adapter"]["parameters"]["trainable"] < m["adapter"]["parameters"]["total"]

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in x for x in lines) and any("eval/loss" in x for x in lines)

    # every LoRA B matrix starts at zero: all of them moved
    weights = load_file(out / "adapter_model.safetensors")
    b = [k for k in weights if "lora_B" in k]
    assert b and all(weights[k].abs().sum() > 0 for k in b)

    # plain peft loads it, and the adapter changes the base's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = modeling.load_tokenizer(modeling.ModelConfig(base=str(out)))
    ids = _probe(tok)
    base = AutoModelForCausalLM.from_pretrained(ROOT / "data" / "tiny-base")
    base_logits = base(ids).logits
    plain = PeftModel.from_pretrained(base, out).eval()
    ours, _ = modeling.load_policy(out)
    assert torch.equal(plain(ids).logits, ours(ids).logits)
    assert not torch.allclose(base_logits, ours(ids).logits)


def test_reload_gives_the_trained_models_logits(tmp_path, monkeypatch):
    """In-process run: the model in memory at the end of training and the one reloaded from disk agree."""
    import trl

    from stages import sft

    trainers = []
    original = trl.SFTTrainer.train

    def keep(self, *a, **k):
        trainers.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(trl.SFTTrainer, "train", keep)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs")),
                         ["sft.max_steps=3", "sft.eval_fraction=0"])
    sft.main(recipe)
    trained = trainers[0].model.eval()
    reloaded, tok = modeling.load_policy(recipe.stage_dir("sft"))
    ids = _probe(tok)
    with torch.no_grad():
        assert torch.allclose(trained(ids).logits, reloaded(ids).logits, atol=1e-6)


def test_full_finetuning_and_cli_base_out(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), adapter={"method": "full"})
    out = tmp_path / "elsewhere"
    run_cli("sft", "--recipe", str(recipe), "--base", str(ROOT / "data" / "tiny-base"), "--out", str(out),
            "--set", "sft.max_steps=2", "--set", "sft.lr=1e-4")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["adapter"]["parameters"]["percent"] == 100.0 and m["recipe"]["sft"]["lr"] == 1e-4
    model, tok = modeling.load_policy(out)
    base = modeling.load_base(modeling.ModelConfig(base=str(ROOT / "data" / "tiny-base")))
    ids = _probe(tok)
    assert not torch.allclose(base(ids).logits, model(ids).logits)


def test_finished_run_is_not_overwritten_without_the_flag(tiny_recipe, tmp_path):
    ran("sft", "--recipe", str(tiny_recipe), "--set", "sft.max_steps=1")
    out = tmp_path / "runs" / "tiny" / "sft"
    before = (out / "adapter_model.safetensors").read_bytes()
    refused("sft", "--recipe", str(tiny_recipe), "--set", "sft.max_steps=1", "--set", "sft.seed=3",
            expect="--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() == before
    ran("sft", "--recipe", str(tiny_recipe), "--set", "sft.max_steps=1", "--set", "sft.seed=3", "--overwrite")
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert json.loads((out / "manifest.json").read_text())["seed"] == 3


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "What is 1 + 2?", "completion": "The answer is 3."}\n{"prompt": "x", "completion": ""}\n',
     "bad.jsonl:2: empty response"),
    ('{"prompt": "What is 1 + 2?", "completion": "The answer is 3."}\n{"prompt": "x",\n', "bad.jsonl:2: invalid JSON"),
])
def test_bad_data_exits_2_and_writes_nothing(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), data={"sft": str(bad)})
    refused("sft", "--recipe", str(recipe), expect=message)
    assert not (tmp_path / "runs").exists()


def test_drop_mode_trains_on_the_good_rows(tmp_path):
    rows = (ROOT / "data" / "tiny" / "sft.jsonl").read_text().splitlines()[:40]
    bad = tmp_path / "mixed.jsonl"
    bad.write_text("\n".join(rows[:20] + ['{"prompt": "x", "completion": ""}', "{nope"] + rows[20:]) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"),
                          data={"sft": str(bad), "on_bad_row": "drop"})
    run_cli("sft", "--recipe", str(recipe), "--set", "sft.max_steps=1")
    m = json.loads((tmp_path / "runs" / "tiny" / "sft" / "manifest.json").read_text())
    assert m["data"]["sft"]["rows_kept"] == 40 and m["data"]["sft"]["rows_dropped"] == 2
    assert Path(m["data"]["sft"]["drop_examples"][0].split(":")[0]).name == "mixed.jsonl"


def test_rows_truncated_to_nothing_are_counted_and_left_out(tmp_path):
    """A row whose prompt fills sft.max_length has no response token left: it is left out and counted (as the RM
    counts its too-long pairs), a row cut inside its response is counted as truncated; a file where every row
    loses its response is refused."""
    long_prompt = "What is 2 + 2? " + "Explain all the arithmetic you know first. " * 8
    rows = [{"prompt": "What is 1 + 1?", "completion": "The answer is 2."},
            {"prompt": long_prompt, "completion": "The answer is 4."},
            {"prompt": "What is 3 + 1?", "completion": "The answer is 4. " + "And then more words. " * 10},
            {"prompt": "What is 5 + 1?", "completion": "The answer is 6."}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs"), data={"sft": str(path)})
    sets = ["sft.max_length=40", "sft.max_steps=1", "sft.eval_fraction=0", "sft.batch_size=2"]
    proc = run_cli("sft", "--recipe", str(recipe), *[x for kv in sets for x in ("--set", kv)])
    assert "dropped 1 of 4 rows" in proc.stderr and "whole response lies past sft.max_length=40" in proc.stderr
    assert "1 of 3 rows reach sft.max_length=40 tokens and are cut there" in proc.stderr
    m = json.loads((tmp_path / "runs" / "tiny" / "sft" / "manifest.json").read_text())["data"]
    assert (m["rows_without_response"], m["rows_truncated"], m["train_rows"]) == (1, 1, 4)

    path.write_text(json.dumps(rows[1]) + "\n")
    refused("sft", "--recipe", str(recipe), "--out", str(tmp_path / "none"),
            *[x for kv in sets for x in ("--set", kv)], lines_before=True,
            expect="every row's response lies past sft.max_length=40")
    assert not (tmp_path / "none").exists()


def test_a_failed_save_keeps_the_previous_run(tmp_path, monkeypatch):
    """Disk full while saving: a one-line error, and the finished run being replaced is untouched."""
    import errno

    import trl

    from stages import sft

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs")),
                         ["sft.max_steps=1", "sft.eval_fraction=0"])
    sft.main(recipe)
    out = recipe.stage_dir("sft")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def disk_full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trl.SFTTrainer, "save_model", disk_full)
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="cannot save the run \\(No space left on device\\)"):
        sft.main(recipe, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(out.parent.glob(".sft.*")), "the failed attempt leaves nothing behind"


def test_a_run_without_its_weights_is_never_marked_complete(tmp_path, monkeypatch):
    """A save that writes nothing and says nothing (as the trainer's does under an FSDP config when it thinks the
    model is not sharded): the run stops with one line naming the missing file instead of being published
    complete, and the finished run it was to replace is untouched. Every file a run promises is listed in its
    manifest with its size."""
    import trl

    from rlhf.errors import UserError
    from stages import sft

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", run_dir=str(tmp_path / "runs")),
                         ["sft.max_steps=1", "sft.eval_fraction=0"])
    sft.main(recipe)
    out = recipe.stage_dir("sft")
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"}
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").stat().st_size
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    monkeypatch.setattr(trl.SFTTrainer, "save_model", lambda self, *a, **k: None)
    with pytest.raises(UserError, match="the run wrote no adapter_config.json, adapter_model.safetensors, which it must hold"):
        sft.main(recipe, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
