"""Experiment trackers (recipe training.report_to): TensorBoard, Weights & Biases and MLflow as sinks fed the
same events as metrics.jsonl, each written through the library's own API.

A telemetry sink: reads events only. Each library is imported when its sink is built (a missing package is
one line, before the run starts) and each writes nothing until the run has started.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

from fuyoucli.errors import InputError
from fuyoucli.telemetry.events import EvalDone, Event, RunStarted, StepDone

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""Tracker name -> the package it needs (and the pip extra of the same name)."""
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's event files go to output_dir/tensorboard."""


def scalars(event: Event) -> tuple[int, dict[str, float]] | None:
    """(step, tag -> value) of an event: a step's metrics.jsonl row as train/* (with train/tokens_per_s,
    tokens over step_time_s), an evaluation as eval/*, the plan's prediction as plan/* at the start step."""
    if isinstance(event, StepDone):
        row = event.row()
        out = {f"train/{k}": float(v) for k, v in row.items()
               if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if event.step_time_s > 0:
            out["train/tokens_per_s"] = event.tokens / event.step_time_s
        return event.step, out
    if isinstance(event, EvalDone):
        row = event.row()
        return event.step, {f"eval/{k}": float(v) for k, v in row.items()
                            if k not in ("kind", "step") and isinstance(v, (int, float)) and v is not None}
    if isinstance(event, RunStarted) and event.planned:
        return event.start_step, {f"plan/{k}": float(v) for k, v in event.planned.items()}
    return None


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _after_earlier_files(log_dir: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name is
    events.out.tfevents.<unix second>.<host>.<pid>...: a resumed run started within the second of the
    last file, from a process with a lexically smaller pid, would sort first and its purge would apply
    before the steps it purges. Waits (at most a second) until a new file's second is later."""
    seconds = []
    for f in log_dir.glob("events.out.tfevents.*"):
        part = f.name.split(".")[3]
        if part.isdigit():
            seconds.append(int(part))
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


class TensorBoardSink:
    """torch.utils.tensorboard.SummaryWriter into output_dir/tensorboard. A resumed run purges the steps
    after its checkpoint, as metrics.jsonl drops them."""

    def __init__(self, output_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without tensorboard

        self._make = SummaryWriter
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        self.writer = None

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted) and self.writer is None:
            purge = event.start_step + 1 if event.start_step else None
            if purge:
                _after_earlier_files(self.log_dir)
            self.writer = self._make(log_dir=str(self.log_dir), purge_step=purge)
        found = scalars(event)
        if found is None or self.writer is None:
            return
        step, values = found
        for tag, value in _finite(values).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    """wandb.init at the run's start (project: WANDB_PROJECT, else fuyou; the run named after the recipe, its
    config the recipe), wandb.log per event, finish at the end. WANDB_MODE=offline works as wandb says."""

    def __init__(self, recipe):
        import wandb

        self.wandb, self.recipe, self.run = wandb, recipe, None

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted) and self.run is None:
            import os

            self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT") or "fuyou", name=self.recipe.name,
                                       config=self.recipe.model_dump(mode="json"),
                                       dir=str(self.recipe.training.output_dir))
        found = scalars(event)
        if found is not None and self.run is not None:
            step, values = found
            self.run.log(_finite(values), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class MlflowSink:
    """mlflow.start_run (named after the recipe; MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME as mlflow reads
    them), mlflow.log_metrics per event, end_run at the end."""

    def __init__(self, recipe):
        import mlflow

        self.mlflow, self.recipe, self.run = mlflow, recipe, None

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted) and self.run is None:
            self.run = self.mlflow.start_run(run_name=self.recipe.name)
            self.mlflow.log_params({"method": event.method, "model": event.model, "total_steps": event.total_steps})
        found = scalars(event)
        if found is not None and self.run is not None:
            step, values = found
            self.mlflow.log_metrics(_finite(values), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """One line (exit 2) naming the first tracker whose package is not installed."""
    for name in names:
        package = PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise InputError(f"training.report_to: {name} needs the {package} package, which is not installed: "
                             f"pip install '{package}' (or fuyoucli[{name}]), or remove {name} from report_to")


def tracker_sinks(recipe) -> list:
    """The sinks training.report_to asks for; nothing is written until the run starts."""
    names = list(recipe.training.report_to)
    check_trackers(names)
    made = {"tensorboard": lambda: TensorBoardSink(recipe.training.output_dir),
            "wandb": lambda: WandbSink(recipe), "mlflow": lambda: MlflowSink(recipe)}
    return [made[name]() for name in names]
