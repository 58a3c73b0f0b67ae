"""A DeepSpeed ZeRO checkpoint of a fuyou run as a Hugging Face folder (or a peft adapter).

After the checkpoint stage, like fuyoucli.export: DeepSpeed's own zero_to_fp32 consolidates the
partitioned fp32 weights on the host; the recipe saved beside them (fuyou_deepspeed.json) rebuilds the
model, whose parameters take the consolidated values. Needs the [deepspeed] extra. Never imports rich.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fuyoucli.checkpoint import CheckpointError
from fuyoucli.errors import FuyouError
from fuyoucli.recipe import Recipe, validate_recipe

STATE_FILE = "fuyou_deepspeed.json"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / STATE_FILE).is_file() or any(path.glob("*_model_states.pt"))


def _recipe(ckpt: Path) -> tuple[Recipe, dict]:
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{ckpt} is a DeepSpeed checkpoint without {STATE_FILE}: it was not written by "
                              "`fuyou finetune --engine deepspeed`, so the model it belongs to is unknown")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    try:
        return validate_recipe(state["recipe"]), state
    except FuyouError as e:
        raise CheckpointError(f"checkpoint {ckpt}: its recipe no longer validates here: {str(e).splitlines()[0]}") from e


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """name -> fp32 tensor, gathered from the ZeRO partitions of every rank (DeepSpeed's zero_to_fp32)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        from fuyoucli.distributed.deepspeed_config import INSTALL_HINT

        raise FuyouError(f"{ckpt} is a DeepSpeed checkpoint; reading it needs DeepSpeed: {INSTALL_HINT}") from None
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def export_deepspeed_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, merge: bool = False,
                                overwrite: bool = False, final_step: int | None = None) -> Path:
    """Write the checkpoint's model to out_dir (atomically), as fuyoucli.export does for fuyou's own;
    `final_step`: out_dir is the run's final model (OUTPUT_DIR/model), from that step."""
    from fuyoucli.export import model_for_export, write_export

    ckpt, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FuyouError(f"{out_dir} is not empty; choose another folder or pass --overwrite")
    recipe, state = _recipe(ckpt)
    tokenizer, model = model_for_export(recipe, merge)
    tensors = consolidated_state_dict(ckpt)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in tensors:
                p.copy_(tensors[name])
            elif p.requires_grad:
                raise CheckpointError(f"checkpoint {ckpt} has no weights for {name}; it does not match the model "
                                      "its recipe builds")
    return write_export(model, tokenizer, out_dir, recipe, merge, {
        "checkpoint": str(ckpt.resolve()), "step": state.get("step"), "merged": merge, "engine": "deepspeed"},
        final_step=final_step)
