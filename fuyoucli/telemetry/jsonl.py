"""metrics.jsonl: one JSON object per training step and per evaluation, flushed as written.

A resumed run keeps the rows up to its checkpoint's step and drops the later ones (and a line cut short
by a kill), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from fuyoucli.telemetry.events import EvalDone, Event, RunFinished, StepDone


def _rows_through(path: Path, step: int) -> list[str]:
    kept = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the last line of a killed run may be cut short
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
    return kept


class JsonlSink:
    def __init__(self, path: Path, keep_through_step: int | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        if keep_through_step is None:
            self._file = path.open("w", encoding="utf-8")
        else:
            kept = _rows_through(path, keep_through_step)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
            self._file = path.open("a", encoding="utf-8")

    def handle(self, event: Event) -> None:
        if isinstance(event, (StepDone, EvalDone)):
            self._file.write(json.dumps(event.row()) + "\n")
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class JsonLogSink:
    """`--json-logs`: every event as one JSON object per line on stdout, {"event": "<kind>", ...}."""

    NAMES = {"RunStarted": "run_started", "StepDone": "step", "EvalStarted": "eval_started", "EvalDone": "eval",
             "RunFinished": "run_finished", "CheckpointSaved": "checkpoint", "RunInterrupted": "interrupted"}

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def handle(self, event: Event) -> None:
        kind = self.NAMES.get(type(event).__name__, type(event).__name__)
        if isinstance(event, (StepDone, EvalDone)):
            doc = event.row()
            doc.pop("kind", None)
        elif isinstance(event, RunFinished):
            doc = {"steps": event.steps, "wall_time_s": event.wall_time_s, "model_dir": event.model_dir,
                   "first_eval": event.first_eval.row() if event.first_eval else None,
                   "last_eval": event.last_eval.row() if event.last_eval else None}
        else:
            doc = dataclasses.asdict(event)
        self.stream.write(json.dumps({"event": kind, **doc}, default=str) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


MEASURED_SUFFIXES = ("_s", "_bytes")


def comparable(row: dict) -> dict:
    """A metrics row without what the clock and the engine measured (step_time_s, compute_s, h2d_bytes...):
    what two runs of one recipe share, whatever the placement and however busy the machine."""
    return {k: v for k, v in row.items() if not k.endswith(MEASURED_SUFFIXES)}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
