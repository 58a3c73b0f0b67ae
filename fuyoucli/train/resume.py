"""Checkpoints of a run and exact resume: what a checkpoint holds, when one is written, how a run continues.

Trainer stage, beside the loop (train/loop.py). A checkpoint is the trainer's state (state_shards /
state_meta), the data position (epoch, index of the next micro-batch: the order is a pure function of
(seed, epoch)), the RNG states (torch CPU/CUDA, Python), the step, the recipe and the plan. For zo2 a
checkpoint can also be a seed ledger: the (step, projected gradients, lr) of every step since the last
full checkpoint, which replays bit-exactly because every z is regenerated from the seed.
Writes files only through fuyoucli/checkpoint.py; never imports rich.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from pathlib import Path

import torch

from fuyoucli.checkpoint import (Checkpoint, CheckpointError, checkpoint_name, checkpoint_root, clean_unfinished,
                                 latest_checkpoint, load_checkpoint, save_checkpoint)
from fuyoucli.engine.lanes import device_rng_states, set_device_rng_states
from fuyoucli.errors import FuyouError
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import Recipe, validate_recipe
from fuyoucli.telemetry.events import CheckpointSaved, EvalDone
from fuyoucli.train.zo import ledger_z_problem

# Recipe fields that may change between a run and its resumption: they change what is logged, evaluated
# or saved, never the training trajectory (evaluation reads the weights without touching them or any RNG).
FREE_ON_RESUME = {
    ("name",), ("training", "log_every"), ("training", "eval_every"), ("training", "eval_batch_size"),
    ("training", "checkpoint_every"), ("training", "checkpoint_minutes"), ("training", "keep_checkpoints"),
    ("training", "checkpoint_on_interrupt"), ("training", "zo_ledger_steps"), ("training", "output_dir"),
    ("offload", "swap_dir"), ("data", "max_eval_examples"),
}


# ---- RNG --------------------------------------------------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    """Global generators a step may read (dropout draws from torch's CPU or CUDA generator)."""
    out = {"rng.torch": torch.get_rng_state()}
    for i, state in enumerate(device_rng_states()):
        out[f"rng.cuda.{i}"] = state
    return out


def rng_meta() -> dict:
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss]}


def restore_rng(tensors: dict, meta: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    set_device_rng_states([tensors[k] for k in cuda])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))


# ---- which checkpoint, and is it this run's ----------------------------------------------------------


def _flatten(doc, prefix=()) -> dict[tuple, object]:
    if isinstance(doc, dict):
        out = {}
        for k, v in doc.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: doc}


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """Fields that differ between the checkpoint's recipe and this one and that would change the run."""
    a, b = _flatten(saved), _flatten(now)
    out = []
    for key in sorted(set(a) | set(b), key=str):
        if any(key[: len(free)] == free for free in FREE_ON_RESUME):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{'.'.join(map(str, key))} ({a.get(key, '<unset>')!r} in the checkpoint, "
                       f"{b.get(key, '<unset>')!r} now)")
    return out


def find_resume_checkpoint(recipe: Recipe, resume: str | Path | bool) -> Path:
    """The folder --resume names, or (no folder given) the newest checkpoint under training.output_dir."""
    if resume is True or resume in ("", "latest"):
        root = checkpoint_root(recipe.training.output_dir)
        clean_unfinished(root)
        found = latest_checkpoint(root)
        if found is None:
            raise CheckpointError(f"nothing to resume: no checkpoint under {root} (the run stopped before its first "
                                  "one, or training.checkpoint_every is 0): start it again without --resume, or "
                                  "pass --resume CHECKPOINT_DIR")
        return found
    path = Path(resume)
    if (path / "checkpoints").is_dir() and not (path / "state.json").exists():  # an output_dir was given
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"nothing to resume: no checkpoint under {path / 'checkpoints'}")
        return found
    return path


def data_fingerprint(recipe: Recipe) -> list[dict]:
    """Size and sha256 of every data file the run reads, taken once per run start and stored in its checkpoints."""
    out = []
    for role, paths in (("train", recipe.data.train), ("eval", recipe.data.eval)):
        for name in paths:
            path = Path(name).expanduser()
            if not path.is_file():
                continue  # a dataset that is not one local file is not fingerprinted
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            out.append({"role": role, "path": str(name), "bytes": path.stat().st_size, "sha256": h.hexdigest()})
    return out


def data_changes(ckpt: Checkpoint, now: list[dict]) -> list[str]:
    """The data files that differ from those the checkpoint's run read (none for a checkpoint without a record)."""
    saved = ckpt.state.get("data_files")
    if not isinstance(saved, list):
        return []
    before = {(d.get("role"), d.get("path")): d for d in saved if isinstance(d, dict)}
    after = {(d["role"], d["path"]): d for d in now}
    out = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key), after.get(key)
        if a is None or b is None or (a.get("bytes"), a.get("sha256")) != (b["bytes"], b["sha256"]):
            what = "is new" if a is None else "is gone" if b is None else \
                f"changed ({a.get('bytes')} -> {b['bytes']} bytes)"
            out.append(f"data.{key[0]} {key[1]} {what}")
    return out


def _check_resume_state(ckpt: Checkpoint) -> None:
    """What a resumed run reads from state.json and run.safetensors, checked before any file is touched."""
    st = ckpt.state

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    data, meta = st.get("data"), st.get("rng", {})
    problem = None
    if not isinstance(data, dict) or not count(data.get("epoch")) or not count(data.get("index")):
        problem = "its data position is missing or malformed"
    elif not count(st.get("total_steps")) or not isinstance(st.get("trainer", {}), dict):
        problem = "its step count or trainer state is malformed"
    elif not isinstance(meta, dict):
        problem = "its RNG state is malformed"
    else:
        try:
            saved_py = random.getstate()
            restore_rng({}, meta)  # Python's generator validates the state it is given
            random.setstate(saved_py)
            torch_state = ckpt.run_tensors.get("rng.torch")
            if torch_state is not None and (torch_state.dtype != torch.uint8
                                            or torch_state.shape != torch.get_rng_state().shape):
                raise ValueError("torch")
            for s, gs, lr in st.get("ledger", []):
                int(s), [float(g) for g in gs], float(lr)
            for key in ("first_eval", "last_eval"):
                eval_from(st.get(key))
        except (TypeError, ValueError, KeyError) as e:
            problem = f"its RNG state, ledger or evaluations are malformed ({type(e).__name__})"
    if problem:
        raise CheckpointError(f"checkpoint {ckpt.path} is damaged: {problem}; resume from an older checkpoint")


def open_for_resume(recipe: Recipe, resume: str | Path | bool, *, data_files: list[dict] | None = None,
                    allow_data_change: bool = False, note=None) -> Checkpoint:
    """Open and verify the checkpoint and check that it belongs to this recipe and (given `data_files`, this
    run's data_fingerprint) to the same data; loads no weights and changes no file."""
    ckpt = load_checkpoint(find_resume_checkpoint(recipe, resume))
    _check_resume_state(ckpt)
    try:
        saved = validate_recipe(ckpt.state.get("recipe") or {}).model_dump(mode="json")
    except FuyouError as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: the recipe it was written with no longer validates: "
                              f"{str(e).splitlines()[0]}") from e
    diff = recipe_differences(saved, recipe.model_dump(mode="json"))
    if diff:
        more = f" and {len(diff) - 2} more" if len(diff) > 2 else ""
        raise CheckpointError(f"checkpoint {ckpt.path} is of a different run: {'; '.join(diff[:2])}{more}; "
                              "resume with the recipe it was written with")
    base = ckpt.state.get("ledger_base")
    if base:
        base_path = ckpt.path.parent / base
        if not base_path.is_dir():
            raise CheckpointError(f"checkpoint {ckpt.path} is a seed ledger over {base}, which is missing; "
                                  "resume from an older full checkpoint")
        _check_resume_state(load_checkpoint(base_path))  # verified now, before any weights load
    changed = data_changes(ckpt, data_files) if data_files is not None else []
    if changed and not allow_data_change:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt.path} was trained on other data: {changed[0]}{more}; restore the "
                              "files, or pass --allow-data-change to continue on the new data")
    for c in changed:
        if note is not None:
            note(f"warning: {c} since the checkpoint (--allow-data-change): the run continues on the new data")
    return ckpt


def saved_plan(ckpt: Checkpoint, recipe: Recipe) -> Plan | None:
    doc = ckpt.state.get("plan")
    if doc is None:
        return None
    plan = Plan.from_dict(doc)
    if recipe.offload.swap_dir != plan.swap_dir and recipe.offload.swap_dir is not None:
        plan = dataclasses.replace(plan, swap_dir=recipe.offload.swap_dir)
    return plan


def restore_trainer(trainer, ckpt: Checkpoint) -> list[tuple[int, list[float], float]]:
    """Load the trainer's state (and replay a seed ledger); returns the ledger entries replayed."""
    meta = ckpt.state.get("trainer", {})
    base = ckpt.state.get("ledger_base")
    ledger = [(int(s), [float(g) for g in gs], float(lr)) for s, gs, lr in ckpt.state.get("ledger", [])]
    problem = ledger_z_problem(ckpt.state, trainer.z_source) if ledger and hasattr(trainer, "z_source") else None
    if problem:  # before any weight loads
        raise CheckpointError(f"checkpoint {ckpt.path} is a seed ledger: {problem}; or resume from the full "
                              f"checkpoint it extends (--resume {ckpt.path.parent / base})")
    source = load_checkpoint(ckpt.path.parent / base, verify=False) if base else ckpt
    trainer.load_state_dict(source.tensors, source.state.get("trainer", meta))
    for step, grads, lr in ledger:
        trainer.replay(step, grads, lr)
    return ledger


def eval_from(doc: dict | None) -> EvalDone | None:
    return EvalDone(**doc) if doc else None


# ---- writing them on a cadence ---------------------------------------------------------------------


class Checkpointer:
    """Decides when a checkpoint is due and writes it (full, or a zo2 seed ledger over the last full one).
    With `writes` False (a data-parallel rank other than the main one, whose weights are the main one's)
    it keeps the books but writes nothing."""

    def __init__(self, recipe: Recipe, plan: Plan | None, trainer, *, total_steps: int, device: torch.device,
                 data_files: list[dict] | None = None, writes: bool = True):
        t = recipe.training
        self.writes = writes
        self.recipe, self.plan, self.trainer = recipe, plan, trainer
        self.data_files = data_files
        self.total_steps, self.device = total_steps, device
        self.root = checkpoint_root(t.output_dir)
        self.every, self.minutes, self.keep = t.checkpoint_every, t.checkpoint_minutes, t.keep_checkpoints
        self.ledger_steps = t.zo_ledger_steps if hasattr(trainer, "replay") else 0
        self.supported = hasattr(trainer, "state_shards") and hasattr(trainer, "load_state_dict")
        self.last_time = time.monotonic()
        self.ledger: list[tuple[int, list[float], float]] = []
        self.base: str | None = None
        self.base_step = 0
        self.last_saved: Path | None = None

    def resumed(self, ckpt: Checkpoint, ledger: list) -> None:
        """Continue the ledger of the checkpoint a run resumed from."""
        base = ckpt.state.get("ledger_base")
        self.base = base or ckpt.path.name
        self.base_step = int(ckpt.state.get("ledger_base_step", ckpt.step)) if base else ckpt.step
        self.ledger = list(ledger)
        self.last_saved = ckpt.path

    def record(self, step: int, grads: tuple[float, ...], lr: float) -> None:
        if self.ledger_steps:
            self.ledger.append((step, list(grads), lr))

    def due(self, step: int) -> bool:
        if not self.supported:
            return False
        if self.every and step % self.every == 0:
            return True
        return bool(self.minutes) and time.monotonic() - self.last_time >= 60 * self.minutes

    def save(self, step: int, *, position: tuple[int, int], first_eval: EvalDone | None,
             last_eval: EvalDone | None, reason: str = "scheduled") -> CheckpointSaved | None:
        if not self.writes:
            return None
        start = time.perf_counter()
        ledger = bool(self.ledger_steps) and self.base is not None and step - self.base_step < self.ledger_steps \
            and (self.root / self.base).is_dir()
        state = {
            "total_steps": self.total_steps,
            "data": {"epoch": position[0], "index": position[1]},
            "trainer": self.trainer.state_meta(),
            "rng": rng_meta(),
            "device": self.device.type,
            # As written (unset fields left out), so that it validates again as a recipe.
            "recipe": self.recipe.model_dump(mode="json", exclude_unset=True),
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "first_eval": dataclasses.asdict(first_eval) if first_eval else None,
            "last_eval": dataclasses.asdict(last_eval) if last_eval else None,
            "created_unix": time.time(),
        }
        if self.data_files is not None:
            state["data_files"] = self.data_files
        if ledger:
            state.update(ledger_base=self.base, ledger_base_step=self.base_step,
                         ledger=[[s, g, lr] for s, g, lr in self.ledger])
            shards: list = []
        else:
            shards = self.trainer.state_shards()
        path, nbytes = save_checkpoint(self.root, step, shards, rng_tensors(), state, keep=self.keep)
        if not ledger:
            self.base, self.base_step, self.ledger = path.name, step, []
        self.last_time = time.monotonic()
        self.last_saved = path
        return CheckpointSaved(step=step, path=str(path), nbytes=nbytes, seconds=time.perf_counter() - start,
                               kind="ledger" if ledger else "full", reason=reason)
