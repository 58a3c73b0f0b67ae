"""Plan stage, the search: the fastest placement that fits every tier, assembled into the Plan.

Chooses how many decoder layers stay resident, where streamed weights live (pinned, pageable, SSD,
filled fastest first), where optimizer states live, the activation policy (keep / swap / recompute,
Fuyou's seconds saved per byte), prefetch depth, the zo2 home dtype, how zo2 holds z (a block's at
once, or tensor by tensor where that is what fits) and the largest micro-batch, by pricing candidates
with plan.cost. When nothing fits, plan.explain says why and what would. Pure: the workload, the
machine and the options come in as data (train.plan_inputs builds them); no torch, no file.

Why it is long: the search's candidate builder and its assembly into a Plan share the
workload's derived sizes; split, each half would recompute them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from fuyoucli.model.types import DTYPE_BYTES, ModelInventory
from fuyoucli.plan import explain, work
from fuyoucli.plan.cost import Estimate, estimate
from fuyoucli.plan.memory import (capacities, fits, home_bytes, host_staging_buffers, optimizer_bytes_per_param,
                                  overflows)
from fuyoucli.plan.types import BlockPlan, Machine, Options, Placement, Plan, Tier, Workload


@dataclasses.dataclass
class _Best:
    placement: Placement | None = None
    est: Estimate | None = None
    key: tuple = ()

    def offer(self, pl: Placement, est: Estimate, key: tuple) -> None:
        if self.placement is None or key < self.key:
            self.placement, self.est, self.key = pl, est, key


class _Search:
    """Builds and prices candidates for one workload on one machine; counts the estimates it made."""

    def __init__(self, inv: ModelInventory, wl: Workload, machine: Machine, opts: Options):
        self.inv, self.wl, self.m, self.o = inv, wl, machine, opts
        self.cap = capacities(machine, opts)
        self.zo, self.cpu = wl.method == "zo2", machine.compute_device == "cpu"
        self.layers = [i for i, b in enumerate(inv.blocks) if b.name.startswith("layers.")]
        self.n = len(inv.blocks)
        self.evals = 0

    def run(self, home_dtype: str, micro: int, depth: int, n_res: int, optimizer_on_device: bool,
            swap: str | None = None) -> tuple[Placement, Estimate]:
        pl = self.build(home_dtype, micro, depth, n_res, optimizer_on_device, swap)
        return pl, self.eval(pl)

    def eval(self, pl: Placement) -> Estimate:
        self.evals += 1
        return estimate(self.inv, self.wl, self.m, pl)

    def build(self, home_dtype: str, micro: int, depth: int, n_res: int, optimizer_on_device: bool,
              swap: str | None = None) -> Placement:
        """Resident: embed, head and the last n_res layers. Streamed weights fill the fastest host
        tier first; optimizer states take the host RAM left, then the SSD. Layers recompute in the
        backward from inputs kept on the device, unless `swap` says: 'inputs' (recompute-swap: the
        inputs wait in pinned host memory) or 'all' (every saved activation swapped, no recompute);
        that host memory is reserved before weights and optimizer states take theirs."""
        inv, wl, o, cap = self.inv, self.wl, self.o, self.cap
        block_home_bytes = home_bytes(inv, wl, home_dtype)
        resident = set(i for i in range(self.n) if i not in self.layers)
        resident.update(self.layers[len(self.layers) - n_res:] if n_res else [])
        streamed = [i for i in range(self.n) if i not in resident]
        largest_streamed = max((block_home_bytes[i] for i in streamed), default=0)
        states_per_param = 0 if (self.zo or wl.lora) else optimizer_bytes_per_param(wl)  # (a streamed block's)
        compute_bytes = DTYPE_BYTES[wl.compute_dtype]
        largest_gradients = max((s.trainable_params * compute_bytes for s in inv.blocks), default=0)
        # the host staging memory.py prices (first-order: and the gradients' landing buffers)
        staging = host_staging_buffers(depth, zo=self.zo, writeback=self.zo and not wl.lora)
        reserve = staging * largest_streamed + (0 if self.zo else 2 * largest_gradients)
        if swap is not None:
            per_token = {"all": lambda b: b.internal_elems_per_token, "inputs": lambda b: b.boundary_elems_per_token}[swap]
            reserve += sum(wl.tokens_per_step * per_token(inv.blocks[i]) * compute_bytes for i in self.layers)
        ssd_ok = cap.ssd > 0
        # states read ahead, updating and written back, when some go to the SSD
        states_staging = 3 * max((int(b.trainable_params * states_per_param) for b in inv.blocks), default=0) \
            if ssd_ok else 0
        weights, host_left = self._weights_homes(block_home_bytes, streamed, cap.pinned - reserve,
                                                 max(cap.pageable, cap.pinned) - reserve - states_staging)
        optimizer_homes = self._optimizer_homes(resident, optimizer_on_device, states_per_param, host_left)
        activations: list[str | None] = [None] * self.n
        if not self.zo:
            for i in range(self.n):
                default = {None: "recompute", "inputs": "recompute-swap", "all": "swap"}[swap]
                activations[i] = (o.activation or default) if i in self.layers else "keep"
        return Placement(home_dtype=home_dtype, weights_home=tuple(weights), optimizer_home=tuple(optimizer_homes),
                         activation=tuple(activations), prefetch_depth=depth if streamed else 0,
                         micro_batch_size=micro)

    def _weights_homes(self, block_home_bytes: list[int], streamed: list[int], pinned_left: int,
                       host_left: int) -> tuple[list[Tier], int]:
        """Streamed weights fill pinned, then pageable host memory, then the SSD; returns the homes and
        the host RAM left for optimizer states."""
        o, cap = self.o, self.cap
        ssd_ok = cap.ssd > 0
        weights = [Tier.DEVICE] * self.n
        for i in streamed:
            b = block_home_bytes[i]
            if o.weights_home is not None:
                weights[i] = o.weights_home  # on a CPU a host home is pointless but valid (benchmarks)
            elif self.cpu:  # streaming saves RAM only from the SSD; without a swap_dir, host RAM it is
                weights[i] = Tier.SSD if ssd_ok else Tier.PAGEABLE
            elif b <= pinned_left and b <= host_left:
                weights[i], pinned_left, host_left = Tier.PINNED, pinned_left - b, host_left - b
            elif b <= host_left:
                weights[i], host_left = Tier.PAGEABLE, host_left - b
            elif ssd_ok:
                weights[i] = Tier.SSD
            else:
                weights[i], host_left = Tier.PAGEABLE, host_left - b  # does not fit: reported
        if o.weights_home is not None and not self.cpu:
            if o.weights_home in (Tier.PINNED, Tier.PAGEABLE):
                host_left -= sum(block_home_bytes[i] for i in streamed)
        if self.cpu:  # host RAM is the device: resident blocks and host-homed streamed ones use it
            host_left = cap.device - sum(block_home_bytes[i] for i in range(self.n) if weights[i] is not Tier.SSD)
        return weights, host_left

    def _optimizer_homes(self, resident: set[int], optimizer_on_device: bool, states_per_param: float,
                         host_left: int) -> list[Tier | None]:
        """First-order states: on the device for resident blocks when asked (and LoRA's always), else the
        host RAM left, then the SSD; on a CPU the 'device' is that RAM."""
        o, wl = self.o, self.wl
        ssd_ok = self.cap.ssd > 0
        optimizer_homes: list[Tier | None] = [None] * self.n
        for i, s in enumerate(self.inv.blocks):
            if self.zo or not s.trainable_params:
                continue
            if wl.lora:
                optimizer_homes[i] = Tier.DEVICE
                continue
            need = int(s.trainable_params * (states_per_param if i not in resident
                                             else optimizer_bytes_per_param(wl, streamed=False)))
            if o.optimizer_home is not None:
                optimizer_homes[i] = o.optimizer_home
            elif i in resident and optimizer_on_device:
                optimizer_homes[i] = Tier.DEVICE
            elif self.cpu:
                optimizer_homes[i] = Tier.DEVICE if need <= host_left or not ssd_ok else Tier.SSD
                host_left -= need if optimizer_homes[i] is Tier.DEVICE else 0
            elif need <= host_left or not ssd_ok:
                optimizer_homes[i], host_left = Tier.PAGEABLE, host_left - need
            else:
                optimizer_homes[i] = Tier.SSD
        return optimizer_homes

    def per_tensor(self, pl: Placement) -> tuple[Placement, Estimate]:
        """zo2: the placement with z drawn tensor by tensor (a tensor's z on the device, not a block's)."""
        pl = dataclasses.replace(pl, z_buffer="tensor")
        return pl, self.eval(pl)

    def swappable(self, pl: Placement) -> bool:
        return not self.zo and not self.cpu and self.o.activation is None and bool(self.layers)

    def tune_activations(self, pl: Placement, est: Estimate) -> tuple[Placement, Estimate]:
        """Keep saved activations on the device while it has room (free in time), then swap the rest
        to pinned host memory while that lowers the step (convex in the swapped count, as Fuyou
        observes); the others are recomputed from the block's input (kept where the candidate kept
        it: on the device, or swapped when the device was short even so)."""
        if self.zo or self.o.activation is not None or not self.layers:
            return pl, est
        wl, cb = self.wl, DTYPE_BYTES[self.wl.compute_dtype]
        order = sorted(self.layers, key=lambda i: -i)  # the backward meets the last layers first
        base = pl.activation[order[0]]
        if base == "swap":  # every layer swapped already: nothing left to trade
            return pl, est

        def with_acts(keep: int, swap: int) -> Placement:
            act = list(pl.activation)
            for k, i in enumerate(order):
                act[i] = "keep" if k < keep else ("swap" if k < keep + swap else base)
            return dataclasses.replace(pl, activation=tuple(act))

        freed = (lambda b: b.boundary_elems_per_token) if base == "recompute" else (lambda b: 0)
        per = max(1, wl.tokens_per_step * max(self.inv.blocks[i].internal_elems_per_token
                                               - freed(self.inv.blocks[i]) for i in order) * cb)
        slack = self.cap.device - est.memory.device
        keep = max(0, min(len(order), slack // per)) if slack > 0 else 0
        best_pl, best_est = pl, est
        while keep > 0:
            cand = with_acts(keep, 0)
            e = self.eval(cand)
            if fits(e.memory, self.cap):
                best_pl, best_est = cand, e
                break
            keep -= 1
        rest = len(order) - keep
        if rest == 0 or self.cpu or best_est.times.bottleneck in ("h2d", "d2h"):
            return best_pl, best_est

        def cost(s: int) -> tuple[float, Placement, Estimate]:
            cand = with_acts(keep, s)
            e = self.eval(cand)
            return (e.times.step_s if fits(e.memory, self.cap) else float("inf")), cand, e

        lo, hi = 0, rest
        while hi - lo > 32:  # ternary search on an integer, convex step time; exhaustive when small
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            c1, c2 = cost(m1)[0], cost(m2)[0]
            if c1 == c2 == float("inf"):
                lo = m1  # too few swaps leave the device short: the feasible side is above
            elif c1 <= c2:
                hi = m2
            else:
                lo = m1
        for s in range(lo, hi + 1):
            t, cand, e = cost(s)
            if t < best_est.times.step_s:
                best_pl, best_est = cand, e
        return best_pl, best_est


def _key(pl: Placement, est: Estimate) -> tuple:
    """Fastest first; on a tie, fewer streamed blocks (nothing to go wrong on the link), then the larger
    micro-batch, the smaller prefetch depth and the smaller device footprint."""
    streamed = sum(1 for t in pl.weights_home if t is not Tier.DEVICE)
    return (round(est.times.step_s, 9), streamed, -pl.micro_batch_size, pl.prefetch_depth, est.memory.device)


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _grid(n_layers: int) -> list[int]:
    if n_layers <= 24:
        return list(range(n_layers + 1))
    return sorted({round(k * n_layers / 16) for k in range(17)})


def search(inv: ModelInventory, wl: Workload, machine: Machine, opts: Options) -> tuple[Placement, Estimate, bool, list[str]]:
    """(placement, estimate, feasible, notes): the fastest fitting candidate, else the smallest one."""
    s = _Search(inv, wl, machine, opts)
    home_dtype = _home_dtype(wl, opts)
    resident_counts = _resident_counts(s)
    best = _fastest(s, home_dtype, resident_counts)
    if best.placement is not None:
        return best.placement, best.est, True, []
    pl, est = _smallest(s, home_dtype, resident_counts)
    return pl, est, False, []


def _home_dtype(wl: Workload, opts: Options) -> str:
    """The weights' home dtype: the recipe's, else the model's own (a 16-bit model keeps 16-bit zo2
    homes, its updates rounded stochastically unless the recipe says otherwise)."""
    return opts.home_dtype if opts.home_dtype is not None else wl.compute_dtype


def _zo_full(wl: Workload) -> bool:
    return wl.method == "zo2" and not wl.lora


def _resident_counts(s: _Search) -> list[int]:
    """The numbers of resident decoder layers worth trying (a coarse grid on deep models, refined
    around the best one by _fastest)."""
    opts, n_layers = s.o, len(s.layers)
    if opts.mode == "in_memory":
        return [n_layers]
    if opts.resident_layers is not None:
        return [min(opts.resident_layers, n_layers)]
    if opts.optimizer_home is Tier.DEVICE:
        return [n_layers]
    if opts.mode == "stream":
        return [0]
    if s.cpu and not s.cap.ssd and opts.weights_home is None:
        return [n_layers]  # a CPU's device memory is host RAM: streaming saves RAM only from the SSD
    return _grid(n_layers)


def _fastest(s: _Search, home_dtype: str, resident_counts: list[int]) -> _Best:
    """The fastest fitting candidate with weights at home in `home_dtype`: per micro-batch size, every
    prefetch depth and resident count, then that micro-batch's best with its activations tuned."""
    wl, opts = s.wl, s.o
    optimizer_choices = [True, False] if (wl.method == "adamw" and not wl.lora and opts.optimizer_home is None) \
        else [False]
    depths = [opts.prefetch_depth] if opts.prefetch_depth is not None else [1, 0]
    best = _Best()
    for micro in _divisors_desc(wl.batch_size):
        per_micro = _Best()  # activation tuning depends on the micro-batch
        for depth in depths:
            _try_depth(s, per_micro, home_dtype, micro, depth, resident_counts, optimizer_choices)
        if per_micro.placement is not None:
            pl, est = s.tune_activations(per_micro.placement, per_micro.est)
            best.offer(pl, est, _key(pl, est))
    return best


def _try_depth(s: _Search, best: _Best, home_dtype: str, micro: int, depth: int, resident_counts: list[int],
               optimizer_choices: list[bool]) -> None:
    """Offer every fitting candidate at one prefetch depth: the resident counts given, then, on a coarse
    grid, every count within a sixteenth of the layers of the best so far."""
    tried: set[tuple[int, bool]] = set()

    def trial(n_res: int, optimizer_on_device: bool) -> None:
        if (n_res, optimizer_on_device) in tried:
            return
        tried.add((n_res, optimizer_on_device))
        pl, est = s.run(home_dtype, micro, depth, n_res, optimizer_on_device)
        if fits(est.memory, s.cap):
            best.offer(pl, est, _key(pl, est))
        elif s.zo:
            # a block's z does not fit: draw it tensor by tensor, again for each pass (the same placement
            # with z per block is never slower, so it is tried first)
            pl, est = s.per_tensor(pl)
            if fits(est.memory, s.cap):
                best.offer(pl, est, _key(pl, est))
        elif s.swappable(pl) and {t for t, _, _ in overflows(est.memory, s.cap)} == {"device"}:
            # activations do not fit on the device even recomputed: the layers' inputs, or every saved
            # activation, to pinned host memory (whichever is faster and fits; pointless when host or SSD
            # is short already: the swaps only add to them)
            for swap in ("inputs", "all"):
                pl, est = s.run(home_dtype, micro, depth, n_res, optimizer_on_device, swap=swap)
                if fits(est.memory, s.cap):
                    best.offer(pl, est, _key(pl, est))

    for n_res in resident_counts:
        for optimizer_on_device in optimizer_choices:
            trial(n_res, optimizer_on_device)
    n_layers = len(s.layers)
    if len(resident_counts) > 1 and best.placement is not None and len(resident_counts) < n_layers + 1:
        center = sum(1 for i in s.layers if best.placement.weights_home[i] is Tier.DEVICE)
        step = max(1, n_layers // 16)
        for n_res in range(max(0, center - step), min(n_layers, center + step) + 1):
            for optimizer_on_device in optimizer_choices:
                trial(n_res, optimizer_on_device)


def _smallest(s: _Search, home_dtype: str, resident_counts: list[int]) -> tuple[Placement, Estimate]:
    """Nothing fits: the smallest candidate, to say what binds and by how much (with the layers' inputs
    in host memory when that is what the device is short of)."""
    n_res = resident_counts[0] if len(resident_counts) == 1 else 0
    depth = 0 if s.o.prefetch_depth is None else s.o.prefetch_depth
    pl, est = s.run(home_dtype, 1, depth, n_res, False)
    if s.swappable(pl):
        short = lambda e: sum(need - have for _, need, have in overflows(e.memory, s.cap))  # noqa: E731
        swapped = s.run(home_dtype, 1, depth, n_res, False, swap="inputs")
        if short(swapped[1]) < short(est):
            pl, est = swapped
    if s.zo:
        pl, est = s.per_tensor(pl)
    return pl, est


# ---- the Plan ------------------------------------------------------------------------------------


def _compact_format_notes(inv: ModelInventory, wl: Workload, machine: Machine, opts: Options, pl: Placement,
                          est: Estimate) -> list[str]:
    """A plan whose AdamW states or LoRA base go to the SSD, or whose step the drive or the link binds:
    what each compact format would take instead (compact AdamW states; a quantized base), in host RAM
    or with fewer bytes to move."""
    states_on_ssd = any(h is Tier.SSD for h in pl.optimizer_home)
    base_on_ssd = wl.lora and any(h is Tier.SSD for h in pl.weights_home)
    bound = est.times.bottleneck
    notes = []
    for changes, on_ssd, bounds, homes, what in (
            (explain.compact_state_changes(wl, machine), states_on_ssd, ("ssd",), "optimizer_home", "AdamW states"),
            (explain.quantization_changes(wl), base_on_ssd, ("ssd", "h2d"), "weights_home", "the base")):
        if not (on_ssd or bound in bounds):
            continue
        for label, change, _ in changes:
            other, other_est, ok, _notes = search(inv, dataclasses.replace(wl, **change), machine, opts)
            if not ok or other_est.times.step_s >= est.times.step_s:
                continue
            where = ("would fit in host RAM" if on_ssd and not any(h is Tier.SSD for h in getattr(other, homes))
                     else "would move fewer bytes")
            notes.append(f"{label.removeprefix('use ')} {where}: {other_est.times.step_s:.3g} s/step instead of "
                         f"{est.times.step_s:.3g}" + (f" with {what} on SSD" if on_ssd else ""))
    return notes


def make_plan(inv: ModelInventory, wl: Workload, machine: Machine, opts: Options, *, suggest: bool = True,
              lora_inventory: Callable[[], ModelInventory] | None = None) -> Plan:
    """Search, then assemble the Plan; when nothing fits, the reasons and the nearest changes that fit
    (`lora_inventory()`: the model's blocks under LoRA, whose trainable counts the LoRA suggestion needs;
    without it that suggestion is planned with every parameter trained, which overstates it)."""
    pl, est, feasible, notes = search(inv, wl, machine, opts)
    if feasible and suggest and _zo_full(wl) and opts.home_dtype is None and pl.home_dtype != "float32":
        exact = search(inv, wl, machine, dataclasses.replace(opts, home_dtype="float32"))
        if exact[2] and exact[1].times.step_s < est.times.step_s:
            notes.append(f"offload.home_dtype: float32 would take {exact[1].times.step_s:.3g} s/step instead of "
                         f"{est.times.step_s:.3g} (twice the bytes to move, but no rounding work; every update "
                         f"exact)")
    if feasible and suggest:
        published = explain.zo2_published(inv, wl, opts, est.memory.device, lambda i, w, o: make_plan(
            i, w, machine, o, suggest=False))
        if published:
            notes.append(published)
        notes += _compact_format_notes(inv, wl, machine, opts, pl, est)
    cap = capacities(machine, opts)
    reasons: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()
    if not feasible:
        reasons = tuple(explain.reasons(est.memory, est.device_parts, cap, opts))
        if suggest:
            def replan(i: ModelInventory, w: Workload, o: Options) -> Plan:
                return make_plan(i, w, machine, o, suggest=False)
            suggestions = tuple(explain.suggestions(inv, wl, machine, opts, est.memory, cap, replan, lora_inventory))
    step = est.times.step_s
    best_rate = machine.flops(wl.compute_dtype)
    if machine.layer_timings:
        cal = work.calibration(machine, wl, pl.micro_batch_size * wl.seq_len)
        passes = (f"forward x{cal.forward_no_grad:.2f}" if wl.method == "zo2"
                  else f"forward x{cal.forward:.2f}, backward x{cal.backward:.2f}")
        notes.append(f"compute priced against this device's measured decoder layers at "
                     f"{pl.micro_batch_size * wl.seq_len} tokens per micro-batch: {passes}")
    return Plan(
        method=wl.method, compute_device=machine.compute_device, blocks=_block_plans(inv, wl, pl),
        prefetch_depth=pl.prefetch_depth, device_buffers=est.device_buffers, home_dtype=pl.home_dtype,
        wire_dtype=est.wire_dtype, compute_dtype=wl.compute_dtype, pinned_pool_bytes=est.pinned_pool_bytes,
        swap_dir=opts.swap_dir, device_budget_bytes=cap.device, memory=est.memory, capacity=cap, times=est.times,
        tokens_per_s=wl.tokens_per_step / step if step > 0 else 0.0, feasible=feasible, reasons=reasons,
        suggestions=suggestions, micro_batch_size=pl.micro_batch_size,
        micro_batches=wl.batch_size * wl.grad_accum // pl.micro_batch_size,
        seq_len=wl.seq_len, tokens_per_step=wl.tokens_per_step, flops_per_step=est.flops_per_step,
        tflops=est.flops_per_step / step / 1e12 if step > 0 else 0.0,
        gpu_utilization=est.flops_per_step / step / best_rate if step > 0 and best_rate > 0 else 0.0,
        lora=wl.lora, quantization=wl.quantization, model=inv.model_type, machine=machine.name, notes=tuple(notes), z_buffer=pl.z_buffer,
        home_rounding=wl.home_rounding if _zo_full(wl) and pl.home_dtype != "float32" else "nearest",
        device_parts=est.device_parts,
        device_context_bytes=machine.context_bytes if machine.compute_device == "cuda" else 0,
    )


def _block_plans(inv: ModelInventory, wl: Workload, pl: Placement) -> tuple[BlockPlan, ...]:
    hb = home_bytes(inv, wl, pl.home_dtype)
    momentum_bytes = 4 if wl.zo_momentum and wl.method == "zo2" else 0
    return tuple(
        BlockPlan(name=b.name, param_bytes=hb[i], weights_home=pl.weights_home[i], optimizer_home=pl.optimizer_home[i],
                  activation=pl.activation[i], params=b.params, trainable_params=b.trainable_params,
                  optimizer_bytes=int(b.trainable_params * (
                      momentum_bytes if wl.method == "zo2" else optimizer_bytes_per_param(
                          wl, pl.optimizer_home[i], streamed=pl.weights_home[i] is not Tier.DEVICE))))
        for i, b in enumerate(inv.blocks))
