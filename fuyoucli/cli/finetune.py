"""`fuyou finetune RECIPE`: validate the recipe, then run it. Imports torch only after validation.

Picks the sinks: the live dashboard on a terminal, plain log lines when stdout is piped, JSON lines
with --json-logs, only the summary with --quiet; --trace FILE adds a Perfetto trace of a few steps;
training.report_to adds TensorBoard / W&B / MLflow (telemetry/trackers.py).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer


def finetune(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see recipes/)."),
    checkpoint: Optional[Path] = typer.Argument(
        None, metavar="CHECKPOINT_DIR", show_default=False,
        help="With --resume: the checkpoint to continue from (default: the newest under training.output_dir).",
    ),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set training.max_steps=10 --set method.lr=1e-5. Repeatable.",
    ),
    resume: bool = typer.Option(
        False, "--resume",
        help="Continue a run exactly from a checkpoint: `--resume` takes the newest under "
             "training.output_dir/checkpoints, `--resume CHECKPOINT_DIR` the one given.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the final summary."),
    json_logs: bool = typer.Option(False, "--json-logs", help="Print every event as one JSON object per line."),
    plain: bool = typer.Option(False, "--plain", help="Plain log lines even on a terminal (no live dashboard)."),
    trace: Optional[Path] = typer.Option(None, "--trace", metavar="FILE",
                                         help="Write a Chrome/Perfetto trace (JSON) of a few steps: one track per "
                                              "lane (compute, upload, offload, SSD read/write, CPU optimizer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in training.output_dir."),
    allow_data_change: bool = typer.Option(False, "--allow-data-change",
                                           help="With --resume: continue even though the data files differ from "
                                                "those the checkpoint was trained on (a warning is printed)."),
    engine: str = typer.Option("fuyou", "--engine", metavar="fuyou|deepspeed",
                               help="fuyou: this package's engine (one process, or --nproc zo2 ranks). deepspeed: "
                                    "DeepSpeed ZeRO-3 through its own launcher, with the config `fuyou plan "
                                    "--export deepspeed` writes (first-order only; the [deepspeed] extra)."),
    nproc: int = typer.Option(1, "--nproc", min=1, metavar="N",
                              help="Processes (ranks) on this machine: zo2 data-parallel ranks with the fuyou engine "
                                   "(only loss scalars are exchanged), GPUs per node with --engine deepspeed."),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", metavar="FILE",
                                            help="--engine deepspeed across machines: DeepSpeed's hostfile "
                                                 "(`host slots=N` per line)."),
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
    if json_logs and quiet:
        raise typer.BadParameter("give one of --json-logs and --quiet", param_hint="--json-logs / --quiet")
    if engine not in ("fuyou", "deepspeed"):
        raise typer.BadParameter(f"{engine!r}: the engines are fuyou and deepspeed", param_hint="--engine")
    from fuyoucli.telemetry.trackers import tracker_sinks

    if loaded.training.report_to and (engine == "deepspeed" or nproc > 1):
        from fuyoucli.errors import RecipeError

        raise RecipeError(f"training.report_to {loaded.training.report_to}: trackers are written by single-process "
                          "runs only for now; remove report_to or run without --nproc / --engine deepspeed")
    if engine == "deepspeed" and loaded.model.quantization != "none":
        from fuyoucli.errors import RecipeError

        raise RecipeError(f"model.quantization: {loaded.model.quantization} is fuyou's own engine's (DeepSpeed's ZeRO "
                          "would partition the quantized codes as if they were weights); run without --engine "
                          "deepspeed, or set quantization: none")
    trackers = tracker_sinks(loaded)  # a missing tracker package is one line, before anything is written
    if engine == "deepspeed" or nproc > 1:
        from fuyoucli.distributed.launch import launch

        display = "json" if json_logs else "quiet" if quiet else "plain"
        code = launch(loaded, recipe_path=str(recipe), sets=set_ or [], engine=engine, nproc=nproc, hostfile=hostfile,
                      overwrite=overwrite, resume=(str(checkpoint) if checkpoint else True) if resume else None,
                      display=display, trace=trace, allow_data_change=allow_data_change)
        if code:
            raise typer.Exit(code)
        return
    if hostfile is not None:
        raise typer.BadParameter("--hostfile is for --engine deepspeed", param_hint="--hostfile")
    from fuyoucli.train.run import finetune as run_finetune

    sinks = [_display(loaded, quiet=quiet, json_logs=json_logs, plain=plain), *trackers]
    if trace is not None:
        from fuyoucli.telemetry.trace import TraceSink

        sinks.append(TraceSink(trace))
    command = str(recipe) + "".join(f" --set {shlex.quote(s)}" for s in set_ or [])
    run_finetune(loaded, sinks=sinks, overwrite=overwrite,
                 resume=(str(checkpoint) if checkpoint else True) if resume else None, recipe_path=command,
                 allow_data_change=allow_data_change)


def _display(recipe, *, quiet: bool, json_logs: bool, plain: bool):
    if json_logs:
        from fuyoucli.telemetry.jsonl import JsonLogSink

        return JsonLogSink(sys.stdout)
    if not quiet and not plain and sys.stdout.isatty():
        from fuyoucli.telemetry.dashboard import DashboardSink

        return DashboardSink(swap_dir=recipe.offload.swap_dir)
    from fuyoucli.telemetry.console import ConsoleSink

    return ConsoleSink(quiet=quiet, log_every=recipe.training.log_every)
