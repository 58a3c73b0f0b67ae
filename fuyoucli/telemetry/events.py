"""Events the trainers emit. Plain data: no rich, no torch, no I/O.

The trainer and engine only ever call `Sinks.emit`; what is printed or written is each sink's business.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RunStarted:
    name: str
    method: str
    model: str
    device: str
    offload: str
    """Where the weights live and why (e.g. 'in_memory (planner not available yet)')."""
    total_steps: int
    trainable_params: int
    total_params: int
    train_examples: int
    eval_examples: int
    output_dir: str
    notes: tuple[str, ...] = ()
    """One-line remarks about the data (records skipped, examples truncated)."""
    start_step: int = 0
    """Steps already done (a resumed run continues after them)."""
    planned: dict[str, float] = field(default_factory=dict)
    """What the plan predicted, in seconds per step: step_s and the busy time of each resource (gpu_s,
    h2d_s, d2h_s, ssd_read_s, ssd_write_s, cpu_optimizer_s), and tokens_per_s; empty without a plan."""


@dataclass(frozen=True)
class StepDone:
    step: int
    loss: float
    lr: float
    tokens: int
    step_time_s: float
    extra: dict[str, float] = field(default_factory=dict)
    """Method-specific figures (projected gradient, grad norm, loss scale...) and, for streamed trainers,
    where the step's time went (compute_s, wait_fetch_s, wait_ssd_s, h2d_s, ..., cpu_optimizer_s) and the
    bytes each link moved (h2d_bytes, ...)."""
    spans: tuple = ()
    """Timed spans (telemetry.timeline.Span) of what each lane did: for the trace, not for metrics.jsonl."""
    started_s: float = 0.0
    """time.perf_counter() when the step began (the clock the spans use)."""

    def row(self) -> dict[str, Any]:
        row = {"kind": "train", "step": self.step, "loss": self.loss, "lr": self.lr,
               "tokens": self.tokens, "step_time_s": self.step_time_s}
        row.update(self.extra)
        return row


@dataclass(frozen=True)
class EvalStarted:
    """An evaluation began (it can take as long as many steps; the dashboard says it is evaluating)."""
    step: int
    examples: int


@dataclass(frozen=True)
class EvalDone:
    step: int
    loss: float
    perplexity: float
    accuracy: float | None
    examples: int

    def row(self) -> dict[str, Any]:
        row = {"kind": "eval", **asdict(self)}
        if self.accuracy is None:
            del row["accuracy"]
        return row


@dataclass(frozen=True)
class RunFinished:
    steps: int
    wall_time_s: float
    model_dir: str
    first_eval: EvalDone | None
    last_eval: EvalDone | None


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str
    nbytes: int
    seconds: float
    kind: str
    """'full' (trainable weights and optimizer state) or 'ledger' (zo2 seeds since the last full one)."""
    reason: str = "scheduled"
    """'scheduled' (checkpoint_every / checkpoint_minutes) or 'interrupt'."""


@dataclass(frozen=True)
class RunInterrupted:
    step: int
    """Steps completed (and in the checkpoint, when one was written)."""
    checkpoint: str | None
    resume_hint: str = ""


Event = RunStarted | StepDone | EvalStarted | EvalDone | RunFinished | CheckpointSaved | RunInterrupted


class Sink(Protocol):
    def handle(self, event: Event) -> None: ...

    def close(self) -> None: ...


class Sinks:
    """Fans each event out to every sink; closes them all even if one fails."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.handle(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
