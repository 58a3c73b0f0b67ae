"""The run loop every entry point shares: draw the step's micro-batches, step, emit events, evaluate,
checkpoint, stop on request, finish.

Trainer stage. Serves the single-process run (train/run.py, with OneProcess), data-parallel zo2
(distributed/zo_run.py, over torch.distributed ranks) and the DeepSpeed entry point (whose engine does
the step behind the same trainer interface); each entry builds the trainer, the checkpoint writer and
its RunStarted event, the loop does the rest. Emits telemetry events only; imports nothing from cli/ or
distributed/ and never rich.
"""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from fuyoucli.checkpoint import crash_point
from fuyoucli.engine.lanes import device_peak_reserved_bytes, reset_device_peak, synchronize_device
from fuyoucli.errors import FuyouError
from fuyoucli.interrupts import interrupt
from fuyoucli.recipe import Recipe
from fuyoucli.telemetry.events import (CheckpointSaved, EvalDone, EvalStarted, RunFinished, RunInterrupted,
                                       RunStarted, Sinks, StepDone)
from fuyoucli.train.data import Datasets, batches, collate
from fuyoucli.train.lr_schedule import lr_at
from fuyoucli.train.resume import restore_rng


class TrainingDiverged(FuyouError):
    exit_code = 4


def total_steps(recipe: Recipe, n_train: int) -> int:
    t = recipe.training
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.batch_size * t.grad_accum
    return max(1, math.ceil(t.epochs * n_train / per_step))


class MicroBatches:
    """Endless micro-batches in a seeded order; each epoch reshuffles with (seed, epoch).

    `position` is (epoch, index of the next micro-batch in that epoch): the order is a pure function of
    (seed, epoch), so a checkpoint stores the position and a resumed run takes the same batches."""

    def __init__(self, data: Datasets, recipe: Recipe, device: torch.device, position: tuple[int, int] = (0, 0)):
        self.data, self.device = data, device
        self.batch_size, self.seed = recipe.training.batch_size, recipe.training.seed
        self.epoch, self.index = position
        self._it = self._from_position()

    def _from_position(self):
        order = batches(self.data.train, self.batch_size, seed=self.seed, epoch=self.epoch, shuffle=True)
        return itertools.islice(order, self.index, None)

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.index

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2):
            examples = next(self._it, None)
            if examples is not None:
                self.index += 1
                return {k: v.to(self.device) for k, v in collate(examples, self.data.pad_token_id).items()}
            self.epoch, self.index = self.epoch + 1, 0
            self._it = self._from_position()
        raise RuntimeError("the training set is empty")


@torch.no_grad()
def evaluate(trainer, data: Datasets, recipe: Recipe, device: torch.device, step: int) -> EvalDone | None:
    """Held-out loss, perplexity and (classification) accuracy at the trainer's current weights.

    Batches go to the trainer in groups, so a streamed trainer fetches each block once per group."""
    if not data.eval:
        return None
    size = recipe.training.eval_batch_size or recipe.training.batch_size
    group = max(1, recipe.training.grad_accum * (2 * recipe.method.q if recipe.method.name == "zo2" else 1))
    loss_sum, count, correct = 0.0, 0, 0
    pending: list[dict] = []

    def drain() -> None:
        nonlocal loss_sum, count, correct
        for out in trainer.eval_losses(pending):
            loss_sum += float(out.loss_sum)
            count += out.count
            correct += out.correct or 0
        pending.clear()

    for examples in batches(data.eval, size, seed=0, epoch=0, shuffle=False):
        pending.append({k: v.to(device) for k, v in collate(examples, data.pad_token_id).items()})
        if len(pending) == group:
            drain()
    if pending:
        drain()
    loss = loss_sum / max(count, 1)
    accuracy = correct / len(data.eval) if recipe.data.format == "classification" else None
    return EvalDone(step=step, loss=loss, perplexity=math.exp(min(loss, 50.0)), accuracy=accuracy,
                    examples=len(data.eval))


def check_finite(res, step: int, lr: float, scale_used: float | None) -> None:
    """Stop a run whose loss or gradients stopped being finite. Without loss scaling (fp32, bf16) the first
    such step ends it. fp16 loss scaling skips an overflowing step and halves the scale; a step that
    overflows with the scale already at its floor (1.0) ends it, so at most log2(scale) + 1 steps are
    skipped in a row (17 from the initial 2**16)."""
    scaled = "loss_scale" in res.extra
    if scaled and res.skipped and (scale_used is None or scale_used > 1.0):
        return
    if res.skipped or not math.isfinite(res.loss):
        what = f"the loss became {res.loss}" if not math.isfinite(res.loss) else "the gradients became non-finite"
        floor = " (fp16: it overflowed with the loss scale already at its floor, 1.0)" if scaled else ""
        raise TrainingDiverged(f"{what} at step {step}{floor}: lower method.lr (now {lr:g}) or use "
                               "float32/bfloat16")


class StopRequests:
    """Ctrl-C / SIGTERM during the loop: the first asks the loop to stop after the current step (and write
    a checkpoint); a second one interrupts at once, and later ones are ignored while the run shuts down.
    Outside the main thread nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: int | None = None
        self.interrupted = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum
        elif not self.interrupted:
            self.interrupted = True
            interrupt()

    def __enter__(self) -> "StopRequests":
        if self.enabled:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---- what the loop is given ---------------------------------------------------------------------------


class OneProcess:
    """The ranks of a single-process run: rank 0 of 1, the main one; the collectives return their input."""

    rank, world = 0, 1
    is_main = True

    def any(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass


class Ranks(Protocol):
    """What the loop asks of the processes of a run (OneProcess, distributed.zo_parallel.Ranks, DeepSpeed's)."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool: ...

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a stop request ends all ranks at one step)."""

    def barrier(self) -> None: ...


class CheckpointWriter(Protocol):
    """train.resume.Checkpointer, or the DeepSpeed entry point's. `save` runs on every rank at the same
    steps; it returns the event to emit (None on a rank that writes nothing)."""

    supported: bool
    last_saved: Path | None

    def record(self, step: int, grads: tuple[float, ...], lr: float) -> None: ...

    def due(self, step: int) -> bool: ...

    def save(self, step: int, *, position: tuple[int, int], first_eval: EvalDone | None,
             last_eval: EvalDone | None, reason: str = "scheduled") -> CheckpointSaved | None: ...


@dataclass(frozen=True)
class Start:
    """Where the loop begins: step 0 of a new run (with an evaluation first, if the recipe asks), or a
    checkpoint's step, data position, evaluations and RNG states (restored just before the first step)."""

    step: int = 0
    position: tuple[int, int] = (0, 0)
    resumed: bool = False
    first_eval: EvalDone | None = None
    last_eval: EvalDone | None = None
    rng: tuple[dict, dict] | None = None
    """(tensors, meta) as train.resume.restore_rng takes them."""


@dataclass
class Loop:
    recipe: Recipe
    data: Datasets
    trainer: object
    """step(step, micro, lr) -> StepOutcome, eval_losses(micro) -> [BatchLoss]."""
    checkpoints: CheckpointWriter
    sinks: Sinks
    device: torch.device
    steps: int
    started: RunStarted
    resume_hint: str
    finish: Callable[[Sinks, tuple[int, int]], Path]
    """After the last step and the final evaluation, given the sinks and the data position: write the final
    model, return its folder."""
    t0: float
    """perf_counter() when the run began (RunFinished.wall_time_s)."""
    ranks: Ranks = OneProcess()


# ---- the loop -----------------------------------------------------------------------------------------


def _evaluate(loop: Loop, step: int) -> EvalDone | None:
    if loop.data.eval:  # an evaluation can take as long as many steps: the dashboard says it is evaluating
        loop.sinks.emit(EvalStarted(step=step, examples=len(loop.data.eval)))
    return evaluate(loop.trainer, loop.data, loop.recipe, loop.device, step=step)


def _step(loop: Loop, stream: MicroBatches, step: int, scale_used: float | None):
    """One training step: its micro-batches, the trainer's step, the checks, the StepDone event."""
    m, device = loop.recipe.method, loop.device
    micro = [next(stream) for _ in range(loop.recipe.training.grad_accum)]
    lr = lr_at(step, peak_lr=m.lr, total_steps=loop.steps, warmup_steps=m.warmup_steps, schedule=m.schedule)
    reset_device_peak(device)
    began = time.perf_counter()
    res = loop.trainer.step(step, micro, lr)
    synchronize_device(device)
    elapsed = time.perf_counter() - began
    crash_point("step", step)
    check_finite(res, step, m.lr, scale_used)
    loop.checkpoints.record(step, res.projected_grads, lr if res.applied_lr is None else res.applied_lr)
    # tokens: the step's input tokens (padding excluded), what throughput is measured in;
    # target_tokens: those the loss is over (answers, label words).
    tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro))
    extra = {"target_tokens": res.tokens, **res.extra}
    peak = device_peak_reserved_bytes(device)
    if peak is not None:
        extra["device_peak_reserved_bytes"] = peak
    if "wait_fetch_s" in extra:  # compute: the rest of the step, when the lane was not blocked
        extra["compute_s"] = max(0.0, elapsed - extra["wait_fetch_s"] - extra["wait_ssd_s"])
    loop.sinks.emit(StepDone(step=step, loss=res.loss, lr=lr, tokens=tokens, step_time_s=elapsed,
                             extra=extra, spans=res.spans, started_s=began))
    return res


def run_loop(loop: Loop, start: Start) -> RunFinished:
    """Emit RunStarted, then run steps start.step + 1 .. loop.steps, evaluating and checkpointing on the
    recipe's cadence; a stop request (on any rank) checkpoints and ends the run as an interrupt."""
    t, sinks, ranks = loop.recipe.training, loop.sinks, loop.ranks
    sinks.emit(loop.started)
    if not start.resumed:
        first_eval = last_eval = _evaluate(loop, step=0) if t.eval_before else None
        if first_eval:
            sinks.emit(first_eval)
    else:
        first_eval, last_eval = start.first_eval, start.last_eval
    stream = MicroBatches(loop.data, loop.recipe, loop.device, start.position)
    if start.rng is not None:
        restore_rng(*start.rng)
    scale_used: float | None = None  # fp16: the loss scale the current step ran with
    with StopRequests(t.checkpoint_on_interrupt and loop.checkpoints.supported) as stop:
        for step in range(start.step + 1, loop.steps + 1):
            scale_used = _step(loop, stream, step, scale_used).extra.get("loss_scale")
            if t.eval_every and step % t.eval_every == 0 and step != loop.steps:
                last_eval = _evaluate(loop, step=step) or last_eval
                if last_eval and last_eval.step == step:
                    sinks.emit(last_eval)
            stopping = ranks.any(stop.requested is not None)  # one decision for every rank
            # The last step needs no scheduled checkpoint: the final model is saved right after.
            if (loop.checkpoints.due(step) and step != loop.steps) or stopping:
                saved = loop.checkpoints.save(step, position=stream.position, first_eval=first_eval,
                                              last_eval=last_eval, reason="interrupt" if stopping else "scheduled")
                if saved is not None:
                    sinks.emit(saved)
            if stopping:
                ranks.barrier()
                sinks.emit(RunInterrupted(step=step, checkpoint=str(loop.checkpoints.last_saved),
                                          resume_hint=loop.resume_hint))
                stop.interrupted = True
                interrupt()
    last_eval = _evaluate(loop, step=loop.steps)
    if last_eval:
        sinks.emit(last_eval)
    model_dir = loop.finish(sinks, stream.position)
    finished = RunFinished(steps=loop.steps, wall_time_s=time.perf_counter() - loop.t0, model_dir=str(model_dir),
                           first_eval=first_eval, last_eval=last_eval)
    sinks.emit(finished)
    return finished
