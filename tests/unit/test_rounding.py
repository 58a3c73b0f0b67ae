"""Stochastic rounding into a 16-bit home: unbiased, exact where exact, seeded, replayable."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.engine.rounding import HomeRounding, stochastic_round_
from fuyoucli.kernels.native import sr_bf16

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


# -- HomeRounding's bf16 stores on a CPU device: compiled where a C compiler is, torch's draws otherwise --


@pytest.fixture(params=["torch", "native"])
def kernel(request, monkeypatch):
    if request.param == "native" and sr_bf16() is None:
        pytest.skip("no C compiler here: the compiled rounding is not built")
    monkeypatch.setenv("FUYOU_NATIVE_KERNELS", "1" if request.param == "native" else "0")
    return request.param


def _store(step: int, src: torch.Tensor, pieces=(None,)) -> torch.Tensor:
    """One pass of HomeRounding over `src` (bf16), stored piece by piece at the given cut points."""
    r = HomeRounding("stochastic", 3, step, 1, torch.device("cpu"))
    out = torch.empty(src.shape, dtype=torch.bfloat16)
    cuts = [0, *[c for c in pieces if c is not None], src.numel()]
    for a, b in zip(cuts, cuts[1:]):
        r.store(out[a:b], src[a:b].clone())
    return out


def test_home_rounding_is_unbiased_on_either_kernel(kernel):
    base = torch.tensor([1.0, -1.0, 3.0e-3, -7.5, 0.3, 100.0]).to(torch.bfloat16)
    lower = base.float()
    gap = torch.nextafter(base, torch.full_like(base, float("inf"))).float() - lower
    x = (lower + 0.3 * gap).repeat(1000)  # 6,000 values per pass, 20 passes (steps)
    out = torch.stack([_store(step, x).float().view(1000, 6) for step in range(20)])
    assert bool(((out == lower) | (out == lower + gap)).all())
    up_share = (out.mean((0, 1)) - lower) / gap
    assert torch.allclose(up_share, torch.full_like(up_share, 0.3), atol=0.02), up_share


def test_home_rounding_keeps_exact_values_and_specials_on_either_kernel(kernel):
    w = torch.randn(4096).to(torch.bfloat16)
    assert torch.equal(_store(0, w.float()), w)
    out = _store(0, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")]))
    assert out[:4].float().tolist() == [0.0, 0.0, float("inf"), float("-inf")] and torch.isnan(out[4])
    assert torch.signbit(out[1])


def test_compiled_rounding_draws_one_stream_per_pass_whatever_the_pieces(monkeypatch):
    """A pass stored in pieces (zo2's update goes piece by piece) draws as one stored whole, so the
    in-memory reference and the streamed engine round alike whatever buffers cut them; each new pass
    (a candidate, a replay) starts the stream again."""
    if sr_bf16() is None:
        pytest.skip("no C compiler here: the compiled rounding is not built")
    monkeypatch.setenv("FUYOU_NATIVE_KERNELS", "1")
    src = torch.randn(10_000) * 1e-2 + 1.0
    whole = _store(4, src)
    assert torch.equal(whole, _store(4, src, pieces=(300, 4096, 9999)))
    assert not torch.equal(whole, _store(5, src))
    torch_ops = HomeRounding("stochastic", 3, 4, 1, torch.device("cpu"))
    assert not torch.equal(whole, stochastic_round_(torch.empty_like(whole), src.clone(), torch_ops._gen))
