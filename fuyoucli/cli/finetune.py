"""`fuyou finetune RECIPE`: validate the recipe, then run it. Imports torch only after validation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def finetune(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see recipes/)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set training.max_steps=10 --set method.lr=1e-5. Repeatable.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final summary."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in training.output_dir."),
) -> None:
    """Fine-tune a model as a recipe describes; writes metrics.jsonl and the final model to training.output_dir."""
    from fuyoucli.recipe import load_recipe

    loaded = load_recipe(recipe, set_ or [])
    from fuyoucli.telemetry.console import ConsoleSink
    from fuyoucli.train.run import finetune as run_finetune

    run_finetune(loaded, sinks=[ConsoleSink(quiet=quiet, log_every=loaded.training.log_every)], overwrite=overwrite)
