"""Weight stores: streamed blocks' homes and device slots, and the operations the schedule names on them.

Engine stage. `WeightStore` owns each streamed block's flat home copy (pinned or pageable host
memory, or an SSD file), the device slots, and the residency state machine; it moves bytes only
through the Lanes (the one module that touches streams) and performs fetch, write_home, evict and
the waits for a home's last write when the executor (engine/executor.py) walks a schedule to them.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from fuyoucli.engine.executor import OpLog
from fuyoucli.engine.flat import byte_offsets, byte_views, views_of
from fuyoucli.engine.lanes import After, Mark
from fuyoucli.engine.residency import Residency, State
from fuyoucli.engine.ticket import Ticket
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
    dtypes: list[torch.dtype] | None = None
    """A read-only block whose tensors differ in dtype (a quantized base): `dtype` is then uint8, the
    block is its tensors' bytes (engine/flat.py: byte_offsets) and `numel` counts bytes."""
    numel: int = 0
    host: torch.Tensor | None = None
    """Home copy for PINNED/PAGEABLE (typed, flat)."""
    pending: Ticket | None = None
    """The last write of this block's home (from its slot, or the CPU optimizer's update); the
    schedule waits for it before the block's next fetch."""

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        if self.dtypes is not None:
            return byte_views(flat, self.shapes, self.dtypes)
        return views_of(flat, self.shapes)

    def size(self) -> int:
        """Elements of the store's dtype the block takes (bytes for a byte-laid block)."""
        if self.dtypes is not None:
            return byte_offsets(self.shapes, self.dtypes)[1]
        return sum(s.numel() for s in self.shapes)


@dataclass
class _Slot:
    device: torch.Tensor
    free_after: After = None
    """The slot may be overwritten once this mark (or these: the last compute and write-back reading
    it) is done."""
    staging: torch.Tensor | None = None
    """Aligned host buffer for SSD reads into this slot."""
    raw: torch.Tensor | None = None
    """On a CPU device: the slot's own bytes (aligned, whole 4 KiB pages), read and written by the SSD
    threads directly, with no staging copy."""
    writing: Future | None = None
    """On a CPU device: the file write of the slot's last block, which must end before it is refilled."""
    upload_mark: Mark | None = None
    ticket: Ticket | None = None
    """The fetch into this slot: the upload, or the SSD read that queues it."""
    block: int | None = None
    written: bool = False
    """Its block was sent home from it (write_back): the slot is free once that copy has read it."""


@dataclass
class TransferStats:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    fetches: int = 0
    writebacks: int = 0


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
        self.ops = OpLog()
        """Where performed operations are logged (the engine's log; off by default)."""
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
            u.numel = u.size()
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

    # -- the operations the schedule names: fetch, write_home, evict, wait ---------------------------

    def fetch(self, b: int, slot: int) -> None:
        u, s = self.units[b], self.slots[slot]
        if u.pending is not None:
            # The schedule waits for a block's last write home before fetching it (plan/schedule.py);
            # fetching now could bring up the older weights.
            raise RuntimeError(f"{u.name} fetched while its last write home may be running: the schedule "
                               "misses a wait")
        if self.residency.state[u.name] is State.EVICTING:  # left with nothing to write home
            self.residency.move(u.name, State.HOME)
        self.residency.move(u.name, State.IN_FLIGHT)
        s.block, s.written = b, False
        target = s.device[: u.numel]
        self.stats.fetches += 1
        self.stats.h2d_bytes += u.numel * self.dtype.itemsize
        self.ops.performed(Op("fetch", b, slot))
        if self.direct and u.home is Tier.SSD:
            s.ticket = Ticket(job=self.ssd.submit(self._ssd_fetch_direct, u, s))
            return
        if s.writing is not None:  # a host block into a slot whose last block is still being written out
            s.writing.result()
            s.writing = None
        if u.home is Tier.SSD:
            s.ticket = Ticket(job=self.ssd.submit(self._ssd_fetch, u, s, target))
        else:
            s.ticket = Ticket(mark=self.lanes.upload(target, u.host, after=s.free_after))

    def _ssd_fetch_direct(self, u: StreamUnit, s: _Slot) -> Mark:
        if s.writing is not None:  # the slot's last block must have left it (writes and reads share a pool)
            s.writing.result()
            s.writing = None
        self.ssd.read_sync(self._key(u), s.raw[: self._file_bytes(u)])
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
        """Views of block b's weights in its slot, ready for the compute lane (the first call waits for
        the fetch; a zo2 block is acquired by its update and again by its passes)."""
        u, s = self.units[b], self.slots[slot]
        if self.residency.state[u.name] is State.RESIDENT:
            return u.views(s.device[: u.numel])
        on_ssd = s.ticket.on_thread
        start = time.perf_counter()
        s.ticket.compute_wait(self.lanes)
        self.recorder.span("wait_ssd" if on_ssd else "wait_fetch", u.name, start, time.perf_counter())
        self.residency.move(u.name, State.RESIDENT)
        return u.views(s.device[: u.numel])

    def flat(self, b: int, slot: int) -> torch.Tensor:
        return self.slots[slot].device[: self.units[b].numel]

    def write_back(self, b: int, slot: int) -> None:
        """Block b changed on the device: send it home from its slot (the schedule waits for this
        before b's next fetch). The slot is free once the copy has read it."""
        u, s = self.units[b], self.slots[slot]
        if not u.writable:
            raise RuntimeError(f"block {u.name} is read-only but was changed on the device")
        self.stats.writebacks += 1
        self.stats.d2h_bytes += u.numel * self.dtype.itemsize
        done = self.lanes.mark_compute()  # the compute that changed it, which the copy must follow
        src = s.device[: u.numel]
        if self.direct and u.home is Tier.SSD:
            fut = self.ssd.submit(self._ssd_write_direct, u, s.raw)
            s.writing = fut
            u.pending = Ticket(job=fut)
            s.free_after = done
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
            u.pending = Ticket(job=fut)
        else:
            mark = self.lanes.offload(u.host, src, after=done)
            s.free_after = mark
            u.pending = Ticket(mark=mark)
        s.written = True
        self.ops.performed(Op("write_home", b, slot))

    def release(self, b: int, slot: int) -> None:
        """Block b is done computing (and, if it changed, on its way home): free its slot."""
        u, s = self.units[b], self.slots[slot]
        self.residency.move(u.name, State.EVICTING)
        # The slot may be refilled once the compute that last read it is done and, if the block went
        # home from it, once that copy has read it too: a zo2 block goes home before its passes, so the
        # two run side by side on different lanes. (`pending` is not touched here: what is there was
        # installed by the write, or while the block computed by `hold`, the CPU optimizer's update.)
        read = self.lanes.mark_compute()
        s.free_after = (s.free_after, read) if s.written and s.free_after is not None else read
        for _, p in u.params:
            p.data = torch.empty(0, dtype=p.dtype, device=self.arena.device)
        self.ops.performed(Op("evict", b, slot))

    def settle(self, b: int, on: str = "write_home") -> None:
        """The schedule's wait: block b's last write home (or the update that writes it) is complete."""
        self._settle(self.units[b])
        self.ops.performed(Op("wait", b, on=on))

    def _ssd_write_direct(self, u: StreamUnit, raw: torch.Tensor) -> None:
        self.ssd.write_sync(self._key(u), raw[: self._file_bytes(u)])

    def _ssd_write(self, u: StreamUnit, buf: torch.Tensor, mark: Mark) -> None:
        self.lanes.host_wait(mark)
        nbytes = -(-u.numel * self.dtype.itemsize // 4096) * 4096
        self.ssd.write_sync(self._key(u), buf[:nbytes])

    def _settle(self, u: StreamUnit) -> None:
        """Wait for the block's last write home so that its home holds the newest weights."""
        if u.pending is not None:
            u.pending.host_wait(self.lanes)
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

    def hold(self, b: int, ticket: Ticket) -> None:
        """Block b's home is being rewritten (an update still running): the schedule's next wait for b
        (and home_weights) waits for `ticket`."""
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

    def read_home(self, b: int) -> torch.Tensor:
        """Block b's flat weights at home, for the one job that updates them in place of a master (the
        CPU optimizer's, with a bf16 master): the home tensor itself for a host home, a fresh read of
        the file for an SSD one. No settle: that job is what a settle would wait for, and the
        schedule let it run only after the block's last fetch and its previous write home."""
        u = self.units[b]
        if u.home is not Tier.SSD:
            return u.host
        return self.read_home_into(b, aligned_host(self.home_file_bytes(b)))

    def home_file_bytes(self, b: int) -> int:
        """Bytes one read of block b's home file takes (its weights, rounded up to the O_DIRECT alignment)."""
        return self._file_bytes(self.units[b])

    def _file_bytes(self, u: StreamUnit) -> int:
        return -(-u.numel * self.dtype.itemsize // ALIGN) * ALIGN

    def read_home_into(self, b: int, buf: torch.Tensor) -> torch.Tensor:
        """read_home of an SSD-homed block into `buf` (aligned bytes, home_file_bytes(b) of them), for the
        CPU optimizer's read-ahead: it reads a bf16 master beside the block's states, ahead of the update,
        on the SSD threads, as read_home would within it. Returns block b's flat weights in `buf`."""
        u = self.units[b]
        self.ssd.read_sync(self._key(u), buf[: self._file_bytes(u)])
        return buf[: u.numel * self.dtype.itemsize].view(self.dtype)

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
