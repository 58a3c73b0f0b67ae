"""From a recipe to the plan a run executes: the machine's profile, the model's inventory, the planner.

Trainer-side glue between the pure planner (plan/), which takes its inputs as data, and the run loop
(cli/plan.py uses it too). A run whose machine has no saved profile measures it once (the quick
probe, about a minute, a progress line per phase on stderr) and saves it, so the first `fuyou
finetune` on a new machine plans from measurements instead of failing. An infeasible plan stops the
run before any weights load, with the planner's reasons and suggestions.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from fuyoucli.errors import InfeasiblePlan, InputError
from fuyoucli.hardware.profile import HardwareProfile, default_profile_path, load_profile
from fuyoucli.model.types import ModelInventory
from fuyoucli.plan.search import make_plan
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import PeftConfig, Recipe
from fuyoucli.train.plan_inputs import (
    check_offload_applies, machine_from_profile, options_from_recipe, workload_from_recipe,
)


def hardware_for_recipe(recipe: Recipe, *, profile: str | None = None, preset: str | None = None) -> HardwareProfile:
    """The machine to plan for: a --profile/--preset given on the command line, else the recipe's
    hardware section, else this machine's saved profile (an InputError saying how to get one)."""
    spec = profile or preset or recipe.hardware.profile or recipe.hardware.preset
    if spec is not None:
        return load_profile(spec)
    if not default_profile_path().is_file():
        raise InputError(f"no hardware profile of this machine at {default_profile_path()}: run `fuyou profile` "
                         "to measure it, or set hardware.preset in the recipe (or pass --preset NAME; "
                         "`fuyou profile --list-presets` lists them)")
    return load_profile(None)


def plan_recipe(recipe: Recipe, inv: ModelInventory, profile: HardwareProfile,
                lora_inventory: Callable[[], ModelInventory] | None = None) -> Plan:
    """The plan for a recipe on a machine, given the model's inventory (model.inventory builds it), and
    for the LoRA suggestion, a way to get its inventory under LoRA (called only if it does not fit)."""
    check_offload_applies(recipe)
    machine, notes = machine_from_profile(profile, recipe.offload.swap_dir)
    m = recipe.method
    compact = m.name == "adamw" and (m.states, m.master) != ("fp32", "fp32")
    if compact and machine.adam_params_per_s(m.states, m.master) <= 0:
        raise InputError(f"the hardware profile has no rate for the CPU AdamW with method.states: {m.states}, "
                         f"master: {m.master} (measured by an older fuyou): run `fuyou profile` again")
    p = make_plan(inv, workload_from_recipe(recipe), machine, options_from_recipe(recipe),
                  lora_inventory=lora_inventory)
    return dataclasses.replace(p, notes=notes + p.notes) if notes else p


def machine_profile(recipe: Recipe, note: Callable[[str], None]) -> HardwareProfile:
    if recipe.hardware.profile or recipe.hardware.preset or default_profile_path().is_file():
        return hardware_for_recipe(recipe)
    from fuyoucli.hardware.probe import probe
    from fuyoucli.hardware.profile import save_profile

    disks = [str(_existing_ancestor(Path(recipe.offload.swap_dir)))] if recipe.offload.swap_dir else ["."]
    note(f"no hardware profile of this machine yet: measuring it (quick) for the planner; "
         f"`fuyou profile` makes a fuller one")
    # About a minute with no other output: say what is happening, phase by phase (plain lines, for piped logs too).
    print("fuyou: profiling this machine once (quick, about a minute; saved for later runs; `fuyou profile` "
          "makes a fuller one) ...", file=sys.stderr, flush=True)
    profile = probe(disks, quick=True, on_step=_print_phase)
    path = save_profile(profile, default_profile_path())
    note(f"saved the profile to {path}")
    return load_profile(path)


def _existing_ancestor(path: Path) -> Path:
    """The folder itself, or the nearest one above it that exists: a swap_dir the run has yet to create
    lies on that folder's filesystem, which is the disk to measure."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _print_phase(label: str, index: int, total: int) -> None:
    if index < total:
        print(f"fuyou: profiling {index + 1}/{total}: {label}", file=sys.stderr, flush=True)


def plan_for_run(recipe: Recipe, *, num_labels: int | None, note: Callable[[str], None] = lambda s: None) -> Plan | None:
    """The plan for this recipe on this machine; None for offload.mode: in_memory (the reference path),
    which is still planned when it sets a memory limit, so that a run over the limit is refused."""
    o = recipe.offload
    check_offload_applies(recipe)  # an in-memory run is not planned, but its settings must still apply
    if o.mode == "in_memory" and o.host_memory_limit is None and o.device_memory_limit is None:
        return None
    from fuyoucli.model.inventory import inventory, lora_inventory

    profile = machine_profile(recipe, note)
    lora = lambda: lora_inventory(recipe.model, PeftConfig(type="lora"), num_labels=num_labels)  # noqa: E731
    plan = plan_recipe(recipe, inventory(recipe.model, recipe.peft, num_labels=num_labels), profile, lora)
    if not plan.feasible:
        lines = [f"the run does not fit this machine ({plan.machine}):"] + [f"  {r}" for r in plan.reasons]
        if plan.suggestions:
            lines += ["what would make it fit:"] + [f"  {s}" for s in plan.suggestions]
        if plan.compute_device == "cpu" and o.host_memory_limit is not None:
            lines.append(f"(on a CPU machine the device is host RAM: offload.host_memory_limit "
                         f"{o.host_memory_limit:,} B caps it)")
        lines.append("`fuyou plan RECIPE --dry-run` shows the whole placement")
        raise InfeasiblePlan("\n".join(lines))
    return None if o.mode == "in_memory" else plan
