"""The `fuyou` command: assembles the sub-commands and maps known failures to one line and an exit code.

Thin by design: each command module turns its arguments into one library call. Set FUYOU_DEBUG=1 to
see the full traceback of any failure.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import typer

from fuyoucli.cli import export, finetune, generate, plan, profile, report
from fuyoucli.errors import FuyouError
from fuyoucli.interrupts import CliInterrupts

app = typer.Typer(
    name="fuyou",
    help="Fine-tune large language models on one GPU: zeroth-order (ZO2) and offloaded first-order training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # No markup in help text: option help names extras like `[deepspeed]`, which rich markup would eat.
    rich_markup_mode=None,
)
app.command(name="finetune", no_args_is_help=True)(finetune.finetune)
app.command(name="profile")(profile.profile)
app.command(name="plan", no_args_is_help=True)(plan.plan)
app.command(name="export", no_args_is_help=True)(export.export)
app.command(name="report", no_args_is_help=True)(report.report)
app.command(name="generate", no_args_is_help=True)(generate.generate)


@app.callback()
def _root() -> None:
    """fuyou: plan and run fine-tuning of models larger than your GPU."""


def _message_for(exc: BaseException) -> tuple[str, int] | None:
    """One line and an exit code for failures a user can act on; None for real bugs."""
    if isinstance(exc, FuyouError):
        return str(exc), exc.exit_code
    name = type(exc).__name__
    if name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()):
        return ("out of memory on the compute device: lower training.batch_size or data.max_length, "
                "or use peft.type: lora"), 3
    if isinstance(exc, MemoryError):
        return "out of host memory: lower training.batch_size or data.max_length, or use a smaller model", 3
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing {exc.filename or 'output'}: free space or set training.output_dir elsewhere", 3
    return None


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(aborts, usage errors) of click and of the copy of click that typer >= 0.26 carries (typer._click):
    a bad option or a missing argument raises the latter's, which is no subclass of click's."""
    import click
    import typer

    aborts: tuple[type, ...] = (click.exceptions.Abort, typer.Abort)
    usage: tuple[type, ...] = (click.ClickException,)
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        return aborts, usage
    return aborts, usage + (vendored.ClickException,)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("FUYOU_DEBUG", "") not in ("", "0")
    if not sys.stderr.isatty():
        # Piped logs: no tqdm bars from transformers/huggingface_hub (they redraw with carriage returns).
        # Read when those libraries are first imported, which happens after this, inside a command.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes (which peft imports whenever it is installed) asks the Hub for a fused CPU kernel on
    # import; the `kernels` package refuses it (untrusted: nothing is downloaded or run) and bitsandbytes
    # uses its own, but logs a warning each time that says nothing to a fuyou user.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    with CliInterrupts() as interrupts:
        _run(argv, debug, interrupts)


def _run(argv: list[str] | None, debug: bool, interrupts: CliInterrupts) -> None:
    try:
        # Non-standalone click returns what standalone mode would have exited with: a command's
        # typer.Exit code, or 130 for a Ctrl-C it caught (commands themselves return None).
        rv = app(args=argv, prog_name="fuyou", standalone_mode=False)
    except KeyboardInterrupt:
        _interrupted(interrupts)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the one place that turns failures into messages
        aborts, usage_errors = _click_exception_types()
        if isinstance(exc, aborts):
            _interrupted(interrupts)
        if isinstance(exc, usage_errors):
            exc.show()
            sys.exit(exc.exit_code)
        known = _message_for(exc)
        if debug or known is None:
            raise
        message, code = known
        print(f"fuyou: error: {message}", file=sys.stderr)
        sys.exit(code)
    else:
        code = rv if isinstance(rv, int) else 0
        if code == 130:
            _interrupted(interrupts)
        sys.exit(code)


def _interrupted(interrupts: CliInterrupts) -> None:
    # A second Ctrl-C from here on must not cut the exit (torch's atexit callbacks) short with a traceback.
    interrupts.shutting_down()
    print("fuyou: interrupted", file=sys.stderr)
    sys.exit(130)
