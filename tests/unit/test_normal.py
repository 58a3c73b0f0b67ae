"""kernels/normal.py: zo2's z on a CPU device. The compiled counter-based stream against a numpy
restatement of its arithmetic (bit for bit), its statistics, and its independence from how it is cut."""

import math

import numpy as np
import pytest
import torch

from fuyoucli.kernels.native import normal as native_normal
from fuyoucli.kernels.normal import COUNTER_SOURCE, NormalStream, z_source

needs_native = pytest.mark.skipif(native_normal() is None, reason="no C compiler: the CPU draws from torch")

F = np.float32


def _mix32(x):
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _hash(c, key):
    lo, hi = (c & 0xFFFFFFFF).astype(np.uint32), (c >> 32).astype(np.uint32)
    return _mix32(_mix32(lo ^ np.uint32(key & 0xFFFFFFFF)) + (hi ^ np.uint32(key >> 32)))


def _poly(coeffs, y):
    out = np.full_like(y, F(coeffs[0]))
    for c in coeffs[1:]:
        out = out * y + F(c)
    return out


def reference(key: int, offset: int, n: int) -> np.ndarray:
    """The stream's values offset .. offset + n, restated from adamw_chunk.c's comment in numpy (uint32
    arithmetic wraps, float32 ops round once, np.sqrt is correctly rounded)."""
    pairs = np.arange(offset // 2, (offset + n + 1) // 2 + 1, dtype=np.uint64)
    a, b = _hash(2 * pairs, key), _hash(2 * pairs + np.uint64(1), key)
    with np.errstate(over="ignore"):
        u = ((a >> np.uint32(8)) + np.uint32(1)).astype(np.int32).astype(F) * F(2.0 ** -24)
        bits = u.view(np.uint32)
        m = ((bits & np.uint32(0x7FFFFF)) | np.uint32(0x3F800000)).view(F)
        big = m > F(math.sqrt(2))
        m = np.where(big, m * F(0.5), m)
        e = ((bits >> np.uint32(23)).astype(np.int32) - 127 + big).astype(F)
        f = m - F(1)
        s = f / (f + F(2))
        p = _poly([1 / 9, 1 / 7, 1 / 5, 1 / 3, 1], s * s)
        r = np.sqrt(F(-2) * (e * F(math.log(2)) + (s + s) * p))
        q = b >> np.uint32(30)
        x = ((b >> np.uint32(8)) & np.uint32(0x3FFFFF)).astype(np.int32).astype(F) * F(2.0 ** -22) * F(math.pi / 2)
        y = x * x
        c = _poly([1 / math.factorial(12), -1 / math.factorial(10), 1 / math.factorial(8), -1 / 720, 1 / 24,
                   -0.5, 1], y)
        sn = _poly([1 / math.factorial(13), -1 / math.factorial(11), 1 / math.factorial(9), -1 / 5040, 1 / 120,
                    -1 / 6, 1], y) * x
    cq, sq = np.where(q & 1, sn, c), np.where(q & 1, c, sn)
    cq = np.where((q == 1) | (q == 2), -cq, cq)
    sq = np.where(q >= 2, -sq, sq)
    values = np.stack([r * cq, r * sq], axis=1).reshape(-1)  # value 2p, 2p + 1 of pair p
    start = offset - 2 * (offset // 2)
    return values[start:start + n]


def _native(key: int, offset: int, n: int) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    native_normal()(out.data_ptr(), n, key, offset)
    return out


@needs_native
@pytest.mark.parametrize("key,offset,n", [(12345, 0, 100_003), (2**63 - 7, 3, 4097),
                                          (0xDEADBEEFCAFE, 2**31 - 1000, 5000), (1, 2**33 + 1, 33), (7, 5, 1),
                                          (7, 4, 1)])
def test_compiled_stream_is_its_stated_arithmetic_bit_for_bit(key, offset, n):
    """Against the numpy restatement, over odd starts and ends and a counter whose low half wraps
    (offset 2^31 - 1000: the counters 2i pass 2^32 inside the piece)."""
    got = _native(key, offset, n).numpy()
    want = reference(key, offset, n)
    assert got.view(np.uint32).tolist() == want.view(np.uint32).tolist()


@needs_native
def test_pieces_are_the_whole_stream():
    stream, whole = NormalStream("cpu", 99), NormalStream("cpu", 99).draw(10_001)
    parts = [stream.draw(k) for k in (1, 2, 3, 4000, 5995)]
    assert torch.equal(torch.cat(parts), whole)
    strided = torch.empty(200, 2)[:, 0]  # not contiguous: drawn aside, then copied
    assert torch.equal(NormalStream("cpu", 5).fill(strided), NormalStream("cpu", 5).draw(200))


@needs_native
def test_stream_is_standard_normal_and_uncorrelated():
    """Moments, the CDF (Kolmogorov-Smirnov distance) and neighbour correlations of 2^22 values; a
    change to a constant or a quadrant's sign fails one of these."""
    z = NormalStream("cpu", 2024).draw(1 << 22).double()
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((z ** 3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96 / n)
    zs = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(zs / math.sqrt(2)))
    ks = float(torch.max(torch.abs(cdf - torch.arange(1, n + 1, dtype=torch.float64) / n)))
    assert ks < 1.63 / math.sqrt(n)  # the 1% level
    for lag in (1, 2, 3):  # 1: the two halves of a Box-Muller pair
        assert abs(float((z[:-lag] * z[lag:]).mean())) < 5 / math.sqrt(n)
    assert abs(float((z[0::2] ** 2 * z[1::2] ** 2).mean()) - 1) < 5 * math.sqrt(8 / (n / 2))


@needs_native
def test_seeds_give_unrelated_streams():
    a, b = NormalStream("cpu", 10).draw(1 << 20), NormalStream("cpu", 11).draw(1 << 20)
    assert abs(float((a.double() * b.double()).mean())) < 5 / math.sqrt(1 << 20)
    c = NormalStream("cpu", 10 + (1 << 32)).draw(1 << 20)  # the key's upper half counts too
    assert abs(float((a.double() * c.double()).mean())) < 5 / math.sqrt(1 << 20)


def test_z_source_names_what_draws(monkeypatch):
    assert z_source("cpu") == (COUNTER_SOURCE if native_normal() is not None else "torch-cpu")
    assert z_source("meta") == "torch-meta"
    monkeypatch.setenv("FUYOU_NATIVE_KERNELS", "0")
    assert z_source("cpu") == "torch-cpu"
    g = torch.Generator().manual_seed(3)
    assert torch.equal(NormalStream("cpu", 3).draw(100), torch.randn(100, generator=g))
