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


BYTE_ALIGN = 64
"""Where each tensor of a byte-laid block starts: a multiple of any element size, and of what CUDA's
vectorized loads like."""


def byte_offsets(shapes, dtypes) -> tuple[list[int], int]:
    """Byte offset of each tensor of a block whose tensors differ in dtype (a quantized base's codes and
    scales beside its norms), laid end to end, each aligned to BYTE_ALIGN; and the padded total."""
    offsets, offset = [], 0
    for shape, dtype in zip(shapes, dtypes):
        offsets.append(offset)
        offset += -(-shape.numel() * dtype.itemsize // BYTE_ALIGN) * BYTE_ALIGN
    return offsets, offset


def byte_views(flat: torch.Tensor, shapes, dtypes) -> list[torch.Tensor]:
    """Typed views of the uint8 buffer `flat` at byte_offsets (no copy)."""
    offsets, _ = byte_offsets(shapes, dtypes)
    return [flat[o: o + s.numel() * d.itemsize].view(d).view(s) for o, s, d in zip(offsets, shapes, dtypes)]
