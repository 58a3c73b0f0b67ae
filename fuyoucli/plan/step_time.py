"""Plan stage, the time model: seconds each resource is busy in one step of a placement, and the step.

Pure arithmetic (no torch, no I/O); every rate comes from the Machine, so from a measured or preset
HardwareProfile. Overlap model (pipelined per block, as Fuyou and ZO2 run it): within a phase, a
block's fetch (SSD read -> host staging -> H2D) overlaps the previous block's compute and the
write-back of the one before, so a phase takes the busiest resource's total plus a fill (the first
streamed block's fetch, less the compute of resident blocks before it) and a drain (the last streamed
block's write-back). With prefetch depth 0 nothing overlaps: the phase is the sum of everything.
A zo2 step is one phase (all 2*q forward passes run while each block is resident), plus for the
conservative variant a second, read-only one (each streamed block fetched again, 3 forward passes:
w, w - u, w + u); a first-order step is a forward phase and a backward phase (blocks re-fetched in
reverse, gradients D2H as produced, CPU AdamW of block i overlapped with the backward of block i-1).
Execution is layer-major: all micro-batches of a step pass through a block while it is on the device.
One drive serves a phase's reads and writes: their times add, or, where the profile measured the
drive slower at both at once, the bytes both ways go at that mixed rate. Each forward's products and
elementwise work, and each backward, are scaled by the profile's measured decoder layers
(work.calibration).
"""

from __future__ import annotations

import dataclasses
import functools

from fuyoucli.model.types import DTYPE_BYTES, BlockSpec, ModelInventory
from fuyoucli.plan import work
from fuyoucli.plan.memory import BlockBytes, block_bytes, optimizer_bytes_per_param
from fuyoucli.plan.types import Machine, Placement, StepTimes, Tier, Workload

# AdamW on the compute device (optimizer_home DEVICE): reads fp32 master, m, v, grad and writes
# master, m, v (28 bytes, as BACKGROUND.md's CPU figure) plus the compute-dtype weight copy.
DEVICE_ADAM_BYTES_PER_PARAM = 28
# Resources in StepTimes order; 'ssd' is read + write of one drive, which share its bandwidth.
RESOURCES = ("gpu", "h2d", "d2h", "ssd_read", "ssd_write", "cpu_optimizer", "dram")
_N = len(RESOURCES)
GPU, H2D, D2H, SSD_R, SSD_W, CPU_OPT, DRAM = range(_N)

Busy = list[float]
"""Seconds one block keeps each resource busy in a phase, indexed by GPU, H2D, ... (RESOURCES)."""


class _Step:
    """One placement's pricing: the rates and token counts every block's seconds are made of."""

    def __init__(self, inv: ModelInventory, wl: Workload, machine: Machine, pl: Placement):
        self.inv, self.wl, self.machine, self.pl = inv, wl, machine, pl
        self.cpu = machine.compute_device == "cpu"
        self.bytes: BlockBytes = block_bytes(inv, wl, pl)
        self.tokens = wl.tokens_per_step
        self.micro_tokens = pl.micro_batch_size * wl.seq_len
        self.micro_batches = max(1, self.tokens // max(1, self.micro_tokens))
        self.rate = work.compute_rate(machine, wl, inv.hidden_size) or 1.0
        self.small_rate = work.small_product_rate(machine, wl) or self.rate
        self.calibration = work.calibration(machine, wl, self.micro_tokens)
        self.ssd_read_bps, self.ssd_write_bps = machine.disk_read_bps or 1.0, machine.disk_write_bps or 1.0
        self.dram_bps = machine.dram_bps or 1.0
        self.adam_params_per_s = machine.adam_params_per_s(wl.adam_states, wl.adam_master) or 1.0

    def link_rates(self, two_way: bool) -> tuple[float, float]:
        m = self.machine
        if two_way:
            return m.duplex_h2d_bps or m.h2d_bps, m.duplex_d2h_bps or m.d2h_bps
        return m.h2d_bps, m.d2h_bps

    def forward_parts(self, s: BlockSpec) -> tuple[float, float]:
        """(products and elementwise work, the loss) of one forward of block s over the step's tokens;
        the first is what the measured layers calibrate, the loss has its own measured rates."""
        m, wl = self.machine, self.wl
        raw = work.product_s(m, wl, s, self.tokens, self.micro_batches, self.rate) + \
            work.forward_extra_s(m, wl, self.inv, s, self.tokens, self.micro_tokens, self.small_rate)
        return raw, (work.head_loss_s(m, wl, self.inv, self.tokens, self.micro_tokens) if s.name == "head" else 0.0)

    def fetch(self, i: int, v: Busy, h2d_bps: float) -> None:
        """Bring block i's weights from home to the device. On a CPU the 'device' is host memory: an
        SSD read lands in a staging buffer and, like a host home, is copied into the block's slot by
        the CPU itself (compute-device time: the same cores)."""
        m, home, b = self.machine, self.pl.weights_home[i], self.bytes.home[i]
        if home is Tier.DEVICE or b == 0:
            return
        if home is Tier.SSD:
            v[SSD_R] += b / self.ssd_read_bps
        if self.cpu:
            v[GPU] += work.cpu_copy_s(m, b)
            if home is Tier.SSD:  # read and copied out of the staging buffer by the I/O thread
                v[GPU] += b * m.disk_read_loss_s_per_byte + m.cpu_burst_loss * work.cpu_copy_s(m, b)
            return
        if home is Tier.PAGEABLE:
            v[DRAM] += 2 * b / self.dram_bps  # memcpy into the pinned staging pool (read + write)
        if home is Tier.SSD or home is Tier.PINNED or home is Tier.PAGEABLE:
            v[H2D] += b / h2d_bps

    def write_back(self, i: int, v: Busy, d2h_bps: float) -> None:
        """Send block i's updated weights home (zo2)."""
        m, home, b = self.machine, self.pl.weights_home[i], self.bytes.write_back[i]
        if home is Tier.DEVICE or b == 0:
            return
        if self.cpu:
            v[GPU] += work.cpu_copy_s(m, b)  # slot -> home (or the SSD write buffer)
        else:
            v[D2H] += b / d2h_bps
            if home is Tier.PAGEABLE:
                v[DRAM] += 2 * b / self.dram_bps
        if home is Tier.SSD:
            v[SSD_W] += b / self.ssd_write_bps
            if self.cpu:
                v[GPU] += b * m.disk_write_loss_s_per_byte


@dataclasses.dataclass
class _Phase:
    busy: list[Busy]
    """Per block, in the order the phase visits them."""
    reverse: bool = False
    """Visits the blocks last to first (a backward)."""


def step_times(inv: ModelInventory, wl: Workload, machine: Machine, pl: Placement) -> tuple[StepTimes, float]:
    """(busy seconds per resource and the step under the overlap model, model FLOPs of the step)."""
    step = _Step(inv, wl, machine, pl)
    phases, flops = _zo_phases(step) if wl.method == "zo2" else _first_order_phases(step)
    totals = [0.0] * _N
    step_s = 0.0
    order = list(range(len(inv.blocks)))
    for phase in phases:
        visited = list(reversed(order)) if phase.reverse else order
        for v in phase.busy:
            for r in range(_N):
                totals[r] += v[r]
        step_s += _phase_time(phase.busy, [pl.weights_home[i] for i in visited], pl.prefetch_depth, step.cpu,
                              machine)
    names = {"gpu": totals[GPU], "h2d": totals[H2D], "d2h": totals[D2H], "ssd": totals[SSD_R] + totals[SSD_W],
             "cpu_optimizer": totals[CPU_OPT], "dram": totals[DRAM]}
    bottleneck = max(names, key=lambda k: names[k])
    times = StepTimes(gpu_s=totals[GPU], h2d_s=totals[H2D], d2h_s=totals[D2H], ssd_read_s=totals[SSD_R],
                      ssd_write_s=totals[SSD_W], cpu_optimizer_s=totals[CPU_OPT], dram_s=totals[DRAM],
                      step_s=step_s, bottleneck=bottleneck)
    return times, flops


# ---- zo2 ------------------------------------------------------------------------------------------


def _zo_phases(step: _Step) -> tuple[list[_Phase], float]:
    """All 2q passes while each block is on the device, its update going home after; the conservative
    variant's candidates in a second, read-only pass."""
    inv, wl, machine, pl = step.inv, step.wl, step.machine, step.pl
    passes = 2 * wl.q
    writeback = any(step.bytes.write_back[i] for i in step.bytes.streamed)
    h2d_bps, d2h_bps = step.link_rates(writeback)
    engine = bool(step.bytes.streamed)  # the streamed engine runs the step; with nothing streamed, the reference
    flops = 0.0
    busy = []
    priced: dict[tuple[BlockSpec, bool], float] = {}
    for i, s in enumerate(inv.blocks):
        v = [0.0] * _N
        flops += passes * step.tokens * s.forward_flops_per_token(wl.seq_len)
        streamed = pl.weights_home[i] is not Tier.DEVICE
        key = (_shape_of(s), streamed)
        if key not in priced:  # identical layers: priced once per estimate
            raw, loss = step.forward_parts(s)
            priced[key] = passes * (step.calibration.forward_no_grad * raw + loss +
                                    step.micro_batches * work.dequant_s(machine, wl, s)) + \
                work.zo_block_s(machine, wl, s, pl.home_dtype, engine=engine, streamed=streamed and not wl.lora,
                                tied_embed=inv.tied_embeddings and s.name == "embed",
                                z_per_tensor=pl.z_buffer == "tensor")
        v[GPU] = priced[key]
        step.fetch(i, v, h2d_bps)
        step.write_back(i, v, d2h_bps)
        busy.append(v)
    phases = [_Phase(busy)]
    if wl.zo_conservative:
        second = []
        for i, s in enumerate(inv.blocks):
            v = [0.0] * _N
            flops += 3 * step.tokens * s.forward_flops_per_token(wl.seq_len)
            raw, loss = step.forward_parts(s)
            v[GPU] = 3 * (step.calibration.forward_no_grad * raw + loss +
                          step.micro_batches * work.dequant_s(machine, wl, s))
            v[GPU] += work.zo_candidates_s(machine, wl, s, pl.home_dtype, engine=engine,
                                           tied_embed=inv.tied_embeddings and s.name == "embed")
            step.fetch(i, v, machine.h2d_bps)  # read-only: nothing goes back
            second.append(v)
        phases.append(_Phase(second))
    return phases, flops


# ---- first-order --------------------------------------------------------------------------------


def _first_order_phases(step: _Step) -> tuple[list[_Phase], float]:
    """A forward over the blocks, then a backward in reverse: weights fetched again, activations
    swapped back or recomputed, gradients off to the optimizer (module docstring)."""
    inv, wl, pl = step.inv, step.wl, step.pl
    compute_bytes = DTYPE_BYTES[wl.compute_dtype]
    swaps = any(a in ("swap", "recompute-swap") for a in pl.activation)
    h2d_forward, d2h_forward = step.link_rates(swaps)
    h2d_backward, _ = step.link_rates(True)
    forward, backward = [], []
    flops = 0.0
    priced: dict[BlockSpec, tuple[float, float, float]] = {}  # by _shape_of
    for i, s in enumerate(inv.blocks):
        forward_flops = step.tokens * s.forward_flops_per_token(wl.seq_len)
        backward_factor = 1.0 + (s.trainable_params / s.params if wl.lora and s.params else 1.0)
        if s.params == 0:
            backward_factor = 1.0
        policy = pl.activation[i] if s.name.startswith("layers.") else "keep"
        recompute = policy in ("recompute", "recompute-swap")
        swapped_bytes = (step.tokens * s.internal_elems_per_token * compute_bytes if policy == "swap"
                         else step.tokens * s.boundary_elems_per_token * compute_bytes if policy == "recompute-swap"
                         else 0)
        key = _shape_of(s)
        if key not in priced:  # identical layers: priced once per estimate
            priced[key] = (*step.forward_parts(s), work.grad_s(step.machine, wl, s))
        raw, loss, grad_s = priced[key]
        dequant_s = step.micro_batches * work.dequant_s(step.machine, wl, s)  # again in the backward
        forward_s = step.calibration.forward * raw + loss + dequant_s
        forward.append(_forward_busy(step, i, forward_s, swapped_bytes, h2d_forward, d2h_forward))
        # Backward: each product twice (input and weight gradients; LoRA: the frozen base's input
        # gradient only), each elementwise op's gradient about as costly as the op itself twice over
        # (reads the upstream gradient and its saved inputs, writes one per input); then scaled by the
        # measured layers' backward (calibration).
        w = [0.0] * _N
        w[GPU] = step.calibration.backward * (backward_factor * raw + grad_s) + backward_factor * loss + \
            dequant_s + (forward_s if recompute else 0.0)
        if s.name == "head":
            w[GPU] += work.loss_backward_s(step.machine, wl, inv, step.tokens)
        flops += forward_flops * (1 + backward_factor) + (forward_flops if recompute else 0.0)
        step.fetch(i, w, h2d_backward)
        if swapped_bytes and not step.cpu:
            w[H2D] += swapped_bytes / h2d_backward
        elif swapped_bytes:
            w[GPU] += work.cpu_copy_s(step.machine, swapped_bytes)
        _optimizer_busy(step, i, w)
        backward.append(w)
    return [_Phase(forward), _Phase(list(reversed(backward)), reverse=True)], flops


def _forward_busy(step: _Step, i: int, forward_s: float, swapped_bytes: int, h2d_bps: float, d2h_bps: float) -> Busy:
    v = [0.0] * _N
    v[GPU] = forward_s
    step.fetch(i, v, h2d_bps)
    if swapped_bytes and not step.cpu:
        v[D2H] += swapped_bytes / d2h_bps
    elif swapped_bytes:  # a CPU device's 'host' is the same memory: a copy each way, by the cores
        v[GPU] += work.cpu_copy_s(step.machine, swapped_bytes)
    return v


def _optimizer_busy(step: _Step, i: int, w: Busy) -> None:
    """Block i's AdamW after its backward: on the device, or its gradients to the CPU worker (states on
    the host or the SSD), whose updated weights go back to their home or the resident copy."""
    wl, machine, pl, blocks = step.wl, step.machine, step.pl, step.bytes
    trainable = step.inv.blocks[i].trainable_params
    optimizer_home, weights_home = pl.optimizer_home[i], pl.weights_home[i]
    _, d2h_bps = step.link_rates(True)
    h2d_bps, _ = step.link_rates(True)
    states_per_param = optimizer_bytes_per_param(wl, streamed=weights_home is not Tier.DEVICE)
    if wl.lora:
        if trainable and step.cpu:
            w[CPU_OPT] += trainable / step.adam_params_per_s
        elif trainable:
            w[GPU] += trainable * DEVICE_ADAM_BYTES_PER_PARAM / machine.device_mem_bps
        return
    if not trainable:
        return
    if optimizer_home is Tier.DEVICE:
        if step.cpu:
            w[CPU_OPT] += trainable / step.adam_params_per_s
        else:
            w[GPU] += trainable * DEVICE_ADAM_BYTES_PER_PARAM / machine.device_mem_bps
        return
    if not step.cpu:
        w[D2H] += blocks.write_back[i] / d2h_bps
    else:  # the gradients copied to the optimizer's buffers; it runs inline on a CPU device
        # (engine/optimizer.py) and writes the new weights home
        w[GPU] += work.cpu_copy_s(machine, blocks.write_back[i])
        if weights_home is not Tier.DEVICE:
            w[GPU] += work.cpu_copy_s(machine, blocks.home[i])
        if optimizer_home is Tier.SSD:
            w[GPU] += trainable * states_per_param * (machine.disk_read_loss_s_per_byte
                                                      + machine.disk_write_loss_s_per_byte)
    w[CPU_OPT] += trainable / step.adam_params_per_s
    if optimizer_home is Tier.SSD:
        w[SSD_R] += trainable * states_per_param / step.ssd_read_bps
        w[SSD_W] += trainable * states_per_param / step.ssd_write_bps
    if weights_home is Tier.SSD:
        w[SSD_W] += blocks.home[i] / step.ssd_write_bps  # the updated compute-dtype copy
        if wl.adam_master == "bf16":  # that copy is the master: the optimizer reads it too
            w[SSD_R] += blocks.home[i] / step.ssd_read_bps
    elif weights_home is Tier.DEVICE and not step.cpu:
        w[H2D] += blocks.home[i] / h2d_bps  # updated weights back to the resident copy


# ---- the overlap model ---------------------------------------------------------------------------


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


def _phase_time(per: list[Busy], homes: list[Tier], depth: int, cpu: bool = False,
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
