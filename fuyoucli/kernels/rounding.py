"""Stochastic rounding of fp32 results into 16-bit tensors: the arithmetic, with a generator the caller
seeds. Kernel level (torch only, no fuyou imports): the engine's homes and optimizers round through
engine/rounding.py (HomeRounding seeds it per run, step and block); the hardware probe times it.
"""

from __future__ import annotations

import torch


def stochastic_round_(dst: torch.Tensor, src32: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """dst (bfloat16 or float16) := src32 rounded to dst's dtype stochastically: to the neighbour above
    with probability (src - below) / (above - below), else below. Exactly representable values are
    kept as they are (an update of 0 changes nothing). One uniform draw per element, in order.
    A contiguous bfloat16-bound `src32` is used as scratch (it ends holding the rounded value): the
    callers' fp32 working copies are dead by then, and no tensor of the block's size is made."""
    if src32.dtype != torch.float32:
        raise TypeError(f"stochastic rounding reads float32, got {src32.dtype}")
    if dst.dtype == torch.bfloat16:
        # bfloat16 is float32's upper 16 bits: adding a uniform 16-bit integer to the lower half and
        # truncating carries into the kept half with exactly the probability above (sign-magnitude:
        # the magnitude rounds unbiasedly, so the value does).
        noise = torch.randint(0, 1 << 16, src32.shape, generator=gen, device=src32.device, dtype=torch.int32)
        scratch = src32 if src32.is_contiguous() else src32.contiguous()
        bits = scratch.view(torch.int32)
        bits.add_(noise).bitwise_and_(-65536)  # 0xFFFF0000 as int32
        return dst.copy_(scratch)  # exact: the low half is zero
    if dst.dtype == torch.float16:
        # float16 is not a truncation of float32: find both neighbours explicitly.
        near = src32.to(torch.float16)
        back = near.float()
        above = back > src32
        toward = torch.where(above, torch.tensor(float("-inf"), dtype=torch.float16, device=near.device),
                             torch.tensor(float("inf"), dtype=torch.float16, device=near.device))
        other = torch.nextafter(near, toward)
        lo = torch.where(above, other, near).float()
        hi = torch.where(above, near, other).float()
        gap = hi - lo
        p_up = torch.where(gap > 0, (src32 - lo) / gap, torch.zeros_like(gap)).nan_to_num_(0.0)
        u = torch.rand(src32.shape, generator=gen, device=src32.device, dtype=torch.float32)
        return dst.copy_(torch.where(u < p_up, hi, lo))
    raise TypeError(f"stochastic rounding stores into bfloat16 or float16, not {dst.dtype}")
