"""metrics.jsonl: one JSON object per training step and per evaluation, flushed as written.

A resumed run keeps the rows up to its checkpoint's step and drops the later ones (and a line cut short
by a kill), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fuyoucli.telemetry.events import EvalDone, Event, StepDone


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


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
