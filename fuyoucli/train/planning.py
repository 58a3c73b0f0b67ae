"""From a recipe to the plan a run executes: the machine's profile, the model's inventory, the planner.

Trainer-side glue between the pure planner (plan/) and the run loop. A run whose machine has no saved
profile measures it once (the quick probe, about a minute, a progress line per phase on stderr) and
saves it, so the first `fuyou finetune` on a new machine plans from measurements instead of failing. An infeasible plan stops the run before any
weights load, with the planner's reasons and suggestions.
"""

from __future__ import annotations

import sys
from typing import Callable

from fuyoucli.errors import InfeasiblePlan
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import PeftConfig, Recipe


def machine_profile(recipe: Recipe, note: Callable[[str], None]):
    from fuyoucli.hardware.profile import default_profile_path, load_profile, save_profile
    from fuyoucli.plan.search import hardware_for_recipe

    if recipe.hardware.profile or recipe.hardware.preset or default_profile_path().is_file():
        return hardware_for_recipe(recipe)
    from fuyoucli.hardware.probe import probe

    disks = [recipe.offload.swap_dir] if recipe.offload.swap_dir else ["."]
    note(f"no hardware profile of this machine yet: measuring it (quick) for the planner; "
         f"`fuyou profile` makes a fuller one")
    # About a minute with no other output: say what is happening, phase by phase (plain lines, for piped logs too).
    print("fuyou: profiling this machine once (quick, about a minute; saved for later runs; `fuyou profile` "
          "makes a fuller one) ...", file=sys.stderr, flush=True)
    profile = probe(disks, quick=True, on_step=_print_phase)
    path = save_profile(profile, default_profile_path())
    note(f"saved the profile to {path}")
    return load_profile(path)


def _print_phase(label: str, index: int, total: int) -> None:
    if index < total:
        print(f"fuyou: profiling {index + 1}/{total}: {label}", file=sys.stderr, flush=True)


def plan_for_run(recipe: Recipe, *, num_labels: int | None, note: Callable[[str], None] = lambda s: None) -> Plan | None:
    """The plan for this recipe on this machine; None for offload.mode: in_memory (the reference path),
    which is still planned when it sets a memory limit, so that a run over the limit is refused."""
    o = recipe.offload
    if o.mode == "in_memory" and o.host_memory_limit is None and o.device_memory_limit is None:
        return None
    from fuyoucli.model.inventory import inventory, lora_inventory
    from fuyoucli.plan.search import plan_recipe

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
