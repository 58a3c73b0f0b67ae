"""Export a run as a Hugging Face folder: the base model with a checkpoint's or the final model's weights.

After the checkpoint stage. The recipe stored in the checkpoint says how to rebuild the model (path,
dtype, head, LoRA); the checkpoint's param.<name> tensors replace the trainable parameters (a zo2
seed-ledger checkpoint is first replayed on its base, on the device kind it was trained on). Full
fine-tunes become a folder `AutoModelForCausalLM.from_pretrained` loads; LoRA becomes a peft adapter
folder, or with merge=True a full folder with the adapters folded in (a quantized base dequantized into
the model's dtype first: an ordinary 16-bit folder, no quantization config). The source may be a run folder
(its final model), the final model folder, or a checkpoint; the source's run folder and the destination
are locked while the export runs (fuyoucli/folder_lock.py). Never imports rich.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyoucli.checkpoint import (FINAL_INFO, MANIFEST, STATE_FILE, Checkpoint, CheckpointError, atomic_dir, crash_point,
                                 latest_checkpoint, load_checkpoint, remove_leftovers)
from fuyoucli.engine.lanes import cuda_available
from fuyoucli.errors import FuyouError, InputError
from fuyoucli.folder_lock import folder_lock, holds_only_lock
from fuyoucli.recipe import Recipe, validate_recipe

FINAL_RECIPE = "fuyou_recipe.json"


class ExportOntoSource(FuyouError):
    exit_code = 2


@dataclass(frozen=True)
class Source:
    """What `fuyou export` reads: a checkpoint folder, or (final) a finished run's model folder."""

    path: Path
    final: bool


def _is_checkpoint(path: Path) -> bool:
    from fuyoucli.distributed.deepspeed_export import is_deepspeed_checkpoint

    return (path / STATE_FILE).is_file() or (path / MANIFEST).is_file() or is_deepspeed_checkpoint(path)


def _run_folder(path: Path) -> Path | None:
    """The run folder `path` is, or is the final model or a checkpoint of (None: a folder outside any run)."""
    def is_run(p: Path) -> bool:
        return (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()

    for candidate, inside in ((path, True), (path.parent, path.name == "model"),
                              (path.parent.parent, path.parent.name == "checkpoints")):
        if inside and is_run(candidate):
            return candidate
    return None


def resolve_source(path: str | Path) -> Source:
    """A checkpoint folder, a final model folder (OUTPUT_DIR/model), or a run folder (its final model; a run
    that has not finished is refused with the checkpoint to export instead)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path} not found: give a run folder, its model folder or a checkpoint folder")
    if _is_checkpoint(path):
        return Source(path, False)
    if (path / FINAL_RECIPE).is_file():
        return Source(path, True)
    if (path / "model" / FINAL_RECIPE).is_file():
        return Source(path / "model", True)
    if _run_folder(path) == path:
        newest = latest_checkpoint(path / "checkpoints")
        if newest is None:
            raise CheckpointError(f"{path} holds no final model and no checkpoint: the run did not finish; finish "
                                  "it (fuyou finetune RECIPE --resume) before exporting")
        raise CheckpointError(f"{path} holds no final model: the run did not finish; export its newest checkpoint "
                              f"(fuyou export {newest} OUT) or finish it (fuyou finetune RECIPE --resume)")
    raise InputError(f"{path} is not a fuyou run folder, final model folder (OUTPUT_DIR/model) or checkpoint")


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder whose weights an export of `path` reads (see resolve_source)."""
    return resolve_source(path).path


def _refuse_onto_source(source: Path, out_dir: Path, given: Path) -> None:
    # Real paths: a symlink or a "../" must not hide that the destination is the source.
    src, dest = source.resolve(), out_dir.resolve()
    if dest == src or dest in src.parents or src in dest.parents:
        where = "is" if dest == src else "contains" if dest in src.parents else "is inside"
        raise ExportOntoSource(f"{out_dir} {where} the export's source {given}: writing there would destroy what "
                               "is being exported; choose a folder outside it")


def export(source: str | Path, out_dir: str | Path, *, merge: bool = False, overwrite: bool = False) -> tuple[Path, str]:
    """Export a run folder, its final model or a checkpoint (fuyou's or DeepSpeed's) to out_dir.
    Returns (out_dir, what was exported, e.g. "step 4 (final model)")."""
    from fuyoucli.distributed.deepspeed_export import export_deepspeed_checkpoint, is_deepspeed_checkpoint

    given, out_dir = Path(source), Path(out_dir)
    run_dir = _run_folder(given) if given.is_dir() else None
    with ExitStack() as locks:
        # The run is locked before its folder is read: a live run's newest checkpoint may be pruned any time.
        if run_dir is not None:
            locks.enter_context(folder_lock(run_dir, what="the run folder"))
        src = resolve_source(given)
        for s in (given, src.path):
            _refuse_onto_source(s, out_dir, given)
        locks.enter_context(folder_lock(out_dir, what="the export folder"))
        if not holds_only_lock(out_dir) and not overwrite:
            raise FuyouError(f"{out_dir} is not empty; choose another folder or pass --overwrite")
        remove_leftovers(out_dir.parent, out_dir.name)  # what a killed export into out_dir left
        if src.final:
            written, step = export_final_model(src.path, out_dir, merge=merge)
            return written, f"step {step} (final model)" if step is not None else "the final model"
        if is_deepspeed_checkpoint(src.path):
            written = export_deepspeed_checkpoint(src.path, out_dir, merge=merge, overwrite=True)
        else:
            written = export_checkpoint(src.path, out_dir, merge=merge, overwrite=True)
        info = json.loads((written / "fuyou_export.json").read_text(encoding="utf-8"))
        return written, f"step {info.get('step')} (checkpoint)"


def _recipe_of(ckpt: Checkpoint) -> Recipe:
    doc = ckpt.state.get("recipe")
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint {ckpt.path} holds no recipe")
    try:
        return validate_recipe(doc)
    except FuyouError as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: its recipe no longer validates here: "
                              f"{str(e).splitlines()[0]}") from e


def _trained_tensors(ckpt: Checkpoint, model, recipe: Recipe):
    """name -> tensor of every trainable parameter, replaying a seed ledger when the checkpoint is one."""
    base = ckpt.state.get("ledger_base")
    if not base:
        return ckpt.tensors
    from fuyoucli.kernels.normal import z_source
    from fuyoucli.model.blocks import param_blocks
    from fuyoucli.train.zo import ZOReference, ledger_z_problem

    device = ckpt.state.get("device", "cpu")
    if device != "cpu" and not (device == "cuda" and cuda_available()):
        raise CheckpointError(f"checkpoint {ckpt.path} is a seed ledger drawn on {device}: export it on a machine "
                              f"with {device} (z must be regenerated there), or export a full checkpoint")
    problem = ledger_z_problem(ckpt.state, z_source(device))
    if problem:
        raise CheckpointError(f"checkpoint {ckpt.path} is a seed ledger: {problem}; or export the full checkpoint "
                              f"it extends ({ckpt.path.parent / base})")
    source = load_checkpoint(ckpt.path.parent / base)
    meta = source.state.get("trainer", {})
    home = getattr(torch, meta.get("home_dtype", "float32"))
    model.to(device)
    # a checkpoint from before z was drawn in pieces (no z_piece) drew every tensor whole: one piece each
    zo = ZOReference(model, param_blocks(model), recipe.method, seed=recipe.training.seed, head=recipe.model.head,
                     home_dtype=home, home_rounding=meta.get("home_rounding", "nearest"),
                     z_piece=int(meta.get("z_piece") or 1 << 62))
    zo.load_state_tensors(source.tensors)
    for step, grads, lr in ckpt.state["ledger"]:
        zo.replay(int(step), [float(g) for g in grads], float(lr))
    model.to("cpu")
    return zo.state_tensors()


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, merge: bool = False,
                      overwrite: bool = False) -> Path:
    """Write the checkpoint's model to out_dir (atomically). Returns out_dir. Takes no lock: see export()."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not holds_only_lock(out_dir) and not overwrite:
        raise FuyouError(f"{out_dir} is not empty; choose another folder or pass --overwrite")
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
    recipe, tokenizer, model = checkpoint_model(ckpt, merge=merge)
    return write_export(model, tokenizer, out_dir, recipe, merge,
                        {"checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "merged": merge})


def checkpoint_model(ckpt: Checkpoint, *, merge: bool = False) -> tuple[Recipe, object, object]:
    """(recipe, tokenizer, model): the model a fuyou checkpoint's recipe builds, on the CPU, with the
    checkpoint's trained weights (a seed ledger replayed). Shared by export and `fuyou generate`."""
    recipe = _recipe_of(ckpt)
    tokenizer, model = model_for_export(recipe, merge)
    tensors = _trained_tensors(ckpt, model, recipe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                key = f"param.{name}"
                if key not in tensors:
                    raise CheckpointError(f"checkpoint {ckpt.path} has no weights for {name}; it does not match "
                                          "the model its recipe builds")
                p.copy_(tensors[key])
    return recipe, tokenizer, model


def export_final_model(model_dir: Path, out_dir: Path, *, merge: bool) -> tuple[Path, int | None]:
    """A finished run's OUTPUT_DIR/model, rebuilt from its recipe with its saved weights (LoRA: the adapter,
    merged if asked). Returns (out_dir, the step the weights are from, when the folder says)."""
    recipe, tokenizer, model, step = final_model(model_dir, merge=merge)
    return write_export(model, tokenizer, out_dir, recipe, merge,
                        {"model_dir": str(model_dir.resolve()), "step": step, "merged": merge}), step


def final_model(model_dir: Path, *, merge: bool = False) -> tuple[Recipe, object, object, int | None]:
    """(recipe, tokenizer, model, step): a finished run's OUTPUT_DIR/model rebuilt from its recipe with its
    saved weights (LoRA: base + adapter), on the CPU. Shared by export and `fuyou generate`."""
    from safetensors.torch import load_file

    try:
        doc = json.loads((model_dir / FINAL_RECIPE).read_text(encoding="utf-8"))
        if isinstance(doc.get("peft"), dict) and doc["peft"].get("type") == "none":
            doc["peft"] = {"type": "none"}  # a full dump lists LoRA's defaults, which only validate with LoRA
        recipe = validate_recipe(doc)
    except (OSError, ValueError, AttributeError, FuyouError) as e:
        raise CheckpointError(f"{model_dir / FINAL_RECIPE} cannot be read as a recipe "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    try:
        step = json.loads((model_dir / FINAL_INFO).read_text(encoding="utf-8")).get("step")
    except (OSError, ValueError, AttributeError):
        step = None
    tokenizer, model = model_for_export(recipe, merge)
    files = sorted(model_dir.glob("adapter_model*.safetensors" if recipe.peft.type == "lora" else "model*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir} holds no safetensors weights")
    try:
        saved = {k: v for f in files for k, v in load_file(str(f)).items()}
    except Exception as e:  # noqa: BLE001 - safetensors' own error type for a damaged file
        raise CheckpointError(f"{model_dir}: its weights cannot be read ({str(e).splitlines()[0]})") from e
    with torch.no_grad():
        if recipe.peft.type == "lora":
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, saved)
            missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        else:
            result = model.load_state_dict(saved, strict=False)
            loaded = {id(p) for n, p in model.named_parameters() if n in saved}
            missing = [n for n, p in model.named_parameters() if id(p) not in loaded]
    if missing:
        raise CheckpointError(f"{model_dir} does not match the model its recipe builds ({missing[0]})")
    return recipe, tokenizer, model, step


def model_for_export(recipe: Recipe, merge: bool):
    """(tokenizer, model) as the recipe builds them, on the CPU, for a checkpoint's weights to be copied in;
    --merge is refused for a full-parameter run. Shared with the DeepSpeed checkpoint export."""
    if merge and recipe.peft.type != "lora":
        raise FuyouError("--merge folds LoRA adapters into the base; this checkpoint trained every parameter "
                         "(export it without --merge)")
    from fuyoucli.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    labels = (len(recipe.data.labels) or None) if recipe.model.head == "sequence_classification" else None
    model = load_model(recipe.model, recipe.peft, seed=recipe.training.seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=labels, device="cpu")
    return tokenizer, model


def write_export(model, tokenizer, out_dir: Path, recipe: Recipe, merge: bool, info: dict, *,
                 final_step: int | None = None) -> Path:
    """Merge LoRA if asked and write the folder atomically, with fuyou_export.json (`info` first: where the
    weights came from). With `final_step` the folder is also a run's final model, as save_final_model
    writes one (its recipe and step, what `fuyou export RUN_DIR` looks for)."""
    if merge:
        if recipe.model.quantization != "none":  # the base's matrices into the compute dtype, then the adapters
            from fuyoucli.model.quantized import dequantize_model

            dequantize_model(model)
        model = model.merge_and_unload()
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        crash_point("export", int(info.get("step") or 0))
        tokenizer.save_pretrained(tmp)
        (tmp / "fuyou_export.json").write_text(json.dumps({
            **info, "kind": "peft adapter" if recipe.peft.type == "lora" and not merge else "full model",
            "recipe": recipe.model_dump(mode="json")}, indent=2), encoding="utf-8")
        if final_step is not None:
            (tmp / FINAL_RECIPE).write_text(json.dumps(recipe.model_dump(mode="json", exclude_unset=True), indent=2),
                                            encoding="utf-8")
            (tmp / FINAL_INFO).write_text(json.dumps({"step": final_step}), encoding="utf-8")
    return out_dir
