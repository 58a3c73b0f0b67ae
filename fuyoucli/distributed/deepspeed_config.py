"""A recipe and its plan as a DeepSpeed config (ZeRO stage 3), with the reason for every key.

Beside the plan stage: reads the Recipe, the Plan (None: everything in memory) and the hardware
profile (the swap disk's measured block size and queue depth become the aio section). Pure: imports
no torch and no deepspeed, so the mapping is tested without either; DeepSpeed's own parser checks
the result where it is installed (tests/unit/test_deepspeed_config.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.hardware.profile import Disk, HardwareProfile
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import Recipe

INSTALL_HINT = "pip install 'fuyoucli[deepspeed]'"
ZO_ON_DEEPSPEED = ("method zo2 has no DeepSpeed equivalent (DeepSpeed trains with gradients); for several "
                   "processes or GPUs run `fuyou finetune RECIPE --nproc N` (data-parallel zeroth-order, "
                   "only scalars exchanged)")


@dataclass(frozen=True)
class Choice:
    key: str
    """Dotted path in the config, e.g. zero_optimization.offload_param.device."""
    value: object
    why: str


@dataclass
class DeepSpeedExport:
    config: dict = field(default_factory=dict)
    choices: list[Choice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the config does not say and the launcher does (LoRA, data, the lr per step...)."""

    def set(self, key: str, value: object, why: str) -> None:
        node = self.config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
        self.choices.append(Choice(key, value, why))


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def disk_for(profile: HardwareProfile | None, swap_dir: str | None) -> Disk | None:
    """The profiled disk holding swap_dir (longest matching path), like the planner picks it."""
    if profile is None or not profile.disks or not swap_dir:
        return None
    target = os.path.abspath(os.path.expanduser(swap_dir))
    matches = [d for d in profile.disks
               if target == d.path or target.startswith(d.path.rstrip("/") + "/") or d.path == "/"]
    return max(matches, key=lambda d: len(d.path)) if matches else max(profile.disks, key=lambda d: d.read_gbps)


def aio_point(disk: Disk) -> tuple[int, int, str]:
    """(block bytes, queue depth, why): the measured (block, in-flight) pair with the best slower direction
    (swapping reads and writes as much as it reads), else the best read point."""
    writes = {(p.block_bytes, p.threads): p.gbps for p in disk.write}
    both = [(min(p.gbps, writes[(p.block_bytes, p.threads)]), p) for p in disk.read
            if (p.block_bytes, p.threads) in writes]
    if both:
        rate, best = max(both, key=lambda t: t[0])
        return best.block_bytes, best.threads, (
            f"measured on {disk.path} ({disk.device}): {best.block_bytes} B blocks with {best.threads} in flight "
            f"read {best.gbps:.3g} GB/s and write {writes[(best.block_bytes, best.threads)]:.3g} GB/s, the best "
            f"of the measured pairs for the slower direction")
    best = disk.best_read
    return best.block_bytes, best.threads, (f"measured on {disk.path} ({disk.device}): the fastest read, "
                                            f"{best.gbps:.3g} GB/s at {best.block_bytes} B x {best.threads} in flight")


def _home(blocks, attr: str) -> set[Tier]:
    return {getattr(b, attr) for b in blocks if getattr(b, attr) is not None}


def deepspeed_config(recipe: Recipe, plan: Plan | None, profile: HardwareProfile | None = None, *,
                     world_size: int = 1, total_steps: int | None = None,
                     max_tensor_params: int = 0, compute_device: str | None = None) -> DeepSpeedExport:
    """The DeepSpeed config equivalent to the recipe and plan on `world_size` ranks (data parallel).

    `total_steps` (when known: training.max_steps, or from the data) sets a decaying scheduler's length;
    `max_tensor_params` (the largest tensor, from the inventory) sizes the NVMe parameter buffers;
    `compute_device` ('cuda' or 'cpu') stands in for the plan's when there is no plan."""
    m, t = recipe.method, recipe.training
    if m.name != "adamw":
        raise RecipeError(ZO_ON_DEEPSPEED)
    if world_size < 1:
        raise FuyouError(f"world size must be >= 1, got {world_size}")
    out = DeepSpeedExport()
    where = f"plan for {plan.machine}" if plan is not None else "offload.mode: in_memory (no plan)"

    # ---- batch: the recipe's examples per optimizer step, split into the plan's micro-batches per rank
    per_step = t.batch_size * t.grad_accum
    micro = plan.micro_batch_size if plan is not None else t.batch_size
    if per_step % (micro * world_size):
        raise FuyouError(
            f"the recipe's {per_step} examples per step (training.batch_size {t.batch_size} x grad_accum "
            f"{t.grad_accum}) do not split into micro-batches of {micro} on {world_size} ranks: make "
            f"batch_size x grad_accum a multiple of {micro * world_size}")
    accum = per_step // (micro * world_size)
    out.set("train_batch_size", per_step,
            f"training.batch_size {t.batch_size} x training.grad_accum {t.grad_accum}: the same examples per "
            "optimizer step as the single-GPU run, whatever the number of ranks")
    out.set("train_micro_batch_size_per_gpu", micro,
            f"the plan's micro-batch ({where}): the largest forward that fits the device"
            if plan is not None and micro != t.batch_size else f"training.batch_size ({where})")
    out.set("gradient_accumulation_steps", accum,
            f"{per_step} examples / ({micro} per micro-batch x {world_size} rank{'s' * (world_size > 1)}); "
            f"DeepSpeed checks train_batch_size = micro x accumulation x world size")

    # ---- precision
    dtype = recipe.model.dtype
    out.set("bf16.enabled", dtype == "bfloat16",
            f"model.dtype {dtype}: " + ("compute in bfloat16 with fp32 master weights and optimizer states, as "
                                        "fuyou's mixed precision does" if dtype == "bfloat16"
                                        else "not bfloat16"))
    out.set("fp16.enabled", dtype == "float16", f"model.dtype {dtype}" + (
        ": fp16 compute with dynamic loss scaling" if dtype == "float16" else "; with neither bf16 nor fp16 "
        "DeepSpeed computes in fp32" if dtype == "float32" else ""))
    if dtype == "float16":
        out.set("fp16.loss_scale", 0, "0 = dynamic loss scaling, as fuyou's DynamicLossScale")
        out.set("fp16.initial_scale_power", 16, "initial scale 2^16, fuyou's starting scale")
        out.set("fp16.loss_scale_window", 1000, "double the scale after 1000 clean steps, as fuyou does")
        out.set("fp16.hysteresis", 1, "halve the scale (and skip the step) at the first overflow, as fuyou does")
        out.set("fp16.min_loss_scale", 1, "fuyou never scales below 1")

    # ---- optimizer, clipping, schedule
    lora = recipe.peft.type == "lora"
    out.set("optimizer.type", "AdamW", "method.name adamw (decoupled weight decay)")
    out.set("optimizer.params.lr", m.lr, "method.lr (the peak; fuyou's launcher sets the lr of every step itself)")
    out.set("optimizer.params.betas", list(m.betas), "method.betas")
    out.set("optimizer.params.eps", m.eps, "method.eps")
    out.set("optimizer.params.weight_decay", m.weight_decay,
            "method.weight_decay; fuyou's launcher passes two parameter groups so that, as in fuyou, biases and "
            "norms get none")
    if (plan.compute_device if plan is not None else compute_device) == "cpu":
        out.set("optimizer.params.torch_adam", True,
                f"{'the plan computes' if plan is not None else 'runs'} on a CPU: torch's AdamW instead of "
                "DeepSpeed's FusedAdam (a CUDA kernel, or a C++ one compiled at start on a CPU)")
    clip = m.max_grad_norm
    out.set("gradient_clipping", float(clip) if clip is not None else 0.0,
            f"method.max_grad_norm {clip}: clip the global gradient norm" if clip is not None
            else "method.max_grad_norm null: no clipping (0 turns it off)")
    _scheduler(out, recipe, total_steps)

    # ---- ZeRO stage 3 and where the plan keeps each kind of bytes
    out.set("zero_optimization.stage", 3,
            "ZeRO stage 3: parameters, gradients and optimizer states partitioned across ranks, the stage "
            "that can offload parameters (what fuyou's streaming does on one GPU)")
    out.set("zero_optimization.overlap_comm", True,
            "overlap gradient reduction with the backward, as fuyou overlaps gradient offload with it")
    out.set("zero_optimization.contiguous_gradients", True, "copy gradients into one buffer as they are produced "
                                                            "(less fragmentation)")
    out.set("zero_optimization.stage3_gather_16bit_weights_on_model_save", True,
            "lets engine.save_16bit_model write a whole model; fuyou itself consolidates with zero_to_fp32")
    _offload(out, recipe, plan, profile, max_tensor_params=max_tensor_params, lora=lora)
    if out.config["optimizer"]["params"].get("torch_adam") and "offload_optimizer" in out.config["zero_optimization"]:
        out.set("zero_force_ds_cpu_optimizer", False,
                "torch's AdamW updates the offloaded states (DeepSpeed otherwise insists on its compiled CPU Adam)")
    out.set("steps_per_print", max(1, t.log_every) * 1000,
            "fuyou's launcher logs every step to metrics.jsonl; keep DeepSpeed's own prints rare")
    out.set("wall_clock_breakdown", False, "fuyou's metrics carry the step time")

    out.notes += [
        f"model: {recipe.model.path} in {dtype}"
        + (f", LoRA r={recipe.peft.r} alpha={recipe.peft.alpha:g} (peft, applied before deepspeed.initialize: "
           "only adapters are trainable, the base is partitioned and offloaded like any frozen weight)"
           if lora else ", every parameter trained"),
        "data: the recipe's data section, tokenized by fuyou; every rank draws the same seeded order of "
        "micro-batches and takes its own share (rank r: the r-th slice of each step), so the examples of a "
        "step are those of the single-GPU run",
        "loss: each micro-batch's summed token loss is scaled by (accumulation x world size) / the step's "
        "target tokens over all ranks, so that DeepSpeed's averaging yields the token-weighted mean of the "
        "single-GPU run",
        f"learning rate: fuyou's schedule ({m.schedule}, warmup {m.warmup_steps}) set on the optimizer before "
        "every step, so runs match fuyou's; the scheduler block is the closest DeepSpeed scheduler for use "
        "with other launchers",
    ]
    if plan is not None and any(b.activation in ("recompute", "recompute-swap") for b in plan.blocks):
        out.notes.append("activations: the plan recomputes some layers in the backward; fuyou's launcher turns "
                         "on the model's gradient checkpointing (DeepSpeed's activation_checkpointing section only "
                         "applies to models written for deepspeed.checkpointing)")
    if plan is not None and any(b.activation == "recompute-swap" for b in plan.blocks):
        out.notes.append("activations: the plan swaps some recomputed layers' inputs to host memory; under "
                         "DeepSpeed they stay on the device (the model's gradient checkpointing keeps them "
                         "there), so device memory may run short where fuyou's engine fits")
    if plan is not None and plan.resident_blocks:
        out.notes.append(f"residency: the plan keeps {len(plan.resident_blocks)} blocks on the device; ZeRO-3 "
                         "chooses by size instead (stage3_param_persistence_threshold)")
    return out


def _scheduler(out: DeepSpeedExport, recipe: Recipe, total_steps: int | None) -> None:
    m = recipe.method
    total = total_steps or recipe.training.max_steps
    warm = m.warmup_steps
    if m.schedule == "constant":
        if not warm:
            return
        out.set("scheduler.type", "WarmupLR", f"method.schedule constant after {warm} warmup steps")
        out.set("scheduler.params.warmup_min_lr", 0.0, "warmup starts from 0, as fuyou's")
        out.set("scheduler.params.warmup_max_lr", m.lr, "method.lr")
        out.set("scheduler.params.warmup_num_steps", warm, "method.warmup_steps")
        out.set("scheduler.params.warmup_type", "linear", "fuyou warms up linearly")
        return
    if total is None:
        out.notes.append(f"scheduler: method.schedule {m.schedule} decays over the run's length, which "
                         "training.epochs leaves to the data size; no scheduler block (fuyou's launcher sets the "
                         "lr of every step)")
        return
    if m.schedule == "linear":
        out.set("scheduler.type", "WarmupDecayLR", f"method.schedule linear: warmup, then linear decay to 0")
        out.set("scheduler.params.warmup_min_lr", 0.0, "warmup starts from 0, as fuyou's")
        out.set("scheduler.params.warmup_max_lr", m.lr, "method.lr")
    else:
        out.set("scheduler.type", "WarmupCosineLR", "method.schedule cosine: warmup, then cosine decay to 0")
        out.set("scheduler.params.warmup_min_ratio", 0.0, "warmup starts from 0, as fuyou's")
        out.set("scheduler.params.cos_min_ratio", 0.0, "decays to 0, as fuyou's")
    out.set("scheduler.params.warmup_num_steps", warm, "method.warmup_steps")
    out.set("scheduler.params.total_num_steps", total, "training.max_steps" if total_steps is None
            else "the run's optimizer steps")
    out.set("scheduler.params.warmup_type", "linear", "fuyou warms up linearly")


def _offload(out: DeepSpeedExport, recipe: Recipe, plan: Plan | None, profile: HardwareProfile | None, *,
             max_tensor_params: int, lora: bool) -> None:
    z = "zero_optimization"
    if plan is None:
        out.notes.append("offload: none (offload.mode in_memory: everything on the device)")
        return
    weights = _home(plan.blocks, "weights_home") - {Tier.DEVICE}
    states = _home(plan.blocks, "optimizer_home") - {Tier.DEVICE}
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[plan.home_dtype]
    nvme = False
    if weights:
        streamed = [b for b in plan.blocks if b.weights_home is not Tier.DEVICE]
        on_ssd = [b for b in streamed if b.weights_home is Tier.SSD]
        device = "nvme" if on_ssd else "cpu"
        names = ", ".join(sorted({b.weights_home.value for b in streamed}))
        out.set(f"{z}.offload_param.device", device,
                f"the plan streams {len(streamed)} of {len(plan.blocks)} blocks from {names} "
                f"({_gb(sum(b.param_bytes for b in streamed))})" + (
                    "; some live on the SSD, so all offloaded parameters go to NVMe" if on_ssd else ""))
        out.set(f"{z}.offload_param.pin_memory", Tier.PAGEABLE not in weights,
                "the plan homes every streamed block in pinned RAM" if Tier.PAGEABLE not in weights
                else "the plan homes some blocks in pageable RAM: pinned RAM would not hold them all")
        if on_ssd:
            nvme = True
            out.set(f"{z}.offload_param.nvme_path", plan.swap_dir, "offload.swap_dir")
            in_ram = sum(b.params for b in streamed if b.weights_home is not Tier.SSD)
            out.set(f"{z}.offload_param.max_in_cpu", in_ram,
                    f"parameters the plan keeps in host RAM rather than on the SSD ({_gb(in_ram * dtype_bytes)})")
            buffer = max(int(1e8), max_tensor_params)
            out.set(f"{z}.offload_param.buffer_size", buffer,
                    "elements per NVMe staging buffer: DeepSpeed's default 1e8, or the model's largest tensor "
                    "when bigger (a buffer must hold one tensor)")
            out.set(f"{z}.offload_param.buffer_count", max(5, plan.prefetch_depth + 2),
                    f"staging buffers: the blocks in flight (prefetch depth {plan.prefetch_depth} + the one "
                    "computing + one written back), at least DeepSpeed's default 5")
        layer = max((b.params for b in streamed), default=0)
        out.set(f"{z}.stage3_prefetch_bucket_size", plan.prefetch_depth * layer,
                f"parameters fetched ahead: the plan's prefetch depth {plan.prefetch_depth} x the largest streamed "
                f"block ({layer:,} parameters); 0 fetches synchronously")
        resident = sum(b.params for b in plan.blocks if b.weights_home is Tier.DEVICE)
        live = resident + plan.device_buffers * layer
        out.set(f"{z}.stage3_max_live_parameters", live,
                f"parameters on the device at once: the resident blocks ({resident:,}) plus the plan's "
                f"{plan.device_buffers} device buffers of one block each")
    else:
        out.notes.append("offload_param: none (the plan keeps every block's weights on the device)")
    if states and not lora:
        on_ssd = Tier.SSD in states
        device = "nvme" if on_ssd else "cpu"
        held = [b for b in plan.blocks if b.optimizer_home not in (None, Tier.DEVICE)]
        out.set(f"{z}.offload_optimizer.device", device,
                f"the plan keeps the fp32 master weights and AdamW states of {len(held)} blocks on "
                f"{', '.join(sorted(s.value for s in states))} ({_gb(sum(b.optimizer_bytes for b in held))}); "
                "the CPU runs AdamW on them, as fuyou's CPU optimizer does")
        out.set(f"{z}.offload_optimizer.pin_memory", Tier.PAGEABLE not in states or on_ssd,
                "pinned staging for the gradient and state copies" if Tier.PAGEABLE not in states or on_ssd
                else "the plan keeps states in pageable RAM")
        if on_ssd:
            nvme = True
            out.set(f"{z}.offload_optimizer.nvme_path", plan.swap_dir, "offload.swap_dir")
            out.set(f"{z}.offload_optimizer.buffer_count", 4,
                    "AdamW swaps four tensors per parameter group (master, gradient, m, v)")
            out.set(f"{z}.offload_optimizer.pipeline_read", True,
                    "read the next group's states while the CPU updates this one (Fuyou: SSD read of group "
                    "i+1 overlaps the update and write of group i)")
            out.set(f"{z}.offload_optimizer.pipeline_write", True, "write the previous group's states back "
                                                                   "while this one updates")
        largest = max((b.trainable_params for b in held), default=0)
        if largest:
            out.set(f"{z}.sub_group_size", largest,
                    f"the optimizer steps one sub-group at a time: one block's trainable parameters ({largest:,}), "
                    "as fuyou's CPU optimizer updates block by block")
    elif lora:
        out.notes.append("offload_optimizer: none (LoRA adapters and their AdamW states stay on the device, "
                         "as in the plan)")
    else:
        out.notes.append("offload_optimizer: none (the plan keeps optimizer states on the device)")
    if nvme:
        disk = disk_for(profile, plan.swap_dir)
        if disk is None:
            out.notes.append("aio: no profiled disk holds offload.swap_dir; DeepSpeed's aio defaults apply "
                             f"(run `fuyou profile --disk {plan.swap_dir}`)")
            return
        block, depth, why = aio_point(disk)
        out.set("aio.block_size", block, why)
        out.set("aio.queue_depth", depth, f"the requests in flight of that measured point ({depth})")
        out.set("aio.intra_op_parallelism", 1, "one submitting thread: the queue depth was measured from one "
                                               "thread's point of view")
        out.set("aio.single_submit", False, "submit requests in batches (DeepSpeed's faster default)")
        out.set("aio.overlap_events", True, "overlap submission and completion (DeepSpeed's default)")
        out.set("aio.use_gds", False, "GPUDirect Storage off: the plan stages SSD data through host RAM")


def sidecar_path(config_path: str | Path) -> Path:
    """OUT.json -> OUT.notes.md beside it."""
    p = Path(config_path)
    return p.with_name((p.stem if p.suffix == ".json" else p.name) + ".notes.md")


def _flat(doc: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def leaf_keys(config: dict) -> set[str]:
    return set(_flat(config))


def render_notes(export: DeepSpeedExport, *, recipe: Recipe, plan: Plan | None, world_size: int,
                 config_name: str) -> str:
    lines = [f"# {config_name}: DeepSpeed config for recipe `{recipe.name}`", "",
             f"Written by `fuyou plan --export deepspeed` from the recipe and "
             + (f"the plan for **{plan.machine}** ({plan.compute_device})" if plan is not None
                else "no plan (offload.mode: in_memory)")
             + f", for **{world_size}** data-parallel rank{'s' * (world_size > 1)}. "
             "Every key in the config, its value and why:", "",
             "| key | value | why |", "|---|---|---|"]
    for c in export.choices:
        value = json.dumps(c.value)
        lines.append(f"| `{c.key}` | `{value}` | {c.why.replace('|', '/')} |")
    lines += ["", "## What the config does not say", ""]
    lines += [f"- {n}" for n in export.notes]
    lines += ["", "Launch it with fuyou's recipe: `fuyou finetune RECIPE --engine deepspeed --nproc N` "
              "(see docs/distributed.md).", ""]
    return "\n".join(lines)


def write_export(export: DeepSpeedExport, path: str | Path, *, recipe: Recipe, plan: Plan | None,
                 world_size: int) -> tuple[Path, Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(export.config, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    notes = sidecar_path(path)
    notes.write_text(render_notes(export, recipe=recipe, plan=plan, world_size=world_size, config_name=path.name),
                     encoding="utf-8")
    return path, notes
