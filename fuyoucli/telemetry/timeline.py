"""Timed spans per lane: what the engine and the trainers record so that a step's time can be split
(compute / waiting on a fetch / waiting on SSD / CPU optimizer) and drawn as a trace.

Telemetry stage, the part the engine may import: plain Python, no torch, no rich, no CUDA. Times are
time.perf_counter() seconds. `NULL` records nothing at no cost; a `Timeline` keeps spans until taken.
`TimedLanes` wraps any Lanes object and records its copies: synchronous ones (CPU) exactly, async ones
(CUDA) from their enqueue (or the lane's previous copy's end) to when a watcher thread sees them done.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

LANES = ("compute", "upload", "offload", "ssd_read", "ssd_write", "cpu_optimizer")
"""The trace's tracks, in display order; waits are drawn on the compute track."""


@dataclass(frozen=True)
class Span:
    lane: str
    """A LANES entry, or 'wait_fetch' / 'wait_ssd' (the compute lane blocked on a block's weights)."""
    name: str
    start_s: float
    end_s: float

    @property
    def seconds(self) -> float:
        return max(0.0, self.end_s - self.start_s)


class _Null:
    enabled = False

    def span(self, lane: str, name: str, start_s: float, end_s: float) -> None:
        pass

    @contextmanager
    def timed(self, lane: str, name: str):
        yield


NULL = _Null()


class Timeline:
    enabled = True

    def __init__(self) -> None:
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    def span(self, lane: str, name: str, start_s: float, end_s: float) -> None:
        with self._lock:
            self._spans.append(Span(lane, name, start_s, end_s))

    @contextmanager
    def timed(self, lane: str, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.span(lane, name, start, time.perf_counter())

    def take(self) -> list[Span]:
        """The spans recorded since the last take (and forget them)."""
        with self._lock:
            spans, self._spans = self._spans, []
        return spans


def busy_seconds(spans: list[Span], lane: str) -> float:
    """Seconds a lane was busy: the union of its spans (overlapping copies on one lane count once)."""
    total, end = 0.0, float("-inf")
    for s in sorted((s for s in spans if s.lane == lane), key=lambda s: s.start_s):
        if s.end_s <= end:
            continue
        total += s.end_s - max(s.start_s, end)
        end = s.end_s
    return total


class TimedLanes:
    """A Lanes wrapper that records each copy as a span on the upload / offload lane."""

    def __init__(self, inner, timeline: Timeline):
        self.inner, self.timeline = inner, timeline
        self._last_end = {"upload": 0.0, "offload": 0.0}
        self._lock = threading.Lock()
        self._watcher: ThreadPoolExecutor | None = None

    def __getattr__(self, name):  # kind, device, mark_compute, compute_wait, pin, synchronize, ...
        return getattr(self.inner, name)

    def _copy(self, lane: str, fn, dst, src, after):
        start = time.perf_counter()
        mark = fn(dst, src, after)
        if getattr(mark, "event", None) is None:  # synchronous: done when the call returned
            self._record(lane, dst, start, time.perf_counter())
        else:
            if self._watcher is None:
                self._watcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuyou-lane-timer")
            self._watcher.submit(self._watch, lane, dst, start, mark)
        return mark

    def _watch(self, lane: str, dst, start: float, mark) -> None:
        self.inner.host_wait(mark)
        self._record(lane, dst, start, time.perf_counter())

    def _record(self, lane: str, dst, start: float, end: float) -> None:
        with self._lock:
            start = max(start, self._last_end[lane])  # copies on one lane run one after another
            self._last_end[lane] = max(end, self._last_end[lane])
        nbytes = getattr(dst, "nbytes", 0)
        label = f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"
        self.timeline.span(lane, label, start, max(start, end))

    def upload(self, dst, src, after=None):
        return self._copy("upload", self.inner.upload, dst, src, after)

    def offload(self, dst, src, after=None):
        return self._copy("offload", self.inner.offload, dst, src, after)

    def host_wait(self, mark) -> None:
        self.inner.host_wait(mark)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.shutdown(wait=True)
            self._watcher = None
