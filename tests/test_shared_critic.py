"""PPO's shared critic (``ppo.critic: shared``): a value head on the policy's own last hidden state. One forward
pass gives the logits and the values, the sampling pass gives the rollout's values, and the value loss reaches the
policy adapter weighed by ``vf_coef``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, ran
from rlhf.engine import rollout
from rlhf.models import methods, modeling
from rlhf.ppo import ppo_math, ppo_models, ppo_update
from rlhf.text import encoding, formats
from rlhf.config import ModelConfig, load_recipe
from rlhf.engine.episodes import Episodes

CFG = ModelConfig(base=str(ROOT / "data" / "tiny-base"))


def _shared(runs, **kw):
    models = ppo_models.load(CFG, "lora", runs / "sft", runs / "rm", critic="shared", **kw)
    models.train(False)
    with torch.no_grad():  # a head that reads something: it starts at zero
        models.critic.head.weight.copy_(torch.randn(models.critic.head.weight.shape,
                                                   generator=torch.Generator().manual_seed(0)) * 0.1)
        models.critic.head.bias.fill_(0.25)
    return models


def _prompts(tok, n=4):
    rows = formats.load(str(ROOT / "data/tiny/heldout_prompts.jsonl"), "prompts").rows[:n]
    return encoding.left_pad(encoding.encode_prompts(tok, rows, 256)[0], tok.pad_token_id)


def _rollout(models, tok, n=4, tokens=10):
    query, query_mask = _prompts(tok, n)
    sampled = models.sample(query, query_mask, keys=rollout.episode_keys(3, 1, torch.arange(n)), temperature=1.0,
                            max_new_tokens=tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                            values=True)
    response, rmask, stopped = ppo_math.truncate_after_eos(sampled.tokens, tok.eos_token_id, tok.pad_token_id)
    return Episodes(ids=torch.cat([query, response], 1), mask=torch.cat([query_mask, rmask], 1), response=response,
                    response_mask=rmask, sampled=rmask, stopped=stopped, logp=sampled.logprobs, entropy=sampled.entropy,
                    sampling_values=sampled.values)


def test_one_pass_gives_the_policy_logits_and_the_values_by_hand(parents):
    """The shared pass's logits are the policy's, bit for bit; its values are w . h + b on the backbone's final
    hidden state; the sampling pass records the same values for the states the tokens were drawn in; only the
    head is the critic's own parameters, and nothing of a value adapter exists."""
    _, runs = parents
    models = _shared(runs)
    tok = modeling.load_tokenizer(CFG, str(runs / "sft"))
    ro = _rollout(models, tok)
    ids, mask, length = ro.ids, ro.mask, ro.length
    with torch.no_grad():
        logits, values = models.critic.with_policy(ids, mask, length + 1)
        assert torch.equal(logits, models.policy_logits(ids, mask, keep=length + 1))
        models.use("policy")
        hidden = methods.unwrap(models.model).model(input_ids=ids, attention_mask=mask,
                                                     position_ids=encoding.position_ids(mask)).last_hidden_state
    w, b = models.critic.head.weight[0], models.critic.head.bias[0]
    by_hand = (hidden[:, -length - 1:] * w).sum(-1) + b
    torch.testing.assert_close(values, by_hand, rtol=0, atol=1e-5)
    torch.testing.assert_close(models.critic.values(ids, mask)[:, -length - 1:], by_hand, rtol=0, atol=1e-5)
    # the decode's value of each response token's state: the same numbers from the KV-cache pass
    real = ro.response_mask.bool()
    torch.testing.assert_close(ro.sampling_values[real], ppo_math.predicting(values, length)[real], rtol=0,
                               atol=1e-5)
    assert [tuple(x.shape) for x in models.parameters("value")] == [(1, 256), (1,)]
    assert not any(".value." in n for n, _ in models.model.named_parameters())
    with pytest.raises(RuntimeError, match="shared critic only"):
        ppo_models.load(CFG, "lora", runs / "sft", runs / "rm").sample(ids, mask, values=True, temperature=0.0,
                                                                       max_new_tokens=1, eos_token_id=1,
                                                                       pad_token_id=0)


def test_the_value_loss_reaches_the_policy_adapter_through_vf_coef(parents):
    """One PPO epoch on one mini-batch, lr 0 (weights stay put) and no clipping of gradients: against returns one
    above the rollout's values, the value loss is 0.5 mean (v - R)^2 with dL/dv = -1/tokens, so the head's bias
    gets exactly -vf_coef; and the policy adapter's gradient is the policy loss's plus vf_coef times the value
    loss's, the latter taken by autograd through the backbone independently of the loop."""
    recipe, runs = parents
    models = _shared(runs)
    tok = modeling.load_tokenizer(CFG, str(runs / "sft"))
    ro = _rollout(models, tok)
    length, rmask = ro.length, ro.response_mask
    returns = (ro.sampling_values + 1.0) * rmask
    batch = ppo_update.Batch(episodes=ro, ref_logp=ro.logp.clone(), values=ro.sampling_values,
                             rewards=torch.zeros_like(rmask, dtype=torch.float32), kl=torch.zeros_like(ro.logp),
                             advantages=torch.linspace(-1, 1, ro.response.numel()).reshape(ro.response.shape) * rmask,
                             returns=returns)
    params = {role: models.parameters(role) for role in ("policy", "value")}
    base = load_recipe(recipe).ppo

    def grads(vf_coef: float) -> list[torch.Tensor]:
        p = dataclasses.replace(base, critic="shared", ppo_epochs=1, batch_size=4, mini_batch_size=4,
                                micro_batch_size=4, lr=0.0, vf_coef=vf_coef, max_grad_norm=1e9)
        optimizer = torch.optim.SGD([{"params": x} for x in params.values()], lr=0.0)
        stats = ppo_update.ppo_epochs(models, optimizer, params, batch, p, step=1, kl_coef=0.0)
        assert stats["policy/ratio_first"] == pytest.approx(1.0, abs=1e-5)
        return [x.grad.clone() for role in params.values() for x in role]

    with_value, without = grads(0.5), grads(0.0)
    bias = models.critic.head.bias
    index = next(i for i, x in enumerate(x for role in params.values() for x in role) if x is bias)
    assert with_value[index].item() == pytest.approx(-0.5, abs=1e-4)
    # the value loss's own gradient in the policy adapter, by autograd on a fresh forward
    policy = params["policy"]
    values = ppo_math.predicting(models.critic.with_policy(ro.ids, ro.mask, length + 1)[1], length)
    vf = 0.5 * ppo_math.masked_mean((values - returns) ** 2, rmask)
    expected = torch.autograd.grad(vf, policy, allow_unused=True)
    moved = 0
    for got, off, own in zip(with_value, without, expected):
        own = torch.zeros_like(got) if own is None else own
        torch.testing.assert_close(got - off, 0.5 * own, rtol=1e-3, atol=1e-6)
        moved += bool(own.abs().max() > 0)
    assert moved > len(policy) // 4, "the value loss reached few of the policy's tensors"


def test_ppo_with_the_shared_critic_through_the_cli(parents, tmp_path):
    """Two steps with ``ppo.critic: shared``: no value adapter is created or saved, the head alone is (its metadata
    says what it reads), the start line, the manifest and the model card say which critic ran, and the trainable
    parameters are the policy adapter's plus the head's."""
    recipe, runs = parents
    out = tmp_path / "ppo"
    # fp32: the first ratio below is 1 because sampling and the update compute the same numbers; under bf16
    # autocast (what "auto" picks on a CPU with fast bf16 units) the sampling pass's kernels differ (0.9992 seen)
    sets = ["ppo.max_steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
            "ppo.max_new_tokens=12", "ppo.eval_every=0", "ppo.save_every=1", "ppo.critic=shared",
            "ppo.mixed_precision=no"]
    ran("ppo", "--recipe", str(recipe), "--out", str(out), *[x for kv in sets for x in ("--set", kv)])
    assert sorted(p.name for p in (out / "value").iterdir()) == ["value_head.safetensors"]
    with safe_open(str(out / "value" / "value_head.safetensors"), "pt") as f:
        assert f.metadata() == {"critic": "shared", "reads": "the policy's last hidden state"}
    head = load_file(out / "value" / "value_head.safetensors")
    assert head["weight"].abs().max() > 0, "the head started at zero and trained"
    m = json.loads((out / "manifest.json").read_text())
    assert m["advantage"]["critic"] == "shared"
    policy = sum(v.numel() for v in load_file(out / "adapter_model.safetensors").values())
    assert m["adapter"]["parameters"]["trainable"] == policy + 257
    assert "- advantage: `gae`, a value head on the policy (shared critic)" in (out / "README.md").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # the sampling pass's log-probs are the policy's: the first ratio is 1 to rounding of its mean
        assert r["value/grad_norm"] > 0 and r["policy/grad_norm"] > 0
        assert r["policy/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    sft, pol = load_file(runs / "sft" / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert set(pol) == set(sft) and any(not torch.equal(pol[k], sft[k]) for k in pol)


def test_each_critic_has_its_own_value_loss_weight():
    """``vf_coef: null`` is the critic's own weight (0.1 for the adapter critic, 0.01 for the shared one, whose
    value gradient lands in the policy adapter); a set weight, 0 included, is kept; a negative one is refused."""
    from rlhf.config import PPOConfig
    from rlhf.errors import UserError

    assert PPOConfig().value_coef == 0.1 and PPOConfig(critic="shared").value_coef == 0.01
    assert PPOConfig(critic="shared", vf_coef=0.0).value_coef == 0.0
    assert PPOConfig(advantage="rloo", samples_per_prompt=2, critic="shared").value_model is None
    with pytest.raises(UserError, match="ppo.vf_coef must not be negative"):
        PPOConfig(vf_coef=-1.0).validate("recipe.yaml")
