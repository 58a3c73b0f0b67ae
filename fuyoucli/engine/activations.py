"""Saved activations of blocks whose backward runs later: kept on the device or swapped to host memory.

Engine stage. The first-order trainer runs a block's forward inside `recording(block, swap)` (torch's
saved-tensor hooks), so everything autograd saves for the backward passes through here:
- a view of a streaming slot (a streamed block's weight) is never saved: it is recorded as (offset,
  size, stride) and re-made, when the backward unpacks it, from the slot the block was fetched into
  for its backward (the slot it had in the forward holds another block by then);
- tensors that are not on the device, and resident parameters, are saved as they are;
- everything else stays on the device (plan activation 'keep') or is copied to host memory on the
  offload lane and brought back on the upload lane ahead of the block's backward ('swap').
A recomputed layer saves nothing through the hooks: only its input, which the trainer keeps on the
device ('recompute') or hands to `stash` ('recompute-swap': to host memory and back the same way).
Copies go through the Lanes only; host memory comes from one pool, allocated once and reused.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fuyoucli.engine.lanes import Mark
from fuyoucli.engine.tiers import DeviceArena

_HOST_ALIGN = 64


@dataclass
class _WeightRef:
    block: int
    offset: int
    """Bytes from the slot's start: a byte-laid slot (engine.store, a quantized base) holds tensors of
    several dtypes, whose element offsets are not the slot's."""
    size: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Swapped:
    block: int
    host: torch.Tensor
    device: torch.Tensor | None = None
    mark: Mark | None = None


class HostPool:
    """Host memory for swapped activations: chunks allocated once (pinned where the lanes pin) and
    handed out front to back; `reset()` at a step's start makes all of it free again."""

    def __init__(self, pin=None, chunk_bytes: int = 64 << 20):
        self.pin, self.chunk_bytes = pin, chunk_bytes
        self.chunks: list[torch.Tensor] = []
        self._chunk, self._offset = 0, 0
        self.peak_bytes = 0
        self._used = 0

    def alloc(self, nbytes: int) -> torch.Tensor:
        nbytes = -(-nbytes // _HOST_ALIGN) * _HOST_ALIGN
        while True:
            if self._chunk < len(self.chunks):
                chunk = self.chunks[self._chunk]
                if self._offset + nbytes <= chunk.numel():
                    out = chunk[self._offset: self._offset + nbytes]
                    self._offset += nbytes
                    self._used += nbytes
                    self.peak_bytes = max(self.peak_bytes, self._used)
                    return out
                self._chunk, self._offset = self._chunk + 1, 0
                continue
            raw = torch.empty(max(nbytes, self.chunk_bytes) + _HOST_ALIGN, dtype=torch.uint8)
            if self.pin is not None:
                raw = self.pin(raw)
            start = (-raw.data_ptr()) % _HOST_ALIGN
            self.chunks.append(raw[start: start + max(nbytes, self.chunk_bytes)])

    def reset(self) -> None:
        self._chunk, self._offset, self._used = 0, 0, 0


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the tensor's elements fill exactly numel slots of its storage."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


class SavedActivations:
    def __init__(self, lanes, device: torch.device, slots: list[torch.Tensor], resident_ptrs: set[int],
                 arena: DeviceArena):
        self.lanes, self.device, self.arena = lanes, device, arena
        self.slots = slots
        self._slot_of_ptr = {s.untyped_storage().data_ptr(): n for n, s in enumerate(slots)}
        self.resident_ptrs = resident_ptrs
        self.pool = HostPool(lanes.pin if lanes.kind == "cuda" else None)
        self._swapped: dict[int, list[Swapped]] = {}
        self._kept_ptrs: dict[int, set[int]] = {}
        self._charged: dict[int, int] = {}
        self._where: dict[int, int] = {}
        self._outgoing: list[tuple[Mark | None, list[torch.Tensor]]] = []
        self.swapped_bytes = 0
        """Bytes copied to the host (and back) so far."""

    def _charge(self, block: int, nbytes: int, what: str) -> None:
        self.arena.charge(nbytes, what)
        self._charged[block] = self._charged.get(block, 0) + nbytes

    # -- forward: what autograd saves ------------------------------------------------------------------

    @contextmanager
    def recording(self, block: int, swap: bool):
        """Run block `block`'s forward inside this: its saved tensors are kept or swapped (see module doc)."""
        seen: dict[tuple, object] = {}
        refs: list[torch.Tensor] = []
        last: list[Mark | None] = [None]

        def pack(t: torch.Tensor):
            if t.device != self.device or t.untyped_storage().data_ptr() in self.resident_ptrs:
                return t
            ptr = t.untyped_storage().data_ptr()
            slot = self._slot_of_ptr.get(ptr)
            if slot is not None:
                base = self.slots[slot]
                return _WeightRef(block, t.storage_offset() * t.element_size() - base.storage_offset() * base.element_size(),
                                  t.shape, t.stride(), t.dtype)
            key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                return seen[key]
            if not swap:
                kept = self._kept_ptrs.setdefault(block, set())
                if ptr not in kept:
                    kept.add(ptr)
                    self._charge(block, t.untyped_storage().nbytes(), f"saved activations of block {block}")
                seen[key] = t
                return t
            src = t if _dense(t) else t.contiguous()
            handle, last[0] = self._send(block, src)
            refs.append(src)
            seen[key] = handle
            return handle

        def unpack(h):
            if isinstance(h, torch.Tensor):
                return h
            if isinstance(h, _WeightRef):
                base = self.slots[self._where[h.block]]
                start = base.storage_offset() * base.element_size() + h.offset
                if h.dtype == base.dtype:
                    return base.as_strided(h.size, h.stride, start // base.element_size())
                itemsize = torch.empty(0, dtype=h.dtype).element_size()
                return torch.empty(0, dtype=h.dtype, device=base.device).set_(
                    base.untyped_storage(), start // itemsize, h.size, h.stride)
            if h.device is None:  # not prefetched: bring it now
                self.prefetch(h.block)
                self.lanes.compute_wait(h.mark)
            return h.device

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
        if refs:
            self._hold(last[0], refs)

    def stash(self, block: int, t: torch.Tensor) -> Swapped:
        """Send `t` (a recomputed layer's input) to host memory; `ready(block)` brings it back to the
        device before the block's backward, as `handle.device`."""
        src = t.contiguous()
        handle, mark = self._send(block, src)
        self._hold(mark, [src])
        return handle

    def _send(self, block: int, src: torch.Tensor) -> tuple[Swapped, Mark]:
        """Copy dense `src` into the host pool on the offload lane (once the compute that produced it
        is done); `ready(block)` brings it back."""
        extent = 1 + sum((n - 1) * s for n, s in zip(src.shape, src.stride())) if src.numel() else 0
        raw = self.pool.alloc(extent * src.element_size())
        host = raw[: extent * src.element_size()].view(src.dtype).as_strided(src.shape, src.stride())
        mark = self.lanes.offload(host, src, after=self.lanes.mark_compute())
        self.swapped_bytes += host.numel() * host.element_size()
        handle = Swapped(block, host)
        self._swapped.setdefault(block, []).append(handle)
        return handle, mark

    def _hold(self, mark: Mark | None, refs: list[torch.Tensor]) -> None:
        """The device copies must live until their offload has read them: keep them until the next
        copies are queued (one micro-batch longer), then wait for the copies and drop them."""
        self._release_outgoing()
        self._outgoing.append((mark, refs))

    def _release_outgoing(self) -> None:
        for mark, _ in self._outgoing:
            if mark is not None:
                self.lanes.host_wait(mark)
        self._outgoing.clear()

    def end_forward(self) -> None:
        self._release_outgoing()

    # -- backward ---------------------------------------------------------------------------------------

    def bind(self, block: int, slot: int) -> None:
        """Block `block` now sits in `slot`: its saved weight views are re-made from there."""
        self._where[block] = slot

    def prefetch(self, block: int) -> None:
        """Start bringing block `block`'s swapped tensors back to the device (upload lane)."""
        pending = [h for h in self._swapped.get(block, []) if h.device is None]
        if not pending:
            return
        # New device memory may still be in use by compute queued before this point (the
        # allocator recycles it on the compute lane): the uploads wait for that compute.
        after = self.lanes.mark_compute()
        for h in pending:
            h.device = torch.empty_strided(h.host.shape, h.host.stride(), dtype=h.host.dtype, device=self.device)
            self._charge(block, h.host.numel() * h.host.element_size(), f"swapped-in activations of block {block}")
            h.mark = self.lanes.upload(h.device, h.host, after=after)

    def ready(self, block: int) -> None:
        """The compute lane waits until block `block`'s swapped tensors are back."""
        self.prefetch(block)
        handles = self._swapped.get(block, [])
        if handles:
            self.lanes.compute_wait(handles[-1].mark)  # one lane, in order: the last mark covers all

    def has_swapped(self, block: int) -> bool:
        return bool(self._swapped.get(block))

    def release(self, block: int) -> None:
        """Block `block`'s backward is done: forget what it saved."""
        self._swapped.pop(block, None)
        self._kept_ptrs.pop(block, None)
        self._where.pop(block, None)
        self.arena.release(self._charged.pop(block, 0))

    def reset(self) -> None:
        """A new step: every saved tensor of the last one is gone, and the host pool is free again."""
        self._release_outgoing()
        for block in list(self._charged):
            self.release(block)
        self._swapped.clear()
        self.pool.reset()
