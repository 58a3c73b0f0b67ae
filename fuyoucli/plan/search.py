"""Plan stage, the search: the fastest placement that fits every tier, or why none does.

Chooses how many decoder layers stay resident, where streamed weights live (pinned, pageable, SSD,
filled fastest first), where optimizer states live, the activation policy (keep / swap / recompute,
Fuyou's seconds saved per byte), prefetch depth, the zo2 home dtype, how zo2 holds z (a block's at
once, or tensor by tensor where that is what fits) and the largest micro-batch, by evaluating
candidates with plan.cost. Pure (no torch); also turns a Recipe and a HardwareProfile
into the numbers the cost model reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Callable

from fuyoucli.errors import RecipeError
from fuyoucli.hardware.profile import (
    ALLOCATOR_SLACK, ASSUMED_CONTEXT_BYTES, BLAS_WORKSPACE_BYTES, HardwareProfile,
)
from fuyoucli.plan import work
from fuyoucli.plan.cost import (
    Estimate, Placement, capacities, estimate, fits, home_bytes, optimizer_bytes_per_param, overflows,
)
from fuyoucli.plan.types import (
    DTYPE_BYTES, BlockPlan, BlockSpec, LayerTiming, Machine, ModelInventory, Options, Plan, Tier, TierBytes, Workload,
)
from fuyoucli.recipe import Recipe

GB = 10**9
_LINK_SIZE_BYTES = 256 << 20  # blocks stream in transfers of tens of MB and up: the curve's large end


# ---- inputs ------------------------------------------------------------------------------------


def machine_from_profile(profile: HardwareProfile, swap_dir: str | None = None) -> tuple[Machine, tuple[str, ...]]:
    """The cost model's numbers from a profile; the disk is the profiled one holding swap_dir
    (longest matching path), else the fastest profiled disk (with a note)."""
    c, links, h = profile.compute, profile.links, profile.host
    cuda = c.kind == "cuda"
    notes: list[str] = []
    pinned = h.ram_available_bytes if h.pinned_allocatable_bytes is None else h.pinned_allocatable_bytes
    if h.memlock_limit_bytes is not None:
        pinned = min(pinned, h.memlock_limit_bytes)
    if c.kind == "cpu":
        pinned = 0
    disk = None
    if profile.disks:
        if swap_dir:
            target = os.path.abspath(os.path.expanduser(swap_dir))
            matches = [d for d in profile.disks
                       if target == d.path or target.startswith(d.path.rstrip("/") + "/") or d.path == "/"]
            if matches:
                disk = max(matches, key=lambda d: len(d.path))
            else:
                disk = max(profile.disks, key=lambda d: d.read_gbps)
                notes.append(f"swap_dir {swap_dir} is on no profiled disk; assuming the speed of {disk.path} "
                             f"(run `fuyou profile --disk {swap_dir}` to measure it)")
        else:
            disk = max(profile.disks, key=lambda d: d.read_gbps)
    dtypes = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    theirs_to_ours = {theirs: ours for ours, theirs in dtypes.items()}
    machine = Machine(
        name=(profile.provenance.preset or c.name) if profile.provenance.source == "preset" else c.name,
        compute_device=c.kind,
        device_bytes=c.free_memory_bytes,
        matmul_flops=tuple((ours, c.matmul_flops(theirs)) for ours, theirs in dtypes.items()),
        matmul_points=tuple((ours, p.size, p.flops) for ours, theirs in dtypes.items()
                            for m in c.matmul if m.dtype == theirs for p in m.points),
        device_mem_bps=c.memory_bandwidth_gbps * GB,
        h2d_bps=links.h2d_pinned.gbps_at(_LINK_SIZE_BYTES) * GB,
        d2h_bps=links.d2h_pinned.gbps_at(_LINK_SIZE_BYTES) * GB,
        duplex_h2d_bps=links.duplex_h2d_pinned.gbps_at(_LINK_SIZE_BYTES) * GB,
        duplex_d2h_bps=links.duplex_d2h_pinned.gbps_at(_LINK_SIZE_BYTES) * GB,
        host_ram_bytes=h.ram_available_bytes,
        pinned_bytes=pinned,
        dram_bps=h.dram_copy_gbps * GB,
        cpu_adam_params_per_s=h.adamw_all_threads_params_per_s,
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
        layer_timings=tuple(
            LayerTiming(dtype=theirs_to_ours[p.dtype], tokens=p.tokens, seq_len=p.seq_len, hidden=p.hidden,
                        spec=BlockSpec(name="layers.0", params=p.params, trainable_params=p.params,
                                       max_tensor_params=p.max_tensor_params,
                                       matmul_flops_per_token=p.matmul_flops_per_token,
                                       attention_flops_per_token_per_key=p.attention_flops_per_token_per_key,
                                       attention_window=None, boundary_elems_per_token=p.hidden,
                                       internal_elems_per_token=0,
                                       elementwise_elems_per_token=p.elementwise_elems_per_token),
                        forward_s=p.forward_s, forward_no_grad_s=p.forward_no_grad_s, backward_s=p.backward_s)
            for p in c.layers),
        context_bytes=(c.context_bytes or ASSUMED_CONTEXT_BYTES) if cuda else 0,
        library_workspace_bytes=BLAS_WORKSPACE_BYTES if cuda else 0,
        allocator_slack=ALLOCATOR_SLACK if cuda else 0.0,
    )
    if cuda and not c.context_bytes and profile.provenance.source == "measured":
        notes.append(f"this profile has no measured CUDA context (measured by an older fuyou): assumed "
                     f"{ASSUMED_CONTEXT_BYTES / 2**30:.1f} GiB; run `fuyou profile` again")
    if not c.layers and profile.provenance.source == "measured":
        notes.append("this profile has no decoder-layer timings (measured by an older fuyou): compute is priced "
                     "from isolated products and elementwise rates alone, which put real layers 1.3-1.7x faster "
                     "than they ran on a 2-core CPU; run `fuyou profile` again")
    if c.kind == "cpu" and not c.elementwise and profile.provenance.source == "measured":
        notes.append("this profile has no elementwise rates (measured by an older fuyou): the step time "
                     "leaves out most of zo2's work on a CPU; run `fuyou profile` again")
    return machine, tuple(notes)


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
                    loss_positions_fraction=loss_positions_fraction(recipe))


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
    if zo and o.activations != "auto":
        bad.append("offload.activations applies to first-order runs (zo2 keeps no activations for a backward)")
    if zo and o.optimizer_home != "auto":
        bad.append("offload.optimizer_home applies to first-order runs (zo2 has no optimizer states)")
    if lora and o.optimizer_home != "auto":
        bad.append("offload.optimizer_home: LoRA adapters and their states always stay on the device")
    if bad:
        raise RecipeError("; ".join(bad))


def hardware_for_recipe(recipe: Recipe, *, profile: str | None = None, preset: str | None = None) -> HardwareProfile:
    """The machine to plan for: a --profile/--preset given on the command line, else the recipe's
    hardware section, else this machine's saved profile (an InputError saying how to get one)."""
    from fuyoucli.errors import InputError
    from fuyoucli.hardware.profile import default_profile_path, load_profile

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
    p = make_plan(inv, workload_from_recipe(recipe), machine, options_from_recipe(recipe),
                  lora_inventory=lora_inventory)
    return dataclasses.replace(p, notes=notes + p.notes) if notes else p


# ---- search ------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Best:
    placement: Placement | None = None
    est: Estimate | None = None
    key: tuple = ()

    def offer(self, pl: Placement, est: Estimate, key: tuple) -> None:
        if self.placement is None or key < self.key:
            self.placement, self.est, self.key = pl, est, key


class _Search:
    def __init__(self, inv: ModelInventory, wl: Workload, machine: Machine, opts: Options):
        self.inv, self.wl, self.m, self.o = inv, wl, machine, opts
        self.cap = capacities(machine, opts)
        self.zo, self.cpu = wl.method == "zo2", machine.compute_device == "cpu"
        self.layers = [i for i, b in enumerate(inv.blocks) if b.name.startswith("layers.")]
        self.n = len(inv.blocks)
        self.evals = 0

    def run(self, home_dtype: str, micro: int, depth: int, n_res: int, opt_dev: bool,
            swap: str | None = None) -> tuple[Placement, Estimate]:
        pl = self.build(home_dtype, micro, depth, n_res, opt_dev, swap)
        return pl, self.eval(pl)

    def eval(self, pl: Placement) -> Estimate:
        self.evals += 1
        return estimate(self.inv, self.wl, self.m, pl)

    def build(self, home_dtype: str, micro: int, depth: int, n_res: int, opt_dev: bool,
              swap: str | None = None) -> Placement:
        """Resident: embed, head and the last n_res layers. Streamed weights fill the fastest host
        tier first; optimizer states take the host RAM left, then the SSD. Layers recompute in the
        backward from inputs kept on the device, unless `swap` says: 'inputs' (recompute-swap: the
        inputs wait in pinned host memory) or 'all' (every saved activation swapped, no recompute);
        that host memory is reserved before weights and optimizer states take theirs."""
        inv, wl, o, cap = self.inv, self.wl, self.o, self.cap
        hb = home_bytes(inv, wl, home_dtype)
        resident = set(i for i in range(self.n) if i not in self.layers)
        resident.update(self.layers[len(self.layers) - n_res:] if n_res else [])
        streamed = [i for i in range(self.n) if i not in resident]
        weights = [Tier.DEVICE] * self.n
        max_stream = max((hb[i] for i in streamed), default=0)
        opt_pp = 0 if (self.zo or wl.lora) else optimizer_bytes_per_param(wl)
        grad = max((inv.blocks[i].trainable_params * DTYPE_BYTES[wl.compute_dtype] for i in range(self.n)), default=0)
        reserve = (depth + 2) * max_stream + (0 if self.zo else 2 * grad)
        if swap is not None:
            per_token = {"all": lambda b: b.internal_elems_per_token, "inputs": lambda b: b.boundary_elems_per_token}[swap]
            reserve += sum(wl.tokens_per_step * per_token(inv.blocks[i]) * DTYPE_BYTES[wl.compute_dtype]
                           for i in self.layers)
        ssd_ok = cap.ssd > 0
        opt_stage = 3 * max((b.trainable_params * opt_pp for b in inv.blocks), default=0) if ssd_ok else 0
        pinned_left = cap.pinned - reserve
        host_left = max(cap.pageable, cap.pinned) - reserve - opt_stage
        for i in streamed:
            b = hb[i]
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
            host_left -= sum(hb[i] for i in streamed if o.weights_home in (Tier.PINNED, Tier.PAGEABLE))
        if self.cpu:  # host RAM is the device: resident blocks and host-homed streamed ones use it
            host_left = cap.device - sum(hb[i] for i in range(self.n) if weights[i] is not Tier.SSD)
        optim: list[Tier | None] = [None] * self.n
        for i, s in enumerate(inv.blocks):
            if self.zo or not s.trainable_params:
                continue
            if wl.lora:
                optim[i] = Tier.DEVICE
                continue
            need = s.trainable_params * opt_pp
            if o.optimizer_home is not None:
                optim[i] = o.optimizer_home
            elif i in resident and opt_dev:
                optim[i] = Tier.DEVICE
            elif self.cpu:
                optim[i] = Tier.DEVICE if need <= host_left or not ssd_ok else Tier.SSD
                host_left -= need if optim[i] is Tier.DEVICE else 0
            elif need <= host_left or not ssd_ok:
                optim[i], host_left = Tier.PAGEABLE, host_left - need
            else:
                optim[i] = Tier.SSD
        act: list[str | None] = [None] * self.n
        if not self.zo:
            for i in range(self.n):
                default = {None: "recompute", "inputs": "recompute-swap", "all": "swap"}[swap]
                act[i] = (o.activation or default) if i in self.layers else "keep"
        return Placement(home_dtype=home_dtype, weights_home=tuple(weights), optimizer_home=tuple(optim),
                         activation=tuple(act), prefetch_depth=depth if streamed else 0, micro_batch_size=micro)

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
    cd = wl.compute_dtype
    notes: list[str] = []
    L = len(s.layers)
    if opts.home_dtype is not None:
        home_dtypes = [opts.home_dtype]
    elif wl.method == "zo2" and not wl.lora:
        home_dtypes = ["float32"] + ([cd] if cd != "float32" else [])
    else:
        home_dtypes = [cd]
    if opts.mode == "in_memory":
        n_res_options = [L]
    elif opts.resident_layers is not None:
        n_res_options = [min(opts.resident_layers, L)]
    elif opts.optimizer_home is Tier.DEVICE:
        n_res_options = [L]
    elif opts.mode == "stream":
        n_res_options = [0]
    elif s.cpu and not s.cap.ssd and opts.weights_home is None:
        n_res_options = [L]  # a CPU's device memory is host RAM: streaming saves RAM only from the SSD
    else:
        n_res_options = _grid(L)
    opt_devs = [True, False] if (wl.method == "adamw" and not wl.lora and opts.optimizer_home is None) else [False]
    depths = [opts.prefetch_depth] if opts.prefetch_depth is not None else [1, 0]

    for hd in home_dtypes:
        best = _Best()
        for micro in _divisors_desc(wl.batch_size):
            mbest = _Best()  # per micro-batch size: activation tuning depends on it
            for depth in depths:
                tried: set[tuple] = set()

                def trial(n_res: int, od: bool) -> None:
                    if (n_res, od) in tried:
                        return
                    tried.add((n_res, od))
                    pl, est = s.run(hd, micro, depth, n_res, od)
                    if fits(est.memory, s.cap):
                        mbest.offer(pl, est, _key(pl, est))
                    elif s.zo:
                        # a block's z does not fit: draw it tensor by tensor, again for each pass (the
                        # same placement with z per block is never slower, so it is tried first)
                        pl, est = s.per_tensor(pl)
                        if fits(est.memory, s.cap):
                            mbest.offer(pl, est, _key(pl, est))
                    elif s.swappable(pl) and {t for t, _, _ in overflows(est.memory, s.cap)} == {"device"}:
                        # activations do not fit on the device even recomputed: the layers' inputs, or
                        # every saved activation, to pinned host memory (whichever is faster and fits;
                        # pointless when host or SSD is short already: the swaps only add to them)
                        for swap in ("inputs", "all"):
                            pl, est = s.run(hd, micro, depth, n_res, od, swap=swap)
                            if fits(est.memory, s.cap):
                                mbest.offer(pl, est, _key(pl, est))

                for n_res in n_res_options:
                    for od in opt_devs:
                        trial(n_res, od)
                if len(n_res_options) > 1 and mbest.placement is not None and len(n_res_options) < L + 1:
                    center = sum(1 for i in s.layers if mbest.placement.weights_home[i] is Tier.DEVICE)
                    step = max(1, L // 16)
                    for n_res in range(max(0, center - step), min(L, center + step) + 1):
                        for od in opt_devs:
                            trial(n_res, od)
            if mbest.placement is not None:
                pl, est = s.tune_activations(mbest.placement, mbest.est)
                best.offer(pl, est, _key(pl, est))
        if best.placement is not None:
            if hd != home_dtypes[0]:
                notes.append(f"zo2 weights live in {hd} at home: float32 did not fit; updates smaller than "
                             f"{hd}'s resolution are lost (set offload.home_dtype to choose)")
            return best.placement, best.est, True, notes
    # Nothing fits: the smallest candidate, to say what binds and by how much (with the layers' inputs
    # in host memory when that is what the device is short of).
    hd = home_dtypes[-1]
    n_res = n_res_options[0] if len(n_res_options) == 1 else 0
    depth = 0 if opts.prefetch_depth is None else opts.prefetch_depth
    pl, est = s.run(hd, 1, depth, n_res, False)
    if s.swappable(pl):
        short = lambda e: sum(need - have for _, need, have in overflows(e.memory, s.cap))  # noqa: E731
        swapped = s.run(hd, 1, depth, n_res, False, swap="inputs")
        if short(swapped[1]) < short(est):
            pl, est = swapped
    if s.zo:
        pl, est = s.per_tensor(pl)
    return pl, est, False, notes


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def make_plan(inv: ModelInventory, wl: Workload, machine: Machine, opts: Options, *, suggest: bool = True,
              lora_inventory: Callable[[], ModelInventory] | None = None) -> Plan:
    """Search, then assemble the Plan; when nothing fits, the reasons and the nearest changes that fit
    (`lora_inventory()`: the model's blocks under LoRA, whose trainable counts the LoRA suggestion needs;
    without it that suggestion is planned with every parameter trained, which overstates it)."""
    pl, est, feasible, notes = search(inv, wl, machine, opts)
    if (feasible and suggest and wl.method == "zo2" and not wl.lora and opts.home_dtype is None
            and pl.home_dtype == "float32" and wl.compute_dtype != "float32"):
        half = search(inv, wl, machine, dataclasses.replace(opts, home_dtype=wl.compute_dtype))
        if half[2] and half[1].times.step_s < 0.67 * est.times.step_s:
            notes.append(f"offload.home_dtype: {wl.compute_dtype} would take {half[1].times.step_s:.3g} s/step "
                         f"instead of {est.times.step_s:.3g} (half the bytes to move; updates below "
                         f"{wl.compute_dtype}'s resolution are lost)")
    cap = capacities(machine, opts)
    hb = home_bytes(inv, wl, pl.home_dtype)
    mom = 4 if wl.zo_momentum and wl.method == "zo2" else 0
    blocks = tuple(
        BlockPlan(name=b.name, param_bytes=hb[i], weights_home=pl.weights_home[i], optimizer_home=pl.optimizer_home[i],
                  activation=pl.activation[i], params=b.params, trainable_params=b.trainable_params,
                  optimizer_bytes=b.trainable_params * (mom if wl.method == "zo2"
                                                        else optimizer_bytes_per_param(wl, pl.optimizer_home[i])))
        for i, b in enumerate(inv.blocks))
    reasons: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()
    if not feasible:
        reasons = tuple(_reasons(est, cap, machine, opts))
        if suggest:
            suggestions = tuple(_suggestions(inv, wl, machine, opts, est, cap, lora_inventory))
    step = est.times.step_s
    best_rate = machine.flops(wl.compute_dtype)
    micro_batches = wl.batch_size * wl.grad_accum // pl.micro_batch_size
    cal = work.calibration(machine, wl, pl.micro_batch_size * wl.seq_len)
    if machine.layer_timings:
        passes = (f"forward x{cal.forward_no_grad:.2f}" if wl.method == "zo2"
                  else f"forward x{cal.forward:.2f}, backward x{cal.backward:.2f}")
        notes.append(f"compute priced against this device's measured decoder layers at "
                     f"{pl.micro_batch_size * wl.seq_len} tokens per micro-batch: {passes}")
    return Plan(
        method=wl.method, compute_device=machine.compute_device, blocks=blocks, prefetch_depth=pl.prefetch_depth,
        device_buffers=est.device_buffers, home_dtype=pl.home_dtype, wire_dtype=est.wire_dtype,
        compute_dtype=wl.compute_dtype, pinned_pool_bytes=est.pinned_pool_bytes,
        swap_dir=opts.swap_dir, device_budget_bytes=cap.device, memory=est.memory, capacity=cap, times=est.times,
        tokens_per_s=wl.tokens_per_step / step if step > 0 else 0.0, feasible=feasible, reasons=reasons,
        suggestions=suggestions, micro_batch_size=pl.micro_batch_size, micro_batches=micro_batches,
        seq_len=wl.seq_len, tokens_per_step=wl.tokens_per_step, flops_per_step=est.flops_per_step,
        tflops=est.flops_per_step / step / 1e12 if step > 0 else 0.0,
        gpu_utilization=est.flops_per_step / step / best_rate if step > 0 and best_rate > 0 else 0.0,
        lora=wl.lora, model=inv.model_type, machine=machine.name, notes=tuple(notes), z_buffer=pl.z_buffer,
        device_parts=est.device_parts,
        device_context_bytes=machine.context_bytes if machine.compute_device == "cuda" else 0,
    )


def _reasons(est: Estimate, cap: TierBytes, machine: Machine, opts: Options) -> list[str]:
    out = []
    for tier, need, have in overflows(est.memory, cap):
        if tier == "device":
            parts = ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(est.device_parts, key=lambda kv: -kv[1]))
            limit = " (offload.device_memory_limit)" if opts.device_memory_limit_bytes is not None else ""
            out.append(f"device memory: needs {_fmt_bytes(need)} at the least, the device offers "
                       f"{_fmt_bytes(cap.device)}{limit} after headroom ({parts})")
        elif tier == "host":
            out.append(f"host RAM: needs {_fmt_bytes(need)}, this machine offers {_fmt_bytes(have)} after headroom")
        elif tier == "pinned":
            out.append(f"pinned host memory: needs {_fmt_bytes(need)}, {_fmt_bytes(have)} can be pinned")
        else:
            where = f"under {opts.swap_dir}" if opts.swap_dir else "(no offload.swap_dir set)"
            out.append(f"SSD: needs {_fmt_bytes(need)} {where}, has {_fmt_bytes(have)}")
    if opts.mode == "in_memory" and not out:
        out.append("offload.mode in_memory keeps everything on the device, and it does not fit")
    return out or ["no placement fits the capacities above"]


def _suggestions(inv: ModelInventory, wl: Workload, machine: Machine, opts: Options, est: Estimate,
                 cap: TierBytes, lora_inventory: Callable[[], ModelInventory] | None) -> list[str]:
    """Nearby changes, each planned again; the ones that fit come first, fastest first. When none fits
    alone, pairs of them are planned too (LoRA and a swap_dir may each fall short where both fit)."""
    tries: list[tuple[str, dict, dict]] = []  # (what to say, Workload fields, Options fields)
    over = {t for t, _, _ in overflows(est.memory, cap)}
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
                      f"({_fmt_bytes(machine.disk_free_bytes)} free)", {}, {"swap_dir": machine.disk_path}))
    if not wl.lora:
        tries.append(("use peft.type: lora", {"lora": True}, {}))
    lora_inv = [inv]  # the inventory under LoRA, built once, when a LoRA try is planned
    if wl.method == "adamw":
        tries.append(("use method.name: zo2", {"method": "zo2", "q": 1}, {}))
    if wl.compute_dtype == "float32" and machine.flops("bfloat16") > 0:
        tries.append(("use model.dtype: bfloat16", {"compute_dtype": "bfloat16"}, {}))
    if opts.device_memory_limit_bytes is not None:
        tries.append(("remove offload.device_memory_limit", {}, {"device_memory_limit_bytes": None}))
    batches: list[tuple[str, dict, dict]] = []  # largest first: the largest that fits is the one worth saying
    b = wl.batch_size
    while b > 1:
        b //= 2
        accum = wl.grad_accum * (wl.batch_size // b) if wl.method == "adamw" else wl.grad_accum
        batches.append((f"lower training.batch_size to {b}" + (f" and raise training.grad_accum to {accum} (same "
                        "examples per step)" if wl.method == "adamw" else ""), {"batch_size": b, "grad_accum": accum}, {}))
    if wl.seq_len > 256:
        tries.append((f"lower data.max_length to {wl.seq_len // 2}", {"seq_len": wl.seq_len // 2}, {}))

    def planned(*changes: tuple[str, dict, dict]) -> Plan:
        w = dataclasses.replace(wl, **{k: v for _, wk, _ in changes for k, v in wk.items()})
        o = dataclasses.replace(opts, **{k: v for _, _, ok in changes for k, v in ok.items()})
        if w.lora and not wl.lora and lora_inventory is not None and lora_inv[0] is inv:
            lora_inv[0] = lora_inventory()
        return make_plan(lora_inv[0] if w.lora and not wl.lora else inv, w, machine, o, suggest=False)

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
