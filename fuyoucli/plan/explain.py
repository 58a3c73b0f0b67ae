"""Plan stage, when a run does not fit: why (each tier that overflows, and what the device peak is
made of) and which nearby changes would fit, each planned again, fastest first.

Pure (no torch, no I/O). Replanning is the caller's function (search.make_plan), passed in, so this
module depends on the data and the cost model's verdicts only.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

from fuyoucli.model.types import ModelInventory
from fuyoucli.plan.memory import DEVICE_HEADROOM, overflows
from fuyoucli.plan.types import Machine, Options, Plan, TierBytes, Workload

Replan = Callable[[ModelInventory, Workload, Options], Plan]
"""Plans a changed workload or options on the same machine, without suggestions of its own."""
Change = tuple[str, dict, dict]
"""(what to tell the user, Workload fields to set, Options fields to set)."""


def fmt_bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def reasons(memory: TierBytes, device_parts: tuple[tuple[str, int], ...], cap: TierBytes, opts: Options) -> list[str]:
    """One line per tier the memory overflows; the device's lists every part of its peak, largest first."""
    out = []
    for tier, need, have in overflows(memory, cap):
        if tier == "device":
            parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(device_parts, key=lambda kv: -kv[1]))
            limit = " (offload.device_memory_limit)" if opts.device_memory_limit_bytes is not None else ""
            out.append(f"device memory: needs {fmt_bytes(need)} at the least, the device offers "
                       f"{fmt_bytes(cap.device)}{limit} after headroom ({parts})")
        elif tier == "host":
            out.append(f"host RAM: needs {fmt_bytes(need)}, this machine offers {fmt_bytes(have)} after headroom")
        elif tier == "pinned":
            out.append(f"pinned host memory: needs {fmt_bytes(need)}, {fmt_bytes(have)} can be pinned")
        else:
            where = f"under {opts.swap_dir}" if opts.swap_dir else "(no offload.swap_dir set)"
            out.append(f"SSD: needs {fmt_bytes(need)} {where}, has {fmt_bytes(have)}")
    if opts.mode == "in_memory" and not out:
        out.append("offload.mode in_memory keeps everything on the device, and it does not fit")
    return out or ["no placement fits the capacities above"]


def suggestions(inv: ModelInventory, wl: Workload, machine: Machine, opts: Options, memory: TierBytes,
                cap: TierBytes, replan: Replan, lora_inventory: Callable[[], ModelInventory] | None) -> list[str]:
    """Nearby changes, each planned again; the ones that fit come first, fastest first. When none fits
    alone, pairs of them are planned too (LoRA and a swap_dir may each fall short where both fit)."""
    tries = _changes(wl, machine, opts, {t for t, _, _ in overflows(memory, cap)})
    batches = _smaller_batches(wl)
    lora_inv = [inv]  # the inventory under LoRA, built once, when a LoRA try is planned

    def planned(*changes: Change) -> Plan:
        w = dataclasses.replace(wl, **{k: v for _, wk, _ in changes for k, v in wk.items()})
        o = dataclasses.replace(opts, **{k: v for _, _, ok in changes for k, v in ok.items()})
        if w.lora and not wl.lora and lora_inventory is not None and lora_inv[0] is inv:
            lora_inv[0] = lora_inventory()
        return replan(lora_inv[0] if w.lora and not wl.lora else inv, w, o)

    fit: list[tuple[float, str]] = []
    nofit: list[str] = []

    def offer(text: str, p: Plan) -> bool:
        if p.feasible:
            fit.append((p.times.step_s, f"{text}: fits, {p.times.step_s:.3g} s/step ({p.times.bottleneck}-bound)"))
        return p.feasible

    for t in tries:
        if not offer(t[0], planned(t)):
            nofit.append(f"{t[0]}: still does not fit")
    for t in batches:
        if offer(t[0], planned(t)):
            break
    if not fit:  # two changes at once: pairs of the above, then each with the largest batch that fits
        for one, other in itertools.combinations(tries, 2):
            offer(f"{one[0]}, and {other[0]}", planned(one, other))
    if not fit:
        for one in tries:
            for other in batches:
                if offer(f"{one[0]}, and {other[0]}", planned(one, other)):
                    break
    return [t for _, t in sorted(fit)] + nofit[:2]


def _changes(wl: Workload, machine: Machine, opts: Options, over: set[str]) -> list[Change]:
    """The single changes worth planning, given the tiers that overflow."""
    tries: list[Change] = []
    if opts.mode == "in_memory":
        tries.append(("set offload.mode: auto (stream what does not fit)", {}, {"mode": "auto"}))
    forced = [k for k in ("resident_layers", "weights_home", "optimizer_home", "activation", "prefetch_depth",
                          "home_dtype") if getattr(opts, k) is not None]
    if forced:
        names = ", ".join("activations" if k == "activation" else k for k in forced)
        tries.append((f"let the planner choose offload.{names} (remove the setting)", {}, {k: None for k in forced}))
    ram = {"host", "pinned", "ssd"} | ({"device"} if machine.compute_device == "cpu" else set())  # a CPU's is RAM
    if not opts.swap_dir and machine.disk_read_bps > 0 and over & ram:
        tries.append((f"set offload.swap_dir to a folder on {machine.disk_path} "
                      f"({fmt_bytes(machine.disk_free_bytes)} free)", {}, {"swap_dir": machine.disk_path}))
    tries += compact_state_changes(wl, machine)
    tries += quantization_changes(wl)
    if not wl.lora:
        tries.append(("use peft.type: lora", {"lora": True}, {}))
        tries.append(("use peft.type: lora and model.quantization: nf4", {"lora": True, "quantization": "nf4"}, {}))
    if wl.method == "adamw":
        tries.append(("use method.name: zo2", {"method": "zo2", "q": 1}, {}))
    if wl.compute_dtype == "float32" and machine.flops("bfloat16") > 0:
        tries.append(("use model.dtype: bfloat16", {"compute_dtype": "bfloat16"}, {}))
    if opts.device_memory_limit_bytes is not None:
        tries.append(("remove offload.device_memory_limit", {}, {"device_memory_limit_bytes": None}))
    if wl.seq_len > 256:
        tries.append((f"lower data.max_length to {wl.seq_len // 2}", {"seq_len": wl.seq_len // 2}, {}))
    return tries


def compact_state_changes(wl: Workload, machine: Machine) -> list[Change]:
    """First-order full training: the compact AdamW formats not yet in use (8-bit moments; a bf16 master
    when the model computes in bf16), whose CPU rate the machine's profile measured."""
    if wl.method != "adamw" or wl.lora:
        return []
    out: list[Change] = []
    for states, master in (("int8", wl.adam_master), (wl.adam_states, "bf16"), ("int8", "bf16")):
        if (states, master) == (wl.adam_states, wl.adam_master):
            continue
        if master == "bf16" and wl.compute_dtype != "bfloat16":
            continue
        if machine.adam_params_per_s(states, master) <= 0 or any(c[1] == {"adam_states": states, "adam_master": master}
                                                                  for c in out):
            continue
        said = " and ".join(f"method.{k}: {v}" for k, v, old in (("states", states, wl.adam_states),
                                                                 ("master", master, wl.adam_master)) if v != old)
        out.append((f"use {said}", {"adam_states": states, "adam_master": master}, {}))
    return out


def quantization_changes(wl: Workload) -> list[Change]:
    """A LoRA run's frozen base in the formats smaller than the one in use (nf4 first: a quarter of
    16-bit bytes; int8 about half, and exact for a Q8_0 GGUF)."""
    if not wl.lora:
        return []
    smaller = {"none": ("nf4", "int8"), "int8": ("nf4",), "nf4": ()}[wl.quantization]
    return [(f"use model.quantization: {fmt}", {"quantization": fmt}, {}) for fmt in smaller]


def _smaller_batches(wl: Workload) -> list[Change]:
    """Halved batch sizes, largest first (the largest that fits is the one worth saying); first-order
    keeps the examples per step by accumulating more."""
    batches: list[Change] = []
    b = wl.batch_size
    while b > 1:
        b //= 2
        accum = wl.grad_accum * (wl.batch_size // b) if wl.method == "adamw" else wl.grad_accum
        keep_examples = f" and raise training.grad_accum to {accum} (same examples per step)"
        batches.append((f"lower training.batch_size to {b}" + (keep_examples if wl.method == "adamw" else ""),
                        {"batch_size": b, "grad_accum": accum}, {}))
    return batches


# ---- beside published figures --------------------------------------------------------------------

ZO2_PUBLISHED_GB = {  # (hidden size, layers) -> (model, GB)
    (2048, 24): ("OPT-1.3B", 3.75), (2560, 32): ("OPT-2.7B", 4.14), (4096, 32): ("OPT-6.7B", 4.99),
    (5120, 40): ("OPT-13B", 6.18), (7168, 48): ("OPT-30B", 8.86), (9216, 64): ("OPT-66B", 12.07),
    (12288, 96): ("OPT-175B", 18.04),
}
"""ZO2 (arXiv 2503.12668): the GPU memory of its OPT runs at batch 1, seq 2048, float16, every decoder
layer offloaded to CPU memory."""


def zo2_published(inv: ModelInventory, wl: Workload, opts: Options, device_bytes: int, replan: Replan) -> str | None:
    """For a zo2 run shaped like one of ZO2's published ones, the plan's device peak beside ZO2's
    figure and, when it is above it, what the plan becomes on a device offering only ZO2's bytes."""
    if not (wl.method == "zo2" and not wl.lora and inv.model_type == "opt" and wl.batch_size * wl.grad_accum == 1
            and wl.seq_len == 2048 and wl.compute_dtype == "float16"):
        return None
    found = ZO2_PUBLISHED_GB.get((inv.hidden_size, inv.num_layers))
    if found is None:
        return None
    name, gb = found
    line = (f"ZO2 reports {gb:.2f} GB of GPU memory for {name} at batch 1 x 2048, float16; this plan's device "
            f"peak: {device_bytes / 1e9:.2f} GB")
    if device_bytes <= gb * 1e9:
        return line
    limit = int(gb * 1e9 / (1 - DEVICE_HEADROOM)) + 1  # the device then offers ZO2's bytes after headroom
    tight = replan(inv, wl, dataclasses.replace(opts, device_memory_limit_bytes=limit))
    if not tight.feasible:
        return line + f"; in {gb:.2f} GB it does not fit"
    return line + (f"; offload.device_memory_limit: {limit / 1e9:.2f} GB (ZO2's {gb:.2f} GB after headroom) plans "
                   f"{tight.memory.device / 1e9:.2f} GB at {tight.times.step_s:.3g} s/step")
