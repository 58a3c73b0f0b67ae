"""Plain progress lines on the terminal (the live dashboard is a separate sink)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.markup import escape

from fuyoucli.telemetry.events import (CheckpointSaved, EvalDone, Event, RunFinished, RunInterrupted, RunStarted,
                                       StepDone)


def _fmt_eval(e: EvalDone) -> str:
    text = f"eval loss {e.loss:.4f}  ppl {e.perplexity:.2f}"
    if e.accuracy is not None:
        text += f"  accuracy {e.accuracy:.1%}"
    return text + f"  ({e.examples} examples)"


class ConsoleSink:
    def __init__(self, quiet: bool = False, log_every: int = 1, console: Console | None = None):
        self.quiet = quiet
        self.log_every = log_every
        # soft_wrap: a line is never cut at the terminal's width (piped logs would get 80-column breaks
        # inside long paths); a terminal wraps it for display anyway.
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.total_steps = 0

    def handle(self, event: Event) -> None:
        c = self.console
        if isinstance(event, RunStarted):
            self.total_steps = event.total_steps
            if not self.quiet:
                if event.start_step:
                    c.print(f"[bold]fuyou[/] resuming {escape(event.name)} after step {event.start_step}")
                c.print(f"[bold]fuyou[/] {escape(event.name)}: {escape(event.method)} on {escape(event.model)}")
                c.print(f"  device {event.device}, offload {event.offload}", markup=False)
                c.print(f"  {event.trainable_params:,} trainable of {event.total_params:,} parameters; "
                        f"{event.train_examples} train / {event.eval_examples} eval examples; "
                        f"{event.total_steps} steps -> {event.output_dir}", markup=False)
                for note in event.notes:
                    c.print(f"  {note}", markup=False)
        elif isinstance(event, StepDone):
            if not self.quiet and (event.step % self.log_every == 0 or event.step == self.total_steps):
                tok_s = event.tokens / event.step_time_s if event.step_time_s > 0 else math.nan
                c.print(f"step {event.step:>5}/{self.total_steps}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                        f"{event.step_time_s:.2f} s  {tok_s:,.0f} tok/s", markup=False)
        elif isinstance(event, EvalDone):
            if not self.quiet:
                c.print(f"step {event.step:>5}  {_fmt_eval(event)}", markup=False)
        elif isinstance(event, CheckpointSaved):
            if not self.quiet:
                c.print(f"step {event.step:>5}  checkpoint ({event.kind}, {event.nbytes / 1e6:,.1f} MB, "
                        f"{event.seconds:.1f} s) -> {event.path}", markup=False)
        elif isinstance(event, RunInterrupted):
            where = f"; checkpoint {event.checkpoint}" if event.checkpoint else ""
            hint = f"; {event.resume_hint}" if event.checkpoint and event.resume_hint else ""
            c.print(f"stopped after step {event.step}{where}{hint}", markup=False)
        elif isinstance(event, RunFinished):
            line = f"done: {event.steps} steps in {event.wall_time_s:.1f} s; model saved to {event.model_dir}"
            c.print(line, markup=False)
            if event.first_eval and event.last_eval:
                c.print(f"  before: {_fmt_eval(event.first_eval)}", markup=False)
                c.print(f"  after:  {_fmt_eval(event.last_eval)}", markup=False)

    def close(self) -> None:
        pass
