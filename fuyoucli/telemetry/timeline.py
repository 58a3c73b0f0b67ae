"""Timed spans per lane: what the engine and the trainers record so that a step's time can be split
(compute / waiting on a fetch / waiting on SSD / CPU optimizer) and drawn as a trace.

Telemetry stage, the part the engine may import: plain Python, no torch, no rich, no CUDA. Times are
time.perf_counter() seconds. `NULL` records nothing at no cost; a `Timeline` keeps spans until taken.
(The lanes' copies are timed by engine/timed_lanes.py, a Lanes wrapper, into a Timeline.)
"""

from __future__ import annotations

import threading
import time
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
