"""Weight-only quantization of a frozen base: the stored formats and their dequantization.

Kernel level: torch (and bitsandbytes for nf4) only; the same calls run on a CPU and a CUDA device.
A quantized weight is a few flat tensors (`QuantizedWeight.tensors`, named), which the model keeps as
frozen parameters and the engine streams like any other frozen weight; `dequantize` turns them back
into the compute dtype on whatever device they are on.
- nf4: bitsandbytes' 4-bit NormalFloat (QLoRA's format): 64 values per block, two per byte, and the
  blocks' absmax quantized again to 8 bits (QLoRA's double quantization: 0.516 bytes a parameter).
  bitsandbytes is QLoRA's own library and its CPU backend dequantizes natively; the same bytes then
  dequantize on CUDA with its CUDA kernel.
- int8: symmetric blocks of 32 values with an fp16 scale each (value = code * scale): the layout of
  llama.cpp's Q8_0, so a Q8_0 GGUF tensor is kept exactly (1.0625 bytes a parameter). Dequantizing is
  one multiply in plain torch on any device. bitsandbytes' int8 formats (LLM.int8's row-wise scales
  with fp16 outliers, or its dynamic 8-bit map) cannot hold Q8_0 blocks as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

FORMATS = ("int8", "nf4")
INT8_BLOCK = 32
NF4_BLOCK = 64
NF4_ABSMAX_BLOCK = 256
"""Blocks of 8-bit absmax values under one fp32 scale (bitsandbytes' nested quantization)."""

BYTES_PER_PARAM = {
    "int8": 1 + 2 / INT8_BLOCK,
    "nf4": 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_ABSMAX_BLOCK),
}
"""Bytes a quantized parameter takes at home and on the wire (codes and scales; the offset of nf4's
nested scales, 4 bytes a tensor, is left out)."""


class QuantizationUnavailable(RuntimeError):
    pass


def _bnb():
    """bitsandbytes' functional module. Its CPU backend, on import, asks the `kernels` package for a
    fused CPU kernel from the Hugging Face Hub; the kernels package refuses untrusted repositories (no
    download happens) and bitsandbytes falls back to its own kernels, but logs a warning per import
    that says nothing to a fuyou user (cli/app.py silences it before anything imports bitsandbytes)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        raise QuantizationUnavailable(
            f"model.quantization: nf4 needs bitsandbytes: pip install 'fuyoucli[quant]' ({e})") from e
    return F


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized matrix: `tensors` (name -> flat tensor) and what dequantizing needs besides."""

    fmt: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]


def quantize(weight: torch.Tensor, fmt: str) -> QuantizedWeight:
    """`weight` (any float dtype, any device) in format `fmt`. Deterministic: the same weight gives the
    same bytes, so a run that quantizes again at resume gets the base it trained on."""
    shape = tuple(weight.shape)
    if fmt == "int8":
        flat = weight.detach().reshape(-1).float()
        pad = -flat.numel() % INT8_BLOCK
        blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, INT8_BLOCK)
        scale = (blocks.abs().amax(dim=1) / 127).to(torch.float16)
        # Divide by the fp16 scale that is stored, so that dequantizing inverts this exactly where it can.
        safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
        codes = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return QuantizedWeight(fmt, shape, {"codes": codes.view(-1), "scale": scale})
    if fmt == "nf4":
        F = _bnb()
        packed, state = F.quantize_4bit(weight.detach().contiguous(), blocksize=NF4_BLOCK, quant_type="nf4",
                                        compress_statistics=True)
        return QuantizedWeight(fmt, shape, {"codes": packed.view(-1), "absmax": state.absmax.view(-1),
                                            "absmax2": state.state2.absmax.view(-1),
                                            "offset": state.offset.reshape(1).float()})
    raise ValueError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")


def from_q8_0(codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> QuantizedWeight:
    """A Q8_0 tensor as stored in a GGUF file (int8 codes, one fp16 scale per 32 of them), kept as it is."""
    return QuantizedWeight("int8", tuple(shape), {"codes": codes.reshape(-1).to(torch.int8),
                                                  "scale": scale.reshape(-1).to(torch.float16)})


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """nf4's 16 code values and the 256 of the nested absmax (bitsandbytes' dynamic map), per device."""
    key = (name, device)
    if key not in _TABLES:
        F = _bnb()
        _TABLES[key] = F.get_4bit_type("nf4", device=device) if name == "nf4" else \
            F.create_dynamic_map(signed=True).to(device)
    return _TABLES[key]


def dequantize(fmt: str, shape: tuple[int, int], tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype`, on the tensors' device (a new tensor; the inputs are unchanged)."""
    n = math.prod(shape)
    if fmt == "int8":
        codes, scale = tensors["codes"], tensors["scale"]
        # fp32 product, then one rounding to the compute dtype: an fp16 scale does not fit bf16's mantissa.
        w = (codes.view(-1, INT8_BLOCK).float() * scale.float()[:, None]).view(-1)[:n]
        return w.view(shape).to(dtype)
    if fmt == "nf4":
        F = _bnb()
        device = tensors["codes"].device
        nested = F.QuantState(absmax=tensors["absmax2"], code=_table("dynamic", device), blocksize=NF4_ABSMAX_BLOCK,
                              dtype=torch.float32)
        state = F.QuantState(absmax=tensors["absmax"], shape=torch.Size(shape), code=_table("nf4", device),
                             blocksize=NF4_BLOCK, quant_type="nf4", dtype=dtype, offset=tensors["offset"][0],
                             state2=nested)
        return F.dequantize_4bit(tensors["codes"].view(-1, 1), state)
    raise ValueError(f"unknown quantization format {fmt!r}")
