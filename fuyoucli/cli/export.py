"""`fuyou export SOURCE OUT_DIR [--merge]`: a run, its final model or a checkpoint as a Hugging Face folder.
Thin: one call to fuyoucli.export (which hands a DeepSpeed run's checkpoint to deepspeed_export)."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    checkpoint: Path = typer.Argument(..., metavar="SOURCE",
                                      help="A run's OUTPUT_DIR (its final model), the final model folder "
                                           "(OUTPUT_DIR/model), or a checkpoint folder (OUTPUT_DIR/checkpoints/step-N)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR",
                                   help="Folder to write (must be empty or absent, and outside SOURCE)."),
    merge: bool = typer.Option(False, "--merge", help="LoRA: fold the adapters into the base weights and write a "
                                                      "full model instead of a peft adapter."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it holds files."),
) -> None:
    """Export a run's final model or a checkpoint as a Hugging Face folder (config, tokenizer, safetensors)
    that AutoModelForCausalLM.from_pretrained loads, or a peft adapter for LoRA runs. A DeepSpeed run's
    checkpoint (`fuyou finetune --engine deepspeed`) is consolidated with DeepSpeed's zero_to_fp32."""
    from fuyoucli.export import export as run_export

    written, what = run_export(checkpoint, out_dir, merge=merge, overwrite=overwrite)
    typer.echo(f"exported {checkpoint}, {what} -> {written}")
