"""The training run: recipe in, metrics.jsonl, checkpoints and a saved model out.

Composes the stages: load model -> build data -> pick the step function (zo2 or adamw) -> loop
(evaluate, step, emit events, checkpoint) -> save. A run can continue from a checkpoint exactly
(train/resume.py). Emits telemetry events only; never imports rich.
"""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from pathlib import Path

import torch

from fuyoucli.checkpoint import (CheckpointError, checkpoint_root, clean_unfinished, crash_point, list_checkpoints,
                                 remove_leftovers, remove_stale_swap, save_final_model)
from fuyoucli.engine.lanes import (cap_device_memory, device_peak_reserved_bytes, lanes_choice, reset_device_peak,
                                   synchronize_device)
from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.folder_lock import LOCK_FILE, folder_lock, holds_only_lock
from fuyoucli.interrupts import interrupt
from fuyoucli.model.inventory import inventory
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import Recipe
from fuyoucli.telemetry.events import (EvalDone, EvalStarted, RunFinished, RunInterrupted, RunStarted, Sink, Sinks,
                                       StepDone)
from fuyoucli.telemetry.jsonl import JsonlSink
from fuyoucli.train.data import Datasets, batches, build_datasets, collate
from fuyoucli.train.lr_schedule import lr_at
from fuyoucli.train.planning import plan_for_run
from fuyoucli.train.preflight import check_model_files, check_output_dir, check_output_writable, preflight
from fuyoucli.train.trainers import build_trainer, streamed_layers, streams


class TrainingDiverged(FuyouError):
    exit_code = 4


def compute_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


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


def check_recipe_for_method(recipe: Recipe) -> None:
    if recipe.method.name == "zo2" and recipe.peft.type == "lora" and recipe.peft.dropout > 0:
        raise RecipeError("peft.dropout must be 0 with method zo2: both perturbed forward passes must compute "
                          "the same function (set peft.dropout: 0)")


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    if path.is_dir() and not holds_only_lock(path):  # a lock file alone is this process's
        check_output_dir(path, overwrite=overwrite, resuming=False)
    if overwrite:
        # The old run's checkpoints and model must not be mistaken for this run's (by --resume, by a reader).
        import shutil

        shutil.rmtree(checkpoint_root(path), ignore_errors=True)
        shutil.rmtree(path / "model", ignore_errors=True)
        (path / "report.png").unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)


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


def _evaluate(sinks: Sinks, trainer, data: Datasets, recipe: Recipe, device, step: int) -> EvalDone | None:
    if data.eval:  # an evaluation can take as long as many steps: the dashboard says it is evaluating
        sinks.emit(EvalStarted(step=step, examples=len(data.eval)))
    return evaluate(trainer, data, recipe, device, step=step)


def _planned(plan: Plan | None) -> dict[str, float]:
    if plan is None or not plan.times.step_s:
        return {}
    t = plan.times
    return {"step_s": t.step_s, "gpu_s": t.gpu_s, "h2d_s": t.h2d_s, "d2h_s": t.d2h_s, "ssd_read_s": t.ssd_read_s,
            "ssd_write_s": t.ssd_write_s, "cpu_optimizer_s": t.cpu_optimizer_s, "tokens_per_s": plan.tokens_per_s,
            "device_bytes": float(plan.memory.device), "pinned_bytes": float(plan.pinned_pool_bytes + plan.memory.pinned)}


def _never_started(out_dir: Path) -> bool:
    """True if out_dir holds only what a start that completed no step leaves (an empty or eval-only
    metrics.jsonl, no checkpoint, no model, interrupted temporaries): such a folder is not a run."""
    from fuyoucli.telemetry.jsonl import read_metrics

    for p in out_dir.iterdir():
        if p.name in (LOCK_FILE, "metrics.jsonl.tmp") or p.name.startswith(".model."):
            continue
        if p.name == "checkpoints" and p.is_dir() and not list_checkpoints(p):
            continue
        if p.name == "metrics.jsonl" and p.is_file():
            try:
                if not any(r.get("kind") == "train" for r in read_metrics(p)):
                    continue
            except (OSError, ValueError):
                pass
        return False
    return True


def _forget_unstarted(out_dir: Path) -> bool:
    """Remove the leftovers of a start that completed no step (see _never_started); True if there were any."""
    import shutil

    if not out_dir.is_dir() or holds_only_lock(out_dir) or not _never_started(out_dir):
        return False
    shutil.rmtree(checkpoint_root(out_dir), ignore_errors=True)
    remove_leftovers(out_dir, "model")
    for name in ("metrics.jsonl", "metrics.jsonl.tmp"):
        (out_dir / name).unlink(missing_ok=True)
    return True


def finetune(recipe: Recipe, sinks: list[Sink] | None = None, *, overwrite: bool = False,
             plan: Plan | None | str = "auto", resume: str | Path | bool | None = None,
             recipe_path: str | None = None, allow_data_change: bool = False) -> RunFinished:
    """Run a recipe. `plan` decides where weights live: "auto" asks the planner (per offload.mode),
    a Plan is taken as given, None runs everything in memory (the reference path). `resume` (True for
    the newest checkpoint under training.output_dir, or a checkpoint folder) continues a run exactly,
    with the plan saved in the checkpoint; a checkpoint of other data files is refused unless
    `allow_data_change`. The output folder is locked for the whole run (fuyoucli/folder_lock.py)."""
    check_recipe_for_method(recipe)
    out_dir = Path(recipe.training.output_dir)
    # Taking the lock creates the folder: first say precisely why it cannot be (a file in the way, a
    # read-only disk). Then the lock comes before every look at the folder's contents, --overwrite's
    # deletions included: a second process must not judge, cut or delete what a live run is writing.
    check_output_writable(out_dir)
    with folder_lock(out_dir, what="training.output_dir"):
        return _finetune(recipe, sinks, out_dir, overwrite=overwrite, plan=plan, resume=resume,
                         recipe_path=recipe_path, allow_data_change=allow_data_change)


def _finetune(recipe: Recipe, sinks: list[Sink] | None, out_dir: Path, *, overwrite: bool, plan: Plan | None | str,
              resume: str | Path | bool | None, recipe_path: str | None, allow_data_change: bool) -> RunFinished:
    from fuyoucli.train import resume as ckpts

    notes: list[str] = []
    if not resume and not overwrite and _forget_unstarted(out_dir):
        notes.append(f"removed what an earlier start that completed no step left in {out_dir}")
    if not holds_only_lock(out_dir):
        check_output_dir(out_dir, overwrite=overwrite, resuming=bool(resume))
    # A cut-short model file is found from its headers in milliseconds: before the planner, which may first
    # profile this machine for a minute.
    check_model_files(recipe.model.path)
    ckpt = None
    data_files = ckpts.data_fingerprint(recipe)
    if resume:
        ckpt = ckpts.open_for_resume(recipe, resume, data_files=data_files, allow_data_change=allow_data_change,
                                     note=notes.append)
        if plan == "auto":
            plan = ckpts.saved_plan(ckpt, recipe)
    t0 = time.perf_counter()
    device = compute_device()
    lanes_choice(device)  # a bad FUYOU_LANES is one line before anything is loaded or written
    seed = recipe.training.seed
    torch.manual_seed(seed)

    # Tokenize first (cheap) so that the label count is known when a classification head is built.
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=seed, head=recipe.model.head)
    notes += [f"data: {n}" for n in data.notes]
    num_labels = len(data.label_names) or None
    if plan == "auto":
        plan = plan_for_run(recipe, num_labels=num_labels, note=notes.append)
    # Every check that can fail before a weight loads or a file is written (the plan is known now).
    inv = inventory(recipe.model, recipe.peft, num_labels=num_labels)
    preflight(recipe, plan, trainable_params=inv.trainable_params, params=inv.params, resuming=ckpt is not None,
              note=notes.append)
    if ckpt is None:
        prepare_output_dir(out_dir, overwrite)
    clean_unfinished(checkpoint_root(out_dir))
    for stale in remove_leftovers(out_dir, "model"):
        notes.append(f"removed {stale}, the final model a killed run was writing")
    if plan is not None:
        for stale in remove_stale_swap(plan.swap_dir):
            notes.append(f"removed {stale}, swap files of a run that was killed")
    if recipe.offload.device_memory_limit is not None:
        cap_device_memory(device, recipe.offload.device_memory_limit)  # the allocator too, not only the plan
    # A streamed run loads on the host; the engine moves only resident blocks to the device.
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=num_labels,
                       device="cpu" if streams(plan) else device,
                       streamed_layers=streamed_layers(plan))
    steps = total_steps(recipe, len(data.train))
    # From the inventory, not the model: a streamed layer loads lazily and holds empty parameters until then.
    trainable, total = inv.trainable_params, inv.params
    m = recipe.method
    start = ckpt.step if ckpt is not None else 0
    all_sinks = Sinks(list(sinks or []))
    trainer = None
    try:
        trainer = build_trainer(model, recipe, data, plan, device)
        checkpointer = ckpts.Checkpointer(recipe, plan, trainer, total_steps=steps, device=device,
                                          data_files=data_files)
        if ckpt is not None:
            if not checkpointer.supported:
                raise FuyouError(f"--resume is not supported yet for this trainer ({trainer.where})")
            try:
                ledger = ckpts.restore_trainer(trainer, ckpt)
            except (KeyError, ValueError, IndexError) as e:
                raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run's trainer ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}); resume from another "
                                      "checkpoint") from e
            checkpointer.resumed(ckpt, ledger)
            notes.append(f"resumed from {ckpt.path} (step {start} of {steps}"
                         + (f", {len(ledger)} ledger steps replayed" if ledger else "") + ")")
        elif (recipe.training.checkpoint_every or recipe.training.checkpoint_minutes) and not checkpointer.supported:
            raise FuyouError(f"checkpoints are not supported yet for this trainer ({trainer.where}); "
                             "set training.checkpoint_every: 0 and training.checkpoint_minutes: 0")
        offload = trainer.where
        if plan is not None:
            bottleneck = plan.times.bottleneck or "none"
            if bottleneck == "gpu" and plan.compute_device == "cpu":
                bottleneck = "compute (cpu)"
            step_s = plan.times.step_s
            planned_s = f"{step_s:.2f} s" if step_s >= 0.1 else f"{step_s * 1000:.1f} ms"
            offload += f"; planned {planned_s}/step, bottleneck {bottleneck}" if step_s else ""
            notes += [f"plan: {n}" for n in plan.notes]
        # metrics.jsonl is opened (a resumed run's cut to its checkpoint's step) only now that the whole
        # checkpoint has been validated and loaded: a refused one leaves the file as it was.
        all_sinks.sinks.insert(0, JsonlSink(out_dir / "metrics.jsonl", keep_through_step=start if ckpt else None))
        all_sinks.emit(RunStarted(
            name=recipe.name, method=m.name + (" + lora" if recipe.peft.type == "lora" else ""),
            model=recipe.model.path, device=str(device), offload=offload, total_steps=steps,
            trainable_params=trainable, total_params=total,
            train_examples=len(data.train), eval_examples=len(data.eval), output_dir=str(out_dir), notes=tuple(notes),
            start_step=start, planned=_planned(plan),
        ))
        if ckpt is None:
            first_eval = last_eval = (_evaluate(all_sinks, trainer, data, recipe, device, step=0)
                                      if recipe.training.eval_before else None)
            if first_eval:
                all_sinks.emit(first_eval)
            stream = MicroBatches(data, recipe, device)
        else:
            first_eval, last_eval = ckpts.eval_from(ckpt.state.get("first_eval")), ckpts.eval_from(ckpt.state.get("last_eval"))
            stream = MicroBatches(data, recipe, device, (ckpt.state["data"]["epoch"], ckpt.state["data"]["index"]))
            ckpts.restore_rng(ckpt.run_tensors, ckpt.state.get("rng", {}))
        eval_every = recipe.training.eval_every
        scale_used: float | None = None  # fp16: the loss scale the current step ran with
        with StopRequests(recipe.training.checkpoint_on_interrupt and checkpointer.supported) as stop:
            for step in range(start + 1, steps + 1):
                micro = [next(stream) for _ in range(recipe.training.grad_accum)]
                lr = lr_at(step, peak_lr=m.lr, total_steps=steps, warmup_steps=m.warmup_steps, schedule=m.schedule)
                reset_device_peak(device)
                began = time.perf_counter()
                res = trainer.step(step, micro, lr)
                synchronize_device(device)
                elapsed = time.perf_counter() - began
                crash_point("step", step)
                check_finite(res, step, m.lr, scale_used)
                scale_used = res.extra.get("loss_scale")
                checkpointer.record(step, res.projected_grads, lr if res.applied_lr is None else res.applied_lr)
                # tokens: the step's input tokens (padding excluded), what throughput is measured in;
                # target_tokens: those the loss is over (answers, label words).
                tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro))
                extra = {"target_tokens": res.tokens, **res.extra}
                peak = device_peak_reserved_bytes(device)
                if peak is not None:
                    extra["device_peak_reserved_bytes"] = peak
                if "wait_fetch_s" in extra:  # compute: the rest of the step, when the lane was not blocked
                    extra["compute_s"] = max(0.0, elapsed - extra["wait_fetch_s"] - extra["wait_ssd_s"])
                all_sinks.emit(StepDone(step=step, loss=res.loss, lr=lr, tokens=tokens, step_time_s=elapsed,
                                        extra=extra, spans=res.spans, started_s=began))
                if eval_every and step % eval_every == 0 and step != steps:
                    last_eval = _evaluate(all_sinks, trainer, data, recipe, device, step=step) or last_eval
                    if last_eval and last_eval.step == step:
                        all_sinks.emit(last_eval)
                # The last step needs no scheduled checkpoint: the final model is saved right after.
                if (checkpointer.due(step) and step != steps) or stop.requested:
                    reason = "interrupt" if stop.requested else "scheduled"
                    all_sinks.emit(checkpointer.save(step, position=stream.position, first_eval=first_eval,
                                                     last_eval=last_eval, reason=reason))
                if stop.requested:
                    all_sinks.emit(RunInterrupted(step=step, checkpoint=str(checkpointer.last_saved),
                                                  resume_hint=f"fuyou finetune {recipe_path or 'RECIPE'} --resume"))
                    stop.interrupted = True
                    interrupt()
        last_eval = _evaluate(all_sinks, trainer, data, recipe, device, step=steps)
        if last_eval:
            all_sinks.emit(last_eval)
        trainer.finalize()
        model_dir = save_final_model(model, tokenizer, out_dir / "model", recipe=recipe, step=steps)
        finished = RunFinished(steps=steps, wall_time_s=time.perf_counter() - t0, model_dir=str(model_dir),
                               first_eval=first_eval, last_eval=last_eval)
        all_sinks.emit(finished)
        return finished
    finally:
        if trainer is not None:
            trainer.close()
        all_sinks.close()
