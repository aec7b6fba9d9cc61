"""The rollout sampler's random numbers: provably inside (0, 1), so that no masked or near-impossible token can
ever be forced, at any vocabulary width."""

from __future__ import annotations

import pytest
import torch

from rlhf.engine import rollout
from rlhf.engine.rollout import UNIFORM_BITS, episode_keys, gumbel_max, gumbel_noise, hash_uniform, uniform_from_bits


@pytest.mark.fast
def test_every_hash_value_gives_a_uniform_strictly_inside_0_1_and_finite_noise():
    # exhaustive: hash_uniform keeps the top UNIFORM_BITS bits of a 31-bit hash, so these are all its outputs
    k = torch.arange(1 << UNIFORM_BITS)
    u = uniform_from_bits(k)
    assert u.dtype == torch.float32
    assert float(u.min()) == 2.0 ** -24 and float(u.max()) == 1 - 2.0 ** -24
    assert bool((u > 0).all() and (u < 1).all())
    assert torch.equal(u.double(), (k.double() + 0.5) / 2 ** UNIFORM_BITS)  # exact, no rounding anywhere
    noise = gumbel_noise(u)
    assert bool(torch.isfinite(noise).all())
    assert bool((noise[1:] <= noise[:-1]).all())  # monotone: distinct uniforms never collapse to one extreme


@pytest.mark.fast
def test_the_old_float64_formula_rounded_to_one():
    # what this replaced: (x + 0.5) / 2^31 in float64, cast to float32, is exactly 1.0 for the 64 largest hashes,
    # and -log(-log(1.0)) is +inf, which wins any argmax (and inf + -inf = NaN, which argmax also picks)
    x = torch.arange((1 << 31) - 200, 1 << 31, dtype=torch.int64)
    old = ((x.to(torch.float64) + 0.5) / float(1 << 31)).to(torch.float32)
    assert int((old == 1.0).sum()) == 64
    assert bool(torch.isinf(-gumbel_noise(old[-1:])).all())


def test_a_masked_token_is_never_sampled_at_a_152k_vocabulary():
    # Qwen's vocabulary width; half the columns forbidden (-inf, as min_new_tokens does to EOS). With the old
    # formula each draw picked a forbidden column with probability ~76k * 2^-25 ~ 0.23%: ~5 of these 2,048 draws
    width = 152_064
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(width, generator=generator) * 3
    forbidden = torch.zeros(width, dtype=torch.bool)
    forbidden[torch.randperm(width, generator=generator)[: width // 2]] = True
    scores = scores.masked_fill(forbidden, -torch.inf)
    columns = rollout._columns(width, "cpu")
    keys = episode_keys(3, 1, torch.arange(256))
    picked = torch.cat([gumbel_max(scores.expand(256, width), keys, position, columns) for position in range(8)])
    assert not bool(forbidden[picked].any())
    u = torch.cat([hash_uniform(keys, position, width, columns) for position in range(2)])
    assert bool((u > 0).all() and (u < 1).all())
