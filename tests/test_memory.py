"""The memory calculator (``rlhf memory``, rlhf/scale/memory.py): byte counts by hand on the tiny base's shapes, the
published shapes it ships for the docs' table, and the command's output and refusal."""

from __future__ import annotations

import pytest

from conftest import ROOT, ran, refused
from rlhf.scale import memory

pytestmark = pytest.mark.fast

# the tiny base: hidden 256, MLP 768, 4 layers of 4 heads of 64, vocabulary 512, tied head
LAYER = 4 * 256 * 256 + 3 * 256 * 768 + 2 * 256  # attention, MLP, two norms: 852,480
PARAMETERS = 4 * LAYER + 512 * 256 + 256  # + embeddings + final norm: 3,541,248
LORA_PER_RANK = 4 * (4 * (256 + 256) + 2 * (256 + 768) + (768 + 256))  # 20,480: r x this = the adapter (327,680)


def test_the_tiny_bases_shapes_and_bytes_by_hand():
    s = memory.load_shapes(str(ROOT / "data" / "tiny-base"))
    assert s == memory.Shapes(parameters=PARAMETERS, embeddings=512 * 256, largest_layer=LAYER,
                              lora_per_rank=LORA_PER_RANK)
    adapter = 16 * LORA_PER_RANK
    # full SFT: 16 bytes a trained parameter
    assert memory.per_process(s, "full", "sft")["total"] == 16 * PARAMETERS
    # LoRA PPO: the bf16 base once, the policy and value adapters trained, the reference and reward ones frozen
    assert memory.per_process(s, "lora", "ppo") == {"weights": 2 * PARAMETERS + 2 * 4 * adapter,
                                                    "training": 2 * 16 * adapter,
                                                    "total": 2 * PARAMETERS + 40 * adapter}
    # the shared critic trains one adapter fewer
    assert memory.per_process(s, "lora", "ppo-shared")["training"] == 16 * adapter
    # QLoRA: the decoder's weights in 4 bits, the embeddings in bf16
    assert memory.per_process(s, "qlora", "sft")["weights"] == pytest.approx(
        0.52 * (PARAMETERS - 512 * 256) + 2 * 512 * 256)
    # full SFT sharded over 2: everything halved, plus the largest layer gathered twice in bf16
    assert memory.per_process(s, "full", "sft", processes=2, sharded=True)["total"] == 16 * PARAMETERS / 2 + 2 * 2 * LAYER
    # full PPO sharded over 2: everything halved, plus the whole policy gathered in bf16 for the rollout
    sharded = memory.per_process(s, "full", "ppo", processes=2, sharded=True)
    assert sharded["total"] == (2 * 2 + 2 * 16) * PARAMETERS / 2 + 2 * PARAMETERS


def test_where_each_layout_fits():
    """A 7B full-fine-tuning PPO (policy and value trained, reference and reward frozen: 36 bytes a parameter) is
    ~275 GB before activations: no 80 GB card holds it, eight do sharded (34 GB each, plus the policy gathered
    whole for the rollout: 50 GB); LoRA fits one card; full SFT of 7B shards over eight."""
    s = memory.published("Qwen2.5-7B")
    assert 7.5e9 < s.parameters < 7.7e9  # Qwen2.5-7B has 7.62B
    assert memory.per_process(s, "full", "ppo")["total"] == pytest.approx(36 * s.parameters)
    assert memory.fits(s, "lora", "ppo", 80, 8) == "one GPU each (data parallel)"
    assert memory.fits(s, "full", "ppo", 80, 8) == "FSDP over 8 (fsdp.yaml)"
    assert memory.per_process(s, "full", "ppo", 8, sharded=True)["total"] == pytest.approx((36 / 8 + 2) * s.parameters)
    assert memory.fits(s, "full", "sft", 80, 8) == "FSDP over 8 (fsdp.yaml)"
    assert memory.fits(memory.published("Qwen2.5-72B"), "full", "ppo", 80, 8) == "does not fit"
    table = memory.decision_table()
    assert table.count("\n") == 1 + 3 * len(memory.PUBLISHED) and "| Qwen2.5-0.5B (0.5B) | lora |" in table
    assert table in (ROOT / "docs" / "operations.md").read_text(), "docs/operations.md's table is not the one " \
        "memory.decision_table() makes now: paste it there"


def test_the_memory_command():
    out = ran("memory", str(ROOT / "data" / "tiny-base"), "--method", "full", "--processes", "2")
    assert f"{PARAMETERS:,} parameters" in out and "FSDP over 2" in out
    assert [line.split()[0] for line in out.splitlines()[1:]] == list(memory.HOLDS)
    refused("memory", "no/such/model", expect="no/such/model: no model configuration to read")


@pytest.mark.parametrize("case,change,expect", [
    ("zero-heads", {"num_attention_heads": 0}, "an impossible model configuration"),
    ("negative", {"hidden_size": -256}, "an impossible model configuration"),
    ("fractional", {"num_hidden_layers": 2.5}, "an impossible model configuration"),
    ("encoder", {"model_type": "bert", "architectures": ["BertModel"]}, "is BertModel, not a causal language model"),
    ("remote-code", {"model_type": "mything", "auto_map": {"AutoConfig": "configuration_mything.MyConfig"}},
     "its configuration is the repository's own code (auto_map); rlhf memory never runs it"),
])
def test_memory_refuses_what_is_not_a_causal_lm_it_can_build_in_one_line(tmp_path, case, change, expect):
    """Each was a traceback, a report for an impossible model, or (remote code) a "run custom code? [y/N]" prompt."""
    import json

    config = {**json.loads((ROOT / "data" / "tiny-base" / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_mything.py").write_text("raise SystemExit('remote code ran')\n")
    refused("memory", str(tmp_path), expect=f"{tmp_path}: {expect}")


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_memory_refuses_a_gpu_size_that_is_not_a_positive_finite_number(value):
    from click.testing import CliRunner

    from rlhf.cli import cli

    result = CliRunner().invoke(cli, ["memory", str(ROOT / "data" / "tiny-base"), "--gpu-gb", value])
    assert result.exit_code == 2 and "Invalid value for '--gpu-gb'" in result.output, result.output
