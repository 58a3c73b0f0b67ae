"""`fuyou report OUTPUT_DIR`: a run's summary (from metrics.jsonl) and report.png. Thin: one call to
fuyoucli.telemetry.report, drawn with rich."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def report(
    output_dir: Path = typer.Argument(..., metavar="OUTPUT_DIR", help="A run's training.output_dir."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write OUTPUT_DIR/report.png (needs matplotlib)."),
) -> None:
    """Summarize a run: loss, evaluations, throughput, where the step time went, checkpoints; plot it."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from fuyoucli.telemetry import report as rep

    s = rep.summarize(output_dir)
    c = Console(highlight=False, soft_wrap=not sys.stdout.isatty())  # piped: no 80-column wrapping of paths
    c.print(f"[bold]fuyou report[/] {escape(s['output_dir'])}")
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    if s["steps"]:
        t.add_row("steps", f"{s['steps']} ({s['first_step']}-{s['last_step']})")
        t.add_row("train loss", f"{s['loss_start']:.4f} -> {s['loss_end']:.4f} (min {s['loss_min']:.4f})")
    else:
        t.add_row("steps", "none yet")
    evals = s["evals"]
    if evals:
        first, last = evals[0], evals[-1]
        acc = lambda e: f", accuracy {e['accuracy']:.1%}" if "accuracy" in e else ""  # noqa: E731
        t.add_row("eval loss", f"{first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})")
        t.add_row("perplexity", f"{first['perplexity']:.2f} -> {last['perplexity']:.2f}{acc(last)}")
    if s["steps"]:
        t.add_row("tokens", f"{s['tokens']:,} in {s['train_time_s']:.1f} s of steps"
                  + (f" ({s['tokens_per_s']:,.0f} tokens/s)" if s["tokens_per_s"] else ""))
        t.add_row("step time", f"mean {s['step_time_mean_s']:.3f} s, median {s['step_time_median_s']:.3f} s, "
                  f"p95 {s['step_time_p95_s']:.3f} s")
        for label, value in s["split"].items():
            t.add_row(f"  {label}", f"{value:.3f} s/step")
        for label, link in s["links"].items():
            rate = f" at {link['gbps']:.2f} GB/s" if link["gbps"] else ""
            t.add_row(f"  {label}", f"{link['bytes'] / 1e9:.3f} GB{rate}")
    t.add_row("checkpoints", ", ".join(s["checkpoints"]) or "none")
    t.add_row("final model", s["model"] or "not saved (run unfinished?)")
    c.print(t)
    if plot and s["steps"]:
        png = rep.plot(output_dir)
        c.print(f"plot: {png}" if png else "plot: not written: install matplotlib (pip install 'fuyoucli[plot]')",
                markup=False)
