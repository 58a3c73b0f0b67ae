"""The CPU side of offloaded first-order training: per-block AdamW states and the worker that updates them.

Engine stage (Fuyou's out-of-core CPU optimizer). Each trainable block keeps its master weights and
AdamW's moments m, v at its optimizer home: host RAM, or an SSD file that is read ahead of the
block's update and written behind it through the engine's SsdStore. In the default format the
master is fp32 and the moments fp32 (torch's fused AdamW runs on them); compact formats
(kernels/adamw.py) keep 8-bit moments, and/or a bf16 master: for a streamed block that is the
weights' own home (AdamBlock.home_master), so no copy of the weights sits at the optimizer home.
One worker thread runs the block's optimizer (the trainer builds it: torch's fused CPU AdamW, or the
compact one) on one block at a time, in the order the trainer submits blocks, while the device
computes other blocks. No CUDA here: the worker waits
for gradient copies through `Lanes.host_wait` and hands the new weights to a `publish` callback.

Where the device is the CPU itself there is nothing to overlap the optimizer with: its cores are the
compute's. A worker thread there only competes with the compute's OpenMP team for the same cores:
both sides run slower, and the step takes longer than running the updates in turn. So the jobs can
also run inline (`thread=False`), in the caller's thread when submitted: the same jobs in the same
order, the SSD reads and writes still on the store's I/O threads.

Why it is long: one class whose job queue, read-ahead and write-behind buffers and checkpoint
reads all share the same bookkeeping, clearer read together than split.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fuyoucli.kernels.adamw import AdamFormat
from fuyoucli.engine.flat import views_of
from fuyoucli.engine.lanes import Mark
from fuyoucli.engine.tiers import ALIGN, SsdStore, aligned_host
from fuyoucli.plan.types import Tier


class _Inline:
    """The worker's interface (submit, shutdown) running each job at once in the caller's thread."""

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        out: Future = Future()
        try:
            out.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - delivered through the Future, as a thread's would be;
            out.set_exception(e)  # Ctrl-C is not: it stops the caller, as it would stop a wait on a thread
        return out

    def shutdown(self, wait: bool = True) -> None:
        pass


class Closed(RuntimeError):
    """An update that did not run because the optimizer was closed (e.g. on Ctrl-C)."""


@dataclass
class HostGrads:
    """One block's gradients on the host, laid out flat like the block's parameters (compute dtype)."""

    flat: torch.Tensor
    present: list[bool]
    """Which parameters got a gradient this step (AdamW leaves the others untouched, as torch does)."""
    ready: Mark | None
    """The copy into `flat` is complete once this mark is (the last device -> host copy); None when the
    block got no gradient at all (no copy to wait for: Lanes' waits take a Mark, as CUDA events do)."""
    keep_alive: list = field(default_factory=list)
    """Device tensors the copies read from: freed only after `ready` (their memory must not be reused earlier)."""
    release: Callable[[], None] | None = None
    """Returns `flat` to its pool once the optimizer has read it."""

    def done(self) -> None:
        if self.release is not None:
            self.release()
            self.release = None


@dataclass
class AdamBlock:
    """A block as the optimizer sees it: its trainable tensors' shapes, how to get their initial
    values (called once, one block at a time), and where its state lives."""

    key: int
    name: str
    shapes: list[torch.Size]
    initial: Callable[[], list[torch.Tensor]]
    home: Tier
    """PINNED, PAGEABLE or DEVICE (host RAM: a CPU run's device) keep the state in memory; SSD in a file."""
    home_master: Callable[[], torch.Tensor] | None = None
    """bf16 master only: the block's weights at their home, flat (the store's own home tensor, or a
    fresh read of its file), which the update changes and publishes back. None: the state keeps the
    master (fp32, or the bf16 copy of a block whose weights stay on the device)."""
    master_file: FileMaster | None = None
    """A bf16 master whose home is an SSD file: how to read it ahead of the update (home_master
    then serves only reads outside a step's updates: checkpoints)."""


@dataclass(frozen=True)
class FileMaster:
    """A bf16 master homed in a file (a streamed block's weights on the SSD). The optimizer reads it
    ahead of the block's update, on the SSD threads beside the block's states, into a staging buffer:
    read inside the update it would sit on the update's critical path (measured on this project's VM:
    0.2-0.6 s of a 1.0-1.4 s SSD-homed step). Safe to read ahead: the file is written only by the
    block's own update, and the step's forward fetch of the block waited for the last such write."""

    nbytes: int
    """Bytes one read takes (aligned)."""
    read_into: Callable[[torch.Tensor], torch.Tensor]
    """Reads the file into the given aligned bytes; returns the flat bf16 weights in them."""


@dataclass
class UpdateResult:
    norms: list[torch.Tensor | None] | None
    """Per-tensor gradient norms (fp32, after unscaling) when asked for."""
    published: Any
    """What `publish` returned (e.g. a Future of an SSD write, or a lane mark)."""
    skipped: bool = False


@dataclass
class _State:
    key: int
    name: str
    shapes: list[torch.Size]
    numel: int
    home: Tier
    proxies: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    steps: list[torch.Tensor]
    buffer: torch.Tensor | None
    """The state's bytes (state_layout), for states homed in memory."""
    layout: list[tuple[str, torch.dtype, list[int]]]
    home_master: Callable[[], torch.Tensor] | None = None
    master_file: FileMaster | None = None

    @property
    def nbytes(self) -> int:
        return layout_bytes(self.layout)

    @property
    def staged(self) -> bool:
        """Whether an update reads anything ahead into a staging buffer: states on SSD, a master in a file."""
        return self.home is Tier.SSD or self.master_file is not None

    @property
    def state_file_bytes(self) -> int:
        """Bytes of a staging buffer the states take (aligned; 0 where they stay in memory); a master
        read from its file follows them."""
        return _aligned(self.nbytes) if self.home is Tier.SSD else 0


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def state_layout(shapes: list[torch.Size], fmt: AdamFormat,
                 keeps_master: bool) -> list[tuple[str, torch.dtype, list[int]]]:
    """One block's state as segments (key, dtype, numel per tensor), end to end, widest dtype first
    (so every segment starts aligned to its dtype). 'param' is the master when the state keeps it;
    the default format's is [master | m | v] in fp32."""
    numels = [s.numel() for s in shapes]
    segs = [("param", fmt.master_dtype, numels)] if keeps_master else []
    parts = [fmt.state_parts(n) for n in numels]
    for i, (key, dtype, _) in enumerate(parts[0] if parts else []):
        segs.append((key, dtype, [p[i][2] for p in parts]))
    return sorted(segs, key=lambda seg: -seg[1].itemsize)


def layout_bytes(layout: list[tuple[str, torch.dtype, list[int]]]) -> int:
    return sum(sum(numels) * dtype.itemsize for _, dtype, numels in layout)


def _joined(views: list[torch.Tensor]) -> torch.Tensor:
    """The one flat tensor that consecutive views of a segment (_segments) are parts of."""
    if not views:
        return torch.empty(0)
    first, total = views[0], sum(v.numel() for v in views)
    return first.as_strided((total,), (1,), first.storage_offset())


def _segments(raw: torch.Tensor, layout) -> dict[str, list[torch.Tensor]]:
    """Per key, one flat view per tensor of the state bytes `raw` (uint8)."""
    out, offset = {}, 0
    for key, dtype, numels in layout:
        nbytes = sum(numels) * dtype.itemsize
        seg = raw[offset: offset + nbytes].view(dtype)
        views, at = [], 0
        for n in numels:
            views.append(seg[at: at + n])
            at += n
        out[key] = views
        offset += nbytes
    return out


class CpuAdam:
    """Per-block optimizer states and the single worker thread that updates them (`thread=False`:
    the jobs run inline, for a CPU device; module docstring).

    `make_optimizer(tensors)` builds the torch optimizer over one block's fp32 tensors (the trainer
    passes torch.optim.AdamW(..., fused=True) with its parameter groups). Its tensors are proxies
    whose storage is bound, per update, to wherever the block's master weights and moments are.
    """

    STATE_KEYS = ("exp_avg", "exp_avg_sq")

    @staticmethod
    def state_bytes(shapes: list[torch.Size], fmt: AdamFormat = AdamFormat(), keeps_master: bool = True) -> int:
        """Bytes of one block's state at its home (state_layout): the default format's fp32 master, m
        and v are 12 per parameter; bf16 master at home and 8-bit moments, about 2."""
        return layout_bytes(state_layout(list(shapes), fmt, keeps_master))
    TRACE_CAP = 100_000

    def __init__(self, blocks: list[AdamBlock], make_optimizer: Callable[..., torch.optim.Optimizer],
                 *, lanes, ssd: SsdStore | None, read_ahead: int = 1,
                 on_job: Callable[[int], None] | None = None, thread: bool = True, fmt: AdamFormat = AdamFormat()):
        """`make_optimizer(tensors, key)` builds one block's optimizer: torch's AdamW for the default
        format, CompactAdamW (seeded with the block's key) for the others."""
        self.lanes, self.ssd, self.read_ahead, self.on_job, self.fmt = lanes, ssd, read_ahead, on_job, fmt
        self.trace: list[tuple[str, int, float, float]] = []
        """(what, block key, start, end) in perf_counter seconds: 'job' (a whole update, waits included),
        'adam' and 'norms' (the worker's arithmetic), 'read' / 'write' (SSD states). Drained by
        take_trace(); the oldest half is dropped past TRACE_CAP entries, so a long run stays bounded."""
        self.busy_s = 0.0
        """Seconds the worker spent in optimizer arithmetic (not waiting for reads or gradient copies)."""
        self.ssd_bytes_read = self.ssd_bytes_written = 0
        self.states: dict[int, _State] = {}
        self.thread = thread
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyou-adam") if thread else _Inline()
        self._lock = threading.Lock()
        max_numel = max((sum(x.numel() for x in b.shapes) for b in blocks), default=0)
        self._scratch = torch.empty(max_numel, dtype=torch.float32)
        if any(b.home is Tier.SSD for b in blocks) and ssd is None:
            raise ValueError("optimizer states homed on SSD need an SsdStore")
        self._free: queue.Queue = queue.Queue()
        for b in blocks:
            self._add(b, make_optimizer)
        staged = [st for st in self.states.values() if st.staged]
        staging_bytes = max((st.state_file_bytes + (st.master_file.nbytes if st.master_file else 0) for st in staged),
                            default=0)
        # Read ahead, updating, writing behind: with these many buffers a read never waits for the
        # update it precedes, and a write only holds back the read `read_ahead + 1` blocks later.
        for _ in range(read_ahead + 2 if staged else 0):
            self._free.put(aligned_host(staging_bytes))
        self._reads: dict[int, tuple[Future, torch.Tensor]] = {}
        self._writes: set[Future] = set()
        self._order: list[int] = []
        self._next = 0
        self._error: BaseException | None = None
        self._closing = threading.Event()

    # -- set-up ----------------------------------------------------------------------------------------

    def _add(self, b: AdamBlock, make_optimizer) -> None:
        shapes = list(b.shapes)
        n = sum(s.numel() for s in shapes)
        if (b.home_master is not None or b.master_file is not None) and self.fmt.master == "fp32":
            raise ValueError("only a bf16 master lives at the weights' home")
        if b.master_file is not None and b.home_master is None:
            raise ValueError("a master read from its file is also read outside updates: give home_master too")
        layout = state_layout(shapes, self.fmt, b.home_master is None)
        nbytes = layout_bytes(layout)
        whole = aligned_host(nbytes) if b.home is Tier.SSD else torch.empty(nbytes, dtype=torch.uint8)
        whole.zero_()  # moments (and 8-bit codes and scales) of 0
        raw = whole[:nbytes]
        segs = _segments(raw, layout)
        if "param" in segs:
            for view, t in zip(segs["param"], b.initial()):
                view.copy_(t.detach().reshape(-1))  # as the reference: p.detach().float()
            proxies = [v.view(s) for v, s in zip(segs["param"], shapes)]
        else:
            proxies = [torch.empty(s, dtype=self.fmt.master_dtype) for s in shapes]
        optimizer = make_optimizer(proxies, b.key)
        state = _State(b.key, b.name, shapes, n, b.home, proxies, optimizer,
                       steps=[torch.zeros((), dtype=torch.float32) for _ in shapes],
                       buffer=None if b.home is Tier.SSD else raw, layout=layout, home_master=b.home_master,
                       master_file=b.master_file)
        if b.home is Tier.SSD:
            self.ssd.write_sync(self._key(b.key), whole)
        if b.home is Tier.SSD or "param" not in segs:
            for p in proxies:  # the state's home is elsewhere; the proxies are bound per update
                p.data = torch.empty(0, dtype=p.dtype)
        self.states[b.key] = state

    @staticmethod
    def _key(key: int) -> str:
        return f"adam-{key:04d}"

    # -- read ahead / write behind (SSD homes) ---------------------------------------------------------

    def begin(self, order: list[int]) -> None:
        """The order of this step's updates: SSD-homed states are read `read_ahead` blocks ahead of it.
        Runs on the worker, after the jobs queued before it (they own the read/write bookkeeping)."""
        self._worker.submit(self._begin, order)

    def _begin(self, order: list[int]) -> None:
        try:
            self._raise_write_errors()
        except BaseException as e:  # noqa: BLE001 - surfaced by the next update or drain
            self._error = e
        for key in list(self._reads):
            fut, buf = self._reads.pop(key)  # left over from a step whose update did not run
            fut.result()
            self._free.put(buf)
        self._order, self._next = list(order), 0
        self._read_up_to(self.read_ahead)

    def _read_up_to(self, count: int) -> None:
        while self._next < min(count, len(self._order)):
            key = self._order[self._next]
            self._next += 1
            if self.states[key].staged and key not in self._reads:
                buf = self._take_buffer()  # waits for a write behind to finish
                self._reads[key] = (self.ssd.submit(self._read, key, buf), buf)

    def _take_buffer(self) -> torch.Tensor:
        """A free staging buffer; raises Closed once close() began (the buffers it waits for may be held
        by reads for updates that close() will never run)."""
        while True:
            if self._closing.is_set():
                raise Closed("the CPU optimizer was closed")
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                continue

    def _read(self, key: int, buf: torch.Tensor) -> torch.Tensor | None:
        """Block `key`'s states (when on SSD) into the front of `buf`, its master (when in a file)
        after them; returns the master's view, or None."""
        st = self.states[key]
        t0 = time.perf_counter()
        nbytes = st.state_file_bytes
        if nbytes:
            self.ssd.read_sync(self._key(key), buf[:nbytes])
        master = None
        if st.master_file is not None:
            master = st.master_file.read_into(buf[nbytes: nbytes + st.master_file.nbytes])
        self._record("read", key, t0, time.perf_counter())
        with self._lock:
            self.ssd_bytes_read += nbytes  # the states' bytes (the master's are the weights' file)
        return master

    def _write(self, key: int, buf: torch.Tensor) -> None:
        try:
            t0 = time.perf_counter()
            nbytes = _aligned(self.states[key].nbytes)
            self.ssd.write_sync(self._key(key), buf[:nbytes])
            self._record("write", key, t0, time.perf_counter())
            with self._lock:
                self.ssd_bytes_written += nbytes
        finally:
            self._free.put(buf)

    def _raise_write_errors(self) -> None:
        for fut in [f for f in self._writes if f.done()]:
            self._writes.discard(fut)
            fut.result()  # re-raises a failed write (disk full...) on the trainer's thread

    def _buffer(self, st: _State) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The block's state bytes in memory (state_layout), the staging buffer they were read into
        (or None: nothing staged), and the master read from its file (or None)."""
        if not st.staged:
            return st.buffer, None, None
        if st.key in self._order:
            self._read_up_to(self._order.index(st.key) + 1)
        if st.key not in self._reads:  # not announced by begin(): read it now
            buf = self._take_buffer()
            self._reads[st.key] = (self.ssd.submit(self._read, st.key, buf), buf)
        fut, buf = self._reads.pop(st.key)
        master = fut.result()
        if st.key in self._order:  # the next reads go out while this block updates
            self._read_up_to(self._order.index(st.key) + 1 + self.read_ahead)
        return (buf[: st.nbytes] if st.home is Tier.SSD else st.buffer), buf, master

    # -- the jobs --------------------------------------------------------------------------------------

    def _fp32(self, st: _State, grads: HostGrads, inv_scale: float) -> list[torch.Tensor | None]:
        """fp32 gradients, unscaled, as the in-memory reference forms them (p.grad.float() * inv_scale)."""
        views = views_of(grads.flat, st.shapes)
        if grads.flat.dtype == torch.float32 and inv_scale == 1.0:
            return [v if ok else None for v, ok in zip(views, grads.present)]
        out = []
        for v, s, ok in zip(views, views_of(self._scratch[: st.numel], st.shapes), grads.present):
            if not ok:
                out.append(None)
                continue
            s.copy_(v)
            if inv_scale != 1.0:
                s.mul_(inv_scale)
            out.append(s)
        return out

    def norms(self, key: int, grads: HostGrads, inv_scale: float = 1.0) -> Future:
        """Per-tensor norms of a block's gradients (for the global norm), computed on the worker."""
        return self._worker.submit(self._norms, key, grads, inv_scale)

    def _norms(self, key: int, grads: HostGrads, inv_scale: float) -> list[torch.Tensor | None]:
        if grads.ready is not None:  # None: the block got no gradient, nothing was copied
            self.lanes.host_wait(grads.ready)
        grads.keep_alive.clear()
        t0 = time.perf_counter()
        out = [None if g is None else torch.linalg.vector_norm(g)
               for g in self._fp32(self.states[key], grads, inv_scale)]
        t1 = time.perf_counter()
        self._record("norms", key, t0, t1)
        self.busy_s += t1 - t0
        return out

    def update(self, key: int, grads: HostGrads, *, lr: float, publish: Callable[[torch.Tensor], Any],
               inv_scale: float = 1.0, coef: float | None = None, want_norms: bool = False) -> Future:
        """Run the optimizer on block `key` from `grads` (clipped by `coef` when given), then call
        `publish(master_flat)` (fp32, or the bf16 master) on the worker; the Future holds an UpdateResult.

        With `want_norms`, a block whose gradients are not finite is left as it is (skipped=True)."""
        return self._worker.submit(self._update, key, grads, lr, publish, inv_scale, coef, want_norms)

    def _update(self, key, grads: HostGrads, lr, publish, inv_scale, coef, want_norms) -> UpdateResult:
        start = time.perf_counter()
        if self.on_job is not None:
            self.on_job(key)
        st = self.states[key]
        try:
            if self._closing.is_set():
                raise Closed("the CPU optimizer was closed")
            if self._error is not None:
                raise self._error
            # The gradients' device -> host copy must be complete before they are read; on CUDA it
            # was queued after the block's backward, which itself waited for the block's upload, so
            # this wait also means the block's home is no longer being read by the device.
            if grads.ready is not None:
                self.lanes.host_wait(grads.ready)
            grads.keep_alive.clear()
            raw, staging, file_master = self._buffer(st)
            segs = _segments(raw, st.layout)
            t0 = time.perf_counter()
            gs = self._fp32(st, grads, inv_scale)
            norms = [None if g is None else torch.linalg.vector_norm(g) for g in gs] if want_norms else None
            if norms is not None and not all(bool(torch.isfinite(x)) for x in norms if x is not None):
                if staging is not None:
                    self._free.put(staging)
                return UpdateResult(norms, None, skipped=True)
            if coef is not None:
                for g in gs:
                    if g is not None:
                        g.mul_(coef)
            master = self._master(st, segs) if file_master is None else self._checked(st, file_master)
            self._bind(st, master, segs)
            for group in st.optimizer.param_groups:
                group["lr"] = lr
            if self.fmt.default:
                for p, g in zip(st.proxies, gs):
                    p.grad = g
                st.optimizer.step()
                for p in st.proxies:
                    p.grad = None
            else:  # a bf16 proxy cannot hold fp32 gradients: they go in beside it
                st.optimizer.step(grads={id(p): g for p, g in zip(st.proxies, gs)})
            grads.done()
            t1 = time.perf_counter()
            self._record("adam", key, t0, t1)
            published = publish(master)
            if staging is not None or "param" not in segs:
                for p in st.proxies:
                    p.data = torch.empty(0, dtype=p.dtype)
            if st.home is Tier.SSD:
                self._writes.add(self.ssd.submit(self._write, key, staging))
            elif staging is not None:  # only the master was staged; publish has copied it out
                self._free.put(staging)
            self.busy_s += t1 - t0
            return UpdateResult(norms, published)
        finally:
            grads.done()
            self._record("job", key, start, time.perf_counter())

    def _master(self, st: _State, segs: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        """The block's master weights, flat: in the state, or (bf16 master) at the weights' home."""
        if st.home_master is None:
            return _joined(segs["param"])
        return self._checked(st, st.home_master())

    def _checked(self, st: _State, master: torch.Tensor) -> torch.Tensor:
        if master.numel() != st.numel or master.dtype != self.fmt.master_dtype:
            raise RuntimeError(f"{st.name}: its home holds {master.numel()} {master.dtype} weights, "
                               f"the optimizer expects {st.numel} {self.fmt.master_dtype}")
        return master

    def _bind(self, st: _State, master: torch.Tensor, segs: dict[str, list[torch.Tensor]]) -> None:
        """Point the block's optimizer at this update's master and moments (views, no copies)."""
        for i, (p, w, step) in enumerate(zip(st.proxies, views_of(master, st.shapes), st.steps)):
            p.data = w
            state = {"step": step}
            for key, views in segs.items():
                if key != "param":
                    state[key] = views[i].view(st.shapes[i]) if views[i].numel() == w.numel() else views[i]
            st.optimizer.state[p] = state

    def _record(self, what: str, key: int, t0: float, t1: float) -> None:
        with self._lock:
            self.trace.append((what, key, t0, t1))
            if len(self.trace) > self.TRACE_CAP:
                del self.trace[: self.TRACE_CAP // 2]

    def take_trace(self) -> list[tuple[str, int, float, float]]:
        """What was recorded since the last call (and forget it)."""
        with self._lock:
            out, self.trace = self.trace, []
        return out

    # -- settling, reading back, closing ----------------------------------------------------------------

    def drain(self) -> None:
        """Wait for every queued job and every write behind."""
        self._worker.submit(lambda: None).result()
        for fut in list(self._writes):
            fut.result()
        self._writes.clear()
        if self._error is not None:
            raise self._error

    def _raw(self, st: _State) -> torch.Tensor:
        """A copy of block st's state bytes, read from its home (the worker is idle: after drain())."""
        if st.home is not Tier.SSD:
            return st.buffer.clone()
        buf = aligned_host(st.nbytes)
        self.ssd.read_sync(self._key(st.key), buf)
        return buf[: st.nbytes].clone()

    def master(self, key: int) -> torch.Tensor:
        """Block `key`'s master weights (flat copy: fp32, or the bf16 master), read from its home."""
        self.drain()
        st = self.states[key]
        if st.home_master is not None:
            return st.home_master().clone()
        return _joined(_segments(self._raw(st), st.layout)["param"]).clone()

    def close(self) -> None:
        """Stop: jobs still queued end at once with Closed, a job waiting for a staging buffer too. (Not
        shutdown(cancel_futures=True): the worker can take a later job while the queue is being
        drained, and that job would wait forever for buffers held by reads for cancelled ones.)"""
        self._closing.set()
        self._worker.shutdown(wait=True)
        for fut in list(self._writes):
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - closing: the files are removed with the store anyway
                pass

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_parts(self, key: int) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
        """Block `key`'s state as it is stored, once every queued update is done: per key ('param': the
        master, 'exp_avg', 'exp_avg_sq', and with 8-bit moments their '_scale's) one flat tensor per
        parameter, in the format's own dtypes (8-bit codes stay 8-bit); and the per-tensor step counts."""
        self.drain()
        st = self.states[key]
        parts = _segments(self._raw(st), st.layout)
        if st.home_master is not None:
            flat = [torch.Size([s.numel()]) for s in st.shapes]
            parts["param"] = [v.clone() for v in views_of(st.home_master(), flat)]
        return parts, [s.clone() for s in st.steps]

    def load_state_parts(self, key: int, parts: dict[str, list[torch.Tensor]], steps: list[torch.Tensor]) -> None:
        """Replace block `key`'s state (state_parts' layout; 'param' is ignored where the master is the
        weights' home, which the caller restores), at its home."""
        self.drain()
        st = self.states[key]
        raw = self._raw(st)
        segs = _segments(raw, st.layout)
        for name, views in segs.items():
            given = parts.get(name)
            if given is None or len(given) != len(views):
                raise ValueError(f"{st.name}: no {name} state given for each of its {len(views)} tensors")
            for view, value in zip(views, given):
                if value.numel() != view.numel():
                    raise ValueError(f"{st.name}: {value.numel()} {name} values given, the tensor has {view.numel()}")
                if name != "param" and value.dtype != view.dtype:  # another state format's: not convertible
                    raise ValueError(f"{st.name}: {name} given as {value.dtype}, the state keeps {view.dtype}")
                view.copy_(value.reshape(-1))
        if st.home is not Tier.SSD:
            st.buffer.copy_(raw)
        else:
            buf = aligned_host(st.nbytes)
            buf[: st.nbytes].copy_(raw)
            self.ssd.write_sync(self._key(key), buf)
        for s, value in zip(st.steps, steps):
            s.copy_(value)
