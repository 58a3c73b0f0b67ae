"""The training run: recipe in, metrics.jsonl and a saved model out.

Composes the stages: load model -> build data -> pick the step function (zo2 or adamw) -> loop
(evaluate, step, emit events) -> save. Emits telemetry events only; never imports rich.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from fuyoucli.checkpoint import save_final_model
from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import Recipe
from fuyoucli.telemetry.events import EvalDone, RunFinished, RunStarted, Sink, Sinks, StepDone
from fuyoucli.telemetry.jsonl import JsonlSink
from fuyoucli.train.data import Datasets, batches, build_datasets, collate
from fuyoucli.train.schedule import lr_at
from fuyoucli.train.planning import plan_for_run
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


def micro_batch_stream(data: Datasets, recipe: Recipe, device: torch.device):
    """Endless micro-batches in a seeded order; each epoch reshuffles with (seed, epoch)."""
    t = recipe.training
    epoch = 0
    while True:
        for examples in batches(data.train, t.batch_size, seed=t.seed, epoch=epoch, shuffle=True):
            yield {k: v.to(device) for k, v in collate(examples, data.pad_token_id).items()}
        epoch += 1


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


def check_recipe_for_method(recipe: Recipe) -> None:
    if recipe.method.name == "zo2" and recipe.peft.type == "lora" and recipe.peft.dropout > 0:
        raise RecipeError("peft.dropout must be 0 with method zo2: both perturbed forward passes must compute "
                          "the same function (set peft.dropout: 0)")


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise FuyouError(f"output directory {path} already holds a run; set training.output_dir elsewhere "
                             "or pass --overwrite to replace it")
    path.mkdir(parents=True, exist_ok=True)


def finetune(recipe: Recipe, sinks: list[Sink] | None = None, *, overwrite: bool = False,
             plan: Plan | None | str = "auto") -> RunFinished:
    """Run a recipe. `plan` decides where weights live: "auto" asks the planner (per offload.mode),
    a Plan is taken as given, None runs everything in memory (the reference path)."""
    check_recipe_for_method(recipe)
    out_dir = Path(recipe.training.output_dir)
    prepare_output_dir(out_dir, overwrite)
    t0 = time.perf_counter()
    device = compute_device()
    seed = recipe.training.seed
    torch.manual_seed(seed)

    # Tokenize first (cheap) so that the label count is known when a classification head is built.
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=seed, head=recipe.model.head)
    notes = [f"data: {n}" for n in data.notes]
    if plan == "auto":
        plan = plan_for_run(recipe, num_labels=len(data.label_names) or None, note=notes.append)
    # A streamed run loads on the host; the engine moves only resident blocks to the device.
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=len(data.label_names) or None,
                       device="cpu" if streams(plan) else device,
                       streamed_layers=streamed_layers(plan) if recipe.method.name == "zo2" else None)
    steps = total_steps(recipe, len(data.train))
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    m = recipe.method
    all_sinks = Sinks([JsonlSink(out_dir / "metrics.jsonl"), *(sinks or [])])
    trainer = None
    try:
        trainer = build_trainer(model, recipe, data, plan, device)
        offload = trainer.where
        if plan is not None:
            bottleneck = plan.times.bottleneck or "none"
            if bottleneck == "gpu" and plan.compute_device == "cpu":
                bottleneck = "compute (cpu)"
            offload += f"; planned {plan.times.step_s:.2f} s/step, bottleneck {bottleneck}" if plan.times.step_s else ""
            notes += [f"plan: {n}" for n in plan.notes]
        all_sinks.emit(RunStarted(
            name=recipe.name, method=m.name + (" + lora" if recipe.peft.type == "lora" else ""),
            model=recipe.model.path, device=str(device), offload=offload, total_steps=steps,
            trainable_params=trainable, total_params=total,
            train_examples=len(data.train), eval_examples=len(data.eval), output_dir=str(out_dir), notes=tuple(notes),
        ))
        first_eval = last_eval = evaluate(trainer, data, recipe, device, step=0)
        if first_eval:
            all_sinks.emit(first_eval)
        stream = micro_batch_stream(data, recipe, device)
        eval_every = recipe.training.eval_every
        for step in range(1, steps + 1):
            micro = [next(stream) for _ in range(recipe.training.grad_accum)]
            lr = lr_at(step, peak_lr=m.lr, total_steps=steps, warmup_steps=m.warmup_steps, schedule=m.schedule)
            start = time.perf_counter()
            res = trainer.step(step, micro, lr)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if not math.isfinite(res.loss) and not res.skipped:
                raise TrainingDiverged(f"the loss became {res.loss} at step {step}: lower method.lr "
                                       f"(now {m.lr:g}) or use float32/bfloat16")
            # tokens: the step's input tokens (padding excluded), what throughput is measured in;
            # target_tokens: those the loss is over (answers, label words).
            tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro))
            all_sinks.emit(StepDone(step=step, loss=res.loss, lr=lr, tokens=tokens, step_time_s=elapsed,
                                    extra={"target_tokens": res.tokens, **res.extra}))
            if eval_every and step % eval_every == 0 and step != steps:
                last_eval = evaluate(trainer, data, recipe, device, step=step)
                if last_eval:
                    all_sinks.emit(last_eval)
        last_eval = evaluate(trainer, data, recipe, device, step=steps)
        if last_eval:
            all_sinks.emit(last_eval)
        trainer.finalize()
        model_dir = save_final_model(model, tokenizer, out_dir / "model", recipe=recipe)
        finished = RunFinished(steps=steps, wall_time_s=time.perf_counter() - t0, model_dir=str(model_dir),
                               first_eval=first_eval, last_eval=last_eval)
        all_sinks.emit(finished)
        return finished
    finally:
        if trainer is not None:
            trainer.close()
        all_sinks.close()
