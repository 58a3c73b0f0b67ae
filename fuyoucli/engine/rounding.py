"""How an fp32 result is stored into a 16-bit weight home (round to nearest, or unbiased stochastic
rounding with draws seeded by (run seed, step, block)). Engine stage: zo2's homes and the AdamW
optimizers' bf16 masters (kernels/adamw.py) round the same way; the arithmetic is kernels/rounding.py.

MeZO's updates (lr 1e-6..1e-7 times a projected gradient) are far below a 16-bit weight's resolution:
rounded to nearest, most of them vanish. Rounded stochastically (up with probability equal to the
distance from the lower neighbour over the gap) the stored weight equals the fp32 result in expectation,
so many small updates add up as they would in fp32 (QuZO, arXiv 2502.12346). The draws come from a
generator seeded like z, so a result does not depend on execution order, and resume and the seed
ledger replay it exactly. No CUDA calls here: the generator lives on whatever device the tensors do.
On a CPU device with a C compiler (kernels/native.py), a bf16 store draws instead from a counter-based
hash of (the pass's seed, the value's position in the pass), in compiled code: torch's CPU generator
fills one value at a time, serially, and cost a streamed zo2 step on this project's 2-core VM 0.2 s
of 0.86 (1.35x the fp32-home step). Same properties: unbiased, one stream per pass, exact on resume on
the machine that ran it (another machine without a compiler continues on torch's draws).
"""

from __future__ import annotations

from typing import Literal

import torch

from fuyoucli.kernels.native import sr_bf16
from fuyoucli.kernels.rounding import stochastic_round_
from fuyoucli.model.blocks import block_generator, block_seed

Rounding = Literal["nearest", "stochastic"]

# The 'direction' slot of block_seed that the rounding draws use: z uses 0..q-1, so a value no
# direction takes keeps the rounding stream independent of every z stream of the same (step, block).
ROUNDING_STREAM = -1


class HomeRounding:
    """Stores fp32 results into a block's home tensors, tensor by tensor in the block's order.

    One instance serves one pass over one block's tensors (an update, or one conservative candidate):
    each pass starts the (seed, step, block) stream afresh, so a candidate evaluated before the update
    stores exactly the weights the update then keeps."""

    def __init__(self, mode: Rounding, seed: int, step: int, block: int, device: torch.device,
                 stream: int = ROUNDING_STREAM):
        """`stream`: the 'direction' slot of the seed (ROUNDING_STREAM; the AdamW bf16 master's chunks
        take the ones below it, engine/compact.py)."""
        if mode not in ("nearest", "stochastic"):
            raise ValueError(f"home rounding must be nearest or stochastic, not {mode!r}")
        self.mode = mode
        self.seed = block_seed(seed, step, stream, block) if mode == "stochastic" else None
        """The draws' seed: kernels/adamw.py's compiled chunk draws from it itself."""
        self._device, self._generator = device, None
        self._drawn = 0
        """Values the compiled rounding drew so far in this pass (its next value's position)."""

    @property
    def _gen(self) -> torch.Generator | None:
        """The draws' generator, made at first use (the compiled chunk never asks for it)."""
        if self._generator is None and self.seed is not None:
            self._generator = block_generator(self._device, self.seed)
        return self._generator

    def store(self, dst: torch.Tensor, src32: torch.Tensor) -> torch.Tensor:
        """dst := src32 in dst's dtype. Nearest, or stochastic when dst is narrower than fp32 (then
        src32 may serve as scratch: stochastic_round_)."""
        if self.seed is None or dst.dtype == torch.float32:
            return dst.copy_(src32)
        native = sr_bf16() if dst.device.type == "cpu" and dst.dtype == torch.bfloat16 else None
        if native is not None and dst.is_contiguous() and src32.is_contiguous() and src32.dtype == torch.float32 \
                and dst.shape == src32.shape:
            native(dst.data_ptr(), src32.data_ptr(), dst.numel(), self.seed, self._drawn)
            self._drawn += dst.numel()
            return dst
        return stochastic_round_(dst, src32, self._gen)

    def rounded(self, src32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """src32 in `dtype` (a new tensor), rounded as store() would (src32 may serve as scratch)."""
        if dtype == torch.float32:
            return src32
        if self.seed is None:
            return src32.to(dtype)
        return self.store(torch.empty(src32.shape, dtype=dtype, device=src32.device), src32)
