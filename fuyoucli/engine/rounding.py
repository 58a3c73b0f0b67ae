"""How an fp32 result is stored into a 16-bit weight home (round to nearest, or unbiased stochastic
rounding with draws seeded by (run seed, step, block)). Engine stage: zo2's homes and the AdamW
optimizers' bf16 masters (engine/compact.py) round the same way.

MeZO's updates (lr 1e-6..1e-7 times a projected gradient) are far below a 16-bit weight's resolution:
rounded to nearest, most of them vanish. Rounded stochastically (up with probability equal to the
distance from the lower neighbour over the gap) the stored weight equals the fp32 result in expectation,
so many small updates add up as they would in fp32 (QuZO, arXiv 2502.12346). The draws come from a
generator seeded like z, so a result does not depend on execution order, and resume and the seed
ledger replay it exactly. No CUDA calls here: the generator lives on whatever device the tensors do.
"""

from __future__ import annotations

from typing import Literal

import torch

from fuyoucli.model.blocks import block_generator, block_seed

Rounding = Literal["nearest", "stochastic"]

# The 'direction' slot of block_seed that the rounding draws use: z uses 0..q-1, so a value no
# direction takes keeps the rounding stream independent of every z stream of the same (step, block).
ROUNDING_STREAM = -1


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


class HomeRounding:
    """Stores fp32 results into a block's home tensors, tensor by tensor in the block's order.

    One instance serves one pass over one block's tensors (an update, or one conservative candidate):
    each pass starts the (seed, step, block) stream afresh, so a candidate evaluated before the update
    stores exactly the weights the update then keeps."""

    def __init__(self, mode: Rounding, seed: int, step: int, block: int, device: torch.device):
        if mode not in ("nearest", "stochastic"):
            raise ValueError(f"home rounding must be nearest or stochastic, not {mode!r}")
        self.mode = mode
        self._gen = block_generator(device, block_seed(seed, step, ROUNDING_STREAM, block)) \
            if mode == "stochastic" else None

    def store(self, dst: torch.Tensor, src32: torch.Tensor) -> torch.Tensor:
        """dst := src32 in dst's dtype. Nearest, or stochastic when dst is narrower than fp32 (then
        src32 may serve as scratch: stochastic_round_)."""
        if self._gen is None or dst.dtype == torch.float32:
            return dst.copy_(src32)
        return stochastic_round_(dst, src32, self._gen)

    def rounded(self, src32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """src32 in `dtype` (a new tensor), rounded as store() would (src32 may serve as scratch)."""
        if dtype == torch.float32:
            return src32
        if self._gen is None:
            return src32.to(dtype)
        return stochastic_round_(torch.empty(src32.shape, dtype=dtype, device=src32.device), src32, self._gen)
