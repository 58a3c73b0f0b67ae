"""Lanes: the ONLY module that touches CUDA streams and events.

Three lanes move and compute data: `upload` (host -> device), `compute` (the model), `offload`
(device -> host). Everything else asks a Lanes object to copy, to mark a point, or to wait for a mark;
it never sees a stream. The implementations share one interface:
- CudaLanes: two side streams plus the current stream, ordered by events (the real thing);
- CpuLanes: the CPU stands in for the device; copies are synchronous, so marks are always complete;
- SimulatedAsyncLanes: the CPU stands in for the device, but copies behave like a GPU's: queued to
  the lane's own thread, finished after a random delay, their destination poisoned meanwhile, so a
  read that skipped a wait fails parity on a machine without a GPU (FUYOU_LANES=async-sim);
- RecordingLanes: wraps another and logs every operation, so tests can check ordering rules
  (a block is never computed before its fetch completed, never evicted while in use).
`lanes_for(device)` picks one; FUYOU_LANES=sync|async-sim overrides the choice on a CPU device.

Why it is long: it is the one module allowed to touch CUDA, so every lanes implementation and
every device query (each with its CPU stand-in) lives here by design.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from fuyoucli.errors import FuyouError


@dataclass
class Mark:
    """A point on one lane; `waited on` means every operation before it on that lane has finished."""

    lane: str
    event: Any = None  # torch.cuda.Event on CUDA; None where the operation was synchronous


After = Union[Mark, tuple[Mark, ...], None]
"""What a copy waits for before it starts: nothing, one mark, or several (on different lanes)."""


def _marks(after) -> tuple[Mark, ...]:
    if after is None:
        return ()
    marks = after if isinstance(after, tuple) else (after,)
    for m in marks:
        _require(m)
    return marks


def _require(mark) -> None:
    """Every implementation refuses what CUDA's would fail on (`None` has no event), so that a wait on
    nothing is found on a CPU too, not first on a GPU."""
    if not isinstance(mark, Mark):
        raise TypeError(f"a lane wait needs a Mark, got {mark!r}")


class CpuLanes:
    """The CPU as the compute device: every copy is done when the call returns."""

    kind = "cpu"
    name = "synchronous (CPU device)"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: After = None) -> Mark:
        dst.copy_(src)
        return Mark("upload")

    def offload(self, dst: torch.Tensor, src: torch.Tensor, after: After = None) -> Mark:
        dst.copy_(src)
        return Mark("offload")

    def mark_compute(self) -> Mark:
        return Mark("compute")

    def compute_wait(self, mark: Mark) -> None:
        _require(mark)

    def host_wait(self, mark: Mark) -> None:
        _require(mark)

    def synchronize(self) -> None:
        pass

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # nothing to pin for: host and "device" are the same memory system

    def peak_device_bytes(self) -> int | None:
        return None  # the engine's own arena accounting is the measure on the CPU


class CudaLanes:
    """Upload and offload on their own streams; compute on the current stream.

    Why each wait exists:
    - an upload into a slot waits for `after` (the compute that last read the slot, and the offload
      that last copied out of it: a zo2 layer goes home while its passes read it), else it would
      overwrite weights still in use;
    - compute waits for the upload's event before using the slot;
    - an offload waits for the compute mark after the update, else it would copy stale weights;
    - the host waits for an offload before reusing the host buffer (e.g. to write it to SSD).
    """

    kind = "cuda"
    name = "CUDA streams"

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self._upload = torch.cuda.Stream(self.device)
        self._offload = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()  # I/O threads enqueue uploads too

    def _copy(self, stream, lane: str, dst: torch.Tensor, src: torch.Tensor, after: After) -> Mark:
        with self._lock, torch.cuda.stream(stream):
            for mark in _marks(after):
                if mark.event is not None:
                    stream.wait_event(mark.event)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return Mark(lane, event)

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: After = None) -> Mark:
        return self._copy(self._upload, "upload", dst, src, after)

    def offload(self, dst: torch.Tensor, src: torch.Tensor, after: After = None) -> Mark:
        return self._copy(self._offload, "offload", dst, src, after)

    def mark_compute(self) -> Mark:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Mark("compute", event)

    def compute_wait(self, mark: Mark) -> None:
        _require(mark)
        if mark.event is not None:
            torch.cuda.current_stream(self.device).wait_event(mark.event)

    def host_wait(self, mark: Mark) -> None:
        _require(mark)
        if mark.event is not None:
            mark.event.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def peak_device_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)


class _SimEvent:
    """A simulated CUDA event: set by the lane's thread once its copy is done (or failed)."""

    def __init__(self, done: bool = False):
        self._set = threading.Event()
        self.error: BaseException | None = None
        if done:
            self._set.set()

    def query(self) -> bool:
        return self._set.is_set()

    def synchronize(self) -> None:
        self._set.wait()
        if self.error is not None:
            raise RuntimeError(f"a simulated copy failed: {self.error}") from self.error

    def _finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self._set.set()


_DONE = _SimEvent(done=True)


@torch.no_grad()
def _poison(t: torch.Tensor) -> None:
    """What a buffer holds while a copy into it is in flight: NaN (all-ones bits for integer buffers,
    which read as NaN when viewed as floats), so a computation that reads it too early shows it."""
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-1 if t.dtype.is_signed else torch.iinfo(t.dtype).max)


class _SimLane:
    """One stream: copies run in submission order on this lane's own thread, each after `after`'s
    event, after a seeded random delay. The thread exits when the lane has been idle for a second and
    is restarted by the next copy, so lanes that are dropped leave no thread behind."""

    IDLE_S = 1.0

    def __init__(self, name: str, rng: random.Random, max_delay_s: float):
        self.name, self.rng, self.max_delay_s = name, rng, max_delay_s
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last = _DONE

    def submit(self, dst: torch.Tensor, src: torch.Tensor, after: After) -> _SimEvent:
        event = _SimEvent()
        with self._lock:
            # The destination holds poison from now on, unless an earlier operation on another lane
            # must read it first (`after`): then from the moment that one is done, as on a GPU.
            ready = all(m.event is None or m.event.query() for m in _marks(after))
            if ready:
                _poison(dst)
            # Half the copies finish at once, the others within max_delay_s: orders vary from run to run.
            delay = 0.0 if self.rng.random() < 0.5 else self.rng.uniform(0.0, self.max_delay_s)
            self._jobs.put((dst, src, after, ready, delay, event))
            self._last = event
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"fuyou-sim-{self.name}", daemon=True)
                self._thread.start()
        return event

    @torch.no_grad()  # a copy engine's copy, outside autograd (as `copy_` on a side stream is used here)
    def _run(self) -> None:
        while True:
            try:
                dst, src, after, poisoned, delay, event = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._thread = None
                        return
                continue
            try:
                for mark in _marks(after):
                    if mark.event is not None:
                        mark.event.synchronize()
                if not poisoned:
                    _poison(dst)
                if delay:
                    time.sleep(delay)
                dst.copy_(src)  # reads the source now, at the end: a writer that did not wait shows too
                event._finish()
            except BaseException as e:  # noqa: BLE001 - surfaced to whoever waits on the event
                event._finish(e)

    def drain(self) -> None:
        with self._lock:
            last = self._last
        last.synchronize()


class SimulatedAsyncLanes:
    """The CPU as the device, with a GPU's asynchrony (FUYOU_LANES=async-sim, and the parity tests).

    Each copy is queued to its lane's thread and completes later (CudaLanes' streams); from the call
    until completion its destination holds poison, and its mark's event is done only when the copy is.
    So anything that reads a buffer before waiting on the right mark (an optimizer reading gradients
    still in flight, a forward reading a block still arriving, a checkpoint reading a block in flight)
    computes with NaN and fails parity, and a writer that changes a copy's source before the copy is
    done changes what arrives. Compute runs in the calling thread, so compute marks are done when taken
    and `compute_wait` blocks the caller: a host write that trusted compute_wait to mean "the copy is
    done" is not caught here (CUDA's stream sanitizer is for that)."""

    kind = "async-sim"
    name = "simulated-async"

    def __init__(self, device: torch.device | str = "cpu", *, seed: int = 0, max_delay_s: float | None = None):
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError("simulated asynchronous lanes compute on the CPU")
        if max_delay_s is None:
            max_delay_s = float(os.environ.get("FUYOU_SIM_MAX_DELAY_MS", "2")) / 1e3
        self._lanes = {lane: _SimLane(lane, random.Random(f"{seed}-{lane}"), max_delay_s)
                       for lane in ("upload", "offload")}

    def _copy(self, lane: str, dst: torch.Tensor, src: torch.Tensor, after: After) -> Mark:
        return Mark(lane, self._lanes[lane].submit(dst, src, after))

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: After = None) -> Mark:
        return self._copy("upload", dst, src, after)

    def offload(self, dst: torch.Tensor, src: torch.Tensor, after: After = None) -> Mark:
        return self._copy("offload", dst, src, after)

    def mark_compute(self) -> Mark:
        return Mark("compute", _DONE)

    def compute_wait(self, mark: Mark) -> None:
        _require(mark)
        if mark.event is not None:
            mark.event.synchronize()  # compute runs in this thread: it waits here

    def host_wait(self, mark: Mark) -> None:
        _require(mark)
        if mark.event is not None:
            mark.event.synchronize()

    def synchronize(self) -> None:
        for lane in self._lanes.values():
            lane.drain()

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def peak_device_bytes(self) -> int | None:
        return None


@dataclass
class RecordingLanes:
    """Logs (operation, label) for every call, then delegates; `label` is set by the caller per block."""

    inner: Any
    log: list[tuple[str, str]] = field(default_factory=list)
    label: str = ""

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def upload(self, dst, src, after=None):
        self.log.append(("upload", self.label))
        return self.inner.upload(dst, src, after)

    def offload(self, dst, src, after=None):
        self.log.append(("offload", self.label))
        return self.inner.offload(dst, src, after)

    def mark_compute(self):
        return self.inner.mark_compute()

    def compute_wait(self, mark):
        self.log.append(("compute_wait", mark.lane))
        self.inner.compute_wait(mark)

    def host_wait(self, mark):
        self.log.append(("host_wait", mark.lane))
        self.inner.host_wait(mark)

    def synchronize(self):
        self.inner.synchronize()

    def pin(self, tensor):
        return self.inner.pin(tensor)

    def peak_device_bytes(self):
        return self.inner.peak_device_bytes()


LANES_ENV = "FUYOU_LANES"
LANE_CHOICES = ("auto", "sync", "async-sim")


class LanesChoiceError(FuyouError):
    exit_code = 2


def lanes_choice(device: torch.device, choice: str | None = None) -> str:
    """Which lanes a run on `device` gets ('cuda', 'sync' or 'async-sim'); `choice` defaults to the
    FUYOU_LANES environment variable. Raises LanesChoiceError (one line) for a choice that cannot be."""
    choice = (choice if choice is not None else os.environ.get(LANES_ENV, "")).strip() or "auto"
    if choice not in LANE_CHOICES:
        raise LanesChoiceError(f"{LANES_ENV}={choice!r} is not one of {', '.join(LANE_CHOICES)}")
    if device.type == "cuda":
        if choice != "auto":
            raise LanesChoiceError(f"{LANES_ENV}={choice} chooses lanes for a CPU device; this run computes on "
                                   f"{device}: unset {LANES_ENV}")
        return "cuda"
    return "async-sim" if choice == "async-sim" else "sync"


def lanes_for(device: torch.device, choice: str | None = None):
    """CUDA streams on a GPU; on a CPU device synchronous lanes, or the simulated asynchronous ones."""
    kind = lanes_choice(device, choice)
    if kind == "cuda":
        return CudaLanes(device)
    return SimulatedAsyncLanes(device) if kind == "async-sim" else CpuLanes(device)


def cap_device_memory(device: torch.device, limit_bytes: int) -> None:
    """Make `limit_bytes` a hard cap for this process's caching allocator on a GPU: it raises an
    out-of-memory error rather than reserve past it (the plan keeps the engine's own budget under it)."""
    if limit_bytes <= 0:
        raise ValueError(f"a device memory cap must be positive, got {limit_bytes} bytes")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_reserved_bytes(device: torch.device) -> int | None:
    """What the caching allocator held at most since the last reset (what the process really keeps on
    the GPU, fragmentation included, the CUDA context not); None on a CPU device."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def synchronize_device(device: torch.device) -> None:
    """Wait for everything queued on the device (a step's time ends when its work is done, not queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the device, for the code around the engine (run loop, checkpoints, preflight, launchers) -------------
# Every torch.cuda call of the training path lives in this module; each helper below does nothing (or
# answers for the CPU) on a machine without CUDA.


def cuda_available() -> bool:
    return torch.cuda.is_available()


def compute_device() -> torch.device:
    """The device a run computes on: the GPU when CUDA is available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_count() -> int:
    """GPUs this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def bind_local_device(local_rank: int) -> torch.device:
    """This rank's device: GPU `local_rank` (modulo the GPUs present), made the current one; the CPU without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_rng_states() -> list[torch.Tensor]:
    """Every GPU generator's state, in device order; none when CUDA is unavailable or was never initialized
    (no generator has been drawn from, so there is nothing to save)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return []


def set_device_rng_states(states: list[torch.Tensor]) -> None:
    """Put back what device_rng_states() returned; nothing happens without CUDA."""
    if states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states)


def seed_device(device: torch.device, seed: int) -> None:
    """Seed `device`'s generator (a CPU device has none of its own: torch's default generator serves it)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def pins_bytes(nbytes: int) -> bool:
    """Whether this process can page-lock `nbytes` of host memory now (tries, then frees them)."""
    try:
        torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        return True
    except RuntimeError:
        return False
