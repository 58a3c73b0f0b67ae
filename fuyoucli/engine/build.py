"""Build: the one place a Plan becomes an engine (homes, stores, the device arena, the SSD store, the
CPU optimizer's state homes and the resident/streamed split) for a streamed trainer to step over.

Engine stage; imports the plan's types and the model's block accessors, nothing from train/. The
trainers (train/zo_streamed.py, train/first_order_streamed.py) receive the Engine and never decide
a placement again: what streams, where each home and optimizer state lives, what sits on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fuyoucli.kernels.adamw import AdamFormat
from fuyoucli.engine.executor import OpLog
from fuyoucli.engine.flat import byte_offsets
from fuyoucli.engine.optimizer import AdamBlock, CpuAdam, FileMaster
from fuyoucli.engine.store import StreamUnit, WeightStore
from fuyoucli.engine.tiers import ALIGN, DeviceArena, SsdStore
from fuyoucli.errors import FuyouError
from fuyoucli.model.blocks import ParamBlock, param_blocks
from fuyoucli.model.runner import BlockRunner
from fuyoucli.plan.types import Plan, Tier

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedPlan(FuyouError):
    exit_code = 2


@dataclass(frozen=True)
class ExecBlock:
    """One stop of a pass, in execution order: the embed stage, a decoder layer, or the head stage."""

    index: int
    """Position in execution order: 0 embed, 1..L the layers, L + 1 head (the schedule's block numbers)."""
    name: str
    """The plan's (and model.blocks') name: 'embed', 'layers.N' or 'head'."""
    layer: int | None
    """The decoder layer's position in the model's layer list; None for embed and head."""
    home: Tier
    """Where the plan homes its weights; anything but DEVICE streams."""

    @property
    def streamed(self) -> bool:
        return self.home is not Tier.DEVICE


@dataclass
class CpuOptimizerSpec:
    """How the first-order trainer's CPU optimizer is made (engine/optimizer.py: CpuAdam)."""

    make: Callable[..., torch.optim.Optimizer]
    """make(tensors, block key): one block's optimizer."""
    thread: bool
    on_job: Callable[[int], None] | None = None
    fmt: AdamFormat = AdamFormat()
    """The states' format; with a bf16 master, a streamed block's master is its weights' home."""


@dataclass
class Engine:
    """What a streamed trainer steps over, as build() made it from the plan: the blocks in execution
    order, the device arena, the weight stores (and the SSD store under them), the homes of resident
    weights and of optimizer states, the lanes; `ops` logs what the executor performs (for tests)."""

    plan: Plan
    model: nn.Module
    lanes: Any
    runner: BlockRunner
    order: list[ExecBlock]
    trainable: list[ParamBlock]
    """The model's trainable blocks in execution order (model.blocks.param_blocks), taken before any
    weight moved; their Parameter objects stay the model's."""
    lora: bool
    """Only adapters train: the frozen base streams read-only in the compute dtype."""
    compute_dtype: torch.dtype
    home_dtype: torch.dtype
    arena: DeviceArena
    ssd: SsdStore | None
    store: WeightStore
    """Streamed blocks' weights, keyed by execution index."""
    momentum: WeightStore | None = None
    """zo2 variant momentum: each streamed block's fp32 momentum, at the block's home."""
    resident_homes: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """zo2: each resident trainable block's weights in the home dtype, on the device (the model's
    parameters then hold the perturbed compute copy)."""
    resident_momentum: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    optimizer_homes: dict[str, Tier] = field(default_factory=dict)
    """First-order: where each trainable block's optimizer runs and keeps its state (DEVICE: torch's
    AdamW on the device; any other tier: the CPU optimizer, its state there)."""
    cpu: CpuAdam | None = None
    ops: OpLog = field(default_factory=OpLog)

    @property
    def device(self) -> torch.device:
        return self.lanes.device

    @property
    def streamed(self) -> list[bool]:
        return [b.streamed for b in self.order]

    def block(self, name: str) -> ExecBlock:
        return self._by_name[name]

    def __post_init__(self) -> None:
        self._by_name = {b.name: b for b in self.order}

    def close(self) -> None:
        """Stop the CPU optimizer and remove the SSD files (safe to call twice)."""
        if self.cpu is not None:
            self.cpu.close()
        if self.ssd is not None:
            self.ssd.close()
            self.ssd = None


def check_plan(plan: Plan) -> None:
    """What the streamed engines cannot run, said before anything is allocated."""
    engine = "zo2 engine" if plan.method == "zo2" else "first-order engine"
    for b in plan.blocks:
        if b.name in ("embed", "head") and b.weights_home is not Tier.DEVICE:
            raise UnsupportedPlan(f"the {engine} keeps {b.name} on the device; the plan homes it on "
                                  f"{b.weights_home.value}")
    if plan.method == "zo2":
        if plan.wire_dtype != plan.home_dtype:
            raise UnsupportedPlan(f"the zo2 engine sends home weights as they are stored (home {plan.home_dtype}, "
                                  f"wire {plan.wire_dtype}); the device applies the update, so both must match")
        if plan.z_buffer not in ("block", "tensor"):
            raise UnsupportedPlan(f"z_buffer {plan.z_buffer!r}: the zo2 engine holds z per 'block' or per 'tensor'")
    elif plan.home_dtype != plan.compute_dtype:
        raise UnsupportedPlan(f"first-order training stores weights at home in the compute dtype "
                              f"({plan.compute_dtype}); the plan says home {plan.home_dtype}")


def execution_order(plan: Plan, runner: BlockRunner) -> list[ExecBlock]:
    homes = {b.name: b.weights_home for b in plan.blocks}
    names = [("embed", None)] + [(f"layers.{i}", i) for i in range(runner.n_layers)] + [("head", None)]
    return [ExecBlock(e, name, layer, homes.get(name, Tier.DEVICE)) for e, (name, layer) in enumerate(names)]


def optimizer_homes(plan: Plan, order: list[ExecBlock], trainable: list[ParamBlock], lora: bool,
                    device: torch.device) -> dict[str, Tier]:
    """The plan's optimizer home of each trainable block, as the first-order engine can run it: LoRA
    adapters (and a new head) train on the device; a block the plan left without one is optimized on
    the host when it streams, else on the device; a CPU run's 'device' is host memory, so a streamed
    block's optimizer there runs on the CPU worker all the same."""
    planned = {b.name: b.optimizer_home for b in plan.blocks}
    streams = {b.name: b.streamed for b in order}
    out = {}
    for blk in trainable:
        home, streamed = planned.get(blk.name), streams[blk.name]
        if home is None or lora:
            home = Tier.PAGEABLE if streamed and not lora else Tier.DEVICE
        if home is Tier.DEVICE and streamed and not lora:
            if device.type != "cpu":
                raise UnsupportedPlan(f"{blk.name} streams its weights but homes its optimizer on the device: "
                                      "the first-order engine updates streamed blocks on the CPU")
            home = Tier.PAGEABLE
        out[blk.name] = home
    return out


class _Shapes:
    """A parameter's shape and first value: its own, or, for the empty parameter of a lazily loaded
    layer (model.lazy), the model file's (by qualified name, a tensor at a time)."""

    def __init__(self, model: nn.Module):
        self.source = getattr(model, "fuyou_source", None)
        self.names = {id(p): n for n, p in model.named_parameters()}

    def lazy(self, p: nn.Parameter) -> bool:
        return self.source is not None and p.numel() == 0

    def shape(self, p: nn.Parameter) -> torch.Size:
        return self.source.shape(self.names[id(p)]) if self.lazy(p) else p.shape

    def value(self, p: nn.Parameter) -> torch.Tensor:
        return self.source.read(self.names[id(p)], p.dtype) if self.lazy(p) else p


def _units(plan: Plan, order: list[ExecBlock], runner: BlockRunner, shapes: _Shapes, lora: bool,
           dtype: torch.dtype) -> list[StreamUnit]:
    """What streams of each streamed layer: its trained weights (full training), or its frozen base
    (LoRA: the adapters stay on the device). zo2 trains them on the device and writes them home."""
    units = []
    for blk in order:
        if not blk.streamed:
            continue
        params = [(shapes.names[id(p)], p) for p in runner.layers[blk.layer].parameters() if p.requires_grad != lora]
        dtypes = [p.dtype for _, p in params]
        if lora and any(d != dtype for d in dtypes):
            # a quantized base (model.quantized): codes, scales and norms stream as one block of bytes
            units.append(StreamUnit(index=blk.index, name=blk.name, params=params, shapes=[], dtype=torch.uint8,
                                    home=blk.home, writable=False, dtypes=dtypes))
            continue
        if plan.method == "adamw" and any(d != dtype for d in dtypes):
            raise UnsupportedPlan(f"the model's weights are not in the plan's compute dtype {plan.compute_dtype}")
        units.append(StreamUnit(index=blk.index, name=blk.name, params=params, shapes=[], dtype=dtype,
                                home=blk.home, writable=plan.method == "zo2" and not lora))
    return units


def _ssd_bytes(units: list[StreamUnit], shapes: _Shapes, momentum: bool, opt_homes: dict[str, Tier],
               trainable: list[ParamBlock], fmt: AdamFormat) -> int:
    """Bytes of the files the run keeps under swap_dir: SSD-homed weights (and zo2 momentum beside
    them), and the CPU optimizer's SSD-homed states (CpuAdam.state_bytes)."""
    total = 0
    for u in units:
        if u.home is Tier.SSD:
            sizes = [shapes.shape(p) for _, p in u.params]
            if u.dtypes is not None:
                total += byte_offsets(sizes, u.dtypes)[1]
                continue
            numel = sum(s.numel() for s in sizes)
            total += numel * (u.dtype.itemsize + (4 if momentum and u.writable else 0))
    streamed = {u.name for u in units}
    for blk in trainable:
        if opt_homes.get(blk.name) is Tier.SSD:
            total += CpuAdam.state_bytes([shapes.shape(p) for _, p in blk.params], fmt,
                                         _keeps_master(fmt, blk.name in streamed))
    return total


def _keeps_master(fmt: AdamFormat, streamed: bool) -> bool:
    """Whether a block's optimizer state holds its master: always, but for a bf16 master of a streamed
    block (its weights' home, in the compute dtype bf16, is the master)."""
    return fmt.master == "fp32" or not streamed


def _cpu_optimizer(spec: CpuOptimizerSpec, order: list[ExecBlock], trainable: list[ParamBlock],
                   opt_homes: dict[str, Tier], shapes: _Shapes, lanes, ssd, stores: list) -> CpuAdam:
    """`stores` holds the weight store once it is made (after the optimizer's states are filled from the
    model): a bf16 master of a streamed block is read from, and updated at, the store's home."""
    by_name = {b.name: b for b in order}

    def home_master(blk: ParamBlock):
        e = by_name[blk.name]
        if _keeps_master(spec.fmt, e.streamed):
            return None
        return lambda: stores[0].read_home(e.index)

    def master_file(blk: ParamBlock) -> FileMaster | None:
        e = by_name[blk.name]
        if _keeps_master(spec.fmt, e.streamed) or e.home is not Tier.SSD:
            return None
        # the store is made after the optimizer: its home_file_bytes, from the block's shapes
        numel = sum(shapes.shape(p).numel() for _, p in blk.params)
        return FileMaster(-(-numel * spec.fmt.master_dtype.itemsize // ALIGN) * ALIGN,
                          lambda buf: stores[0].read_home_into(e.index, buf))

    blocks = [AdamBlock(by_name[blk.name].index, blk.name, [shapes.shape(p) for _, p in blk.params],
                        (lambda ps=blk.params: [shapes.value(p) for _, p in ps]), opt_homes[blk.name],
                        home_master(blk), master_file(blk))
              for blk in trainable if opt_homes[blk.name] is not Tier.DEVICE]
    return CpuAdam(blocks, spec.make, lanes=lanes, ssd=ssd, on_job=spec.on_job, thread=spec.thread, fmt=spec.fmt)


def _to_device(model: nn.Module, streamed_ids: set[int], device: torch.device) -> int:
    """Every parameter that does not stream, and every buffer, moved to the device once; returns
    the parameters' bytes."""
    nbytes = 0
    for p in model.parameters():
        if id(p) not in streamed_ids:
            p.data = p.data.to(device)
            nbytes += p.numel() * p.element_size()
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            module._buffers[name] = buf.to(device)
    return nbytes


class _ZeroSource:
    """Where the momentum store's placeholder parameters take their shapes and first values (zeros),
    one tensor at a time, as a lazily loaded model's layers come from their file."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes

    def shape(self, name: str) -> torch.Size:
        return self.shapes[name]

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.shapes[name], dtype=dtype)


def _momentum_store(weights: WeightStore, units: list[StreamUnit], lanes, arena: DeviceArena, slots: int,
                    ssd: SsdStore | None, pin: bool) -> WeightStore:
    """zo2 variant momentum: each streamed layer's fp32 momentum, at the layer's home tier, zeros to
    begin with; fetched into the same slot number as the layer (engine/executor.py: StorePair)."""
    shapes = {n: s for u in units for (n, _), s in zip(u.params, u.shapes)}
    placeholders = [StreamUnit(index=u.index, name=f"{u.name}.momentum",
                               params=[(n, nn.Parameter(torch.empty(0), requires_grad=False)) for n, _ in u.params],
                               shapes=[], dtype=torch.float32, home=u.home, writable=True) for u in units]
    store = WeightStore(placeholders, lanes=lanes, arena=arena, slots=slots, ssd=ssd, pin=pin,
                        source=_ZeroSource(shapes), key_prefix="momentum")
    store.stats = weights.stats  # one count of what crossed the link
    return store


def _zo_resident_homes(trainable: list[ParamBlock], streamed_ids: set[int], home_dtype: torch.dtype,
                       arena: DeviceArena, momentum: bool):
    """zo2's resident homes: each trainable block that does not stream keeps its weights in the home
    dtype on the device (and, variant momentum, an fp32 momentum beside them); the model's parameters
    become the compute copy the passes perturb. These homes are the resident weights the plan counts."""
    homes = {blk.name: [p.detach().to(home_dtype, copy=True) for _, p in blk.params]
             for blk in trainable if not any(id(p) in streamed_ids for _, p in blk.params)}
    for name, tensors in homes.items():
        for h in tensors:
            arena.charge(h.numel() * h.element_size(), f"home copy of {name}")
    moms = {}
    if momentum:
        moms = {name: [arena.alloc(h.numel(), torch.float32, f"momentum of {name}").zero_().view(h.shape)
                       for h in tensors] for name, tensors in homes.items()}
    return homes, moms


def build(plan: Plan, model: nn.Module, lanes, *, zo_momentum: bool = False,
          cpu_optimizer: CpuOptimizerSpec | None = None) -> Engine:
    """The engine a plan describes, over `model` (its parameters become views the engine swaps in).

    What streams: the decoder layers the plan homes off the device, their trained weights (or, with
    LoRA, their frozen base). zo2 (plan.method) trains streamed weights on the device and writes them
    home; first-order training (`cpu_optimizer` given) updates them on the CPU, whose states are
    filled from the model before any weight leaves it. Everything else moves to the device once."""
    check_plan(plan)
    first_order = plan.method == "adamw"
    if first_order and cpu_optimizer is None:
        raise ValueError("a first-order plan's engine needs its CPU optimizer (cpu_optimizer)")
    runner = BlockRunner(model)
    order = execution_order(plan, runner)
    trainable = param_blocks(model)
    lora = any(not p.requires_grad for p in model.parameters())
    compute_dtype, home_dtype = DTYPES[plan.compute_dtype], DTYPES[plan.home_dtype]
    shapes = _Shapes(model)
    units = _units(plan, order, runner, shapes, lora, compute_dtype if lora else home_dtype)
    opt_homes = optimizer_homes(plan, order, trainable, lora, lanes.device) if first_order else {}
    if first_order and not lora:
        by_name = {blk.name: [id(p) for _, p in blk.params] for blk in trainable}
        for u in units:
            if [id(p) for _, p in u.params] != by_name.get(u.name):
                raise UnsupportedPlan(f"{u.name}: its parameters are not all trained; stream it only with LoRA")
    momentum = zo_momentum and not first_order
    fmt = cpu_optimizer.fmt if first_order else AdamFormat()
    if first_order and fmt.master == "bf16" and compute_dtype != torch.bfloat16:
        raise UnsupportedPlan(f"a bf16 master is the bfloat16 weight itself; the plan computes in {plan.compute_dtype}")
    need_bytes = _ssd_bytes(units, shapes, momentum, opt_homes, trainable, fmt)
    ssd = SsdStore(plan.swap_dir, need_bytes) if need_bytes else None
    cpu = None
    stores: list = []
    try:
        arena = DeviceArena(lanes.device, plan.device_budget_bytes)
        if first_order:
            cpu = _cpu_optimizer(cpu_optimizer, order, trainable, opt_homes, shapes, lanes, ssd, stores)
        streamed_ids = {id(p) for u in units for _, p in u.params}
        resident_bytes = _to_device(model, streamed_ids, lanes.device)
        homes, moms = {}, {}
        if first_order:
            arena.charge(resident_bytes, "resident weights")  # the model's parameters are their homes
        else:
            # zo2: the model's parameters are the compute copy the passes read (and, with LoRA, the
            # frozen base); the trained blocks' homes are kept apart from them
            arena.charge(resident_bytes, "resident weights (the compute copy)")
            homes, moms = _zo_resident_homes(trainable, streamed_ids, home_dtype, arena, momentum)
        pin = any(u.home is Tier.PINNED for u in units)
        ops = OpLog()
        store = WeightStore(units, lanes=lanes, arena=arena, slots=plan.device_buffers, ssd=ssd, pin=pin,
                            source=shapes.source)
        store.ops = ops
        stores.append(store)
        if shapes.source is not None:
            shapes.source.close()  # every streamed weight is at its home now
        mstore = None
        if momentum and units and not lora:
            mstore = _momentum_store(store, units, lanes, arena, plan.device_buffers, ssd, pin)
    except BaseException:
        if cpu is not None:
            cpu.close()
        if ssd is not None:
            ssd.close()
        raise
    return Engine(plan, model, lanes, runner, order, trainable, lora, compute_dtype, home_dtype, arena, ssd, store,
                  momentum=mstore, resident_homes=homes, resident_momentum=moms, optimizer_homes=opt_homes,
                  cpu=cpu, ops=ops)
