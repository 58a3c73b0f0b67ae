"""Export a checkpoint as a Hugging Face folder: the base model with the checkpoint's trained weights.

After the checkpoint stage. The recipe stored in the checkpoint says how to rebuild the model (path,
dtype, head, LoRA); the checkpoint's param.<name> tensors replace the trainable parameters (a zo2
seed-ledger checkpoint is first replayed on its base, on the device kind it was trained on). Full
fine-tunes become a folder `AutoModelForCausalLM.from_pretrained` loads; LoRA becomes a peft adapter
folder, or with merge=True a full folder with the adapters folded in. Never imports rich.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fuyoucli.checkpoint import Checkpoint, CheckpointError, atomic_dir, latest_checkpoint, load_checkpoint
from fuyoucli.errors import FuyouError
from fuyoucli.recipe import Recipe, validate_recipe


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's output folder (its newest checkpoint)."""
    path = Path(path)
    if not (path / "state.json").is_file() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"no checkpoint under {path / 'checkpoints'}")
        return found
    return path


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
    from fuyoucli.model.blocks import param_blocks
    from fuyoucli.train.zo import ZOReference

    device = ckpt.state.get("device", "cpu")
    if device != "cpu" and not (device == "cuda" and torch.cuda.is_available()):
        raise CheckpointError(f"checkpoint {ckpt.path} is a seed ledger drawn on {device}: export it on a machine "
                              f"with {device} (z must be regenerated there), or export a full checkpoint")
    source = load_checkpoint(ckpt.path.parent / base)
    home = getattr(torch, source.state.get("trainer", {}).get("home_dtype", "float32"))
    model.to(device)
    zo = ZOReference(model, param_blocks(model), recipe.method, seed=recipe.training.seed, head=recipe.model.head,
                     home_dtype=home)
    zo.load_state_tensors(source.tensors)
    for step, grads, lr in ckpt.state["ledger"]:
        zo.replay(int(step), [float(g) for g in grads], float(lr))
    model.to("cpu")
    return zo.state_tensors()


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, merge: bool = False,
                      overwrite: bool = False) -> Path:
    """Write the checkpoint's model to out_dir (atomically). Returns out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FuyouError(f"{out_dir} is not empty; choose another folder or pass --overwrite")
    ckpt = load_checkpoint(resolve_checkpoint(checkpoint))
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
    return write_export(model, tokenizer, out_dir, recipe, merge,
                        {"checkpoint": str(ckpt.path.resolve()), "step": ckpt.step, "merged": merge})


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


def write_export(model, tokenizer, out_dir: Path, recipe: Recipe, merge: bool, info: dict) -> Path:
    """Merge LoRA if asked and write the folder atomically, with fuyou_export.json (`info` first: where the
    weights came from)."""
    if merge:
        model = model.merge_and_unload()
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fuyou_export.json").write_text(json.dumps({
            **info, "kind": "peft adapter" if recipe.peft.type == "lora" and not merge else "full model",
            "recipe": recipe.model_dump(mode="json")}, indent=2), encoding="utf-8")
    return out_dir
