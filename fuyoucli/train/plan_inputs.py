"""From a recipe and a hardware profile to the planner's inputs: Workload, Options and Machine.

Glue between the stages before the plan (recipe.py, hardware/) and the pure planner (plan/), which
takes these as data and reads no file. The only place a profile becomes a Machine: its rates in
bytes (or FLOPs) per second, the disk under swap_dir, a CUDA process's own memory. No torch.
"""

from __future__ import annotations

import os

from fuyoucli.errors import RecipeError
from fuyoucli.hardware.profile import (
    ALLOCATOR_SLACK, ASSUMED_CONTEXT_BYTES, BLAS_WORKSPACE_BYTES, ComputeDevice, Disk, HardwareProfile,
)
from fuyoucli.model.types import BlockSpec
from fuyoucli.plan.types import LayerTiming, Machine, Options, Tier, Workload
from fuyoucli.recipe import Recipe

GB = 10**9
LINK_SIZE_BYTES = 256 << 20  # blocks stream in transfers of tens of MB and up: the curve's large end
_OURS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the profile's dtype names -> the plan's


def machine_from_profile(profile: HardwareProfile, swap_dir: str | None = None) -> tuple[Machine, tuple[str, ...]]:
    """The cost model's numbers from a profile; the disk is the profiled one holding swap_dir
    (longest matching path), else the fastest profiled disk (with a note)."""
    c, links, h = profile.compute, profile.links, profile.host
    cuda = c.kind == "cuda"
    notes: list[str] = []
    pinned = h.ram_available_bytes if h.pinned_allocatable_bytes is None else h.pinned_allocatable_bytes
    if h.memlock_limit_bytes is not None:
        pinned = min(pinned, h.memlock_limit_bytes)
    if not cuda:
        pinned = 0
    disk = _disk_for(profile, swap_dir, notes)
    machine = Machine(
        name=(profile.provenance.preset or c.name) if profile.provenance.source == "preset" else c.name,
        compute_device=c.kind,
        device_bytes=c.free_memory_bytes,
        matmul_flops=tuple((ours, c.matmul_flops(theirs)) for theirs, ours in _OURS.items()),
        matmul_points=tuple((ours, p.size, p.flops) for theirs, ours in _OURS.items()
                            for m in c.matmul if m.dtype == theirs for p in m.points),
        device_mem_bps=c.memory_bandwidth_gbps * GB,
        h2d_bps=links.h2d_pinned.gbps_at(LINK_SIZE_BYTES) * GB,
        d2h_bps=links.d2h_pinned.gbps_at(LINK_SIZE_BYTES) * GB,
        duplex_h2d_bps=links.duplex_h2d_pinned.gbps_at(LINK_SIZE_BYTES) * GB,
        duplex_d2h_bps=links.duplex_d2h_pinned.gbps_at(LINK_SIZE_BYTES) * GB,
        host_ram_bytes=h.ram_available_bytes,
        pinned_bytes=pinned,
        dram_bps=h.dram_copy_gbps * GB,
        cpu_adam_params_per_s=h.adamw_all_threads_params_per_s,
        cpu_adam_compact=tuple((r.states, r.master, r.params_per_s) for r in h.adamw_compact),
        disk_path=disk.path if disk else None,
        disk_free_bytes=disk.free_bytes if disk else 0,
        disk_read_bps=disk.read_gbps * GB if disk else 0.0,
        disk_write_bps=disk.write_gbps * GB if disk else 0.0,
        disk_mixed_bps=disk.mixed_gbps * GB if disk else 0.0,
        elementwise_points=tuple((p.params, p.randn_params_per_s, p.inplace_gbps * GB, p.fresh_gbps * GB,
                                  (p.norm_gbps or p.inplace_gbps) * GB) for p in c.elementwise),
        cpu_burst_loss=h.burst_compute_loss,
        log_softmax_elems_per_s=c.log_softmax_elems_per_s,
        log_softmax_backward_elems_per_s=c.log_softmax_backward_elems_per_s,
        disk_read_loss_s_per_byte=disk.read_compute_loss_s_per_gb / GB if disk else 0.0,
        disk_write_loss_s_per_byte=disk.write_compute_loss_s_per_gb / GB if disk else 0.0,
        layer_timings=_layer_timings(c),
        context_bytes=(c.context_bytes or ASSUMED_CONTEXT_BYTES) if cuda else 0,
        library_workspace_bytes=BLAS_WORKSPACE_BYTES if cuda else 0,
        allocator_slack=ALLOCATOR_SLACK if cuda else 0.0,
    )
    return machine, tuple(notes + _older_profile_notes(profile))


def _disk_for(profile: HardwareProfile, swap_dir: str | None, notes: list[str]) -> Disk | None:
    if not profile.disks:
        return None
    fastest = max(profile.disks, key=lambda d: d.read_gbps)
    if not swap_dir:
        return fastest
    target = os.path.abspath(os.path.expanduser(swap_dir))
    matches = [d for d in profile.disks
               if target == d.path or target.startswith(d.path.rstrip("/") + "/") or d.path == "/"]
    if matches:
        return max(matches, key=lambda d: len(d.path))
    notes.append(f"swap_dir {swap_dir} is on no profiled disk; assuming the speed of {fastest.path} "
                 f"(run `fuyou profile --disk {swap_dir}` to measure it)")
    return fastest


def _layer_timings(c: ComputeDevice) -> tuple[LayerTiming, ...]:
    """The profile's timed decoder layers, each with the block the planner prices for it."""
    return tuple(
        LayerTiming(dtype=_OURS[p.dtype], tokens=p.tokens, seq_len=p.seq_len, hidden=p.hidden,
                    spec=BlockSpec(name="layers.0", params=p.params, trainable_params=p.params,
                                   max_tensor_params=p.max_tensor_params,
                                   matmul_flops_per_token=p.matmul_flops_per_token,
                                   attention_flops_per_token_per_key=p.attention_flops_per_token_per_key,
                                   attention_window=None, boundary_elems_per_token=p.hidden,
                                   internal_elems_per_token=0,
                                   elementwise_elems_per_token=p.elementwise_elems_per_token),
                    forward_s=p.forward_s, forward_no_grad_s=p.forward_no_grad_s, backward_s=p.backward_s)
        for p in c.layers)


def _older_profile_notes(profile: HardwareProfile) -> list[str]:
    """What a measured profile from an older fuyou lacks, and what the plan assumes instead."""
    c = profile.compute
    if profile.provenance.source != "measured":
        return []
    notes = []
    if c.kind == "cuda" and not c.context_bytes:
        notes.append(f"this profile has no measured CUDA context (measured by an older fuyou): assumed "
                     f"{ASSUMED_CONTEXT_BYTES / 2**30:.1f} GiB; run `fuyou profile` again")
    if not c.layers:
        notes.append("this profile has no decoder-layer timings (measured by an older fuyou): compute is priced "
                     "from isolated products and elementwise rates alone, which put real layers 1.3-1.7x faster "
                     "than they ran on a 2-core CPU; run `fuyou profile` again")
    if c.kind == "cpu" and not c.elementwise:
        notes.append("this profile has no elementwise rates (measured by an older fuyou): the step time "
                     "leaves out most of zo2's work on a CPU; run `fuyou profile` again")
    return notes


def loss_positions_fraction(recipe: Recipe) -> float:
    """Share of the positions the loss scores (train.losses): one per example for label-word
    classification, none that matter for a classification head (its logits are the labels), and
    every position otherwise (text; for prompt/answer data, an upper bound: only answers count)."""
    d = recipe.data
    if recipe.model.head == "sequence_classification":
        return 1.0  # the head's logits are num_labels wide: the loss is negligible either way
    if d.format == "classification":
        return 1.0 / max(1, d.max_length)
    return 1.0


def workload_from_recipe(recipe: Recipe) -> Workload:
    m = recipe.method
    zo = m.name == "zo2"
    return Workload(method=m.name, lora=recipe.peft.type == "lora", compute_dtype=recipe.model.dtype,
                    batch_size=recipe.training.batch_size, seq_len=recipe.data.max_length,
                    grad_accum=recipe.training.grad_accum, q=m.q if zo else 1,
                    zo_momentum=zo and m.variant == "momentum",
                    zo_conservative=zo and m.variant == "conservative",
                    clips_grads=not zo and m.max_grad_norm is not None,
                    loss_positions_fraction=loss_positions_fraction(recipe),
                    home_rounding=zo_home(recipe)[1],
                    adam_states="fp32" if zo else m.states, adam_master="fp32" if zo else m.master,
                    quantization=recipe.model.quantization)


def zo_home(recipe: Recipe) -> tuple[str, str]:
    """(home dtype, rounding) of a zo2 full-parameter run's weights, in memory or streamed: the
    recipe's offload.home_dtype, else the model's own dtype; offload.home_rounding, else stochastic
    whenever the home is narrower than float32. ('float32', 'nearest') for other runs, which keep no
    zo2 home. The planner's own default (plan.search) is the same rule."""
    o = recipe.offload
    if recipe.method.name != "zo2" or recipe.peft.type == "lora":
        return "float32", "nearest"
    dtype = recipe.model.dtype if o.home_dtype == "auto" else o.home_dtype
    rounding = o.home_rounding if o.home_rounding != "auto" else ("nearest" if dtype == "float32" else "stochastic")
    return dtype, rounding


_TIERS = {"device": Tier.DEVICE, "pinned": Tier.PINNED, "pageable": Tier.PAGEABLE, "host": Tier.PAGEABLE,
          "ssd": Tier.SSD}


def options_from_recipe(recipe: Recipe) -> Options:
    o = recipe.offload
    auto = lambda v: None if v == "auto" else v  # noqa: E731
    return Options(
        mode=o.mode, swap_dir=o.swap_dir, device_memory_limit_bytes=o.device_memory_limit,
        host_memory_limit_bytes=o.host_memory_limit, prefetch_depth=auto(o.prefetch_depth),
        home_dtype=auto(o.home_dtype), resident_layers=auto(o.resident_layers),
        weights_home=_TIERS.get(o.weights_home), optimizer_home=_TIERS.get(o.optimizer_home),
        activation=auto(o.activations),
    )


def check_offload_applies(recipe: Recipe) -> None:
    """Offload settings that the recipe's method would not use are errors, not silently ignored."""
    o, zo, lora = recipe.offload, recipe.method.name == "zo2", recipe.peft.type == "lora"
    bad = []
    if o.home_dtype != "auto" and (not zo or lora):
        bad.append("offload.home_dtype applies to zo2 full-parameter runs (first-order and LoRA weights live "
                   "in model.dtype)")
    if o.home_rounding != "auto" and (not zo or lora):
        bad.append("offload.home_rounding applies to zo2 full-parameter runs (their updates are stored into "
                   "the weights' home)")
    elif o.home_rounding == "stochastic" and zo_home(recipe)[0] == "float32":
        bad.append("offload.home_rounding: stochastic needs a 16-bit home (offload.home_dtype: bfloat16 or "
                   "float16, or a 16-bit model.dtype); a float32 home stores every update exactly")
    if zo and o.activations != "auto":
        bad.append("offload.activations applies to first-order runs (zo2 keeps no activations for a backward)")
    if zo and o.optimizer_home != "auto":
        bad.append("offload.optimizer_home applies to first-order runs (zo2 has no optimizer states)")
    if lora and o.optimizer_home != "auto":
        bad.append("offload.optimizer_home: LoRA adapters and their states always stay on the device")
    if bad:
        raise RecipeError("; ".join(bad))
