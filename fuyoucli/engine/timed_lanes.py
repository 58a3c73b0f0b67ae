"""Timed lanes: a Lanes wrapper that records each copy as a span on the upload or offload track of a
telemetry Timeline, so that a step's time can be split by lane (telemetry/trace.py draws them).

Engine stage, a Lanes implementation: no CUDA of its own (it asks the wrapped lanes to wait). A
synchronous copy (CPU) is timed exactly; an asynchronous one (CUDA, simulated) from its enqueue, or
the lane's previous copy's end, to when a watcher thread sees it done.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fuyoucli.telemetry.timeline import Timeline


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
