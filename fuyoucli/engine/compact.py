"""The compact-state AdamW (kernels/adamw.py) as the engine and the in-memory reference make it: one
optimizer per block, its bf16 master's stochastic rounding seeded by (run seed, step, block) through
HomeRounding (engine/rounding.py), so the streamed engine and the reference draw the same numbers.
Each CHUNK of the block's values has its own stream (the 'direction' slots below zo2's rounding
stream: -1 is zo2's, -1 - i the i-th chunk's; z uses 0..q-1), so chunks round in parallel.

Engine stage; imports the kernel and the engine's rounding, nothing of train/.
"""

from __future__ import annotations

import torch

from fuyoucli.engine.rounding import ROUNDING_STREAM, HomeRounding
from fuyoucli.kernels.adamw import AdamFormat, CompactAdamW


def compact_adamw(params, *, fmt: AdamFormat, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float = 0.0, seed: int = 0, block: int = 0) -> CompactAdamW:
    """CompactAdamW over block `block`'s tensors (or parameter groups), rounding seeded per (seed, step, block)."""
    def rounding(step: int, device: torch.device, stream: int) -> HomeRounding:
        return HomeRounding("stochastic", seed, step, block, device, stream=ROUNDING_STREAM - stream)
    return CompactAdamW(params, fmt=fmt, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rounding=rounding)
