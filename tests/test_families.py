"""The portability matrix: every real model family (a small random-initialised model built from its transformers
config, with the family's own tokenizer conventions and chat template, see tests/families.py) through sft, rm,
ppo, eval and export --merge on data shaped like real files, through the real command line. For each family the
reward is read where the reward model trained: the score transformers' own forward pools (what TRL's reward trainer
trains) equals what PPO's scoring reads on the same sequences laid out as PPO lays out an episode."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from families import BY_NAME, FAMILIES, build, write_data
from rlhf.feedback import rewards
from rlhf.models import heads, modeling
from rlhf.ppo import ppo_models
from rlhf.text import encoding, formats
from rlhf.cli import cli
from rlhf.config import ModelConfig
from stages.rm import encode_rankings, trl_pairs

pytestmark = [pytest.mark.families, pytest.mark.fast]  # in-process and small: part of the fast tier


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("family-data"))


def recipe_for(base: Path, data: dict, run_dir: Path) -> dict:
    return {
        "name": "family", "run_dir": str(run_dir),
        "model": {"base": str(base), "attn_implementation": "eager"},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "data": {"sft": str(data["sft"]), "preference": str(data["preference"]), "prompts": str(data["prompts"]),
                 "eval_prompts": str(data["prompts"])},
        "sft": {"max_steps": 2, "batch_size": 4, "max_length": 256, "eval_fraction": 0.1, "logging_every": 1},
        "rm": {"max_steps": 2, "batch_size": 4, "max_length": 192, "eval_fraction": 0.2, "logging_every": 1,
               "stats_samples": 0},
        "ppo": {"max_steps": 1, "batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 2, "max_new_tokens": 8,
                "max_prompt_length": 96, "eval_every": 0, "mixed_precision": "no"},
        "dpo": {"max_steps": 2, "batch_size": 4, "max_length": 192, "eval_fraction": 0.2, "logging_every": 1},
        "eval": {"policies": ["sft", "ppo", "dpo"], "icl_shots": 1, "limit": 6, "max_new_tokens": 8, "bootstrap": 50},
    }


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, f"rlhf {' '.join(args)} exited {result.exit_code}\n{result.output}"
    return result.output


def ppo_layout(pairs_prompt_ids: list[list[int]], response_ids: list[list[int]], pad: int):
    """Prompts left-padded, responses right-padded, side by side: how PPO's rollout batch looks."""
    query, qmask = encoding.left_pad(pairs_prompt_ids, pad)
    width = max(len(r) for r in response_ids)
    resp = torch.full((len(response_ids), width), pad, dtype=torch.long)
    rmask = torch.zeros_like(resp)
    for i, r in enumerate(response_ids):
        resp[i, :len(r)], rmask[i, :len(r)] = torch.tensor(r), 1
    return torch.cat([query, resp], 1), torch.cat([qmask, rmask], 1)


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_through_every_stage(name, world, tmp_path):
    family = BY_NAME[name]
    base = build(family, tmp_path / "base")
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_for(base, world, tmp_path / "runs")))
    runs = tmp_path / "runs" / "family"
    r = str(recipe_path)

    invoke("sft", "--recipe", r)
    invoke("rm", "--recipe", r)
    # the ranking loop on this family: K candidates from its SFT model, ranked (here by length), and a reward model
    # trained on the rankings with the InstructGPT loss
    (tmp_path / "length.py").write_text("def chars(prompts, responses):\n"
                                        "    return [float(len(r)) for r in responses]\n")
    invoke("sample", str(runs / "sft"), "--prompts", str(world["prompts"]), "-k", "3", "--limit", "6",
           "--max-new-tokens", "6", "--out", str(tmp_path / "candidates.jsonl"))
    invoke("label", str(tmp_path / "candidates.jsonl"), "--by", f"{tmp_path / 'length.py'}:chars",
           "--out", str(tmp_path / "rankings.jsonl"))
    invoke("rm", "--recipe", r, "--set", f"data.preference={tmp_path / 'rankings.jsonl'}",
           "--out", str(runs / "rm-ranked"))
    ranked = json.loads((runs / "rm-ranked" / "manifest.json").read_text())
    assert ranked["status"] == "complete" and ranked["data"]["loss"] == "instructgpt_ranking"
    invoke("ppo", "--recipe", r)
    invoke("dpo", "--recipe", r)  # the reference is the SFT adapter, so the first loss is exactly log 2
    first = json.loads((runs / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    invoke("eval", "--recipe", r)
    invoke("export", str(runs / "ppo"), "--merge", "--out", str(tmp_path / "exported"))

    # every stage finished; the preference rows longer than rm.max_length were left out and counted
    for stage in ("sft", "rm", "ppo", "dpo", "eval"):
        assert json.loads((runs / stage / "manifest.json").read_text())["status"] == "complete", stage
    rm_manifest = json.loads((runs / "rm" / "manifest.json").read_text())
    assert rm_manifest["data"]["rows_too_long"] + rm_manifest["data"]["eval_rows_too_long"] == 8
    summary = json.loads((runs / "eval" / "summary.json").read_text())
    assert set(summary) == {"base ICL 1-shot", "sft", "ppo", "dpo"}
    used = json.loads((runs / "eval" / "manifest.json").read_text())["data"]
    assert used["prompts_too_long"] == 1 and used["prompts_used"] == 5  # the first of 6 has a 40-word input
    assert all(s["responses"] == 5 for s in summary.values())

    # the merged export is a plain transformers model that generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the answer?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert exported.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]

    # the reward is read where it was trained, on every path
    from trl.trainer.reward_trainer import DataCollatorForPreference

    reward, rtok = modeling.load_reward(runs / "rm")
    encoded = encode_rankings(rtok, formats.load(str(world["preference"]), "ranking").rows, 192)
    batch = DataCollatorForPreference(pad_token_id=rtok.pad_token_id)(trl_pairs(encoded)[:6])
    with torch.no_grad():
        trained = reward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        read = heads.sequence_scores(reward, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(read, trained, rtol=0, atol=1e-4)  # TRL's forward pools where we read
    kept = [formats.ranking_as_pairs(r)[0] for r in encoded.rankings[:6]]
    split = [encoding.encode_exchange(rtok, p["prompt"], p[side]) for side in ("chosen", "rejected") for p in kept]
    ids, mask = ppo_layout([q for q, _ in split], [a for _, a in split], rtok.pad_token_id)
    models = ppo_models.load(ModelConfig(base=str(base)), "lora", runs / "sft", runs / "rm")
    with torch.no_grad():
        ppo_scores = models.scores(ids, mask)
    torch.testing.assert_close(ppo_scores, trained, rtol=0, atol=1e-4)  # and so does PPO, on its own layout
    text_scores = rewards.score_conversations(reward, rtok, [p["prompt"] + p[side] for side in ("chosen", "rejected")
                                                             for p in kept])
    torch.testing.assert_close(text_scores, trained, rtol=0, atol=1e-4)  # and eval / rm score, from text


def test_every_tokenizer_is_fitted_the_same_way(tmp_path):
    """Gemma: EOS becomes <end_of_turn> (its turns end there, not at <eos>) and the system prompt folds into the
    first user turn; Llama 3: no pad token, so pad = EOS; GPT-2: the fallback template. Fitting twice (a run's saved
    tokenizer loaded again) changes nothing."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    gemma = modeling.load_tokenizer(ModelConfig(base=str(build(BY_NAME["gemma2"], tmp_path / "gemma"))))
    assert gemma.eos_token == "<end_of_turn>" and gemma.pad_token == "<pad>"
    assert gemma.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n")
    gemma.save_pretrained(str(tmp_path / "saved"))
    again = modeling.load_tokenizer(ModelConfig(base=str(tmp_path / "saved")))
    assert (again.eos_token, again.pad_token, again.chat_template) == (gemma.eos_token, gemma.pad_token,
                                                                        gemma.chat_template)
    llama = modeling.load_tokenizer(ModelConfig(base=str(build(BY_NAME["llama3"], tmp_path / "llama"))))
    assert llama.pad_token_id == llama.eos_token_id == llama.convert_tokens_to_ids("<|eot_id|>")
    gpt2 = modeling.load_tokenizer(ModelConfig(base=str(build(BY_NAME["gpt2"], tmp_path / "gpt2"))))
    assert gpt2.apply_chat_template(chat + [{"role": "assistant", "content": "Yes"}], tokenize=False) == (
        "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\nYes<|endoftext|>\n\n")
    # the exchange PPO lays out: the generation prompt, then the response through the first EOS
    prompt, response = encoding.encode_exchange(gemma, chat, [{"role": "assistant", "content": "Yes"}])
    assert gemma.decode(response) == "Yes<end_of_turn>"
    assert gemma.decode(prompt).endswith("<start_of_turn>model\n")


def test_rewards_are_read_at_the_last_token_that_is_not_pad():
    pad = 0
    ids = torch.tensor([[0, 0, 5, 6, 0],    # left and right padding, pad == EOS: the token before the final EOS
                        [7, 8, 9, 3, 0],    # a distinct EOS (3) is read itself
                        [0, 0, 0, 0, 0]])   # nothing but pad: its last real token
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0], [0, 0, 1, 1, 0]])
    assert heads.reward_index(ids, mask, pad).tolist() == [3, 3, 3]
    assert heads.reward_index(ids, mask, None).tolist() == [4, 3, 3]


def test_a_limit_that_drops_most_rows_says_so_loudly(capsys):
    encoding.report_dropped("rm", 299, 300, "pairs of x.jsonl", "rm.max_length", 160)
    encoding.report_dropped("rm", 3, 300, "pairs of x.jsonl", "rm.max_length", 160)
    encoding.report_dropped("rm", 0, 300, "pairs of x.jsonl", "rm.max_length", 160)
    loud, quiet = capsys.readouterr().err.splitlines()
    assert loud == ("rm: WARNING: dropped 299 of 300 pairs of x.jsonl (99.7%) longer than rm.max_length=160 "
                    "tokens; raise rm.max_length to keep them")
    assert quiet == "rm: dropped 3 of 300 pairs of x.jsonl (1.0%) longer than rm.max_length=160 tokens"


def test_what_a_family_cannot_do_is_a_clear_error_and_conv1d_takes_bottlenecks(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models import methods
    from rlhf.config import AdapterConfig
    from rlhf.errors import UserError

    phi3 = AutoModelForCausalLM.from_pretrained(str(build(BY_NAME["phi3"], tmp_path / "phi3")))
    with pytest.raises(UserError, match="ia3: peft has no default modules for phi3 models; set adapter.target"):
        methods.prepare(phi3, AdapterConfig(method="ia3"))
    methods.prepare(phi3, AdapterConfig(method="ia3", target_modules=["qkv_proj", "down_proj"]))  # as it says
    gpt2 = AutoModelForCausalLM.from_pretrained(str(build(BY_NAME["gpt2"], tmp_path / "gpt2")))
    methods.prepare(gpt2, AdapterConfig(method="adapter"))  # Houlsby bottlenecks after GPT-2's Conv1D projections
    assert sum(1 for m in gpt2.modules() if isinstance(m, methods.Bottleneck)) == 4  # 2 blocks x (attn, mlp)
    ids = torch.tensor([[1, 2, 3]])
    gpt2(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in gpt2.parameters() if p.requires_grad)
