"""Flat buffers seen as tensors: a block's parameters laid out end to end, in the block's order.

Engine stage; torch only. The weight stores (a streamed block's home and slot), the zo2 working
buffers and the CPU optimizer's states each keep a block as one flat tensor and hand out views of it.
"""

from __future__ import annotations

import torch


def views_of(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Views of `flat`'s first elements, one per shape, end to end (no copy)."""
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat[offset: offset + n].view(shape))
        offset += n
    return out
