"""`--trace FILE`: a few steps as a Chrome / Perfetto trace (JSON), one track per lane, so the overlap
of compute, copies, SSD I/O and the CPU optimizer is visible. Open it in https://ui.perfetto.dev or
chrome://tracing.

Telemetry stage: a sink over StepDone's timed spans (telemetry/timeline.py). No rich, no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fuyoucli.telemetry.events import Event, RunStarted, StepDone
from fuyoucli.telemetry.timeline import LANES

TRACKS = ("step",) + LANES
WAIT_NAMES = {"wait_fetch": "waiting for the upload", "wait_ssd": "waiting for the SSD read"}


class TraceSink:
    """Keeps `steps` steps (skipping the first of the run when there are enough: it warms up) and writes
    the trace as soon as it has them, so that a run stopped later still leaves it."""

    def __init__(self, path: str | Path, steps: int = 3):
        self.path, self.steps = Path(path), steps
        self.events: list[dict] = []
        self.kept: list[int] = []
        self.skip_until = 1
        self.origin: float | None = None
        self.name = "fuyou"
        self.written = False

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.name = f"fuyou {event.name} ({event.method}, {event.offload.split(';')[0]})"
            first = event.start_step + 1
            self.skip_until = first + 1 if event.total_steps - event.start_step > self.steps else first
        elif isinstance(event, StepDone) and not self.written and event.step >= self.skip_until:
            self._add(event)
            if len(self.kept) >= self.steps:
                self.write()

    def _us(self, t: float) -> float:
        return round((t - self.origin) * 1e6, 3)

    def _add(self, e: StepDone) -> None:
        starts = [s.start_s for s in e.spans] + ([e.started_s] if e.started_s else [])
        if self.origin is None:
            self.origin = min(starts) if starts else 0.0
        self.kept.append(e.step)
        if e.started_s:
            self.events.append({"ph": "X", "pid": 1, "tid": TRACKS.index("step"), "name": f"step {e.step}",
                                "cat": "step", "ts": self._us(e.started_s), "dur": round(e.step_time_s * 1e6, 3),
                                "args": {"loss": e.loss, "tokens": e.tokens}})
        for s in e.spans:
            lane = "compute" if s.lane in WAIT_NAMES else s.lane
            if lane not in TRACKS:
                continue
            name = f"{WAIT_NAMES[s.lane]} ({s.name})" if s.lane in WAIT_NAMES else s.name
            self.events.append({"ph": "X", "pid": 1, "tid": TRACKS.index(lane), "name": name, "cat": s.lane,
                                "ts": self._us(s.start_s), "dur": round(s.seconds * 1e6, 3), "args": {"step": e.step}})

    def document(self) -> dict:
        meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": self.name}}]
        for tid, track in enumerate(TRACKS):
            meta.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": track}})
            meta.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
        return {"traceEvents": meta + sorted(self.events, key=lambda ev: ev["ts"]), "displayTimeUnit": "ms",
                "otherData": {"steps": self.kept, "clock": "time.perf_counter, microseconds from the first span"}}

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.document()), encoding="utf-8")
        os.replace(tmp, self.path)
        self.written = True

    def close(self) -> None:
        if not self.written and self.kept:
            self.write()
