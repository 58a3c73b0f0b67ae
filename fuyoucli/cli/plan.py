"""`fuyou plan RECIPE --dry-run`: where every byte of a run will live and how fast a step will be.

Thin: recipe + hardware profile -> model inventory (config only, no weights) -> the planner (through
train.planning, which turns recipe and profile into its inputs) -> a rich report or one JSON document.
An infeasible plan is reported, then exits 2 (InfeasiblePlan). `--export deepspeed OUT.json` also
writes the plan as a DeepSpeed config (fuyoucli.distributed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import typer


def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file (see recipes/)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", "-s", metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set training.batch_size=4 --set offload.swap_dir=/nvme. Repeatable.",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Predict only (required: running a plan is `fuyou finetune`)."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as one JSON document instead of tables."),
    profile: Optional[str] = typer.Option(None, "--profile", metavar="FILE",
                                          help="Hardware profile JSON (default: the recipe's hardware section, "
                                               "else this machine's saved profile)."),
    preset: Optional[str] = typer.Option(None, "--preset", metavar="NAME",
                                         help="Plan for a named what-if machine (`fuyou profile --list-presets`)."),
    export: Optional[Tuple[str, Path]] = typer.Option(
        None, "--export", metavar="FORMAT FILE",
        help="Also write the plan as another engine's config: `--export deepspeed OUT.json` writes a DeepSpeed "
             "config (ZeRO-3, offload, aio from the profile) and OUT.notes.md explaining each key."),
    world_size: int = typer.Option(1, "--world-size", min=1, metavar="N",
                                   help="With --export deepspeed: data-parallel ranks (GPUs in all) the config is "
                                        "for; the examples per step stay the recipe's."),
) -> None:
    """Plan a recipe on a machine without loading weights: placement, peak memory per tier, step time, bottleneck."""
    import click

    if not dry_run:
        raise click.UsageError("fuyou plan only predicts for now: add --dry-run (to run a recipe: fuyou finetune RECIPE)")
    if profile and preset:
        raise click.UsageError("give one of --profile and --preset")
    if export is not None and export[0] != "deepspeed":
        raise click.UsageError(f"--export {export[0]}: the formats are: deepspeed")
    from fuyoucli.errors import InfeasiblePlan
    from fuyoucli.model.inventory import inventory, lora_inventory
    from fuyoucli.recipe import PeftConfig, load_recipe
    from fuyoucli.train.planning import hardware_for_recipe, plan_recipe

    loaded = load_recipe(recipe, set_ or [])
    if export is not None and loaded.method.name != "adamw":
        from fuyoucli.distributed.deepspeed_config import ZO_ON_DEEPSPEED
        from fuyoucli.errors import RecipeError

        raise RecipeError(ZO_ON_DEEPSPEED)
    hw = hardware_for_recipe(loaded, profile=profile, preset=preset)
    d = loaded.data
    labels = len(d.labels or d.label_words) or None
    inv = inventory(loaded.model, loaded.peft, num_labels=labels)
    lora = lambda: lora_inventory(loaded.model, PeftConfig(type="lora"), num_labels=labels)  # noqa: E731
    result = plan_recipe(loaded, inv, hw, lora)
    if json_out:
        sys.stdout.write(json.dumps(to_json(result, inv), indent=2) + "\n")
    else:
        from rich.console import Console

        render(Console(soft_wrap=False), result, inv, loaded.name)
    if not result.feasible:
        raise InfeasiblePlan(f"{result.reasons[0] if result.reasons else 'it does not fit'}"
                             + (f"; try: {result.suggestions[0]}" if result.suggestions else "")
                             + ("; no DeepSpeed config written" if export is not None else ""))
    if export is not None:
        from fuyoucli.distributed.deepspeed_config import deepspeed_config, write_export

        max_tensor = max((b.max_tensor_params for b in inv.blocks), default=0)
        ds = deepspeed_config(loaded, result, hw, world_size=world_size, max_tensor_params=max_tensor)
        written = write_export(ds, export[1], recipe=loaded, plan=result, world_size=world_size)
        # stdout may be the plan's JSON document: the note goes to stderr.
        print(f"wrote {written[0]} and {written[1]} (DeepSpeed ZeRO-3, {world_size} rank"
              f"{'s' * (world_size > 1)})", file=sys.stderr)


def to_json(p, inv) -> dict:
    m = p.memory
    return {
        "feasible": p.feasible,
        "model": {"type": inv.model_type, "params": inv.params, "trainable_params": inv.trainable_params,
                  "layers": inv.num_layers},
        "machine": p.machine,
        "peak_bytes": {"gpu": m.device, "pinned": m.pinned, "host": m.pinned + m.pageable, "ssd": m.ssd},
        "device_parts_bytes": dict(p.device_parts),
        "capacity_bytes": {"gpu": p.capacity.device, "pinned": p.capacity.pinned, "host": p.capacity.pageable,
                           "ssd": p.capacity.ssd},
        "step_time_s": p.times.step_s,
        "tokens_per_s": p.tokens_per_s,
        "tflops": p.tflops,
        "gpu_utilization": p.gpu_utilization,
        "bottleneck": p.times.bottleneck,
        "z_buffer": p.z_buffer if p.method == "zo2" else None,
        "times_s": {k: getattr(p.times, k) for k in ("gpu_s", "h2d_s", "d2h_s", "ssd_read_s", "ssd_write_s",
                                                    "cpu_optimizer_s", "dram_s")},
        "placement": [{"block": b.name, "bytes": b.param_bytes, "weights_home": b.weights_home.value,
                       "optimizer_home": b.optimizer_home.value if b.optimizer_home else None,
                       "activation": b.activation} for b in p.blocks],
        "home_bytes_per_param": home_bytes_per_param(p),
        "reasons": list(p.reasons),
        "suggestions": list(p.suggestions),
        "notes": list(p.notes),
        "plan": p.to_dict(),
    }


_Z_BUFFER = {"block": "z drawn per block (once per direction)",
             "tensor": "z drawn per tensor (again for each pass: no room for a block's)"}


def _bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def home_bytes_per_param(p) -> dict | None:
    """First-order full training: a decoder layer's bytes per trained parameter off the device, its
    weights (compute dtype) and its AdamW state (master and moments) wherever the plan homes them."""
    layers = [b for b in p.blocks if b.name.startswith("layers.") and b.trainable_params and b.optimizer_home
              and b.optimizer_home.value != "device"]
    if p.method != "adamw" or p.lora or not layers:
        return None
    b = layers[0]
    weights, state = b.param_bytes / b.params, b.optimizer_bytes / b.trainable_params
    return {"weights": round(weights, 3), "optimizer_state": round(state, 3), "total": round(weights + state, 3)}


def _groups(blocks):
    """Consecutive layers placed alike become one row, so a 96-layer model fits a screen."""
    rows: list[list] = []
    for b in blocks:
        key = (b.param_bytes, b.weights_home, b.optimizer_home, b.activation)
        layer = b.name.startswith("layers.")
        if rows and layer and rows[-1][0] == key and rows[-1][1][-1].name.startswith("layers."):
            rows[-1][1].append(b)
        else:
            rows.append([key, [b]])
    for key, members in rows:
        if len(members) == 1:
            yield members[0].name, 1, members[0]
        else:
            yield f"{members[0].name}-{members[-1].name.split('.')[1]}", len(members), members[0]


def render(console, p, inv, name: str) -> None:
    from rich.table import Table

    what = f"{p.method}{' + lora' if p.lora else ''}, {p.compute_dtype}"
    console.print(f"[bold]Plan for {name}[/bold]: {inv.model_type}, {inv.params / 1e9:.3g} B params "
                  f"({inv.trainable_params / 1e6:.4g} M trainable), {inv.num_layers} layers; {what}; "
                  f"{p.tokens_per_step} tokens per step on [bold]{p.machine}[/bold] ({p.compute_device})",
                  highlight=False)

    t = Table(title="Memory per tier", title_justify="left")
    for col in ("tier", "capacity", "planned peak", "headroom"):
        t.add_column(col, justify="left" if col == "tier" else "right")
    m, c = p.memory, p.capacity
    rows = [("device" if p.compute_device == "cuda" else "device (host RAM)", m.device, c.device)]
    if p.compute_device == "cuda":
        rows += [("pinned host", m.pinned, c.pinned), ("host RAM (pinned + pageable)", m.pinned + m.pageable, c.pageable)]
    rows.append((f"ssd {p.swap_dir or '(no swap_dir)'}", m.ssd, c.ssd))
    for label, need, cap in rows:
        style = "red" if need > cap else ""
        t.add_row(label, _bytes(cap), f"[{style}]{_bytes(need)}[/{style}]" if style else _bytes(need),
                  _bytes(cap - need) if cap >= need else f"[red]-{_bytes(need - cap)}[/red]")
    console.print(t)
    if p.device_parts:
        parts = ", ".join(f"{k} {_bytes(v)}" for k, v in sorted(p.device_parts, key=lambda kv: -kv[1]))
        console.print(f"Device peak: {parts}.", highlight=False)

    t = Table(title="Placement", title_justify="left")
    for col in ("blocks", "count", "weights each", "weights home", "optimizer", "activations"):
        t.add_column(col, justify="right" if col in ("count", "weights each") else "left")
    for label, count, b in _groups(p.blocks):
        t.add_row(label, str(count), _bytes(b.param_bytes), b.weights_home.value,
                  b.optimizer_home.value if b.optimizer_home else "-", b.activation or "-")
    console.print(t)

    tm = p.times
    t = Table(title="Step time by resource (busy seconds per step)", title_justify="left")
    t.add_column("resource")
    t.add_column("seconds", justify="right")
    t.add_column("of step", justify="right")
    named = (("gpu", "compute device", tm.gpu_s), ("h2d", "host -> device", tm.h2d_s),
             ("d2h", "device -> host", tm.d2h_s), ("ssd", "ssd read", tm.ssd_read_s), ("ssd", "ssd write", tm.ssd_write_s),
             ("cpu_optimizer", "cpu optimizer", tm.cpu_optimizer_s), ("dram", "host memory copies", tm.dram_s))
    for key, label, sec in named:
        if sec == 0 and key != "gpu":
            continue
        mark = " [bold](bottleneck)[/bold]" if key == tm.bottleneck else ""
        share = f"{100 * sec / tm.step_s:.0f}%" if tm.step_s else "-"
        t.add_row(label + mark, f"{sec:.4g}", share)
    console.print(t)
    console.print(
        f"Step [bold]{tm.step_s:.4g} s[/bold] ({tm.bottleneck}-bound), {p.tokens_per_s:,.0f} tokens/s, "
        f"{p.tflops:.3g} TFLOPS ({100 * p.gpu_utilization:.0f}% of the device's best matmul rate). "
        f"Micro-batch {p.micro_batch_size} x {p.micro_batches}, prefetch depth {p.prefetch_depth}, "
        f"{p.device_buffers} device buffers, pinned pool {_bytes(p.pinned_pool_bytes)}, "
        f"home {p.home_dtype}" + (f" ({p.home_rounding} rounding)" if p.method == "zo2" and not p.lora
                                  and p.home_dtype != "float32" else "")
        + f", wire {p.wire_dtype}" + (f" (base matrices {p.quantization})" if p.quantization != "none" else "")
        + (f", {_Z_BUFFER[p.z_buffer]}" if p.method == "zo2" else "")
        + ".", highlight=False)
    per_param = home_bytes_per_param(p)
    if per_param:
        console.print(f"At home per trained parameter (a decoder layer): weights {per_param['weights']:.3g} B + "
                      f"AdamW state {per_param['optimizer_state']:.3g} B = [bold]{per_param['total']:.3g} B[/bold].",
                      highlight=False)
    for note in p.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    if not p.feasible:
        console.print("[bold red]Does not fit:[/bold red]")
        for r in p.reasons:
            console.print(f"  - {r}", highlight=False)
        if p.suggestions:
            console.print("[bold]Nearest changes:[/bold]")
            for s in p.suggestions:
                console.print(f"  - {s}", highlight=False)
