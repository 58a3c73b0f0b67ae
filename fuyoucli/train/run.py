"""The single-process training run: recipe in, metrics.jsonl, checkpoints and a saved model out.

Composes the stages: check the folders and the checkpoint -> load the data -> plan and preflight ->
load the model -> build the step function (zo2 or adamw) and its checkpoints -> the shared loop
(train/loop.py: step, evaluate, emit events, checkpoint) -> save. A run can continue from a checkpoint
exactly (train/resume.py). The data-parallel entry (distributed/zo_run.py) reuses the public steps
here. Emits telemetry events only; never imports rich.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fuyoucli.checkpoint import (Checkpoint, CheckpointError, checkpoint_root, clean_unfinished, list_checkpoints,
                                 remove_leftovers, remove_stale_swap, save_final_model)
from fuyoucli.engine.lanes import cap_device_memory, compute_device, lanes_choice
from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.folder_lock import LOCK_FILE, folder_lock, holds_only_lock
from fuyoucli.model.inventory import inventory
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import Recipe
from fuyoucli.telemetry.events import RunFinished, RunStarted, Sink, Sinks
from fuyoucli.telemetry.jsonl import JsonlSink
from fuyoucli.train import resume as ckpts
from fuyoucli.train.data import Datasets, build_datasets
from fuyoucli.train.loop import Loop, Start, run_loop, total_steps
from fuyoucli.train.planning import plan_for_run
from fuyoucli.train.preflight import check_model_files, check_output_dir, check_output_writable, preflight
from fuyoucli.train.trainers import build_trainer, streamed_layers, streams


def check_recipe_for_method(recipe: Recipe) -> None:
    if recipe.method.name == "zo2" and recipe.peft.type == "lora" and recipe.peft.dropout > 0:
        raise RecipeError("peft.dropout must be 0 with method zo2: both perturbed forward passes must compute "
                          "the same function (set peft.dropout: 0)")


def prepare_output_dir(path: Path, overwrite: bool) -> None:
    """Make the output folder of a new run (checked already, by check_output_dir); --overwrite first clears
    what the run it replaces left."""
    if overwrite:
        # The old run's checkpoints and model must not be mistaken for this run's (by --resume, by a reader).
        import shutil

        shutil.rmtree(checkpoint_root(path), ignore_errors=True)
        shutil.rmtree(path / "model", ignore_errors=True)
        shutil.rmtree(path / "tensorboard", ignore_errors=True)  # training.report_to's event files
        (path / "report.png").unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)


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
        if p.name == "tensorboard" and p.is_dir():  # written from the run's start, with metrics.jsonl
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
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
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


def check_output_folder(out_dir: Path, *, overwrite: bool, resume, notes: list[str]) -> None:
    """With the output folder locked: forget what a start that completed no step left there, and refuse a
    folder that holds another run (unless --overwrite or --resume)."""
    if not resume and not overwrite and _forget_unstarted(out_dir):
        notes.append(f"removed what an earlier start that completed no step left in {out_dir}")
    if not holds_only_lock(out_dir):
        check_output_dir(out_dir, overwrite=overwrite, resuming=bool(resume))


def open_inputs(recipe: Recipe, resume, *, allow_data_change: bool,
                notes: list[str]) -> tuple[Checkpoint | None, list[dict]]:
    """The model files (a cut-short one is found from its headers in milliseconds: before the planner, which
    may first profile this machine for a minute), the data files' fingerprint, and the checkpoint --resume
    names, verified against this recipe and data. Returns (checkpoint or None, data fingerprint)."""
    check_model_files(recipe.model.path)
    data_files = ckpts.data_fingerprint(recipe)
    ckpt = None
    if resume:
        ckpt = ckpts.open_for_resume(recipe, resume, data_files=data_files, allow_data_change=allow_data_change,
                                     note=notes.append)
    return ckpt, data_files


def load_data(recipe: Recipe, notes: list[str]):
    """(tokenizer, datasets, label count or None). Tokenized first (cheap), so that the label count is known
    when a classification head is built."""
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=recipe.training.seed, head=recipe.model.head)
    notes += [f"data: {n}" for n in data.notes]
    return tokenizer, data, len(data.label_names) or None


def _clean_folders(out_dir: Path, *, overwrite: bool, ckpt, plan: Plan | None,
                   notes: list[str]) -> None:
    """Make a new run's output folder; remove what a killed run left (unfinished checkpoints, a half-written
    final model, swap files)."""
    if ckpt is None:
        prepare_output_dir(out_dir, overwrite)
    clean_unfinished(checkpoint_root(out_dir))
    for stale in remove_leftovers(out_dir, "model"):
        notes.append(f"removed {stale}, the final model a killed run was writing")
    if plan is not None:
        for stale in remove_stale_swap(plan.swap_dir):
            notes.append(f"removed {stale}, swap files of a run that was killed")


def resume_trainer(recipe: Recipe, trainer, checkpointer: ckpts.Checkpointer, ckpt: Checkpoint | None, steps: int,
                   notes: list[str]) -> Start:
    """Load the checkpoint into the trainer and say where the loop starts; for a new run, refuse checkpoints
    the trainer cannot write."""
    if ckpt is None:
        if (recipe.training.checkpoint_every or recipe.training.checkpoint_minutes) and not checkpointer.supported:
            raise FuyouError(f"checkpoints are not supported yet for this trainer ({trainer.where}); "
                             "set training.checkpoint_every: 0 and training.checkpoint_minutes: 0")
        return Start()
    if not checkpointer.supported:
        raise FuyouError(f"--resume is not supported yet for this trainer ({trainer.where})")
    try:
        ledger = ckpts.restore_trainer(trainer, ckpt)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run's trainer ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); resume from another "
                              "checkpoint") from e
    checkpointer.resumed(ckpt, ledger)
    notes.append(f"resumed from {ckpt.path} (step {ckpt.step} of {steps}"
                 + (f", {len(ledger)} ledger steps replayed" if ledger else "") + ")")
    st = ckpt.state
    return Start(step=ckpt.step, position=(st["data"]["epoch"], st["data"]["index"]), resumed=True,
                 first_eval=ckpts.eval_from(st.get("first_eval")), last_eval=ckpts.eval_from(st.get("last_eval")),
                 rng=(ckpt.run_tensors, st.get("rng", {})))


def _run_started(recipe: Recipe, plan: Plan | None, trainer, inv, data: Datasets, *, device: torch.device,
                 steps: int, start: int, notes: list[str]) -> RunStarted:
    offload = trainer.where
    if plan is not None:
        bottleneck = plan.times.bottleneck or "none"
        if bottleneck == "gpu" and plan.compute_device == "cpu":
            bottleneck = "compute (cpu)"
        step_s = plan.times.step_s
        planned_s = f"{step_s:.2f} s" if step_s >= 0.1 else f"{step_s * 1000:.1f} ms"
        offload += f"; planned {planned_s}/step, bottleneck {bottleneck}" if step_s else ""
        notes += [f"plan: {n}" for n in plan.notes]
    # Parameter counts from the inventory, not the model: a streamed layer loads lazily and holds empty
    # parameters until then.
    return RunStarted(
        name=recipe.name, method=recipe.method.name + (" + lora" if recipe.peft.type == "lora" else "")
        + (f" over a {recipe.model.quantization} base" if recipe.model.quantization != "none" else ""),
        model=recipe.model.path, device=str(device), offload=offload, total_steps=steps,
        trainable_params=inv.trainable_params, total_params=inv.params,
        train_examples=len(data.train), eval_examples=len(data.eval), output_dir=str(Path(recipe.training.output_dir)),
        notes=tuple(notes), start_step=start, planned=_planned(plan),
    )


def _finetune(recipe: Recipe, sinks: list[Sink] | None, out_dir: Path, *, overwrite: bool, plan: Plan | None | str,
              resume: str | Path | bool | None, recipe_path: str | None, allow_data_change: bool) -> RunFinished:
    notes: list[str] = []
    check_output_folder(out_dir, overwrite=overwrite, resume=resume, notes=notes)
    ckpt, data_files = open_inputs(recipe, resume, allow_data_change=allow_data_change, notes=notes)
    if ckpt is not None and plan == "auto":
        plan = ckpts.saved_plan(ckpt, recipe)
    t0 = time.perf_counter()
    device = compute_device()
    lanes_choice(device)  # a bad FUYOU_LANES is one line before anything is loaded or written
    seed = recipe.training.seed
    torch.manual_seed(seed)
    tokenizer, data, num_labels = load_data(recipe, notes)
    if plan == "auto":
        plan = plan_for_run(recipe, num_labels=num_labels, note=notes.append)
    # Every check that can fail before a weight loads or a file is written (the plan is known now).
    inv = inventory(recipe.model, recipe.peft, num_labels=num_labels)
    preflight(recipe, plan, trainable_params=inv.trainable_params, params=inv.params, resuming=ckpt is not None,
              note=notes.append)
    _clean_folders(out_dir, overwrite=overwrite, ckpt=ckpt, plan=plan, notes=notes)
    if recipe.offload.device_memory_limit is not None:
        # The limit is the whole process's device memory (what nvidia-smi shows); the caching allocator
        # gets what the CUDA context the plan counted leaves of it.
        context = plan.device_context_bytes if isinstance(plan, Plan) else 0
        cap_device_memory(device, recipe.offload.device_memory_limit - context)
    # A streamed run loads on the host; the engine moves only resident blocks to the device.
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=num_labels, device="cpu" if streams(plan) else device,
                       streamed_layers=streamed_layers(plan))
    steps = total_steps(recipe, len(data.train))
    all_sinks = Sinks(list(sinks or []))
    trainer = None
    try:
        trainer = build_trainer(model, recipe, data, plan, device)
        checkpointer = ckpts.Checkpointer(recipe, plan, trainer, total_steps=steps, device=device,
                                          data_files=data_files)
        start = resume_trainer(recipe, trainer, checkpointer, ckpt, steps, notes)
        started = _run_started(recipe, plan, trainer, inv, data, device=device, steps=steps, start=start.step,
                               notes=notes)
        # metrics.jsonl is opened (a resumed run's cut to its checkpoint's step) only now that the whole
        # checkpoint has been validated and loaded: a refused one leaves the file as it was.
        all_sinks.sinks.insert(0, JsonlSink(out_dir / "metrics.jsonl", keep_through_step=start.step if ckpt else None))

        def finish(_sinks: Sinks, _position: tuple[int, int]) -> Path:
            trainer.finalize()
            return save_final_model(model, tokenizer, out_dir / "model", recipe=recipe, step=steps)

        return run_loop(Loop(recipe, data, trainer, checkpointer, all_sinks, device, steps, started,
                             resume_hint=f"fuyou finetune {recipe_path or 'RECIPE'} --resume", finish=finish,
                             t0=t0), start)
    finally:
        if trainer is not None:
            trainer.close()
        all_sinks.close()
