"""`fuyou export CHECKPOINT_DIR OUT_DIR [--merge]`: a checkpoint as a Hugging Face folder. Thin: one call
to fuyoucli.export, or to fuyoucli.distributed.deepspeed_export for a DeepSpeed run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    checkpoint: Path = typer.Argument(..., metavar="CHECKPOINT_DIR",
                                      help="A checkpoint folder (OUTPUT_DIR/checkpoints/step-N), or a run's "
                                           "OUTPUT_DIR for its newest checkpoint."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Folder to write (must be empty or absent)."),
    merge: bool = typer.Option(False, "--merge", help="LoRA: fold the adapters into the base weights and write a "
                                                      "full model instead of a peft adapter."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it holds files."),
) -> None:
    """Export a checkpoint as a Hugging Face folder (config, tokenizer, safetensors) that
    AutoModelForCausalLM.from_pretrained loads, or a peft adapter for LoRA runs. A DeepSpeed run's
    checkpoint (`fuyou finetune --engine deepspeed`) is consolidated with DeepSpeed's zero_to_fp32."""
    from fuyoucli.distributed.deepspeed_export import export_deepspeed_checkpoint, is_deepspeed_checkpoint
    from fuyoucli.export import export_checkpoint, resolve_checkpoint

    if is_deepspeed_checkpoint(resolve_checkpoint(checkpoint)):
        written = export_deepspeed_checkpoint(resolve_checkpoint(checkpoint), out_dir, merge=merge,
                                              overwrite=overwrite)
    else:
        written = export_checkpoint(checkpoint, out_dir, merge=merge, overwrite=overwrite)
    typer.echo(f"exported {checkpoint} -> {written}")
