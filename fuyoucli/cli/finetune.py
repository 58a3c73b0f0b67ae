"""`fuyou finetune RECIPE`: validate the recipe, then run it. Imports torch only after validation."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer


def finetune(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see recipes/)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set training.max_steps=10 --set method.lr=1e-5. Repeatable.",
    ),
    checkpoint: Optional[Path] = typer.Argument(
        None, metavar="CHECKPOINT_DIR", show_default=False,
        help="With --resume: the checkpoint to continue from (default: the newest under training.output_dir).",
    ),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue a run exactly from a checkpoint: `--resume` takes the newest under "
             "training.output_dir/checkpoints, `--resume CHECKPOINT_DIR` the one given.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final summary."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in training.output_dir."),
) -> None:
    """Fine-tune a model as a recipe describes; writes metrics.jsonl, checkpoints and the final model to training.output_dir."""
    from fuyoucli.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    if checkpoint is not None and not resume:
        raise typer.BadParameter(f"{checkpoint}: a checkpoint folder is only read with --resume "
                                 f"(fuyou finetune {recipe} --resume {checkpoint})", param_hint="CHECKPOINT_DIR")
    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in training.output_dir; --overwrite would replace it",
                                 param_hint="--resume / --overwrite")
    from fuyoucli.telemetry.console import ConsoleSink
    from fuyoucli.train.run import finetune as run_finetune

    run_finetune(loaded, sinks=[ConsoleSink(quiet=quiet, log_every=loaded.training.log_every)], overwrite=overwrite,
                 resume=(str(checkpoint) if checkpoint else True) if resume else None, recipe_path=str(recipe) + "".join(f" --set {shlex.quote(s)}" for s in set_ or []))
