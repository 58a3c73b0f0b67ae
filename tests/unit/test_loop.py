"""The shared run loop (train/loop.py) over a stand-in trainer: the events and their order, the checkpoint
cadence, a stop request seen on any rank, a non-finite loss, and a resumed start. No model is loaded."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from fuyoucli.recipe import validate_recipe
from fuyoucli.telemetry.events import (CheckpointSaved, EvalDone, EvalStarted, RunFinished, RunInterrupted,
                                       RunStarted, Sinks, StepDone)
from fuyoucli.train.data import Datasets, Example
from fuyoucli.train.loop import Loop, OneProcess, Start, TrainingDiverged, run_loop
from fuyoucli.train.losses import BatchLoss
from fuyoucli.train.trainers import StepOutcome
from tiny import EventList

CPU = torch.device("cpu")


class Trainer:
    def __init__(self, losses=None):
        self.steps: list[tuple[int, int, float]] = []
        self.losses = losses or {}

    def step(self, step, micro, lr):
        self.steps.append((step, len(micro), lr))
        tokens = sum(int(mb["attention_mask"].sum()) for mb in micro)
        return StepOutcome(self.losses.get(step, 1.0 / step), tokens=tokens)

    def eval_losses(self, micro):
        return [BatchLoss(torch.tensor(2.0 * mb["input_ids"].shape[0]), mb["input_ids"].shape[0]) for mb in micro]


class Writer:
    supported = True

    def __init__(self):
        self.last_saved: Path | None = None
        self.saved: list[tuple[int, tuple[int, int], str]] = []

    def record(self, step, grads, lr):
        pass

    def due(self, step):
        return step % 2 == 0

    def save(self, step, *, position, first_eval, last_eval, reason="scheduled"):
        self.saved.append((step, position, reason))
        self.last_saved = Path(f"ckpt-{step}")
        return CheckpointSaved(step=step, path=str(self.last_saved), nbytes=0, seconds=0.0, kind="full", reason=reason)


class StopOnAnotherRank(OneProcess):
    """Rank 0 of a run where another rank was asked to stop at step `at`."""

    def __init__(self, at: int):
        self.at, self.calls, self.barriers = at, 0, 0

    def any(self, flag):
        self.calls += 1
        return flag or self.calls >= self.at

    def barrier(self):
        self.barriers += 1


def _setup(tmp_path, trainer, *, steps=4, ranks=None, **training):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text('{"text": "x"}\n')
    recipe = validate_recipe({
        "model": {"path": str(tmp_path / "model")}, "method": {"name": "adamw", "lr": 1e-3},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "training": {"max_steps": steps, "batch_size": 2, "grad_accum": 2, "eval_every": 2,
                     "output_dir": str(tmp_path / "out"), **training}})
    examples = tuple(Example(input_ids=(1, 2, 3)[: 1 + i % 3], labels=(1, 2, 3)[: 1 + i % 3]) for i in range(6))
    data = Datasets(train=examples, eval=examples[:3], label_names=(), label_token_ids=(), pad_token_id=0)
    events, writer, finished_at = EventList(), Writer(), []

    def finish(sinks, position):
        finished_at.append(position)
        return tmp_path / "out" / "model"

    started = RunStarted(name="t", method="adamw", model="m", device="cpu", offload="-", total_steps=steps,
                         trainable_params=1, total_params=1, train_examples=6, eval_examples=3, output_dir="out")
    loop = Loop(recipe, data, trainer, writer, Sinks([events]), CPU, steps, started,
                resume_hint="fuyou finetune R --resume", finish=finish, t0=time.perf_counter(),
                **({"ranks": ranks} if ranks else {}))
    return loop, events, writer, finished_at


def test_one_process_events_cadence_and_finish(tmp_path):
    trainer = Trainer()
    loop, events, writer, finished_at = _setup(tmp_path, trainer)
    done = run_loop(loop, Start())
    kinds = [(type(e).__name__, getattr(e, "step", None)) for e in events.events]
    assert kinds == [("RunStarted", None), ("EvalStarted", 0), ("EvalDone", 0), ("StepDone", 1), ("StepDone", 2),
                     ("EvalStarted", 2), ("EvalDone", 2), ("CheckpointSaved", 2), ("StepDone", 3), ("StepDone", 4),
                     ("EvalStarted", 4), ("EvalDone", 4), ("RunFinished", None)]
    assert [s for s, _, _ in trainer.steps] == [1, 2, 3, 4] and all(n == 2 for _, n, _ in trainer.steps)
    # No scheduled checkpoint at the last step (the final model follows). 6 examples: 3 micro-batches of 2 per
    # epoch; a position is (epoch, next micro-batch), and an epoch rolls over when its end is drawn past.
    assert writer.saved == [(2, (1, 1), "scheduled")]
    assert finished_at == [(2, 2)]
    assert isinstance(done, RunFinished) and done.first_eval.step == 0 and done.last_eval.step == 4
    assert done.last_eval.loss == pytest.approx(2.0)
    step1 = next(e for e in events.events if isinstance(e, StepDone))
    assert step1.extra["target_tokens"] == step1.tokens and "device_peak_reserved_bytes" not in step1.extra


def test_a_stop_request_on_any_rank_checkpoints_and_interrupts(tmp_path):
    ranks = StopOnAnotherRank(at=3)
    loop, events, writer, _ = _setup(tmp_path, Trainer(), steps=10, ranks=ranks)
    with pytest.raises(KeyboardInterrupt):
        run_loop(loop, Start())
    assert writer.saved == [(2, (1, 1), "scheduled"), (3, (1, 3), "interrupt")]
    last = events.events[-1]
    assert isinstance(last, RunInterrupted) and last.step == 3 and last.checkpoint == "ckpt-3"
    assert last.resume_hint == "fuyou finetune R --resume" and ranks.barriers == 1


def test_a_non_finite_loss_ends_the_run(tmp_path):
    loop, events, _, _ = _setup(tmp_path, Trainer({2: math.nan}))
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 2: lower method.lr") as e:
        run_loop(loop, Start())
    assert e.value.exit_code == 4
    assert [getattr(x, "step", None) for x in events.events if isinstance(x, StepDone)] == [1]


def test_a_resumed_start_takes_its_evaluations_and_position(tmp_path):
    trainer = Trainer()
    loop, events, writer, finished_at = _setup(tmp_path, trainer, eval_before=True)
    first = EvalDone(step=0, loss=9.0, perplexity=math.exp(9.0), accuracy=None, examples=3)
    done = run_loop(loop, Start(step=2, position=(1, 2), resumed=True, first_eval=first, last_eval=first))
    assert not any(isinstance(e, (EvalStarted, EvalDone)) and e.step == 0 for e in events.events)
    assert [s for s, _, _ in trainer.steps] == [3, 4] and finished_at == [(2, 3)] and writer.saved == []
    assert done.first_eval is first
