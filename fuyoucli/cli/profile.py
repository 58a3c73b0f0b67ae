"""`fuyou profile`: measure this machine (or show a preset) and save its HardwareProfile JSON.

Thin: arguments -> probe() or load_profile() -> save -> render. The profile stage's only user of rich;
torch is imported (through probe) only when measuring.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer


def profile(
    disk: Optional[List[Path]] = typer.Option(
        None, "--disk", metavar="PATH",
        help="Directory whose drive to test for offloading (repeatable). Default: the current directory.",
    ),
    quick: bool = typer.Option(False, "--quick", help="Smaller, shorter tests (seconds) instead of the full profile."),
    json_out: bool = typer.Option(False, "--json", help="Print the profile as JSON on stdout instead of tables."),
    out: Optional[Path] = typer.Option(
        None, "--out", metavar="FILE", help="Save the profile here. Default: $FUYOU_CACHE_DIR or "
        "$XDG_CACHE_HOME/fuyou (~/.cache/fuyou), file hardware_profile.json.",
    ),
    preset: Optional[str] = typer.Option(
        None, "--preset", metavar="NAME",
        help="Show a named what-if machine (or a saved profile FILE) without measuring; saved only with --out.",
    ),
    list_presets: bool = typer.Option(False, "--list-presets", help="List the hardware presets and exit."),
) -> None:
    """Measure compute, host<->device links, host memory, CPU AdamW and disks; save the profile the planner reads."""
    import click
    from rich.console import Console

    from fuyoucli.hardware import presets
    from fuyoucli.hardware.profile import default_profile_path, load_profile, profile_to_json, save_profile

    console = Console(soft_wrap=False)
    if list_presets:
        if json_out:
            typer.echo(json.dumps({n: presets.preset_description(n) for n in presets.preset_names()}, indent=2))
        else:
            from rich.table import Table

            t = Table("preset", "machine (`fuyou profile --preset NAME` shows it)", title_justify="left")
            for name in presets.preset_names():
                t.add_row(name, presets.preset_description(name))
            console.print(t)
        return
    if preset is not None:
        if disk or quick:
            raise click.UsageError("--preset shows a profile without measuring; drop --disk and --quick")
        prof = load_profile(preset)
        saved = save_profile(prof, out) if out else None
    else:
        try:
            prof = _measure(disk or [Path.cwd()], quick)
        except KeyboardInterrupt:
            # Typer turns a KeyboardInterrupt into a *returned* 130 when not standalone, which main()
            # would report as success; Abort reaches main()'s "interrupted" line and exit code 130.
            raise click.exceptions.Abort() from None
        saved = save_profile(prof, out or default_profile_path())
    if json_out:
        sys.stdout.write(profile_to_json(prof))
        if saved:
            print(f"fuyou: saved hardware profile to {saved}", file=sys.stderr)
        return
    render(console, prof)
    if saved:
        console.print(f"Saved to [bold]{saved}[/bold]", highlight=False)


def _measure(disks: list[Path], quick: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from fuyoucli.hardware import disk as disk_probe
    from fuyoucli.hardware.probe import probe

    for d in disks:  # fail on a bad --disk before spending a second on anything else
        disk_probe.check_disk_path(d)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def on_step(label: str, index: int, total: int) -> None:
            bar.update(task, description=label, completed=index, total=total)

        def on_detail(label: str) -> None:
            bar.update(task, description=label)

        return probe(disks, quick=quick, on_step=on_step, on_detail=on_detail)


# ---- tables ---------------------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.0f} GFLOP/s"


def _gbps(x: float) -> str:
    return f"{x:.2f} GB/s" if x < 100 else f"{x:.0f} GB/s"


def render(console, prof) -> None:
    """Tables for people; the JSON (--json) carries every point."""
    from rich.table import Table

    c, h, links = prof.compute, prof.host, prof.links
    t = Table(title=f"Compute device ({c.kind})", show_header=False, title_justify="left")
    t.add_row("device", f"{c.name}" + (f" x{c.count}" if c.count > 1 else ""))
    t.add_row("memory", f"{_bytes(c.total_memory_bytes)} total, {_bytes(c.free_memory_bytes)} free")
    t.add_row("memory bandwidth", f"{_gbps(c.memory_bandwidth_gbps)} (copy, read + write)")
    for m in c.matmul:
        t.add_row(f"matmul {m.dtype}", f"{_flops(m.best_flops)} at n={m.best_size}" if m.points else "unsupported")
    if c.layers:
        t.add_row("decoder layer", ", ".join(
            f"{p.tokens} tokens {p.forward_s * 1e3:.1f} + {p.backward_s * 1e3:.1f} ms" for p in c.layers)
            + f" (forward + backward, {c.layers[0].dtype}, hidden {c.layers[0].hidden})")
    if c.note:
        t.add_row("note", c.note)
    console.print(t)

    memcpy = links.kind == "host_memcpy"
    t = Table(title="Links: host memcpy (no CUDA)" if memcpy else "Links: host <-> device",
              title_justify="left")
    heads = ["size", "memcpy GB/s", "2 at once, each GB/s"] if memcpy else \
        ["size", "H2D pinned GB/s", "H2D pageable", "D2H pinned", "D2H pageable", "duplex H2D", "duplex D2H"]
    for head in heads:
        t.add_column(head, justify="right")
    curves = [links.h2d_pinned, links.duplex_h2d_pinned] if memcpy else [
        links.h2d_pinned, links.h2d_pageable, links.d2h_pinned, links.d2h_pageable,
        links.duplex_h2d_pinned, links.duplex_d2h_pinned]
    for i, point in enumerate(curves[0].points):
        t.add_row(_bytes(point.size_bytes), *(f"{cv.points[i].gbps:.2f}" if i < len(cv.points) else "" for cv in curves))
    console.print(t)

    t = Table(title="Host", show_header=False, title_justify="left")
    t.add_row("CPU", f"{h.cpu_model}: {h.physical_cores} cores, {h.logical_cores} threads")
    t.add_row("RAM", f"{_bytes(h.ram_total_bytes)} total, {_bytes(h.ram_available_bytes)} available")
    t.add_row("DRAM copy", f"{_gbps(h.dram_copy_gbps)} (read + write)")
    t.add_row("memlock limit", _bytes(h.memlock_limit_bytes))
    pinned = "not applicable (no CUDA)" if h.pinned_allocatable_bytes is None else (
        ("at least " if h.pinned_probe_capped else "") + _bytes(h.pinned_allocatable_bytes))
    t.add_row("pinned allocatable", pinned)
    t.add_row("AdamW fp32", f"{h.adamw_1thread_params_per_s / 1e9:.2f} G params/s on 1 thread, "
              f"{h.adamw_all_threads_params_per_s / 1e9:.2f} on {h.adamw_threads} ({h.adamw_impl})")
    if h.note:
        t.add_row("note", h.note)
    console.print(t)

    for d in prof.disks:
        t = Table(title=f"Disk {d.path}", show_header=False, title_justify="left")
        t.add_row("filesystem", f"{d.filesystem} on {d.device or '?'}, {_bytes(d.free_bytes)} free")
        t.add_row("method", {"o_direct": "O_DIRECT", "fsync+fadvise": "no O_DIRECT: write + fsync, page cache "
                             "dropped before reads", "fsync": "no O_DIRECT: write + fsync"}[d.method]
                  + (f", {_bytes(d.test_file_bytes)} test file (removed)" if d.test_file_bytes else ""))
        for label, points in (("read", d.read), ("overwrite", d.write)):
            best = max(points, key=lambda q: q.gbps)
            detail = ", ".join(f"{_bytes(q.block_bytes)} x{q.threads} {q.gbps:.2f}" for q in points)
            t.add_row(label, f"[bold]{_gbps(best.gbps)}[/bold]" + (f"  ({detail})" if len(points) > 1 else ""))
        t.add_row("first write", f"{_gbps(d.first_write_gbps)}  (new file: the filesystem allocates blocks)")
        if d.mixed_gbps:
            t.add_row("read + write at once", f"{_gbps(d.mixed_gbps)}  (both ways; an offload's read-ahead "
                      "beside its write-behind)")
        if d.note:
            t.add_row("note", d.note)
        console.print(t)

    p = prof.provenance
    if p.source == "preset":
        console.print(f"Preset [bold]{p.preset}[/bold], not a measurement. Sources: {p.sources}", highlight=False)
    else:
        console.print(f"Measured {p.created_at} on {p.hostname} ({p.mode}, {p.duration_s:.1f} s; "
                      f"fuyou {p.fuyou_version}, torch {p.torch_version})", highlight=False)
        if p.note:
            console.print(f"[yellow]{p.note}[/yellow]", highlight=False)
