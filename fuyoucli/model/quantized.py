"""A LoRA run's frozen base in 8 or 4 bits: the decoder layers' linear weights replaced by quantized ones.

Model stage; kernels.quant holds the formats. Each frozen nn.Linear of a decoder layer becomes a
QuantLinear whose parameters are the quantized tensors (frozen, flat), so the engine streams and homes
the quantized bytes like any frozen weight and the device dequantizes a matrix only for the product
that needs it (QLoRA's way: forward, and again in the backward for the input's gradient; nothing
dequantized outlives its product). peft sees an nn.Linear and wraps it with its LoRA layer as usual;
`compute_dtype` tells it (as for bitsandbytes' layers) which dtype the adapters take.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fuyoucli.kernels.quant import QuantizedWeight, dequantize, quantize


class _QuantLinearFn(torch.autograd.Function):
    """y = x W^T + b with W dequantized here and again for the backward; saves only the stored bytes."""

    @staticmethod
    def forward(ctx, x, bias, layer, *stored):
        w = layer.weight_now(stored, x.dtype)
        ctx.layer = layer
        ctx.save_for_backward(*stored)
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        stored = ctx.saved_tensors
        grad_x = grad @ ctx.layer.weight_now(stored, grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (grad_x, grad_b, None) + (None,) * len(stored)


class QuantLinear(nn.Linear):
    """A frozen linear layer stored quantized (kernels.quant). Its parameters: the format's flat tensors
    (`weight` holds the codes, `weight_<name>` the rest) and the bias in the compute dtype."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a full-precision weight
        self.out_features, self.in_features = q.shape
        self.fmt = q.fmt
        self.compute_dtype = compute_dtype
        self.names = list(q.tensors)
        for name, t in q.tensors.items():
            self.register_parameter(self._attr(name), nn.Parameter(t, requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @staticmethod
    def _attr(name: str) -> str:
        return "weight" if name == "codes" else f"weight_{name}"

    def stored(self) -> list[torch.Tensor]:
        return [getattr(self, self._attr(n)) for n in self.names]

    def weight_now(self, stored, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.fmt, (self.out_features, self.in_features), dict(zip(self.names, stored)), dtype)

    def dequantized(self) -> nn.Linear:
        """An ordinary nn.Linear holding this layer's weight dequantized into the compute dtype."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight = nn.Parameter(self.weight_now(self.stored(), self.compute_dtype), requires_grad=False)
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantLinearFn.apply(x, self.bias, self, *self.stored())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_linears(layers: nn.ModuleList, fmt: str, compute_dtype: torch.dtype,
                     weight_of: Callable[[str, nn.Linear], torch.Tensor] | None = None,
                     prefix: str = "", stored_of: Callable[[str], QuantizedWeight | None] | None = None) -> int:
    """Replace every nn.Linear of `layers` with a QuantLinear in place; returns how many. `weight_of(name,
    module)` gives a linear's full-precision weight by its qualified name (`prefix` + its name in
    `layers`) when the module holds none yet (a lazily loaded layer), else the module's own is used;
    `stored_of(name)`, when given, a weight already stored in `fmt` (a GGUF's Q8_0 matrix), kept as it
    is. Quantized one matrix at a time, so the full-precision copy never exists for more than one."""
    count = 0
    for name, module in list(layers.named_modules()):
        if type(module) is not nn.Linear:
            continue
        full = prefix + name
        q = stored_of(full + ".weight") if stored_of is not None else None
        if q is None:
            weight = module.weight if (weight_of is None or module.weight.numel()) else \
                weight_of(full + ".weight", module)
            q = quantize(weight, fmt)
        bias = module.bias
        if bias is not None and bias.numel() == 0 and weight_of is not None:
            bias = weight_of(full + ".bias", module)
        owner, _, attr = name.rpartition(".")
        parent = layers.get_submodule(owner) if owner else layers
        setattr(parent, attr, QuantLinear(q, bias, compute_dtype))
        count += 1
    return count


def dequantize_model(model: nn.Module) -> int:
    """Every QuantLinear of `model` back to an nn.Linear in its compute dtype (a merged export); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, module.dequantized())
            count += 1
    return count
