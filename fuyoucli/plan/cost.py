"""Plan stage, the cost model: peak bytes per tier and seconds per resource of one candidate placement.

Pure arithmetic over plan.types (no torch, no I/O). Every rate comes from the Machine (so from a
measured or preset HardwareProfile); the only constants here are headroom fractions and bytes per
parameter of known kernels, each with its reason.

Overlap model (pipelined per block, as Fuyou and ZO2 run it): within a phase, a block's fetch
(SSD read -> host staging -> H2D) overlaps the previous block's compute and the write-back of the
one before, so a phase takes the busiest resource's total plus a fill (the first streamed block's
fetch, less the compute of resident blocks before it) and a drain (the last streamed block's
write-back). With prefetch depth 0 nothing overlaps: the phase is the sum of everything. A zo2 step
is one phase (all 2*q forward passes run while each block is resident), plus for the conservative
variant a second, read-only one (each streamed block fetched again, 3 forward passes: w, w - u,
w + u); a first-order step is a
forward phase and a backward phase (blocks re-fetched in reverse, gradients D2H as produced, CPU
AdamW of block i overlapped with the backward of block i-1). Execution is layer-major: all
micro-batches of a step pass through a block while it is on the device. One drive serves a phase's
reads and writes: their times add, or, where the profile measured the drive slower at both at once,
the bytes both ways go at that mixed rate. Each forward's products and elementwise work, and each
backward, are scaled by the profile's measured decoder layers (work.calibration).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from fuyoucli.plan import work
from fuyoucli.plan.types import (
    DTYPE_BYTES, BlockSpec, Machine, ModelInventory, Options, StepTimes, Tier, TierBytes, Workload,
)

# Headroom: fractions of each capacity the plan leaves free. Device: what no named part of the peak
# accounts for (attention kernels' scratch, tensors of an op's own) and the error of the parts that
# are estimates (the CUDA context when not measured, the allocator's slack): kept at its old value
# until a GPU run calibrates those parts. Host: the OS, Python, the tokenized data. SSD: filesystems
# slow down when nearly full.
DEVICE_HEADROOM = 0.08
HOST_HEADROOM = 0.10
SSD_HEADROOM = 0.05
# AdamW on the compute device (optimizer_home DEVICE): reads fp32 master, m, v, grad and writes
# master, m, v (28 bytes, as BACKGROUND.md's CPU figure) plus the compute-dtype weight copy.
DEVICE_ADAM_BYTES_PER_PARAM = 28
# Resources in StepTimes order; 'ssd' is read + write of one drive, which share its bandwidth.
RESOURCES = ("gpu", "h2d", "d2h", "ssd_read", "ssd_write", "cpu_optimizer", "dram")
_N = len(RESOURCES)
GPU, H2D, D2H, SSD_R, SSD_W, CPU_OPT, DRAM = range(_N)


@dataclass(frozen=True)
class Placement:
    """One candidate: per-block homes and activation policy (block order = inventory order)."""

    home_dtype: str
    weights_home: tuple[Tier, ...]
    optimizer_home: tuple[Tier | None, ...]
    activation: tuple[str | None, ...]
    prefetch_depth: int
    micro_batch_size: int
    z_buffer: str = "block"
    """zo2: z held per block (drawn once per direction) or per tensor (drawn again for each pass)."""


@dataclass(frozen=True)
class Estimate:
    memory: TierBytes
    times: StepTimes
    flops_per_step: float
    pinned_pool_bytes: int
    device_buffers: int
    wire_dtype: str
    device_parts: tuple[tuple[str, int], ...]
    """What the device peak is made of (resident weights, buffers, activations, ...), for reasons."""


def capacities(machine: Machine, options: Options) -> TierBytes:
    """Bytes each tier offers the run after headroom. `pageable` is all host RAM the run may use,
    pinned included; on a CPU run the device is host RAM and the host tiers offer nothing separate."""
    host = machine.host_ram_bytes
    if options.host_memory_limit_bytes is not None:
        host = min(host, options.host_memory_limit_bytes)
    # cuda: free memory was seen by a process already holding its context, which the device peak
    # counts: the run's process may hold both. A device_memory_limit is the whole process's memory.
    device = machine.device_bytes + machine.context_bytes if machine.compute_device == "cuda" else host
    if options.device_memory_limit_bytes is not None:
        device = min(device, options.device_memory_limit_bytes)
    ssd = int(machine.disk_free_bytes * (1 - SSD_HEADROOM)) if options.swap_dir and machine.disk_read_bps > 0 else 0
    if machine.compute_device == "cpu":
        return TierBytes(device=int(device * (1 - HOST_HEADROOM)), pinned=0, pageable=0, ssd=ssd)
    host_cap = int(host * (1 - HOST_HEADROOM))
    return TierBytes(device=int(device * (1 - DEVICE_HEADROOM)), pinned=min(machine.pinned_bytes, host_cap),
                     pageable=host_cap, ssd=ssd)


def fits(memory: TierBytes, cap: TierBytes) -> bool:
    return (memory.device <= cap.device and memory.pinned <= cap.pinned
            and memory.pinned + memory.pageable <= max(cap.pageable, cap.pinned) and memory.ssd <= cap.ssd)


def overflows(memory: TierBytes, cap: TierBytes) -> list[tuple[str, int, int]]:
    """(tier, needed, available) for every tier the memory does not fit in."""
    out = []
    if memory.device > cap.device:
        out.append(("device", memory.device, cap.device))
    if memory.pinned > cap.pinned:
        out.append(("pinned", memory.pinned, cap.pinned))
    if memory.pinned + memory.pageable > max(cap.pageable, cap.pinned):
        out.append(("host", memory.pinned + memory.pageable, cap.pageable))
    if memory.ssd > cap.ssd:
        out.append(("ssd", memory.ssd, cap.ssd))
    return out


def home_bytes(inv: ModelInventory, wl: Workload, home_dtype: str) -> list[int]:
    """Per block, the bytes that live at the weights' home (and stream when not resident). Under
    LoRA only the frozen base streams, read-only, in the compute dtype; adapters stay on the device."""
    cb, hb = DTYPE_BYTES[wl.compute_dtype], DTYPE_BYTES[home_dtype]
    mom = 4 if (wl.method == "zo2" and wl.zo_momentum) else 0
    out = []
    for s in inv.blocks:
        if wl.lora:
            out.append((s.params - s.trainable_params) * cb)
        elif wl.method == "zo2":
            out.append(s.params * hb + s.trainable_params * mom)
        else:
            out.append(s.params * cb)
    return out


def optimizer_bytes_per_param(wl: Workload, home: Tier | None = None) -> int:
    """First-order AdamW state bytes per trainable parameter at its home. Off the device (the CPU
    worker's states, engine/optimizer.py): fp32 master, m and v, 12 bytes whatever the compute dtype
    (the weights' home keeps its own compute-dtype copy). On the device (torch's AdamW on the
    parameters themselves): m + v, plus an fp32 master copy when the weights are not fp32."""
    if home is Tier.DEVICE:
        return 8 + (4 if DTYPE_BYTES[wl.compute_dtype] != 4 else 0)
    return 12


def logits_and_loss_bytes(inv: ModelInventory, wl: Workload, micro_tokens: int) -> int:
    """Device bytes of the head's logits and the loss (train.losses) over one micro-batch, at their
    peak. The head writes [tokens, vocab] logits in the compute dtype, kept until the backward ends.
    Text scores every position: the logits reshaped (a view), taken up to fp32 (a copy unless fp32
    already), and cross_entropy's fp32 log-softmax of that, all alive at once; a first-order backward
    then holds the log-softmax autograd saved, the gradient nll_loss hands it and the one it hands
    on, all fp32 (12 bytes per logit). With few positions scored (label words) they are gathered (a
    copy) first, and their gradient is scattered back into zeros of the logits' shape, twice over
    (the gather, then the slice that dropped the last position)."""
    vocab = work.logits_per_token(inv)
    cb = DTYPE_BYTES[wl.compute_dtype]
    upcast = 4 if cb != 4 else 0
    logits = micro_tokens * vocab * cb
    if wl.loss_positions_fraction >= 1:
        forward = micro_tokens * vocab * (upcast + 4)
        backward = micro_tokens * vocab * 12
    else:
        scored = min(micro_tokens, max(1, round(wl.loss_positions_fraction * micro_tokens)))
        forward = scored * vocab * (cb + upcast + 4)
        backward = scored * vocab * 12 + 2 * logits
    return logits + (forward if wl.method == "zo2" else max(forward, backward))


def estimate(inv: ModelInventory, wl: Workload, machine: Machine, pl: Placement) -> Estimate:
    """Peak bytes per tier and busy seconds per resource of one step under placement `pl`."""
    zo = wl.method == "zo2"
    cpu = machine.compute_device == "cpu"
    cb, hb = DTYPE_BYTES[wl.compute_dtype], DTYPE_BYTES[pl.home_dtype]
    T, Tm, h = wl.tokens_per_step, pl.micro_batch_size * wl.seq_len, inv.hidden_size
    rate = work.compute_rate(machine, wl, h) or 1.0
    micro_batches = max(1, T // max(1, Tm))
    mem_bps = machine.device_mem_bps
    mom = 4 if (zo and wl.zo_momentum) else 0
    opt_per_param = optimizer_bytes_per_param(wl)  # states off the device
    opt_dev_per_param = optimizer_bytes_per_param(wl, Tier.DEVICE)
    passes = 2 * wl.q if zo else 1
    cons = zo and wl.zo_conservative  # 3 more passes, in a second phase over the blocks

    # Per-block byte counts. Under LoRA the trainable adapters (and a new head) stay on the device;
    # only the frozen base streams, read-only, in the compute dtype.
    blocks = inv.blocks
    n = len(blocks)
    home_b = home_bytes(inv, wl, pl.home_dtype)
    wb_b, dev_fixed = [0] * n, [0] * n
    for i, s in enumerate(blocks):
        tr = s.trainable_params
        if wl.lora:
            dev_fixed[i] = tr * (cb + 4 + mom) if zo else tr * (cb + 4 + 12)
        elif zo:
            wb_b[i] = home_b[i] if tr else 0  # the updated weights go home
        else:
            wb_b[i] = tr * cb  # gradients D2H, compute dtype

    streamed = [i for i in range(n) if pl.weights_home[i] is not Tier.DEVICE]
    writeback = any(wb_b[i] for i in streamed) if zo else False
    max_stream = max((home_b[i] for i in streamed), default=0)
    depth = pl.prefetch_depth

    # ---- memory --------------------------------------------------------------------------------
    dev = {"resident weights": 0, "streaming buffers": 0, "optimizer on device": 0, "activations": 0,
           "work buffers": 0, "adapters": sum(dev_fixed)}
    pinned = pageable = ssd = 0
    pool = 0
    grad_buf = 0
    for i in range(n):
        s, wh, oh = blocks[i], pl.weights_home[i], pl.optimizer_home[i]
        if wh is Tier.DEVICE:
            dev["resident weights"] += home_b[i]
        elif wh is Tier.PINNED:
            pinned += home_b[i]
        elif wh is Tier.PAGEABLE:
            pageable += home_b[i]
        else:
            ssd += home_b[i]
        if not zo and not wl.lora and s.trainable_params:
            opt = s.trainable_params * opt_per_param
            if oh is Tier.DEVICE:
                dev["optimizer on device"] += s.trainable_params * (opt_dev_per_param + 4)  # states + fp32 gradient
            elif oh is Tier.SSD:
                ssd += opt
            else:
                pageable += opt
            if oh is not Tier.DEVICE:
                grad_buf = max(grad_buf, wb_b[i])
    if streamed:
        buffers = depth + 1 + (1 if writeback and depth > 0 else 0)
        dev["streaming buffers"] = buffers * max_stream
        if not cpu and any(pl.weights_home[i] in (Tier.SSD, Tier.PAGEABLE) for i in streamed):
            pool += (depth + 1 + (1 if writeback or not zo else 0)) * max_stream  # host staging
        elif cpu and any(pl.weights_home[i] is Tier.SSD for i in streamed):
            pool += 0  # on a CPU the device buffers are host memory: the SSD reads land there directly
    else:
        buffers = 0
    if not zo and not wl.lora:
        opt_ssd = [blocks[i].trainable_params * opt_per_param for i in range(n) if pl.optimizer_home[i] is Tier.SSD]
        if opt_ssd:
            pageable += 3 * max(opt_ssd)  # read-ahead, updating, writing back
        if grad_buf:
            dev["streaming buffers"] += 2 * grad_buf  # gradients of one block filling, one draining
            if not cpu:
                pool += 2 * grad_buf  # where they land on the host
    # Work buffers (zo2, allocated once by the engine): the compute-dtype copy a streamed block computes
    # with (cast(home +/- eps*z) is formed there), z in fp32 (z_buffer 'block': for the largest
    # trainable block, one direction's z serving both its passes; 'tensor': for the largest trainable
    # tensor, drawn again for each pass), and for the largest trainable tensor the update direction
    # (plus the fp32 working copy of a half-precision home): updates go tensor by tensor.
    if zo:
        largest = max((s.trainable_params for s in blocks), default=0)
        tensor = max((min(s.max_tensor_params, s.trainable_params) for s in blocks), default=0)
        compute_copy = 0 if wl.lora else max((blocks[i].params for i in streamed), default=0) * cb
        z = tensor if pl.z_buffer == "tensor" else largest
        dev["work buffers"] = compute_copy + z * 4 + (2 if hb != 4 else 1) * tensor * 4
    # Activations: the blocks' own; the head's vocabulary-wide tensors are the logits-and-loss part.
    layer_internal = max((s.internal_elems_per_token for s in blocks if s.name != "head"), default=0)
    if zo:
        dev["activations"] = (max(2 * wl.q, 3 if cons else 0) * T * h + Tm * layer_internal) * cb
    else:
        saved, transient = 0, Tm * layer_internal * cb
        for i, s in enumerate(blocks):
            a = pl.activation[i]
            if not s.name.startswith("layers."):
                continue
            full = T * s.internal_elems_per_token * cb
            ckpt = T * s.boundary_elems_per_token * cb
            if a == "keep":
                saved += full
            elif a == "swap":
                pool += full  # pinned host memory, allocated once with the staging pool
                transient = max(transient, 2 * Tm * s.internal_elems_per_token * cb)
            elif a == "recompute-swap":
                pool += ckpt  # the layer's input waits in pinned host memory
                transient = max(transient, 2 * ckpt)  # swapped in for its backward, the next one's coming
            else:
                saved += ckpt
        dev["activations"] = saved + 2 * T * h * cb + transient
    dev["logits and loss"] = logits_and_loss_bytes(inv, wl, Tm)
    if not cpu:  # what a CUDA process holds beyond its tensors (hardware.profile says why)
        dev["CUDA context"] = machine.context_bytes
        dev["library workspaces"] = machine.library_workspace_bytes
        dev["allocator slack"] = int(machine.allocator_slack * (dev["activations"] + dev["logits and loss"]))
    if cpu:  # host RAM is the device; the 'host' tiers hold nothing separately
        dev["host-side"] = pinned + pageable
        pinned = pageable = pool = 0
    else:
        pinned += pool
    device_total = sum(dev.values())
    memory = TierBytes(device=device_total, pinned=pinned, pageable=pageable, ssd=ssd)

    # ---- time ----------------------------------------------------------------------------------
    ssd_r_bps, ssd_w_bps = machine.disk_read_bps or 1.0, machine.disk_write_bps or 1.0
    dram = machine.dram_bps or 1.0
    adam = machine.cpu_adam_params_per_s or 1.0

    def link_rates(two_way: bool) -> tuple[float, float]:
        if two_way:
            return machine.duplex_h2d_bps or machine.h2d_bps, machine.duplex_d2h_bps or machine.d2h_bps
        return machine.h2d_bps, machine.d2h_bps

    def fetch(i: int, v: list, h2d_bps: float) -> None:
        """Bring block i's weights from home to the device. On a CPU the 'device' is host memory: an
        SSD read lands in a staging buffer and, like a host home, is copied into the block's slot by
        the CPU itself (compute-device time: the same cores)."""
        wh, b = pl.weights_home[i], home_b[i]
        if wh is Tier.DEVICE or b == 0:
            return
        if wh is Tier.SSD:
            v[SSD_R] += b / ssd_r_bps
        if cpu:
            v[GPU] += work.cpu_copy_s(machine, b)
            if wh is Tier.SSD:  # read and copied out of the staging buffer by the I/O thread
                v[GPU] += b * machine.disk_read_loss_s_per_byte + machine.cpu_burst_loss * work.cpu_copy_s(machine, b)
            return
        if wh is Tier.PAGEABLE:
            v[DRAM] += 2 * b / dram  # memcpy into the pinned staging pool (read + write)
        if wh is Tier.SSD or wh is Tier.PINNED or wh is Tier.PAGEABLE:
            v[H2D] += b / h2d_bps

    def write_back(i: int, v: list, d2h_bps: float) -> None:
        """Send block i's updated weights home (zo2)."""
        wh, b = pl.weights_home[i], wb_b[i]
        if wh is Tier.DEVICE or b == 0:
            return
        if cpu:
            v[GPU] += work.cpu_copy_s(machine, b)  # slot -> home (or the SSD write buffer)
        else:
            v[D2H] += b / d2h_bps
            if wh is Tier.PAGEABLE:
                v[DRAM] += 2 * b / dram
        if wh is Tier.SSD:
            v[SSD_W] += b / ssd_w_bps
            if cpu:
                v[GPU] += b * machine.disk_write_loss_s_per_byte

    small_rate = work.small_product_rate(machine, wl) or rate
    cal = work.calibration(machine, wl, Tm)

    def forward_parts(s: BlockSpec) -> tuple[float, float]:
        """(products and elementwise work, the loss) of one forward of block s over the step's tokens;
        the first is what the measured layers calibrate (cal), the loss has its own measured rates."""
        raw = work.product_s(machine, wl, s, T, micro_batches, rate) + work.forward_extra_s(machine, wl, inv, s, T, Tm,
                                                                                         small_rate)
        return raw, (work.head_loss_s(machine, wl, inv, T, Tm) if s.name == "head" else 0.0)

    flops_step = 0.0
    phases: list[list[list[float]]] = []
    reversed_phase: list[bool] = []
    if zo:
        h2d_bps, d2h_bps = link_rates(writeback)
        engine = bool(streamed)  # the streamed engine runs the step; with nothing streamed, the reference
        tied_embed = inv.tied_embeddings
        per = []
        priced: dict[tuple[BlockSpec, bool], float] = {}
        for i, s in enumerate(blocks):
            v = [0.0] * _N
            f = passes * T * s.forward_flops_per_token(wl.seq_len)
            flops_step += f
            key = (_shape_of(s), pl.weights_home[i] is not Tier.DEVICE)
            if key not in priced:  # identical layers: priced once per estimate
                raw, loss = forward_parts(s)
                priced[key] = passes * (cal.forward_no_grad * raw + loss) + \
                    work.zo_block_s(machine, wl, s, pl.home_dtype, engine=engine,
                                    streamed=pl.weights_home[i] is not Tier.DEVICE and not wl.lora,
                                    tied_embed=tied_embed and s.name == "embed", z_per_tensor=pl.z_buffer == "tensor")
            v[GPU] = priced[key]
            fetch(i, v, h2d_bps)
            write_back(i, v, d2h_bps)
            per.append(v)
        phases.append(per)
        reversed_phase.append(False)
        if cons:
            second = []
            for i, s in enumerate(blocks):
                v = [0.0] * _N
                flops_step += 3 * T * s.forward_flops_per_token(wl.seq_len)
                raw, loss = forward_parts(s)
                v[GPU] = 3 * (cal.forward_no_grad * raw + loss)
                v[GPU] += work.zo_candidates_s(machine, wl, s, pl.home_dtype, engine=engine,
                                               tied_embed=tied_embed and s.name == "embed")
                fetch(i, v, machine.h2d_bps)  # read-only: nothing goes back
                second.append(v)
            phases.append(second)
            reversed_phase.append(False)
    else:
        swaps = any(a in ("swap", "recompute-swap") for a in pl.activation)
        fwd, bwd = [], []
        priced: dict[BlockSpec, tuple[float, float, float]] = {}  # by _shape_of
        h2d_f, d2h_f = link_rates(swaps)
        h2d_b, d2h_b = link_rates(True)
        for i, s in enumerate(blocks):
            fl = T * s.forward_flops_per_token(wl.seq_len)
            tr = s.trainable_params
            bwd_factor = 1.0 + (tr / s.params if wl.lora and s.params else 1.0)
            if s.params == 0:
                bwd_factor = 1.0
            act = pl.activation[i] if s.name.startswith("layers.") else "keep"
            recompute = act in ("recompute", "recompute-swap")
            swap_b = (T * s.internal_elems_per_token * cb if act == "swap"
                      else T * s.boundary_elems_per_token * cb if act == "recompute-swap" else 0)
            v = [0.0] * _N
            key = _shape_of(s)
            if key not in priced:  # identical layers: priced once per estimate
                priced[key] = (*forward_parts(s), work.grad_s(machine, wl, s))
            raw, loss, grad_s = priced[key]
            fwd_s = cal.forward * raw + loss
            v[GPU] = fwd_s
            fetch(i, v, h2d_f)
            if swap_b and not cpu:
                v[D2H] += swap_b / d2h_f
            elif swap_b:  # a CPU device's 'host' is the same memory: a copy each way, by the cores
                v[GPU] += work.cpu_copy_s(machine, swap_b)
            fwd.append(v)
            w = [0.0] * _N
            extra = fl if recompute else 0.0
            # Backward: each product twice (input and weight gradients; LoRA: the frozen base's
            # input gradient only), each elementwise op's gradient about as costly as the op itself
            # twice over (reads the upstream gradient and its saved inputs, writes one per input);
            # then scaled by the measured layers' backward (cal).
            w[GPU] = cal.backward * (bwd_factor * raw + grad_s) + bwd_factor * loss + (fwd_s if recompute else 0.0)
            if s.name == "head":
                w[GPU] += work.loss_backward_s(machine, wl, inv, T)
            flops_step += fl * (1 + bwd_factor) + extra
            fetch(i, w, h2d_b)
            if swap_b and not cpu:
                w[H2D] += swap_b / h2d_b
            elif swap_b:
                w[GPU] += work.cpu_copy_s(machine, swap_b)
            oh = pl.optimizer_home[i]
            if not wl.lora and tr:
                if oh is Tier.DEVICE:
                    if cpu:
                        w[CPU_OPT] += tr / adam
                    else:
                        w[GPU] += tr * DEVICE_ADAM_BYTES_PER_PARAM / mem_bps
                else:
                    if not cpu:
                        w[D2H] += wb_b[i] / d2h_b
                    else:  # the gradients copied to the optimizer's buffers; it runs inline on a
                        # CPU device (engine/optimizer.py) and writes the new weights home
                        w[GPU] += work.cpu_copy_s(machine, wb_b[i])
                        if pl.weights_home[i] is not Tier.DEVICE:
                            w[GPU] += work.cpu_copy_s(machine, home_b[i])
                        if oh is Tier.SSD:
                            w[GPU] += tr * opt_per_param * (machine.disk_read_loss_s_per_byte
                                                            + machine.disk_write_loss_s_per_byte)
                    w[CPU_OPT] += tr / adam
                    if oh is Tier.SSD:
                        w[SSD_R] += tr * opt_per_param / ssd_r_bps
                        w[SSD_W] += tr * opt_per_param / ssd_w_bps
                    if pl.weights_home[i] is Tier.SSD:
                        w[SSD_W] += home_b[i] / ssd_w_bps  # the updated compute-dtype copy
                    elif pl.weights_home[i] is Tier.DEVICE and not cpu:
                        w[H2D] += home_b[i] / h2d_b  # updated weights back to the resident copy
            elif wl.lora and tr and cpu:
                w[CPU_OPT] += tr / adam
            elif wl.lora and tr:
                w[GPU] += tr * DEVICE_ADAM_BYTES_PER_PARAM / mem_bps
            bwd.append(w)
        phases.append(fwd)
        phases.append(list(reversed(bwd)))
        reversed_phase += [False, True]

    totals = [0.0] * _N
    step = 0.0
    order = list(range(n))
    for p, per in enumerate(phases):
        idx = list(reversed(order)) if reversed_phase[p] else order
        for v in per:
            for r in range(_N):
                totals[r] += v[r]
        step += _phase_time(per, [pl.weights_home[i] for i in idx], depth, cpu, machine)

    names = {"gpu": totals[GPU], "h2d": totals[H2D], "d2h": totals[D2H], "ssd": totals[SSD_R] + totals[SSD_W],
             "cpu_optimizer": totals[CPU_OPT], "dram": totals[DRAM]}
    bottleneck = max(names, key=lambda k: names[k])
    times = StepTimes(gpu_s=totals[GPU], h2d_s=totals[H2D], d2h_s=totals[D2H], ssd_read_s=totals[SSD_R],
                      ssd_write_s=totals[SSD_W], cpu_optimizer_s=totals[CPU_OPT], dram_s=totals[DRAM],
                      step_s=step, bottleneck=bottleneck)
    wire = pl.home_dtype if (zo and not wl.lora) else wl.compute_dtype
    parts = tuple((k, v) for k, v in dev.items() if v)
    return Estimate(memory=memory, times=times, flops_per_step=flops_step, pinned_pool_bytes=pool,
                    device_buffers=buffers, wire_dtype=wire, device_parts=parts)


@functools.lru_cache(maxsize=4096)
def _shape_of(s: BlockSpec) -> BlockSpec:
    """What prices a block: its spec with every decoder layer's name made the same (the work model
    tells embed, layers and head apart by name, never one layer from another)."""
    return dataclasses.replace(s, name="layers.*") if s.name.startswith("layers.") else s


def _drive_s(read_s: float, write_s: float, machine: Machine | None) -> float:
    """The drive's seconds for a phase's reads and writes: one after the other, or, when both happen and
    the drive serves them at once slower than that (the measured mixed rate), at that rate."""
    both = read_s + write_s
    if machine is None or not (read_s > 0 and write_s > 0 and machine.disk_mixed_bps > 0):
        return both
    moved = read_s * machine.disk_read_bps + write_s * machine.disk_write_bps
    return max(both, moved / machine.disk_mixed_bps)


def _phase_time(per: list[list[float]], homes: list[Tier], depth: int, cpu: bool = False,
                machine: Machine | None = None) -> float:
    """One phase under the overlap model (module docstring). On a CPU device the compute, the
    optimizer and host copies share the same cores: they add up, and only the drive overlaps them."""
    if depth == 0:
        total = sum(sum(v) for v in per)
        reads, writes = sum(v[SSD_R] for v in per), sum(v[SSD_W] for v in per)
        return total - reads - writes + _drive_s(reads, writes, machine)
    if cpu:
        per = [[v[GPU] + v[CPU_OPT] + v[DRAM]] + v[1:CPU_OPT] + [0.0, 0.0] for v in per]
    busy = [sum(v[r] for v in per) for r in range(_N)]
    busy[SSD_R] = _drive_s(busy[SSD_R], busy[SSD_W], machine)  # one drive: reads and writes share it
    busy[SSD_W] = 0.0
    streamed = [k for k, t in enumerate(homes) if t is not Tier.DEVICE]
    fill = drain = 0.0
    if streamed:
        first, last = streamed[0], streamed[-1]
        up = per[first][SSD_R] + per[first][DRAM] + per[first][H2D]
        fill = max(0.0, up - sum(per[k][GPU] for k in range(first)))
        down = per[last][D2H] + per[last][SSD_W] + per[last][CPU_OPT]
        drain = max(0.0, down - sum(per[k][GPU] for k in range(last + 1, len(per))))
    elif per:
        drain = per[-1][CPU_OPT]
    return max(busy) + fill + drain
