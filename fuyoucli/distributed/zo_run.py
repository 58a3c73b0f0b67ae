"""The data-parallel zeroth-order run: one process per rank, the same loop as train/run.py.

Run stage for `fuyou finetune RECIPE --nproc N` (or `torchrun ... -m fuyoucli.distributed.zo_run`):
each rank loads the recipe, the data (every rank draws the same seeded micro-batches) and the whole
model, steps with zo_parallel, and rank 0 alone writes metrics.jsonl, checkpoints (the in-memory zo2
format: a single-process run resumes them and the reverse) and the final model. Never imports rich.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from fuyoucli.distributed.launch import check_data_parallel_recipe
from fuyoucli.errors import FuyouError
from fuyoucli.recipe import Recipe


def init_ranks(backend: str = "gloo"):
    """Join the group described by the torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    import torch.distributed as dist

    from fuyoucli.distributed.zo_parallel import Ranks

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timedelta(minutes=int(os.environ.get("FUYOU_DIST_TIMEOUT_MIN", "30"))))
    return Ranks.current()


def _device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def finetune_data_parallel(recipe: Recipe, ranks, sinks: list | None = None, *, overwrite: bool = False,
                           resume: str | bool | None = None, recipe_path: str | None = None):
    """Run a zo2 recipe on this rank of `ranks`. Returns RunFinished (on every rank)."""
    from fuyoucli.checkpoint import checkpoint_root, clean_unfinished, save_final_model
    from fuyoucli.distributed.zo_parallel import DataParallelZOTrainer
    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.telemetry.events import RunFinished, RunInterrupted, RunStarted, Sinks, StepDone
    from fuyoucli.telemetry.jsonl import JsonlSink
    from fuyoucli.train import resume as ckpts
    from fuyoucli.train.data import build_datasets
    from fuyoucli.train.planning import plan_for_run
    from fuyoucli.train.preflight import check_output_dir
    from fuyoucli.train.run import (
        MicroBatches, StopRequests, TrainingDiverged, check_recipe_for_method, evaluate, prepare_output_dir, total_steps,
    )
    from fuyoucli.train.lr_schedule import lr_at
    from fuyoucli.train.trainers import streams

    check_recipe_for_method(recipe)
    check_data_parallel_recipe(recipe, ranks.world)
    lead = ranks.rank == 0
    out_dir = Path(recipe.training.output_dir)
    t0 = time.perf_counter()
    device = _device(int(os.environ.get("LOCAL_RANK", ranks.rank)))
    seed = recipe.training.seed
    torch.manual_seed(seed)
    ckpt = None
    if resume:
        ckpt = ckpts.open_for_resume(recipe, resume)
    elif lead:
        check_output_dir(out_dir, overwrite=overwrite, resuming=False)

    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=seed, head=recipe.model.head)
    notes = [f"data: {n}" for n in data.notes]
    num_labels = len(data.label_names) or None
    # Rank 0 plans first: on a machine without a saved profile it measures one, the others then read it.
    plan = None
    for turn in (0, 1):
        if (turn == 0) == lead:
            plan = ckpts.saved_plan(ckpt, recipe) if ckpt is not None else \
                plan_for_run(recipe, num_labels=num_labels, note=notes.append if lead else (lambda s: None))
        ranks.barrier()
    if streams(plan):
        raise FuyouError("the data-parallel zo2 path holds the whole model on every rank, and the plan streams "
                         "layers from host memory or SSD; set offload.mode: in_memory, or run one process")
    if ckpt is None and lead:
        prepare_output_dir(out_dir, overwrite)
        clean_unfinished(checkpoint_root(out_dir))
    ranks.barrier()
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=num_labels, device=device)
    steps = total_steps(recipe, len(data.train))
    params = list(model.parameters())
    m = recipe.method
    start = ckpt.step if ckpt is not None else 0
    all_sinks = Sinks([JsonlSink(out_dir / "metrics.jsonl", keep_through_step=start if ckpt else None),
                       *(sinks or [])] if lead else [])
    home = getattr(torch, plan.home_dtype) if plan is not None else torch.float32
    trainer = DataParallelZOTrainer(model, recipe, data, ranks, home_dtype=home)
    try:
        checkpointer = ckpts.Checkpointer(recipe, plan, trainer, total_steps=steps, device=device)
        if ckpt is not None:
            ledger = ckpts.restore_trainer(trainer, ckpt)
            checkpointer.resumed(ckpt, ledger)
            notes.append(f"resumed from {ckpt.path} (step {start} of {steps})")
        all_sinks.emit(RunStarted(
            name=recipe.name, method=m.name + (" + lora" if recipe.peft.type == "lora" else ""),
            model=recipe.model.path, device=f"{device} x {ranks.world} ranks", offload=trainer.where,
            total_steps=steps, trainable_params=sum(p.numel() for p in params if p.requires_grad),
            total_params=sum(p.numel() for p in params), train_examples=len(data.train),
            eval_examples=len(data.eval), output_dir=str(out_dir), notes=tuple(notes), start_step=start))
        if ckpt is None:
            first_eval = last_eval = (evaluate(trainer, data, recipe, device, step=0)
                                      if recipe.training.eval_before else None)
            if first_eval:
                all_sinks.emit(first_eval)
            stream = MicroBatches(data, recipe, device)
        else:
            first_eval, last_eval = ckpts.eval_from(ckpt.state.get("first_eval")), ckpts.eval_from(ckpt.state.get("last_eval"))
            stream = MicroBatches(data, recipe, device, (ckpt.state["data"]["epoch"], ckpt.state["data"]["index"]))
            ckpts.restore_rng(ckpt.run_tensors, ckpt.state.get("rng", {}))
        eval_every = recipe.training.eval_every
        with StopRequests(recipe.training.checkpoint_on_interrupt) as stop:
            for step in range(start + 1, steps + 1):
                # Every rank draws the step's micro-batches (cheap: tokenized already) and evaluates its share.
                micro = [next(stream) for _ in range(recipe.training.grad_accum)]
                lr = lr_at(step, peak_lr=m.lr, total_steps=steps, warmup_steps=m.warmup_steps, schedule=m.schedule)
                began = time.perf_counter()
                res = trainer.step(step, micro, lr)
                elapsed = time.perf_counter() - began
                if not torch.isfinite(torch.tensor(res.loss)):
                    raise TrainingDiverged(f"the loss became {res.loss} at step {step}: lower method.lr (now {m.lr:g})")
                checkpointer.record(step, res.projected_grads, lr if getattr(res, "applied_lr", None) is None else res.applied_lr)
                tokens = int(sum(int(mb["attention_mask"].sum()) for mb in micro))
                all_sinks.emit(StepDone(step=step, loss=res.loss, lr=lr, tokens=tokens, step_time_s=elapsed,
                                        extra={"target_tokens": res.tokens, **res.extra}, started_s=began))
                if eval_every and step % eval_every == 0 and step != steps:
                    last_eval = evaluate(trainer, data, recipe, device, step=step) or last_eval
                    if last_eval and last_eval.step == step:
                        all_sinks.emit(last_eval)
                # One decision for all ranks: a Ctrl-C seen by one rank stops every rank after this step.
                stopping = ranks.any(stop.requested is not None)
                if lead and ((checkpointer.due(step) and step != steps) or stopping):
                    all_sinks.emit(checkpointer.save(step, position=stream.position, first_eval=first_eval,
                                                     last_eval=last_eval,
                                                     reason="interrupt" if stopping else "scheduled"))
                if stopping:
                    ranks.barrier()
                    all_sinks.emit(RunInterrupted(step=step, checkpoint=str(checkpointer.last_saved),
                                                  resume_hint=f"fuyou finetune {recipe_path or 'RECIPE'} "
                                                              f"--nproc {ranks.world} --resume"))
                    raise KeyboardInterrupt
        last_eval = evaluate(trainer, data, recipe, device, step=steps)
        if last_eval:
            all_sinks.emit(last_eval)
        model_dir = out_dir / "model"
        if lead:
            save_final_model(model, tokenizer, model_dir, recipe=recipe)
        ranks.barrier()
        finished = RunFinished(steps=steps, wall_time_s=time.perf_counter() - t0, model_dir=str(model_dir),
                               first_eval=first_eval, last_eval=last_eval)
        all_sinks.emit(finished)
        return finished
    finally:
        all_sinks.close()


# ---- one rank's process: `python -m fuyoucli.distributed.zo_run RECIPE ...` (what --nproc and torchrun start)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuyoucli.distributed.zo_run",
                                description="One rank of a data-parallel zo2 run (torchrun-style environment).")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], dest="set_")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", nargs="?", const="newest", default=None)
    p.add_argument("--display", choices=("plain", "quiet", "json"), default="plain")
    return p


def _sinks(recipe: Recipe, display: str) -> list:
    if display == "json":
        from fuyoucli.telemetry.jsonl import JsonLogSink

        return [JsonLogSink(sys.stdout)]
    from fuyoucli.telemetry.console import ConsoleSink

    return [ConsoleSink(quiet=display == "quiet", log_every=recipe.training.log_every)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ and world > 1:
        # Ranks on one machine share its cores (torchrun sets 1; fuyou's launcher sets cores / ranks).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    who = "" if rank == 0 else f"rank {rank}: "
    try:
        from fuyoucli.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.set_)
        ranks = init_ranks()
        resume = None if args.resume is None else (True if args.resume == "newest" else args.resume)
        command = args.recipe + "".join(f" --set {s}" for s in args.set_)
        finetune_data_parallel(recipe, ranks, _sinks(recipe, args.display) if rank == 0 else [],
                               overwrite=args.overwrite, resume=resume, recipe_path=command)
    except KeyboardInterrupt:
        if rank == 0:
            print("fuyou: interrupted", file=sys.stderr)
        return 130
    except FuyouError as e:
        if os.environ.get("FUYOU_DEBUG", "") not in ("", "0"):
            raise
        print(f"fuyou: {who}error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
