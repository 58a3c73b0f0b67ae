"""The data-parallel zeroth-order run: one process per rank, the loop of train/loop.py over these ranks.

Run stage for `fuyou finetune RECIPE --nproc N` (or `torchrun ... -m fuyoucli.distributed.zo_run`):
each rank loads the recipe, the data (every rank draws the same seeded micro-batches) and the whole
model, steps with zo_parallel, and rank 0 alone holds the output folder's lock and writes metrics.jsonl,
checkpoints (the in-memory zo2 format: a single-process run resumes them and the reverse) and the final
model. Never imports rich.
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


def finetune_data_parallel(recipe: Recipe, ranks, sinks: list | None = None, *, overwrite: bool = False,
                           resume: str | bool | None = None, recipe_path: str | None = None,
                           allow_data_change: bool = False):
    """Run a zo2 recipe on this rank of `ranks`. Returns RunFinished (on every rank). The main rank holds
    the output folder's lock for the whole run, as a single-process run does."""
    from fuyoucli.folder_lock import folder_lock
    from fuyoucli.train.preflight import check_output_writable
    from fuyoucli.train.run import check_recipe_for_method

    check_recipe_for_method(recipe)
    check_data_parallel_recipe(recipe, ranks.world)
    out_dir = Path(recipe.training.output_dir)
    args = dict(overwrite=overwrite, resume=resume, recipe_path=recipe_path, allow_data_change=allow_data_change)
    if not ranks.is_main:
        return _run_rank(recipe, ranks, [], out_dir, **args)
    check_output_writable(out_dir)
    with folder_lock(out_dir, what="training.output_dir"):
        return _run_rank(recipe, ranks, list(sinks or []), out_dir, **args)


def _plan_in_turns(recipe: Recipe, ranks, ckpt, num_labels: int | None, notes: list[str]):
    """Rank 0 plans first: on a machine without a saved profile it measures one, the others then read it."""
    from fuyoucli.train import resume as ckpts
    from fuyoucli.train.planning import plan_for_run

    plan = None
    for turn in (0, 1):
        if (turn == 0) == ranks.is_main:
            plan = ckpts.saved_plan(ckpt, recipe) if ckpt is not None else \
                plan_for_run(recipe, num_labels=num_labels, note=notes.append if ranks.is_main else (lambda s: None))
        ranks.barrier()
    return plan


def _run_rank(recipe: Recipe, ranks, sinks: list, out_dir: Path, *, overwrite: bool, resume: str | bool | None,
              recipe_path: str | None, allow_data_change: bool):
    from fuyoucli.checkpoint import checkpoint_root, clean_unfinished, save_final_model
    from fuyoucli.distributed.zo_parallel import DataParallelZOTrainer
    from fuyoucli.engine.lanes import bind_local_device
    from fuyoucli.model.loading import load_model
    from fuyoucli.telemetry.events import RunStarted, Sinks
    from fuyoucli.telemetry.jsonl import JsonlSink
    from fuyoucli.train import resume as ckpts
    from fuyoucli.train.loop import Loop, run_loop, total_steps
    from fuyoucli.train.run import check_output_folder, load_data, open_inputs, prepare_output_dir, resume_trainer
    from fuyoucli.train.trainers import streams

    notes: list[str] = []
    if ranks.is_main:
        check_output_folder(out_dir, overwrite=overwrite, resume=resume, notes=notes)
    t0 = time.perf_counter()
    device = bind_local_device(int(os.environ.get("LOCAL_RANK", ranks.rank)))
    seed = recipe.training.seed
    torch.manual_seed(seed)
    ckpt, data_files = open_inputs(recipe, resume, allow_data_change=allow_data_change,
                                   notes=notes if ranks.is_main else [])
    tokenizer, data, num_labels = load_data(recipe, notes)
    plan = _plan_in_turns(recipe, ranks, ckpt, num_labels, notes)
    if streams(plan):
        raise FuyouError("the data-parallel zo2 path holds the whole model on every rank, and the plan streams "
                         "layers from host memory or SSD; set offload.mode: in_memory, or run one process")
    if ckpt is None and ranks.is_main:
        prepare_output_dir(out_dir, overwrite)
        clean_unfinished(checkpoint_root(out_dir))
    ranks.barrier()
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=num_labels, device=device)
    steps = total_steps(recipe, len(data.train))
    params = list(model.parameters())
    all_sinks = Sinks(sinks)
    from fuyoucli.train.trainers import ZOHome

    trainer = DataParallelZOTrainer(model, recipe, data, ranks, ZOHome.of(recipe, plan))
    try:
        checkpointer = ckpts.Checkpointer(recipe, plan, trainer, total_steps=steps, device=device,
                                          data_files=data_files, writes=ranks.is_main)
        start = resume_trainer(recipe, trainer, checkpointer, ckpt, steps, notes)
        started = RunStarted(
            name=recipe.name, method=recipe.method.name + (" + lora" if recipe.peft.type == "lora" else ""),
            model=recipe.model.path, device=f"{device} x {ranks.world} ranks", offload=trainer.where,
            total_steps=steps, trainable_params=sum(p.numel() for p in params if p.requires_grad),
            total_params=sum(p.numel() for p in params), train_examples=len(data.train),
            eval_examples=len(data.eval), output_dir=str(out_dir), notes=tuple(notes), start_step=start.step)
        if ranks.is_main:  # opened once the checkpoint is loaded: a refused one leaves the file as it was
            all_sinks.sinks.insert(0, JsonlSink(out_dir / "metrics.jsonl",
                                                keep_through_step=start.step if ckpt else None))

        def finish(_sinks, _position) -> Path:
            model_dir = out_dir / "model"
            if ranks.is_main:
                save_final_model(model, tokenizer, model_dir, recipe=recipe)
            ranks.barrier()
            return model_dir

        hint = f"fuyou finetune {recipe_path or 'RECIPE'} --nproc {ranks.world} --resume"
        return run_loop(Loop(recipe, data, trainer, checkpointer, all_sinks, device, steps, started, resume_hint=hint,
                             finish=finish, t0=t0, ranks=ranks), start)
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
    p.add_argument("--allow-data-change", action="store_true")
    p.add_argument("--display", choices=("plain", "quiet", "json"), default="plain")
    return p


def make_sinks(recipe: Recipe, display: str) -> list:
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
        finetune_data_parallel(recipe, ranks, make_sinks(recipe, args.display) if rank == 0 else [],
                               overwrite=args.overwrite, resume=resume, recipe_path=command,
                               allow_data_change=args.allow_data_change)
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
