"""The quantized formats (kernels.quant) and the frozen layer that computes with them (model.quantized):
what a format stores, how close dequantizing comes back, and that the layer's products and input
gradients are those of an ordinary linear layer over the dequantized weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fuyoucli.kernels.quant import BYTES_PER_PARAM, INT8_BLOCK, dequantize, from_q8_0, quantize
from fuyoucli.model.quantized import QuantLinear, dequantize_model, quantize_linears
from fuyoucli.model.types import QUANT_BYTES_PER_PARAM


def _weight(shape=(96, 160), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def test_int8_comes_back_within_half_a_step_of_its_block():
    w = _weight()
    q = quantize(w, "int8")
    back = dequantize("int8", q.shape, q.tensors, torch.float32)
    blocks = w.reshape(-1, INT8_BLOCK)
    step = (blocks.abs().amax(1) / 127).to(torch.float16).float()
    err = (back.reshape(-1, INT8_BLOCK) - blocks).abs()
    # half a quantization step, plus what the fp16 scale's own rounding adds at the block's edge
    assert (err <= step[:, None] * 0.5 + blocks.abs().amax(1, keepdim=True) * 2 ** -10).all()
    assert q.tensors["codes"].dtype == torch.int8 and q.tensors["scale"].dtype == torch.float16


def test_int8_is_deterministic_and_a_q8_0_tensor_is_kept_as_it_is():
    w = _weight(seed=1)
    a, b = quantize(w, "int8"), quantize(w.clone(), "int8")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(-127, 128, (64, 32), generator=g, dtype=torch.int8)
    codes[:, 7] = 127  # as llama.cpp writes a block: its scale is the block's absmax / 127
    scale = torch.rand(64, generator=g).to(torch.float16)
    kept = from_q8_0(codes, scale, (32, 64))
    back = dequantize("int8", kept.shape, kept.tensors, torch.float32)
    assert torch.equal(back.reshape(-1, 32), codes.float() * scale.float()[:, None])  # Q8_0's own arithmetic, exact
    # and quantizing that weight again gives the same codes and scales back (a round trip is lossless)
    again = quantize(back, "int8")
    assert torch.equal(again.tensors["codes"], kept.tensors["codes"])
    assert torch.equal(again.tensors["scale"], kept.tensors["scale"])


def test_nf4_is_bitsandbytes_nf4():
    F = pytest.importorskip("bitsandbytes.functional")
    w = _weight((128, 192)).to(torch.bfloat16)
    q = quantize(w, "nf4")
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    want = F.dequantize_4bit(packed, state)
    got = dequantize("nf4", q.shape, q.tensors, torch.bfloat16)
    assert torch.equal(got, want)
    err = (got.float() - w.float()).abs().max()
    assert 0 < err < w.float().abs().max() * 0.5  # 16 levels a block: close, not exact


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_the_planner_prices_the_bytes_a_format_really_stores(fmt):
    if fmt == "nf4":
        pytest.importorskip("bitsandbytes")
    w = _weight((512, 1024))
    q = quantize(w, fmt)
    stored = sum(t.numel() * t.element_size() for t in q.tensors.values())
    assert stored / w.numel() == pytest.approx(QUANT_BYTES_PER_PARAM[fmt], abs=1e-4)
    assert BYTES_PER_PARAM[fmt] == pytest.approx(QUANT_BYTES_PER_PARAM[fmt])


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_a_quantized_layer_computes_and_backpropagates_like_linear_over_its_dequantized_weight(fmt):
    if fmt == "nf4":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64, bias=False))])
    for p in layers.parameters():
        p.requires_grad_(False)
    assert quantize_linears(layers, fmt, torch.float32) == 2
    first, second = layers[0][0], layers[0][2]
    assert isinstance(first, QuantLinear) and isinstance(second, QuantLinear)
    plain = nn.Sequential(first.dequantized(), nn.ReLU(), second.dequantized())

    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layers[0](x), plain(x_ref)
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert all(p.grad is None for p in layers.parameters())  # the base stays frozen

    model = nn.Module()
    model.layers = layers
    assert dequantize_model(model) == 2
    assert type(model.layers[0][0]) is nn.Linear
    assert torch.equal(model.layers[0][0].weight, plain[0].weight)


def test_a_quantized_layer_keeps_only_the_stored_bytes_for_its_backward():
    """Nothing dequantized outlives its product: the autograd graph holds the codes and scales, not a
    full-precision weight (QLoRA's memory saving, kept in the backward)."""
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.Linear(256, 256, bias=False)])
    layers[0].weight.requires_grad_(False)
    quantize_linears(layers, "int8", torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layers[0](x)
    assert all(t.dtype in (torch.int8, torch.float16) or t.numel() < 256 * 256 for t in saved)
    assert max(t.numel() * t.element_size() for t in saved) <= math.ceil(256 * 256 * BYTES_PER_PARAM["int8"])
    y.sum().backward()
    assert x.grad is not None
