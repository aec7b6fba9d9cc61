"""The PPO stage: one base with four adapters (reference = the SFT policy, reward = the RM), and a few real steps
through the CLI that move the policy and value but leave the reference and the reward untouched."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import FLAT_WHEN_EVEN, ROOT, ran, refused, run_cli
from rlhf.engine import rollout
from rlhf.feedback import rewards
from rlhf.models import heads, modeling
from rlhf.ppo import ppo_math, ppo_models, ppo_update, precision
from rlhf.scale import allocator
from rlhf.text import encoding, formats
from rlhf.config import ModelConfig, load_recipe
from rlhf.engine.episodes import Episodes, Scored, replace_rows

SMALL = ["ppo.max_steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
         "ppo.max_new_tokens=16", "ppo.eval_every=1", "ppo.eval_samples=4"]


def _batch(tok):
    prompts = formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:5]
    convs = encoding.with_responses(prompts, ["The answer is 4.", "Let me think. So the answer is 1 2.",
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
        separate = sft(input_ids=ids, attention_mask=mask, position_ids=encoding.position_ids(mask)).logits
        scores = models.scores(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ref[real], separate[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(pol[real], ref[real], rtol=0, atol=1e-5)  # the policy starts as the SFT policy
    # the reward adapter + score head on the shared base score like the separately loaded reward model
    rm, rm_tok = modeling.load_reward(runs / "rm")
    convs = encoding.with_responses(formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:5],
                                    ["The answer is 4.", "Let me think. So the answer is 1 2.", "maybe 3.",
                                     "The answer is red.", "x"])
    torch.testing.assert_close(scores, rewards.score_conversations(rm, rm_tok, convs), rtol=0, atol=1e-4)
    # the value head starts as the score head on the normalised scale
    models = ppo_models.load(cfg, "lora", runs / "sft", runs / "rm", value_shift=1.5, value_scale=2.0)
    with torch.no_grad():
        values = models.critic.values(ids, mask)[torch.arange(len(ids)), heads.reward_index(ids, mask, None)]
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
    # "auto": bf16 only where bf16 products measured fast enough on this CPU
    assert (m["mixed_precision"] == "bf16") == (m["bf16_speedup"] >= precision.BF16_MIN_SPEEDUP)
    assert m["repeatable"] is True  # PPO's passes gave the same bits twice here (tests/test_precision.py)
    # tcmalloc preloaded where the system has it, unless turned off (rlhf/scale/allocator.py)
    wanted = allocator.find_tcmalloc() and os.environ.get(allocator.ENV, "auto") != "system"
    assert m["allocator"] == ("tcmalloc" if wanted else "system")
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
    val = load_file(out / "value" / "adapter_model.safetensors")
    rm = load_file(runs / "rm" / "adapter_model.safetensors")
    lora = [k for k in val if "lora_" in k]
    assert lora and all(k in rm for k in lora)
    moved = sum(not torch.equal(val[k], rm[k]) for k in lora)
    assert moved == len(lora), f"only {moved} of {len(lora)} value LoRA tensors trained"


CRITIC_FREE = [("grpo", "{reward_model: 1.0}"), ("rloo", "{gold: 4.0}"),
               ("reinforce_pp", "{reward_model: 1.0, gold: 2.0}")]


@pytest.mark.parametrize("estimator,reward", CRITIC_FREE, ids=[e for e, _ in CRITIC_FREE])
def test_critic_free_estimators_train_the_policy_alone(parents, tmp_path, estimator, reward):
    """K = 4 responses to each of 2 prompts a step: no value adapter or head is created, trained or saved; the
    policy moves; the manifest says which estimator ran; grpo's KL is a loss term, the others' in the reward."""
    recipe, runs = parents
    out = tmp_path / "ppo"
    args = [x for kv in SMALL + [f"ppo.advantage={estimator}", "ppo.samples_per_prompt=4", f"ppo.reward={reward}",
                                 "ppo.save_every=1"] for x in ("--set", kv)]
    proc = run_cli("ppo", "--recipe", str(recipe), "--out", str(out), *args)
    assert f"2 steps of 8 episodes (4 per prompt); advantage {estimator}" in proc.stderr
    assert not (out / "value").exists() and (out / "checkpoints" / "step_000001" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints" / "step_000001" / "value").exists()
    m = json.loads((out / "manifest.json").read_text())
    kl_in = "loss" if estimator == "grpo" else "reward"
    assert m["advantage"] == {"estimator": estimator, "samples_per_prompt": 4, "critic": None, "kl_in": kl_in,
                              "kl_estimator": "k3" if kl_in == "loss" else "k1"}
    assert m["metrics"]["episodes"] == 16 and m["adapter"]["parameters"]["trainable"] == sum(
        v.numel() for v in load_file(out / "adapter_model.safetensors").values())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert not any(k.startswith("value/") for k in r) and r["policy/grad_norm"] > 0
        assert 0.0 <= r["objective/flat_groups"] <= 1.0 and ("policy/kl_loss" in r) == (kl_in == "loss")
        assert r["objective/non_score_reward"] == pytest.approx(-r["ppo/kl_coef"] * r["objective/kl"], abs=1e-6)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    sft, pol = load_file(runs / "sft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(pol) == set(sft) and any(not torch.equal(pol[k], sft[k]) for k in pol)


OBJECTIVES = {  # one sensible setting each: the paper's own aggregation unless the case is about another
    "gspo": (["ppo.policy_loss=gspo", "ppo.advantage=grpo"], "seq_mean_token_mean", [3e-4, 4e-4]),
    "cispo-dr_grpo-overlong": (["ppo.policy_loss=cispo", "ppo.advantage=dr_grpo", "ppo.overlong_buffer=8"],
                               "seq_mean_token_sum_norm", [1.0, 4.0]),
    "dapo-clip-higher-gae": (["ppo.clip_low=0.2", "ppo.clip_high=0.28", "ppo.loss_aggregation=seq_mean_token_sum"],
                             "seq_mean_token_sum", [0.2, 0.28]),
}


@pytest.mark.parametrize("case", list(OBJECTIVES))
def test_every_policy_objective_trains_through_the_cli(parents, tmp_path, case):
    """Each objective and aggregation runs a PPO step in this process: the policy moves, the manifest says what
    ran (with the defaults resolved), the overlong term is logged when on."""
    recipe, runs = parents
    sets, aggregation, clip = OBJECTIVES[case]
    out = tmp_path / "ppo"
    k = [] if "gae" in case else ["ppo.samples_per_prompt=4"]
    ran("ppo", "--recipe", str(recipe), "--out", str(out),
        *[x for kv in SMALL + sets + k + ["ppo.max_steps=1", "ppo.eval_every=0"] for x in ("--set", kv)])
    m = json.loads((out / "manifest.json").read_text())
    objective = dict(kv.split("=") for kv in sets).get("ppo.policy_loss", "ppo")
    assert m["objective"]["policy_loss"] == objective and m["objective"]["loss_aggregation"] == aggregation
    assert m["objective"]["clip"] == pytest.approx(clip)
    assert (m["objective"]["overlong"] is not None) == ("overlong" in case)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert ("objective/overlong" in row) == ("overlong" in case) and math.isfinite(row["policy/loss"])
    if "overlong" in case:  # responses of 9 to 16 tokens pay 1/8 per token past 8, up to 1
        assert -1.0 <= row["objective/overlong"] <= 0.0
    sft, pol = load_file(runs / "sft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert any(not torch.equal(pol[k], sft[k]) for k in pol)


def test_dynamic_sampling_refills_flat_groups(parents, tmp_path):
    """DAPO's dynamic sampling: prompts whose last number is even (or that have none) always give a flat group (a
    scorer that scores them 0); their slots are refilled with the next prompts until none is flat or the rounds
    run out."""
    recipe, _ = parents
    (tmp_path / "flat.py").write_text(FLAT_WHEN_EVEN)
    out = tmp_path / "ppo"
    sets = SMALL + ["ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.max_steps=3", "ppo.eval_every=0",
                    f"ppo.reward={{{tmp_path / 'flat.py'}:flat_when_even: 1.0}}", "ppo.drop_flat_groups=true",
                    "ppo.resample_rounds=2", "ppo.missing_eos_penalty=null"]  # the scorer alone makes groups flat
    ran("ppo", "--recipe", str(recipe), "--out", str(out), *[x for kv in sets for x in ("--set", kv)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["objective/resampled"] for r in rows) > 0
    for r in rows:  # a slot still flat at the end was refilled in every round
        assert r["objective/flat_groups"] == 0.0 or r["objective/resampled"] >= 2
    assert json.loads((out / "manifest.json").read_text())["metrics"]["episodes"] == 3 * 8


def test_a_flat_reward_ends_the_refills_and_says_the_step_trains_on_nothing(parents, tmp_path):
    """A reward that is the same for every response: dynamic sampling stops after one pass over the prompt set
    (6 prompts here, whatever ppo.resample_rounds says), and the run says in one line that its steps train on
    nothing; the manifest counts them."""
    recipe, _ = parents
    (tmp_path / "const.py").write_text("def const(prompts, responses):\n    return [0.5 for _ in responses]\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(6)))
    out = tmp_path / "ppo"
    sets = SMALL + ["ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.max_steps=2", "ppo.eval_every=0",
                    f"ppo.reward={{{tmp_path / 'const.py'}:const: 1.0}}", "ppo.drop_flat_groups=true",
                    "ppo.resample_rounds=100", f"data.prompts={prompts}", "ppo.missing_eos_penalty=null"]
    proc = run_cli("ppo", "--recipe", str(recipe), "--out", str(out), *[x for kv in sets for x in ("--set", kv)])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["objective/flat_groups"] == 1.0 and r["objective/resampled"] <= 6 for r in rows), rows
    warned = [x for x in proc.stderr.splitlines() if "trains on nothing" in x]
    assert len(warned) == 1 and "step 1 " in warned[0] and "the reward is flat" in warned[0], proc.stderr
    assert "all 2 steps trained on nothing" in proc.stderr
    assert json.loads((out / "manifest.json").read_text())["metrics"]["flat_steps"] == 2


def test_critic_free_from_the_bare_base_with_full_finetuning(tiny_recipe, tmp_path):
    """The separate-copies layout (full fine-tuning) without a critic: no value model is loaded or saved."""
    out = tmp_path / "ppo"
    args = [x for kv in SMALL + ["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "ppo.reward={gold: 1.0}",
                                 "adapter.method=full", "ppo.eval_every=0"] for x in ("--set", kv)]
    proc = run_cli("ppo", "--recipe", str(tiny_recipe), "--policy", "base", "--out", str(out), *args)
    assert "parameters (policy)" in proc.stderr
    assert (out / "model.safetensors").is_file() and not (out / "value").exists()


def test_replace_rows_repads_both_batches_of_episodes():
    """A refilled slot's episodes replace rows of the step's scored episodes, whatever their prompt and response
    widths: prompts stay left-padded, responses right-padded, every per-episode field follows its row, and the
    old value is left as it was (each phase returns a new value)."""

    def scored(prompts, responses, base):
        q = max(map(len, prompts))
        r = max(map(len, responses))
        ids = torch.tensor([[0] * (q - len(a)) + a + b + [0] * (r - len(b)) for a, b in zip(prompts, responses)])
        mask = torch.tensor([[0] * (q - len(a)) + [1] * len(a) + [1] * len(b) + [0] * (r - len(b))
                             for a, b in zip(prompts, responses)])
        rmask = mask[:, q:]
        n = len(prompts)
        episodes = Episodes(ids=ids, mask=mask, response=ids[:, q:], response_mask=rmask,
                            sampled=rmask, stopped=torch.ones(n, dtype=torch.bool), logp=-rmask.float() * base,
                            entropy=rmask.float() * base, sampling_values=None)
        return Scored(episodes=episodes, scores=torch.arange(n) + base, terms={"gold": torch.arange(n) + base},
                      overlong=None, total=torch.arange(n) + base, shaped=torch.arange(n) + base)

    old = scored([[5, 6], [7]], [[8], [9, 9, 9]], 10.0)
    new = scored([[1, 2, 3]], [[4, 4]], 20.0)
    merged = replace_rows(old, torch.tensor([0]), new, pad_id=0)
    e = merged.episodes
    assert e.ids.tolist() == [[1, 2, 3, 4, 4, 0], [0, 0, 7, 9, 9, 9]]
    assert e.mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert e.response.tolist() == [[4, 4, 0], [9, 9, 9]]
    assert e.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert e.logp.tolist() == [[-20.0, -20.0, 0.0], [-10.0, -10.0, -10.0]] and e.sampling_values is None
    for field in ("scores", "total", "shaped"):
        assert getattr(merged, field).tolist() == [20.0, 11.0]
    assert merged.terms["gold"].tolist() == [20.0, 11.0] and old.shaped.tolist() == [10.0, 11.0]  # old kept
    assert merged.overlong is None and old.episodes.ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 9, 9]]


def test_advantages_group_consecutive_rows_by_hand():
    """The loop's estimators on 2 prompts x K = 2 responses with hand-picked scores and KLs."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    logp = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [-0.5, -0.5, 0.0]])
    ref = logp - torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.0]])  # k1 = logp-ref
    shaped = torch.tensor([3.0, 1.0, 0.0, 2.0])
    episodes = Episodes(ids=None, mask=None, response=None, response_mask=mask, sampled=mask, stopped=None,
                        logp=logp, entropy=None, sampling_values=None)
    scored = Scored(episodes=episodes, scores=None, terms={}, overlong=None, total=shaped, shaped=shaped)

    def estimate(estimator, coef, **kw):
        p = load_recipe(ROOT / "recipes" / "tiny.yaml", [f"ppo.advantage={estimator}", "ppo.samples_per_prompt=2",
                                                         *[f"ppo.{k}={v}" for k, v in kw.items()]]).ppo
        rewards, _ = ppo_math.kl_penalized_rewards(shaped, logp, ref, mask, coef, p.kl_kind)
        return ppo_update.advantages(p, scored, None, ref, rewards, coef)

    # rloo, KL in the reward (beta 1): sequence rewards 3 - 1 = 2, 1 - 1 = 0 | 0 - 0 = 0, 2 - 0.5 = 1.5;
    # leave-one-out: 2, -2 | -1.5, 1.5, on every real token (no whitening)
    advantages, returns = estimate("rloo", 1.0, whiten_advantages="false")
    assert advantages.tolist() == [[2.0, 2.0, 0.0], [-2.0, 0.0, 0.0], [-1.5, -1.5, -1.5], [1.5, 1.5, 0.0]]
    assert returns is None
    # grpo, KL as a loss term (beta 0 in the reward): scores 3, 1 -> +-1/(sqrt(2) + 1e-4); 0, 2 -> -+ the same
    a = 1 / (math.sqrt(2) + 1e-4)
    advantages, _ = estimate("grpo", 0.0)
    torch.testing.assert_close(advantages, torch.tensor([[a, a, 0.0], [-a, 0.0, 0.0], [-a, -a, -a], [a, a, 0.0]]))
    # reinforce_pp, K = 2: group-mean baseline on the score (1, -1 | -1, 1), per-token KL (beta 1) in the reward,
    # returns to go, then whitened over the batch's 8 real tokens
    advantages, _ = estimate("reinforce_pp", 1.0)
    rewards = torch.tensor([[-0.5, 0.5, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, -1.0], [-0.25, 0.75, 0.0]])
    returns = torch.tensor([[0.0, 0.5, 0.0], [-2.0, 0.0, 0.0], [-1.0, -1.0, -1.0], [0.5, 0.75, 0.0]])
    torch.testing.assert_close(ppo_math.returns_to_go(rewards, mask), returns)
    torch.testing.assert_close(advantages, ppo_math.masked_whiten(returns, mask))


def test_ppo_refuses_wrong_parents(parents, tmp_path):
    recipe, runs = parents
    refused("ppo", "--recipe", str(recipe), "--policy", str(runs / "rm"), "--reward", str(runs / "rm"),
            "--out", str(tmp_path / "x"), expect="not a policy")
    refused("ppo", "--recipe", str(recipe), "--reward", str(runs / "sft"), "--out", str(tmp_path / "x"),
            expect="not a reward model")
    refused("ppo", "--recipe", str(recipe), "--reward", str(tmp_path / "nothing"), "--out",
            str(tmp_path / "x"), expect="nothing: not found (a reward model is a run directory")
    assert not (tmp_path / "x").exists()


def test_min_new_tokens_fixes_the_response_length(parents, tmp_path):
    recipe, _ = parents
    args = [x for kv in SMALL + ["ppo.eval_every=0", "ppo.min_new_tokens=16", "ppo.mixed_precision=no"]
            for x in ("--set", kv)]
    run_cli("ppo", "--recipe", str(recipe), "--out", str(tmp_path / "ppo"), *args)
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["response/length"] == 16 and r["response/eos_rate"] == 0 for r in rows)
    assert json.loads((tmp_path / "ppo" / "manifest.json").read_text())["mixed_precision"] == "no"


def test_a_resumed_run_keeps_the_precision_it_started_with(tmp_path):
    """mixed_precision: auto measures matrix products when a run starts; a CPU busy with other work measured
    0.78x once and 5.74x the next time here. A resumed run takes the precision its checkpoint says, not a new
    measurement, or it would not continue bit for bit."""
    from types import SimpleNamespace

    from rlhf.runs import resume
    from stages import ppo

    p = load_recipe(ROOT / "recipes" / "tiny.yaml").ppo
    assert p.mixed_precision == "auto"
    run = SimpleNamespace(resumed=True, work=tmp_path / "work")
    assert ppo.precision_of(run, p) == ("auto", None)  # no checkpoint yet: measure
    resume.save_state(run.work, 2, {"x": torch.zeros(1)}, {"mixed_precision": "bf16", "bf16_speedup": 1.4}, 2)
    assert ppo.precision_of(run, p) == ("bf16", 1.4)
    run.resumed = False
    assert ppo.precision_of(run, p) == ("auto", None)


def _prompts(tok, n):
    rows = formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:n]
    return encoding.left_pad(encoding.encode_prompts(tok, rows, 256)[0], tok.pad_token_id)


def test_sampling_loop_draws_what_generate_draws_and_keeps_the_log_probs(parents):
    """The generation engine samples the tokens Hugging Face ``generate`` picks with the same Gumbel noise,
    and the log-probs and entropies it keeps equal those of a full forward pass over prompt + response."""
    _, runs = parents
    cfg = ModelConfig(base=str(ROOT / "data" / "tiny-base"))
    models = ppo_models.load(cfg, "lora", runs / "sft", runs / "rm")
    tok = modeling.load_tokenizer(cfg, str(runs / "sft"))
    ids, mask = _prompts(tok, 12)
    keys, temperature = rollout.episode_keys(3, 1, torch.arange(12)), 1.3

    class Gumbel:  # the same draw as a generate() logits processor: a one-hot score for the sampled token
        start = None

        def __call__(self, input_ids, scores):
            self.start = self.start or input_ids.shape[1]
            token = rollout.gumbel_max(scores.float() / temperature, keys, input_ids.shape[1] - self.start)
            return torch.full_like(scores, -torch.inf).scatter(1, token[:, None], 0.0)

    for min_new in (0, 10):
        s = models.sample(ids, mask, keys=keys, temperature=temperature, max_new_tokens=20, min_new_tokens=min_new,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        models.use("policy")  # Hugging Face's own loop over the same policy, as the reference
        out = models.model.generate(input_ids=ids, attention_mask=mask, do_sample=False, logits_processor=[Gumbel()],
                                    max_new_tokens=20, min_new_tokens=min_new, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
        assert torch.equal(s.tokens, out[:, ids.shape[1]:])
        assert min_new == 0 or not (s.tokens[:, :min_new] == tok.eos_token_id).any()
    response, rmask, stopped = ppo_math.truncate_after_eos(s.tokens, tok.eos_token_id, tok.pad_token_id)
    assert stopped.any() and not stopped.all() and rmask.sum() > 100  # both kinds of response, real lengths
    with torch.no_grad():
        logits = ppo_update.response_logits(models, torch.cat([ids, response], 1), torch.cat([mask, rmask], 1),
                                 response.shape[1])
    real = rmask.bool()
    full = ppo_math.logprobs_from_logits(logits, response, temperature)
    torch.testing.assert_close(s.logprobs[real], full[real], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(s.entropy[real], ppo_math.entropy_from_logits(logits, temperature)[real], rtol=1e-5,
                               atol=1e-5)


def _graph_nodes(fn) -> set[str]:
    """The names of every autograd node ``fn`` reaches."""
    names, seen, todo = set(), set(), [fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_lean_lora_forward_matches_peft(parents):
    """The lean forward PPO gives plain LoRA layers computes peft's outputs and gradients, for every role, the
    bare base included; DoRA is left to peft."""
    _, runs = parents
    cfg = ModelConfig(base=str(ROOT / "data" / "tiny-base"))
    models = ppo_models.load(cfg, "lora", runs / "sft", runs / "rm")
    assert models.lean_lora_layers == 4 * 7  # 4 blocks x 7 linear layers, each holding the four adapters
    tok = modeling.load_tokenizer(cfg, str(runs / "sft"))
    ids, mask = _prompts(tok, 6)
    lean_forwards = {m: m.__dict__.pop("forward") for m in models.model.modules() if "forward" in m.__dict__}
    results = []
    for lean in (False, True):
        for module, forward in lean_forwards.items():
            if lean:
                module.forward = forward
        out = {}
        for role in ("policy", "reference"):
            out[role] = models.policy_logits(ids, mask, keep=0, role=role)
        with models.bare():
            out["base"] = models._lm(ids, mask, 0)
        out["reward"] = models.scores(ids, mask)
        values = models.critic.values(ids, mask)
        if lean:  # the adapters' products go into the base output itself: no view for backward to copy into
            assert "CopySlices" not in _graph_nodes(out["policy"].grad_fn)
        (out["policy"][mask.bool()].logsumexp(-1).sum() + values.sum()).backward()
        out["values"] = values
        out["grads"] = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                                  for p in models.parameters("policy") + models.parameters("value")])
        for p in models.parameters("policy") + models.parameters("value"):
            p.grad = None
        results.append(out)
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-5, msg=key)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dora = get_peft_model(AutoModelForCausalLM.from_pretrained(cfg.base),
                          LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    assert ppo_models.use_lean_lora(dora) == 0


USER_SCORERS = '''
def half(prompts, responses):
    return [0.5] * len(responses)

def boom(prompts, responses):
    raise RuntimeError("checker crashed")
'''


def test_ppo_against_a_scorer_alone_needs_no_reward_model(parents, tmp_path):
    """Reward = 4 x gold: no reward model is loaded (the recipe's run_dir holds none), the value model starts from
    the SFT adapter, and the metrics are the scorer's."""
    recipe, runs = parents
    out = tmp_path / "ppo"
    args = [x for kv in SMALL + ["ppo.reward={gold: 4.0}", f"run_dir={tmp_path / 'elsewhere'}"]
            for x in ("--set", kv)]
    proc = run_cli("ppo", "--recipe", str(recipe), "--policy", str(runs / "sft"), "--out", str(out), *args)
    assert "score" in proc.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert m["parents"] == {"sft": str(runs / "sft"), "rm": None} and m["reward_stats"] is None
    assert m["reward"] == {"gold": {"spec": "gold", "weight": 4.0}}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert "objective/score" not in r and "eval/score" not in r and "eval/gold" in r
        assert r["objective/score_total"] == pytest.approx(4.0 * r["objective/scorer/gold"])
        assert 0.0 <= r["objective/scorer/gold"] <= 1.0
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    sft = load_file(runs / "sft" / "adapter_model.safetensors")
    val = load_file(out / "value" / "adapter_model.safetensors")
    assert set(val) == set(sft) and any(not torch.equal(val[k], sft[k]) for k in val), "the value adapter trained"
    assert set(load_file(out / "value" / "value_head.safetensors")) == {"weight", "bias"}


def test_ppo_reward_model_plus_a_scorer_and_a_scorer_that_fails(parents, tmp_path, monkeypatch):
    """reward = RM (normalised) + 2 x a constant 0.5: the total is the normalised score plus 1, step by step. A
    scorer that raises stops the run with a one-line error naming it, and no finished run is left."""
    from stages import ppo

    recipe_path, runs = parents
    user = tmp_path / "checks.py"
    user.write_text(USER_SCORERS)
    recipe = load_recipe(recipe_path, SMALL + ["ppo.eval_every=0",
                                               f"ppo.reward={{reward_model: 1.0, '{user}:half': 2.0}}"])
    manifest = ppo.main(recipe, out=tmp_path / "mix")
    stats = json.loads((runs / "rm" / "manifest.json").read_text())["reward_stats"]
    rows = [json.loads(x) for x in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        normalised = (r["objective/score"] - stats["mean"]) / stats["std"]
        assert r["objective/score_total"] == pytest.approx(normalised + 1.0, abs=1e-4)
        assert r["objective/scorer/half"] == 0.5
    assert manifest["reward"] == {"reward_model": 1.0, "half": {"spec": f"{user}:half", "weight": 2.0}}

    out = tmp_path / "boom"
    proc = run_cli("ppo", "--recipe", str(recipe_path), "--out", str(out), "--set",
                   f"ppo.reward={{'{user}:boom': 1}}", *[x for kv in SMALL for x in ("--set", kv)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"scorer boom ({user}:boom) raised RuntimeError: checker crashed on row 1" in proc.stderr
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("method,critic", [("lora", "adapter"), ("full", "adapter"), ("full", "shared")])
def test_ppo_from_the_bare_base_against_a_scorer_needs_no_parent_run(tiny_recipe, tmp_path, method, critic):
    """`--policy base` with a scorer-only reward: no SFT and no RM run exist; policy and value start from the
    recipe's base (fresh adapters, or copies with full fine-tuning; the value head starts at zero; with the shared
    critic, a head on the policy copy) and both train."""
    from stages import ppo

    recipe = load_recipe(tiny_recipe, SMALL + ["ppo.eval_every=0", "ppo.reward={style: 1.0}",
                                               f"adapter.method={method}", f"ppo.critic={critic}"])
    manifest = ppo.main(recipe, policy="base", out=tmp_path / "ppo")
    assert manifest["parents"] == {"sft": None, "rm": None} and manifest["reward"] == {
        "style": {"spec": "style", "weight": 1.0}}
    assert manifest["base"] == recipe.model.base and manifest["adapter"]["method"] == method
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the base's
    assert all(r["value/grad_norm"] > 0 and r["policy/grad_norm"] > 0 for r in rows)
    if critic == "shared":  # the policy copy's hidden state under a head: no value model
        assert sorted(x.name for x in (tmp_path / "ppo" / "value").iterdir()) == ["value_head.safetensors"]
        return
    if method == "full":
        assert (tmp_path / "ppo" / "value" / "model.safetensors").is_file()
        return
    val = load_file(tmp_path / "ppo" / "value" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in val.items())  # B starts at zero
