"""PPO maths with hand-worked expected tensors, and a plain-loop GAE that agrees with the vectorised one."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.ppo import ppo_math as pm

pytestmark = pytest.mark.fast  # the fast tier (make test-fast)

T = torch.tensor


def test_masked_statistics_and_whitening():
    x, mask = T([1.0, 2.0, 3.0, 100.0]), T([1, 1, 1, 0])
    assert pm.masked_mean(x, mask).item() == pytest.approx(2.0)
    assert pm.masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: ((1)+(0)+(1)) / 2
    assert pm.masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(pm.masked_whiten(x, mask), T([-1.0, 0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(pm.masked_whiten(x, mask, shift_mean=False), T([1.0, 2.0, 3.0, 0.0]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(pm.masked_mean(T([[1.0, 3.0], [5.0, 7.0]]), T([[1, 1], [1, 0]]), dim=1),
                               T([2.0, 5.0]))


def test_truncate_after_eos_by_hand():
    eos, pad = 9, 0
    response = T([[5, 9, 7, 9],    # stops at its first EOS; what follows becomes pad
                  [5, 6, 7, 8],    # never stops: every token counts
                  [9, 4, 4, 4]])   # EOS first: a one-token response
    padded, mask, stopped = pm.truncate_after_eos(response, eos, pad)
    assert padded.tolist() == [[5, 9, 0, 0], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]


def test_predicting_takes_the_position_before_each_response_token():
    # a prompt of 3 tokens (positions 0-2) and a response of 2 (positions 3-4): the response tokens are predicted
    # at positions 2 and 3; position 4 (after the last token) predicts nothing that was sampled
    x = T([[[0.0], [1.0], [2.0], [3.0], [4.0]]])  # each position holds its own index
    assert pm.predicting(x, 2).squeeze(-1).tolist() == [[2.0, 3.0]]
    assert pm.predicting(x.squeeze(-1), 2).tolist() == [[2.0, 3.0]]  # values: [batch, seq]
    kept = x[:, -3:]  # logits_to_keep = length + 1 keeps positions 2, 3, 4: the same two come out
    assert pm.predicting(kept, 2).squeeze(-1).tolist() == [[2.0, 3.0]]
    # with a causal "model" whose logits at t put all mass on the token at t + 1, the response log-probs are 0
    ids = T([[4, 1, 3, 2, 0]])
    logits = torch.full((1, 5, 5), -1e4)
    logits[0, torch.arange(4), ids[0, 1:]] = 0.0
    logp = pm.logprobs_from_logits(pm.predicting(logits, 2), ids[:, -2:])
    torch.testing.assert_close(logp, torch.zeros(1, 2))


def test_shape_scores_by_hand():
    scores, stopped = T([3.0, -1.0, 11.0]), T([True, False, True])
    # standardised with mean 1, std 2: [1, -1, 5]; the second never stopped: -1 - 0.5; clipped at 4
    shaped = pm.shape_scores(scores, stopped, mean=1.0, std=2.0, missing_eos_penalty=0.5, clip=4.0)
    torch.testing.assert_close(shaped, T([1.0, -1.5, 4.0]))
    torch.testing.assert_close(pm.shape_scores(scores, stopped), scores)  # every step off: unchanged
    assert pm.shape_scores(scores, stopped, mean=0.0, std=0.0)[0].item() == pytest.approx(3e6)  # std floor 1e-6
    assert scores.tolist() == [3.0, -1.0, 11.0]  # the input is not changed in place


def test_sequence_sum_ignores_padding_even_when_it_holds_inf():
    x, mask = T([[1.0, 2.0, float("inf")], [0.5, 0.5, 0.5]]), T([[1, 1, 0], [1, 1, 1]])
    assert pm.sequence_sum(x, mask).tolist() == [3.0, 1.5]


def test_logprobs_and_entropy_follow_the_temperature():
    logits = T([[[2.0, 0.0, -2.0]]])
    tokens = T([[0]])
    for temp in (1.0, 0.5):
        z = logits / temp
        expected = z[0, 0, 0] - torch.logsumexp(z[0, 0], -1)
        assert pm.logprobs_from_logits(logits, tokens, temp).item() == pytest.approx(expected.item(), abs=1e-6)
        p = torch.softmax(z[0, 0], -1)
        assert pm.entropy_from_logits(logits, temp).item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    uniform = torch.zeros(1, 1, 4)
    assert pm.entropy_from_logits(uniform).item() == pytest.approx(math.log(4), abs=1e-6)


def test_kl_estimators_by_hand():
    logp, ref = T([[-1.0, -2.0, -0.5]]), T([[-1.5, -1.0, -0.5]])
    torch.testing.assert_close(pm.kl_k1(logp, ref), T([[0.5, -1.0, 0.0]]))
    expected_k3 = T([[math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]])
    torch.testing.assert_close(pm.kl_k3(logp, ref), expected_k3)
    assert (pm.kl_k3(torch.randn(50), torch.randn(50)) >= 0).all()


def test_kl_penalized_rewards_by_hand():
    logp, ref = T([[-1.0, -2.0, -0.5]]), T([[-1.5, -1.0, -0.5]])
    # expected rewards are -kl_coef * kl, with the score added at the last real token
    rewards, kl = pm.kl_penalized_rewards(T([3.0]), logp, ref, T([[1, 1, 1]]), kl_coef=0.1)
    torch.testing.assert_close(rewards, T([[-0.05, 0.1, 3.0]]))
    torch.testing.assert_close(kl, T([[0.5, -1.0, 0.0]]))
    rewards, _ = pm.kl_penalized_rewards(T([3.0]), logp, ref, T([[1, 1, 0]]), kl_coef=0.1)
    torch.testing.assert_close(rewards, T([[-0.05, 3.1, 0.0]]))
    rewards, kl = pm.kl_penalized_rewards(T([0.0]), logp, ref, T([[1, 1, 1]]), kl_coef=1.0, estimator="k3")
    torch.testing.assert_close(rewards, -pm.kl_k3(logp, ref))


def test_gae_by_hand():
    adv, ret = pm.gae(T([[1.0, 0.0, 2.0]]), T([[0.5, 1.0, 1.5]]), T([[1, 1, 1]]), gamma=1.0, lam=0.5)
    # delta_2 = 2 - 1.5 = 0.5; delta_1 = 0 + 1.5 - 1 = 0.5; delta_0 = 1 + 1 - 0.5 = 1.5
    # A_2 = 0.5; A_1 = 0.5 + 0.5 * 0.5 = 0.75; A_0 = 1.5 + 0.5 * 0.75 = 1.875
    torch.testing.assert_close(adv, T([[1.875, 0.75, 0.5]]))
    torch.testing.assert_close(ret, T([[2.375, 1.75, 2.0]]))
    # padding: the value after the last real token counts as 0, whatever the padded slot holds
    adv, ret = pm.gae(T([[1.0, 2.0, 0.0]]), T([[0.5, 1.0, 9.0]]), T([[1, 1, 0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, T([[2.0, 1.0, 0.0]]))
    torch.testing.assert_close(ret, T([[2.5, 2.0, 0.0]]))
    # gamma discounts the bootstrap: delta_0 = 0 + 0.9 * 1 - 0, A_0 = 0.9 + 0.9 * 1 * (1 - 1)
    adv, _ = pm.gae(T([[0.0, 1.0]]), T([[0.0, 1.0]]), T([[1, 1]]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv, T([[0.9, 0.0]]))


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion in plain Python, one sequence and one token at a time."""
    B, n = rewards.shape
    adv = [[0.0] * n for _ in range(B)]
    for b in range(B):
        length = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_v = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b][t] = running
    adv = torch.tensor(adv)
    return adv, (adv + values * mask) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_gae_agrees_with_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    lengths = T([9, 1, 5, 3, 8, 2])
    mask = (torch.arange(9)[None] < lengths[:, None]).float()
    adv, ret = pm.gae(rewards * mask, values, mask, gamma, lam)
    adv2, ret2 = gae_loop(rewards * mask, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv2, atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, ret2, atol=1e-5, rtol=0)


def test_policy_loss_by_hand():
    old = T([[0.0, 0.0, 0.0]])
    logp = T([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    adv = T([[1.0, 1.0, -1.0]])
    loss, stats = pm.policy_loss(logp, old, adv, T([[1, 1, 1]]), clip=0.2)
    # token 0: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); token 1: ratio 0.5 -> max(-0.5, -0.8) = -0.5;
    # token 2: ratio 1.1, A = -1 -> 1.1 either way
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert stats["approxkl"].item() == pytest.approx(expected_kl, abs=1e-6)
    # at ratio 1 the gradient is -A / n per token
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, _ = pm.policy_loss(logp, torch.zeros(1, 2), T([[2.0, -1.0]]), torch.ones(1, 2))
    loss.backward()
    torch.testing.assert_close(logp.grad, T([[-1.0, 0.5]]))


def test_value_loss_by_hand():
    loss, stats = pm.value_loss(T([[0.5, -0.1, 7.0]]), T([[0.0, 0.0, 0.0]]), T([[1.0, 1.0, 0.0]]),
                                T([[1, 1, 0]]), clip=0.2)
    # t0: clipped value 0.2 -> max(0.25, 0.64) = 0.64; t1: within the clip -> 1.21; t2 is padding
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_kl_controllers():
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(12.0, n_steps=64)  # error clipped to +0.2
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(3.0, n_steps=64)  # error -0.5 clipped to -0.2
    assert c.value == pytest.approx(0.1 * (1 - 0.2 * 64 / 10000))
    c = pm.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(6.6, n_steps=100)  # error 0.1
    assert c.value == pytest.approx(0.1 * (1 + 0.1 * 100 / 10000))
    state = c.state_dict()
    d = pm.AdaptiveKLController(1.0, 1.0, 1.0)
    d.load_state_dict(state)
    assert d.value == c.value
    f = pm.FixedKLController(0.05)
    f.update(100.0, 64)
    assert f.value == 0.05


def test_padding_that_overflows_never_turns_a_loss_into_nan():
    # two passes that saw different padding can disagree by any amount there: a gap over ~88 nats makes exp()
    # overflow to inf, and 0 * inf would be NaN. Masked positions must drop out whatever they hold.
    mask = T([[1, 1, 0]])
    logp, old = T([[-1.0, -2.0, 0.0]]), T([[-1.0, -2.0, -200.0]])  # the gap of 200 nats is on padding
    adv = T([[1.0, -1.0, 5.0]])
    loss, stats = pm.policy_loss(logp, old, adv, mask)
    assert loss.item() == pytest.approx(0.0) and stats["ratio"].item() == pytest.approx(1.0)
    assert all(torch.isfinite(v) for v in stats.values())
    # and a gradient through it is finite too
    logp = logp.clone().requires_grad_(True)
    pm.policy_loss(logp, old, adv, mask)[0].backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    # k3's expm1 on padding: the KL and the shaped rewards stay finite and zero there
    rewards, kl = pm.kl_penalized_rewards(T([1.0]), T([[-1.0, -2.0, -300.0]]), T([[-1.0, -2.0, 0.0]]), mask,
                                          0.1, "k3")
    torch.testing.assert_close(kl, T([[0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, T([[0.0, 1.0, 0.0]]))
    # inf and NaN on padding in any masked statistic, value loss or GAE input
    x = T([[1.0, 3.0, float("inf")], [2.0, float("nan"), float("-inf")]])
    m = T([[1, 1, 0], [1, 0, 0]])
    assert pm.masked_mean(x, m).item() == pytest.approx(2.0)
    assert torch.isfinite(pm.masked_whiten(x, m)).all()
    assert pm.value_loss(x, T([[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]]), x, m)[0].item() == pytest.approx(0.0)
    adv, ret = pm.gae(x, x, m)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


# ---------------------------------------------------------------------------------------------------------------
# Critic-free advantage estimators
# ---------------------------------------------------------------------------------------------------------------

def test_grpo_advantages_by_hand():
    # two prompts, K = 4 responses each (consecutive rows); the second group all scored 2.0
    scores = T([1.0, 2.0, 3.0, 6.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 3, deviations [-2, -1, 0, 3], Bessel std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14/3) = 2.1602
    std = math.sqrt(14 / 3)
    expected = [d / (std + 1e-4) for d in (-2.0, -1.0, 0.0, 3.0)] + [0.0] * 4  # equal rewards: nothing to prefer
    torch.testing.assert_close(pm.grpo_advantages(scores, 4), T(expected))
    assert pm.grpo_advantages(scores, 4)[4:].eq(0).all()  # exactly 0, not 0/eps noise


def test_rloo_advantages_by_hand():
    scores = T([1.0, 2.0, 3.0, 6.0, 2.0, 2.0, 2.0, 2.0])
    # response 0: 1 - (2 + 3 + 6) / 3 = -8/3; response 3: 6 - (1 + 2 + 3) / 3 = 4; the flat group: 0
    expected = T([1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(pm.rloo_advantages(scores, 4), expected)
    # the same as K / (K - 1) * (r - group mean)
    torch.testing.assert_close(pm.rloo_advantages(scores, 4), 4 / 3 * pm.group_baseline(scores, 4))
    # K = 2: each response against the other
    torch.testing.assert_close(pm.rloo_advantages(T([5.0, 1.0]), 2), T([4.0, -4.0]))


def test_group_statistics_refuse_ragged_or_single_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        pm.grpo_advantages(T([1.0, 2.0, 3.0]), 4)
    with pytest.raises(ValueError, match="groups of 1"):
        pm.rloo_advantages(T([1.0, 2.0]), 1)


def test_flat_groups_get_exactly_zero_even_when_the_reward_is_not_exact_in_binary():
    # the float32 mean of seven times -1.3 is one ulp off -1.3: without the flat-group rule every response got the
    # same small push (|A| up to ~5e-3 for GRPO, whose std + eps is ~1e-4)
    for value in (-1.3, 0.1, 2.7, -0.7, 1e-3):
        scores = T([value] * 7 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
        for estimator in (pm.grpo_advantages, pm.rloo_advantages, pm.group_baseline):
            got = estimator(scores, 7)
            assert got[:7].eq(0).all(), (estimator.__name__, value, got[:7])
            assert got[7:].ne(0).all()  # a group with a spread is untouched


def test_group_baseline_by_hand():
    torch.testing.assert_close(pm.group_baseline(T([1.0, 3.0, 10.0, 20.0]), 2), T([-1.0, 1.0, -5.0, 5.0]))


def test_returns_to_go_by_hand():
    rewards = T([[0.1, -0.2, 1.0, 9.0],    # the last token is padding: its 9 never counts
                 [0.5, 0.5, 0.5, 0.5]])
    mask = T([[1, 1, 1, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pm.returns_to_go(rewards, mask, gamma=1.0),
                               T([[0.9, 0.8, 1.0, 0.0], [2.0, 1.5, 1.0, 0.5]]))
    # gamma 0.5: G_2 = 1, G_1 = -0.2 + 0.5, G_0 = 0.1 + 0.5 * 0.3
    torch.testing.assert_close(pm.returns_to_go(rewards, mask, gamma=0.5)[0], T([0.25, 0.3, 1.0, 0.0]))


def test_returns_to_go_is_gae_with_zero_values_and_lambda_one():
    """Two implementations agree: REINFORCE's return is GAE's advantage with V = 0 and lambda = 1."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5, 7, generator=g)
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5, 6])[:, None]).long()
    for gamma in (1.0, 0.9):
        adv, _ = pm.gae(rewards, torch.zeros(5, 7), mask, gamma=gamma, lam=1.0)
        torch.testing.assert_close(pm.returns_to_go(rewards, mask, gamma), adv)


def test_per_token_broadcasts_a_sequence_advantage_over_real_tokens():
    mask = T([[1, 1, 0], [1, 0, 0]])
    assert pm.per_token(T([2.0, -1.0]), mask).tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_kl_loss_value_and_gradient_by_hand():
    # one token: logp 0, ref -1. k3 = e^(ref - logp) - (ref - logp) - 1 = e^-1 + 1 - 1 = 0.3679;
    # d k3 / d logp = 1 - e^(ref - logp) = 1 - e^-1 = 0.6321 (pulls logp down towards the reference)
    logp = torch.tensor([[0.0, 5.0]], requires_grad=True)
    loss = pm.kl_loss(logp, T([[-1.0, 0.0]]), T([[1, 0]]))  # the second token is padding
    assert loss.item() == pytest.approx(math.exp(-1))
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([1 - math.exp(-1), 0.0])
    # at the reference the loss and its gradient are zero
    at_ref = torch.tensor([[-0.7, -2.0]], requires_grad=True)
    pm.kl_loss(at_ref, T([[-0.7, -2.0]]), T([[1, 1]])).backward()
    assert at_ref.grad.abs().max().item() == 0.0


def test_kl_loss_gradient_stays_finite_when_padding_holds_a_huge_log_ratio():
    # a padding position where the two passes differ by 100 nats: exp(100) overflows float32, and k3 computed there
    # and masked afterwards had a finite value but a NaN gradient (0 * inf in expm1's backward)
    for estimator in ("k1", "k3"):
        logp = torch.tensor([[0.0, -100.0]], requires_grad=True)
        loss = pm.kl_loss(logp, T([[-1.0, 0.0]]), T([[1, 0]]), estimator)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all(), (estimator, logp.grad)
        assert logp.grad[0, 1].item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The objectives after GRPO: loss aggregation, clip-higher, GSPO, CISPO, Dr. GRPO, overlong shaping
# ---------------------------------------------------------------------------------------------------------------

def test_every_loss_aggregation_by_hand():
    # response 0 has 3 tokens (1, 2, 3), response 1 one token (10) and two of padding (holding anything)
    x = T([[1.0, 2.0, 3.0], [10.0, float("inf"), float("nan")]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    assert pm.aggregate(x, mask, "token_mean").item() == pytest.approx(16 / 4)
    assert pm.aggregate(x, mask, "seq_mean_token_mean").item() == pytest.approx((6 / 3 + 10 / 1) / 2)
    assert pm.aggregate(x, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 10) / 2)
    assert pm.aggregate(x, mask, "seq_mean_token_sum_norm", horizon=8).item() == pytest.approx((6 / 8 + 10 / 8) / 2)
    with pytest.raises(ValueError, match="horizon"):
        pm.aggregate(x, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        pm.aggregate(x, mask, "sum")


@pytest.mark.parametrize("how", pm.AGGREGATIONS)
def test_aggregation_over_parts_is_the_aggregation_of_the_whole(how):
    """Micro-batches (and processes) each hold a part; their aggregates weighed by batch_share sum to the
    whole batch's, as one process holding all of it would compute."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    mask = (torch.arange(5)[None] < T([5, 1, 3, 2, 5, 4])[:, None]).float()
    whole = pm.aggregate(x, mask, how, horizon=5)
    tokens, responses = mask.sum(), torch.tensor(6.0)
    parts = sum(pm.aggregate(x[r], mask[r], how, horizon=5) * pm.batch_share(mask[r], how, tokens, responses)
                for r in (slice(0, 1), slice(1, 4), slice(4, 6)))
    torch.testing.assert_close(parts, whole)


def test_clip_higher_by_hand():
    # ratios 1.25 and 0.75, positive advantages: eps_low 0.2, eps_high 0.28 (DAPO) clips neither upward
    # 1.25 < 1.28 and takes max(-0.75, -0.8) = -0.75 for the other; symmetric 0.2 clips the first at 1.2
    logp, old = T([[math.log(1.25), math.log(0.75)]]), torch.zeros(1, 2)
    adv, mask = T([[1.0, 1.0]]), torch.ones(1, 2)
    terms, stats = pm.policy_loss_terms(logp, old, adv, mask, "ppo", 0.2, 0.28)
    torch.testing.assert_close(terms, T([[-1.25, -0.75]]))
    assert stats["clipfrac"].item() == 0.0
    terms, stats = pm.policy_loss_terms(logp, old, adv, mask, "ppo", 0.2)
    torch.testing.assert_close(terms, T([[-1.2, -0.75]]))
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # a negative advantage is clipped below: ratio 0.75 under 1 - 0.2 takes max(0.75, 0.8) = 0.8
    terms, _ = pm.policy_loss_terms(logp, old, -adv, mask, "ppo", 0.2, 0.28)
    torch.testing.assert_close(terms, T([[1.25, 0.8]]))


def test_gspo_by_hand():
    # response 0: token log-ratios log 1.2 and log 0.9, so s_0 = sqrt(1.2 * 0.9) = sqrt(1.08); response 1: one
    # token with ratio 2 (clipped) and padding holding a huge gap
    logp = T([[math.log(1.2), math.log(0.9)], [math.log(2.0), 0.0]], dtype=torch.float32)
    old = T([[0.0, 0.0], [0.0, -500.0]])
    mask = T([[1, 1], [1, 0]])
    adv = T([[1.0, 1.0], [-1.0, -1.0]])
    s0 = math.sqrt(1.08)
    terms, stats = pm.policy_loss_terms(logp, old, adv, mask, "gspo", 0.1, 0.1)
    # s_0 = 1.0392 within [0.9, 1.1]: -A s_0 on both tokens; s_1 = 2 with A = -1: max(2, 1.1) = 2 (unclipped side)
    torch.testing.assert_close(terms, T([[-s0, -s0], [2.0, 0.0]]))
    assert stats["ratio"].item() == pytest.approx((2 * s0 + 2.0) / 3, rel=1e-6)
    assert stats["clipfrac"].item() == 0.0
    # the gradient of a response's token mean is that of its sequence ratio: d s_0 / d logp_t = s_0 / |o_0|
    logp = logp.clone().requires_grad_(True)
    terms, _ = pm.policy_loss_terms(logp, old, adv, mask, "gspo", 0.1, 0.1)
    pm.aggregate(terms, mask, "seq_mean_token_mean").backward()
    torch.testing.assert_close(logp.grad, T([[-s0 / 2 / 2, -s0 / 2 / 2], [2.0 / 2, 0.0]]))
    # a tight epsilon (the paper's 3e-4 / 4e-4) clips s_0 above; with A > 0 the clipped term is taken, no gradient
    logp.grad = None
    terms, stats = pm.policy_loss_terms(logp, old, adv, mask, "gspo", 3e-4, 4e-4)
    assert terms[0, 0].item() == pytest.approx(-(1 + 4e-4)) and stats["clipfrac"].item() == pytest.approx(2 / 3)
    terms[0].sum().backward()
    torch.testing.assert_close(logp.grad, torch.zeros(2, 2))


def test_cispo_by_hand():
    # ratios 1.5 (weight clipped to 1 + 0.2) and 0.5 (weight 0.5, no lower bound with eps_low = 1); padding last
    logp = T([[math.log(1.5) - 1.0, math.log(0.5) - 2.0, 7.0]])
    old = T([[-1.0, -2.0, 0.0]])
    adv, mask = T([[2.0, -1.0, 3.0]]), T([[1, 1, 0]])
    logp.requires_grad_(True)
    terms, stats = pm.policy_loss_terms(logp, old, adv, mask, "cispo", 1.0, 0.2)
    lp = logp.detach()
    torch.testing.assert_close(terms.detach(), T([[-1.2 * 2.0 * lp[0, 0].item(), -0.5 * -1.0 * lp[0, 1].item(),
                                                   0.0]]))
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    # every token keeps a gradient (the clipped one too): -w_t A_t, the weight itself not differentiated
    pm.aggregate(terms, mask).backward()
    torch.testing.assert_close(logp.grad, T([[-1.2 * 2.0 / 2, 0.5 / 2, 0.0]]))


@pytest.mark.parametrize("objective", pm.POLICY_LOSSES)
def test_a_token_sampled_at_a_tiny_log_prob_keeps_the_gradient_finite(objective):
    """A token the old policy sampled at log-prob -100 (below float32's exp range) that the policy now gives -1:
    the log-ratio 99 is clamped to 20 before it is exponentiated (as verl does), so the ratio is e^20, not inf,
    and the gradient is finite (it was NaN for PPO's and GSPO's negative advantages)."""
    logp = T([[-1.0, -0.5]]).requires_grad_(True)
    old, adv, mask = T([[-100.0, -0.5]]), T([[-1.0, -1.0]]), T([[1, 1]])
    terms, stats = pm.policy_loss_terms(logp, old, adv, mask, objective, 0.2, 0.28)
    pm.aggregate(terms, mask).backward()
    assert torch.isfinite(terms).all() and torch.isfinite(logp.grad).all(), (terms, logp.grad)
    assert stats["approxkl"].item() == pytest.approx(0.5 * 20.0 ** 2 / 2)
    if objective == "ppo":  # the unclipped term is taken (negative advantage): -A * e^20
        assert terms[0, 0].item() == pytest.approx(math.exp(20.0), rel=1e-5)
        assert logp.grad[0, 0].item() == 0.0  # past the clamp the log-ratio has no gradient (as in verl)


def test_dr_grpo_drops_the_standard_deviation():
    scores = T([1.0, 3.0, 10.0, 30.0, 5.0, 5.0])
    torch.testing.assert_close(pm.dr_grpo_advantages(scores, 2), T([-1.0, 1.0, -10.0, 10.0, 0.0, 0.0]))
    # GRPO's would give both non-flat groups the same +-0.707: Dr. GRPO keeps the larger gap the larger push
    grpo = pm.grpo_advantages(scores, 2)
    assert grpo[1].item() == pytest.approx(grpo[3].item(), rel=1e-3)


def test_overlong_penalty_by_hand():
    # L_max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at the limit
    lengths = T([3, 6, 7, 9, 10])
    torch.testing.assert_close(pm.overlong_penalty(lengths, 10, 4), T([0.0, 0.0, -0.25, -0.75, -1.0]))
    torch.testing.assert_close(pm.overlong_penalty(lengths, 10, 4, factor=0.5), T([0.0, 0.0, -0.125, -0.375, -0.5]))
    with pytest.raises(ValueError, match="overlong buffer"):
        pm.overlong_penalty(lengths, 10, 0)


def test_tokens_an_environment_wrote_are_no_step_of_gae_or_the_returns():
    """Two turns of an episode with the environment's 2 tokens between them (mask 1 0 0 1 1, padding after): GAE
    and the returns skip them, as if the sampled tokens were consecutive, and are 0 on them. By hand, gamma 0.9,
    lambda 0.5: the last token's delta = 1 - 0.8 = 0.2; the one before it: 0 + 0.9 * 0.8 - 0.6 = 0.12, A = 0.12 +
    0.45 * 0.2 = 0.21; the first: 0 + 0.9 * 0.6 - 0.5 = 0.04, A = 0.04 + 0.45 * 0.21 = 0.1345."""
    mask = T([[1, 0, 0, 1, 1, 0]])
    rewards = T([[0.0, 9.0, 9.0, 0.0, 1.0, 9.0]])  # what sits under the masked-out tokens is never read
    values = T([[0.5, 9.0, 9.0, 0.6, 0.8, 9.0]])
    advantages, returns = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, T([[0.1345, 0.0, 0.0, 0.21, 0.2, 0.0]]))
    torch.testing.assert_close(returns, T([[0.6345, 0.0, 0.0, 0.81, 1.0, 0.0]]))
    squeezed, _ = pm.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.8]]), T([[1, 1, 1]]), gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages[mask.bool()], squeezed[0])
    torch.testing.assert_close(pm.returns_to_go(rewards, mask, gamma=0.5), T([[0.25, 0.0, 0.0, 0.5, 1.0, 0.0]]))


# -- per-turn rewards of multi-turn episodes

BIG = 1 << 30  # a turn the episode did not play ends past every offset


def test_turn_layout_by_hand():
    """Episode 0 samples turns at offsets 0-2 and 5 (the environment wrote 3-4); episode 1 plays one turn."""
    ends, turns = T([[2, 5], [3, BIG]]), T([2, 1])
    mask = T([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0]])
    assert pm.turn_index(ends, 6).tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    # the discount from the last token of a turn to the first of the next is gamma * turn_gamma
    assert pm.turn_discounts(ends, turns, mask, 1.0, 0.5).tolist() == [[1, 1, 0.5, 1, 1, 1], [1] * 6]
    # G_0 = 1 + 0.5 * 2, G_1 = 2; the second episode's second turn is padding: 0, whatever its reward says
    torch.testing.assert_close(pm.turn_returns(T([[1.0, 2.0], [3.0, 9.0]]), turns, 0.5), T([[2.0, 2.0], [3.0, 0.0]]))
    # RLOO at each turn index, the stopped episode's 0 included: [2 - 3, 3 - 2] and [2 - 0, 0 - 2]
    got = pm.turn_group_advantages(T([[2.0, 2.0], [3.0, 0.0]]), 2, pm.rloo_advantages)
    torch.testing.assert_close(got, T([[-1.0, 2.0], [1.0, -2.0]]))
    index = pm.turn_index(ends, 6)
    assert pm.per_token(got, mask, index).tolist() == [[-1, -1, -1, 0, 0, 2], [1, 1, 1, 1, 0, 0]]
    assert pm.turn_sums(T([[1.0, 2.0, 3.0, 9.0, 9.0, 4.0], [1.0] * 6]), index, mask, 2).tolist() == [[6, 4], [4, 0]]


def test_the_per_turn_baseline_is_unbiased_when_the_policy_chooses_to_stop():
    """A two-turn bandit (verl RFC #7244's setting): turn 1 earns 1, then the policy continues with probability
    p = sigmoid(theta) to a turn 2 that earns c. J = 1 + p * gamma * c, so dJ/dtheta = p (1 - p) gamma c. Taking
    the exact expectation over every group of K = 2 episodes, RLOO on the padded per-turn returns gives exactly that
    gradient. The construction the RFC warns of (each turn index centred over the episodes that reached it, summed
    over the episode's own turns) gives 0 here: its baseline depends on when the episode stopped."""
    import itertools

    p, c, gamma = 0.3, 2.0, 0.9
    truth = p * (1 - p) * gamma * c
    expected_ours = expected_naive = 0.0
    for going in itertools.product([0, 1], repeat=2):  # each episode: 0 stops after turn 1, 1 plays turn 2
        prob = math.prod(p if g else 1 - p for g in going)
        score = [(1 - p) if g else -p for g in going]  # d log pi(decision) / d theta; the decision is in turn 1
        turns = T([1 + g for g in going])
        rewards = T([[1.0, c * g] for g in going])
        ours = pm.turn_group_advantages(pm.turn_returns(rewards, turns, gamma), 2, pm.rloo_advantages)[:, 0]
        expected_ours += prob * sum(a * s for a, s in zip(ours.tolist(), score)) / 2
        reached = [[i for i in range(2) if turns[i] > k] for k in range(2)]
        naive = [sum(rewards[i, k].item() - sum(rewards[j, k].item() for j in reached[k]) / len(reached[k])
                     for k in range(int(turns[i]))) for i in range(2)]
        expected_naive += prob * sum(a * s for a, s in zip(naive, score)) / 2
    assert expected_ours == pytest.approx(truth, abs=1e-6)
    assert abs(expected_naive - truth) > 0.1


def _turn_batch():
    """Two episodes of one prompt (K = 2) as ``turn_advantages`` reads them: the first samples offsets 0-2 and 5
    around two tokens of the environment's, with turn rewards 0.5 and 1 and score 1; the second answers at once
    (offsets 0-3), turn reward 0.25, score 0; no KL."""
    from rlhf.engine.episodes import Episodes, Scored, Turns

    sampled = T([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 0]])
    zeros = torch.zeros(2, 6)
    turns = Turns(answers=["", ""], instances=[None, None], turns=T([2, 1]), calls=T([1, 0]), failures={},
                  ended=["answered"] * 2, ends=[[2, 5], [3]], rewards=[[0.5, 1.0], [0.25]])
    episodes = Episodes(ids=torch.zeros(2, 8, dtype=torch.long), mask=torch.ones(2, 8), response=torch.zeros(2, 6),
                        response_mask=T([[1] * 6, [1, 1, 1, 1, 0, 0]]), sampled=sampled, stopped=T([True, True]),
                        logp=zeros, entropy=zeros, sampling_values=None, turns=turns)
    shaped = T([1.0, 0.0])
    rewards, _ = pm.kl_penalized_rewards(shaped, zeros, zeros, sampled, 0.0)
    return Scored(episodes=episodes, scores=None, terms={}, overlong=None, total=shaped, shaped=shaped), rewards


@pytest.mark.parametrize("estimator", ["rloo", "gae"])
def test_turn_advantages_by_hand(estimator):
    """Token rewards 0.5 at offset 2 and 1 + 1 at offset 5 (episode 0), 0.25 at offset 3 (episode 1); turn_gamma
    0.5. rloo: turn returns [0.5 + 0.5 * 2, 2] and [0.25, 0] (padded), compared at each turn index. gae with V = 0
    and lambda = 1: the discounted returns, 0.5 at a turn's end."""
    from rlhf.config import PPOConfig
    from rlhf.ppo import ppo_update

    scored, rewards = _turn_batch()
    p = PPOConfig(advantage=estimator, samples_per_prompt=2, turn_gamma=0.5, whiten_advantages=False, lam=1.0)
    advantage, returns = ppo_update.advantages(p, scored, torch.zeros(2, 6), torch.zeros(2, 6), rewards, 0.0)
    if estimator == "rloo":
        want = [[1.25, 1.25, 1.25, 0, 0, 2.0], [-1.25] * 4 + [0, 0]]
        assert returns is None
    else:
        want = [[1.5, 1.5, 1.5, 0, 0, 2.0], [0.25] * 4 + [0, 0]]
        torch.testing.assert_close(returns, T(want))
    torch.testing.assert_close(advantage, T(want))
