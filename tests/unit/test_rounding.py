"""Stochastic rounding into a 16-bit home: unbiased, exact where exact, seeded, replayable."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.engine.rounding import HomeRounding, stochastic_round_

HALVES = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", HALVES)
def test_the_mean_of_many_roundings_is_the_fp32_value(dtype):
    # Values strictly between two neighbours, at several magnitudes and both signs.
    base = torch.tensor([1.0, -1.0, 3.0e-3, -7.5, 0.3, 100.0]).to(dtype)
    lower = base.float()
    gap = torch.nextafter(base, torch.full_like(base, float("inf"))).float() - lower
    x = lower + 0.3 * gap  # 30% of the way from a representable value to the one above it
    n = 20000
    gen = torch.Generator().manual_seed(0)
    out = torch.empty(n, x.numel(), dtype=dtype)
    for i in range(n // 1000):
        stochastic_round_(out[i * 1000:(i + 1) * 1000], x.expand(1000, -1).contiguous(), gen)
    # Every result is one of the two neighbours, and the share rounded up is 0.3 (binomial sd ~0.003).
    assert bool(((out.float() == lower) | (out.float() == lower + gap)).all())
    up_share = (out.float().mean(0) - lower) / gap
    assert torch.allclose(up_share, torch.full_like(up_share, 0.3), atol=0.02), up_share


@pytest.mark.parametrize("dtype", HALVES)
def test_nearest_loses_a_small_update_and_stochastic_keeps_it_on_average(dtype):
    w = torch.full((50000,), 1.0, dtype=dtype)
    step = torch.full((50000,), 1.0e-4)  # far below the resolution at 1.0 for both 16-bit formats
    src = w.float() - step
    nearest = src.to(dtype)
    assert torch.equal(nearest, w)  # the update vanished
    sr = stochastic_round_(torch.empty_like(w), src, torch.Generator().manual_seed(1))
    assert (w.float() - sr.float()).mean().item() == pytest.approx(1.0e-4, rel=0.1)


@pytest.mark.parametrize("dtype", HALVES)
def test_representable_values_stay_exactly(dtype):
    w = torch.randn(4096).to(dtype)
    out = stochastic_round_(torch.empty_like(w), w.float(), torch.Generator().manual_seed(2))
    assert torch.equal(out, w)


@pytest.mark.parametrize("dtype", HALVES)
def test_specials_pass_through(dtype):
    src = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    out = stochastic_round_(torch.empty(5, dtype=dtype), src, torch.Generator().manual_seed(3))
    assert out[:4].float().tolist() == [0.0, 0.0, float("inf"), float("-inf")]
    assert torch.isnan(out[4])


def test_the_stream_is_seeded_by_seed_step_block_and_restarts_each_pass():
    src = torch.randn(1000) * 1e-2 + 1.0

    def once(seed, step, block):
        return HomeRounding("stochastic", seed, step, block, torch.device("cpu")).store(
            torch.empty(1000, dtype=torch.bfloat16), src.clone())  # the source serves as scratch

    a = once(0, 5, 2)
    assert torch.equal(a, once(0, 5, 2))  # a second pass (a candidate, a replay) stores the same
    assert not torch.equal(a, once(0, 6, 2)) and not torch.equal(a, once(0, 5, 3)) and not torch.equal(a, once(1, 5, 2))


def test_nearest_mode_is_a_plain_cast():
    src = torch.randn(1000)
    r = HomeRounding("nearest", 0, 0, 0, torch.device("cpu"))
    assert torch.equal(r.store(torch.empty(1000, dtype=torch.float16), src), src.to(torch.float16))
    with pytest.raises(ValueError):
        HomeRounding("up", 0, 0, 0, torch.device("cpu"))


def test_a_contiguous_source_is_the_scratch_and_ends_rounded():
    src = torch.randn(64) * 1e-2 + 1.0
    out = stochastic_round_(torch.empty(64, dtype=torch.bfloat16), src, torch.Generator().manual_seed(4))
    assert torch.equal(src, out.float())  # no block-sized temporary: the fp32 copy took the rounding
