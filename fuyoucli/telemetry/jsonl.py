"""metrics.jsonl: one JSON object per training step and per evaluation, flushed as written."""

from __future__ import annotations

import json
from pathlib import Path

from fuyoucli.telemetry.events import EvalDone, Event, StepDone


class JsonlSink:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("w", encoding="utf-8")

    def handle(self, event: Event) -> None:
        if isinstance(event, (StepDone, EvalDone)):
            self._file.write(json.dumps(event.row()) + "\n")
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
