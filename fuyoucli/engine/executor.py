"""Executor: streamed blocks' homes and device slots, and the walk over a schedule.

Engine stage. `WeightStore` owns each streamed block's flat home copy (pinned or pageable host
memory, or an SSD file), the device slots, and the residency state machine; it moves bytes only
through the Lanes (the one module that touches streams). `run_pass` walks a schedule from
plan/schedule.py and calls the trainer's compute function with each block's device slot.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fuyoucli.engine.flat import views_of
from fuyoucli.engine.lanes import Mark
from fuyoucli.engine.residency import Residency, State
from fuyoucli.engine.tiers import ALIGN, DeviceArena, SsdStore, aligned_host, release_freed_host_memory
from fuyoucli.plan.schedule import Op
from fuyoucli.plan.types import Tier
from fuyoucli.telemetry.timeline import NULL


@dataclass
class StreamUnit:
    """The part of one block that streams: its parameters laid out flat, in one dtype."""

    index: int
    name: str
    params: list[tuple[str, nn.Parameter]]
    shapes: list[torch.Size]
    dtype: torch.dtype
    home: Tier
    writable: bool
    """Updated on the device and written back (trainable full-parameter weights)."""
    numel: int = 0
    host: torch.Tensor | None = None
    """Home copy for PINNED/PAGEABLE (typed, flat)."""
    pending: Future | Mark | None = None
    """The last write-back of this block; its next fetch waits for it."""

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return views_of(flat, self.shapes)


@dataclass
class _Slot:
    device: torch.Tensor
    free_after: Mark | None = None
    """The slot may be overwritten once this mark (last compute or write-back using it) is done."""
    staging: torch.Tensor | None = None
    """Aligned host buffer for SSD reads into this slot."""
    raw: torch.Tensor | None = None
    """On a CPU device: the slot's own bytes (aligned, whole 4 KiB pages), read and written by the SSD
    threads directly, with no staging copy."""
    writing: Future | None = None
    """On a CPU device: the file write of the slot's last block, which must end before it is refilled."""
    upload_mark: Mark | None = None
    ticket: Future | Mark | None = None
    block: int | None = None


@dataclass
class TransferStats:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    fetches: int = 0
    writebacks: int = 0
    trace: list[tuple[str, str]] = field(default_factory=list)


class WeightStore:
    recorder = NULL
    """Where timed spans go (a telemetry Timeline the trainer sets); NULL records nothing."""

    def __init__(self, units: list[StreamUnit], *, lanes, arena: DeviceArena, slots: int,
                 ssd: SsdStore | None, pin: bool, source=None, key_prefix: str = "block"):
        self.units = {u.index: u for u in units}
        self.key_prefix = key_prefix
        """Names this store's SSD files (two stores may share one SsdStore: weights and zo2 momentum)."""
        self.source = source
        self.lanes, self.arena, self.ssd = lanes, arena, ssd
        self.stats = TransferStats()
        self.residency = Residency([u.name for u in units], max_on_device=slots)
        if not units:
            self.slots: list[_Slot] = []
            return
        dtypes = {u.dtype for u in units}
        if len(dtypes) != 1:
            raise ValueError(f"streamed blocks must share one dtype, got {dtypes}")
        self.dtype = dtypes.pop()
        for u in units:
            # An empty parameter of a lazily loaded layer takes its shape from the model file.
            u.shapes = [source.shape(n) if (p.numel() == 0 and source is not None) else p.shape for n, p in u.params]
            u.numel = sum(s.numel() for s in u.shapes)
        self.slot_numel = max(u.numel for u in units)
        pin_fn = lanes.pin if pin else None
        nbytes = self.slot_numel * self.dtype.itemsize
        # On a CPU device the slots are host memory: SSD reads land in them and writes leave from them
        # (aligned, page-padded), where a GPU needs a host staging buffer per slot for each direction.
        self.direct = ssd is not None and lanes.kind == "cpu"
        if self.direct:
            self.slots = []
            for i in range(slots):
                raw = arena.alloc_aligned(nbytes, ALIGN, f"streaming slot {i}")
                self.slots.append(_Slot(raw[:nbytes].view(self.dtype), raw=raw))
        else:
            self.slots = [_Slot(arena.alloc(self.slot_numel, self.dtype, f"streaming slot {i}")) for i in range(slots)]
        if ssd is not None and not self.direct:
            for s in self.slots:
                s.staging = aligned_host(nbytes, pin_with=pin_fn)
            self._write_buffers = [aligned_host(nbytes, pin_with=pin_fn) for _ in range(slots)]
            self._write_pending: list[Future | None] = [None] * slots
            self._next_write = 0
        self._place_homes(units, pin_fn)

    # -- set-up: move each streamed block's weights to its home and free the model's copy ----------

    def _place_homes(self, units: list[StreamUnit], pin_fn) -> None:
        """Fill each block's home tensor by tensor: from the parameter, or (an empty parameter of a lazy
        load; `source` is a model.lazy.TensorSource) straight from the model file."""
        for u in units:
            if u.home is Tier.SSD:
                buf = aligned_host(u.numel * self.dtype.itemsize)
                target = buf[: u.numel * self.dtype.itemsize].view(self.dtype)
            else:
                target = torch.empty(u.numel, dtype=self.dtype)
                if pin_fn is not None and u.home is Tier.PINNED:
                    target = pin_fn(target)
            for (name, p), view in zip(u.params, u.views(target)):
                view.copy_(self.source.read(name, p.dtype) if p.numel() != view.numel() else p.detach())
            if u.home is Tier.SSD:
                self.ssd.write_sync(self._key(u), buf)
                del buf
            else:
                u.host = target
            for _, p in u.params:
                # The model keeps the Parameter objects (peft, optimizers and the runner see them);
                # their storage is swapped in from a slot only while the block computes.
                p.data = torch.empty(0, dtype=p.dtype, device=self.arena.device)
        release_freed_host_memory()  # the model's copies and the file's tensors, freed between live blocks

    def _key(self, u: StreamUnit) -> str:
        return f"{self.key_prefix}-{u.index:04d}"

    # -- the three operations the schedule names --------------------------------------------------

    def fetch(self, b: int, slot: int) -> None:
        u, s = self.units[b], self.slots[slot]
        self._settle(u)
        self.residency.move(u.name, State.IN_FLIGHT)
        s.block = b
        target = s.device[: u.numel]
        self.stats.fetches += 1
        self.stats.h2d_bytes += u.numel * self.dtype.itemsize
        self.stats.trace.append(("fetch", u.name))
        if self.direct and u.home is Tier.SSD:
            s.ticket = self.ssd.submit(self._ssd_fetch_direct, u, s)
            return
        if s.writing is not None:  # a host block into a slot whose last block is still being written out
            s.writing.result()
            s.writing = None
        if u.home is Tier.SSD:
            s.ticket = self.ssd.submit(self._ssd_fetch, u, s, target)
        else:
            s.ticket = self.lanes.upload(target, u.host, after=s.free_after)

    def _ssd_fetch_direct(self, u: StreamUnit, s: _Slot) -> Mark:
        if s.writing is not None:  # the slot's last block must have left it (writes and reads share a pool)
            s.writing.result()
            s.writing = None
        self.ssd.read_sync(self._key(u), s.raw[: -(-u.numel * self.dtype.itemsize // ALIGN) * ALIGN])
        return self.lanes.mark_compute()

    def _ssd_fetch(self, u: StreamUnit, s: _Slot, target: torch.Tensor) -> Mark:
        # The staging buffer is reused per slot: the previous upload from it must have finished.
        if s.upload_mark is not None:
            self.lanes.host_wait(s.upload_mark)
        nbytes = u.numel * self.dtype.itemsize
        self.ssd.read_sync(self._key(u), s.staging[: -(-nbytes // 4096) * 4096])
        s.upload_mark = self.lanes.upload(target, s.staging[:nbytes].view(self.dtype), after=s.free_after)
        return s.upload_mark

    def acquire(self, b: int, slot: int) -> list[torch.Tensor]:
        """Views of block b's weights in its slot, ready for the compute lane."""
        u, s = self.units[b], self.slots[slot]
        on_ssd = isinstance(s.ticket, Future) and not s.ticket.done()
        start = time.perf_counter()
        mark = s.ticket.result() if isinstance(s.ticket, Future) else s.ticket
        self.lanes.compute_wait(mark)
        self.recorder.span("wait_ssd" if on_ssd else "wait_fetch", u.name, start, time.perf_counter())
        self.residency.move(u.name, State.RESIDENT)
        self.stats.trace.append(("compute", u.name))
        return u.views(s.device[: u.numel])

    def flat(self, b: int, slot: int) -> torch.Tensor:
        return self.slots[slot].device[: self.units[b].numel]

    def release(self, b: int, slot: int, dirty: bool) -> None:
        """Block b is done computing; write it back home if it changed, and free its slot."""
        u, s = self.units[b], self.slots[slot]
        self.residency.move(u.name, State.EVICTING)
        self.stats.trace.append(("evict", u.name))
        done = self.lanes.mark_compute()
        s.free_after = done
        for _, p in u.params:
            p.data = torch.empty(0, dtype=p.dtype, device=self.arena.device)
        if not dirty:
            # `pending` stays: the fetch cleared it, so what is there now was installed while the block
            # computed (`hold`: the CPU optimizer's update of its home, queued by its backward).
            return
        if not u.writable:
            raise RuntimeError(f"block {u.name} is read-only but was changed on the device")
        self.stats.writebacks += 1
        self.stats.d2h_bytes += u.numel * self.dtype.itemsize
        src = s.device[: u.numel]
        if self.direct and u.home is Tier.SSD:
            fut = self.ssd.submit(self._ssd_write_direct, u, s.raw)
            s.writing = fut
            u.pending = fut
        elif u.home is Tier.SSD:
            w = self._next_write
            self._next_write = (w + 1) % len(self._write_buffers)
            if self._write_pending[w] is not None:
                self._write_pending[w].result()  # this write buffer's last file write must be done
            buf = self._write_buffers[w]
            mark = self.lanes.offload(buf[: u.numel * self.dtype.itemsize].view(self.dtype), src, after=done)
            s.free_after = mark
            fut = self.ssd.submit(self._ssd_write, u, buf, mark)
            self._write_pending[w] = fut
            u.pending = fut
        else:
            mark = self.lanes.offload(u.host, src, after=done)
            s.free_after = mark
            u.pending = mark

    def _ssd_write_direct(self, u: StreamUnit, raw: torch.Tensor) -> None:
        self.ssd.write_sync(self._key(u), raw[: -(-u.numel * self.dtype.itemsize // ALIGN) * ALIGN])

    def _ssd_write(self, u: StreamUnit, buf: torch.Tensor, mark: Mark) -> None:
        self.lanes.host_wait(mark)
        nbytes = -(-u.numel * self.dtype.itemsize // 4096) * 4096
        self.ssd.write_sync(self._key(u), buf[:nbytes])

    def _settle(self, u: StreamUnit) -> None:
        """Wait for the block's last write-back so that its home holds the newest weights."""
        if u.pending is not None:
            if isinstance(u.pending, Future):
                u.pending.result()
            else:
                self.lanes.host_wait(u.pending)
            u.pending = None
        if self.residency.state[u.name] is State.EVICTING:
            self.residency.move(u.name, State.HOME)

    def settle_all(self) -> None:
        for u in self.units.values():
            self._settle(u)
        self.lanes.synchronize()

    # -- host-side updates (first-order: the CPU optimizer produces the newest weights) ------------

    def write_home(self, b: int, flat: torch.Tensor) -> Future | None:
        """Replace block b's home copy with `flat` (host memory, any float dtype: cast to the home
        dtype). Called from the CPU optimizer's thread while no fetch of b is in flight; for an SSD
        home it returns the file write's Future. Pass what tracks this write to hold()."""
        u = self.units[b]
        if u.home is not Tier.SSD:
            u.host.copy_(flat)
            return None
        if not hasattr(self, "_home_buffers"):
            import queue

            # Two buffers: one being filled while the other's file write finishes.
            self._home_buffers: queue.Queue = queue.Queue()
            for _ in range(2):
                self._home_buffers.put(aligned_host(self.slot_numel * self.dtype.itemsize))
        buf = self._home_buffers.get()  # waits for the older write
        nbytes = u.numel * self.dtype.itemsize
        buf[:nbytes].view(self.dtype).copy_(flat)
        return self.ssd.submit(self._write_home_file, u, buf)

    def _write_home_file(self, u: StreamUnit, buf: torch.Tensor) -> None:
        try:
            self.ssd.write_sync(self._key(u), buf[: -(-u.numel * self.dtype.itemsize // 4096) * 4096])
        finally:
            self._home_buffers.put(buf)

    def hold(self, b: int, ticket: Future) -> None:
        """Block b's next fetch (and home_weights) waits for `ticket`: an update of its home still running."""
        self.units[b].pending = ticket

    def home_weights(self, b: int) -> torch.Tensor:
        """Block b's flat weights as stored at home (a host copy; read from SSD if homed there)."""
        u = self.units[b]
        self._settle(u)
        if u.home is Tier.SSD:
            buf = aligned_host(u.numel * self.dtype.itemsize)
            self.ssd.read_sync(self._key(u), buf)
            return buf[: u.numel * self.dtype.itemsize].view(self.dtype).clone()
        return u.host.clone()

    def set_home_weights(self, b: int, flat: torch.Tensor) -> None:
        """Replace block b's home copy with `flat` (host memory, block b's numel, any float dtype), and
        wait until it is there (loading a checkpoint)."""
        u = self.units[b]
        self._settle(u)
        flat = flat.reshape(-1).to(self.dtype)
        if flat.numel() != u.numel:
            raise ValueError(f"{u.name}: {flat.numel()} weights given, the block has {u.numel}")
        if u.home is Tier.SSD:
            buf = aligned_host(u.numel * self.dtype.itemsize)
            buf[: u.numel * self.dtype.itemsize].view(self.dtype).copy_(flat)
            self.ssd.write_sync(self._key(u), buf)
        else:
            u.host.copy_(flat)


def run_pass(ops: list[Op], store: WeightStore, compute: Callable[[int, int | None], bool]) -> None:
    """Walk a schedule. `compute(block, slot)` runs the block and returns whether it changed its
    weights (so that eviction writes them back)."""
    dirty: dict[int, bool] = {}
    for op in ops:
        if op.kind == "fetch":
            store.fetch(op.block, op.slot)
        elif op.kind == "compute":
            start = time.perf_counter()
            dirty[op.block] = compute(op.block, op.slot)
            unit = store.units.get(op.block)
            store.recorder.span("compute", unit.name if unit else f"block {op.block}", start, time.perf_counter())
        elif op.kind == "evict":
            store.release(op.block, op.slot, dirty.pop(op.block, False))
