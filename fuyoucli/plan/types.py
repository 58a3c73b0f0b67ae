"""Plan stage, the data: what the planner reads (workload, machine, options) and the Plan it returns.

Frozen dataclasses of plain numbers; the Plan is the contract with the engine and is stored in
checkpoints, so it round-trips through JSON (to_dict / from_dict). The model's blocks come as
model.types data. Imports no torch and nothing from engine/ or train/.
"""

from __future__ import annotations

import dataclasses
import types as _types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Literal

# DTYPE_BYTES is also read from here, beside the Plan (train.preflight)
from fuyoucli.model.types import DTYPE_BYTES, BlockSpec  # noqa: F401

Method = Literal["zo2", "adamw"]
Dtype = Literal["float32", "bfloat16", "float16"]
Activation = Literal["keep", "swap", "recompute", "recompute-swap"]
ZBuffer = Literal["block", "tensor"]

class Tier(str, Enum):
    """Where bytes live. DEVICE is the compute device (for a CPU run: host RAM the CPU computes from)."""

    DEVICE = "device"
    PINNED = "pinned"  # page-locked host RAM: DMA to and from the device at the full link rate
    PAGEABLE = "pageable"  # ordinary host RAM: staged through the pinned pool on its way to the device
    SSD = "ssd"  # files under offload.swap_dir


# ---- planner inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What one optimizer step does, from the recipe."""

    method: Method
    lora: bool
    compute_dtype: Dtype
    batch_size: int
    """Examples per micro-batch in the recipe (the planner may split it: Plan.micro_batch_size)."""
    seq_len: int
    grad_accum: int = 1
    q: int = 1
    """zo2: random directions per step (2*q forward passes); 1 for adamw."""
    zo_momentum: bool = False
    """zo2 variant momentum: an fp32 momentum buffer travels with each trainable weight."""
    zo_conservative: bool = False
    """zo2 variant conservative: 3 more forward passes per step (at w, w - u, w + u), a second pass over
    the streamed layers (read-only)."""
    clips_grads: bool = False
    """first-order: max_grad_norm is set (the gradients are scaled in place when the norm exceeds it,
    as it does in most steps early on)."""
    loss_positions_fraction: float = 1.0
    """Share of the positions whose logits go through the loss: 1 for language modelling text, one
    position per example for label-word classification (the loss then costs next to nothing)."""
    home_rounding: Literal["nearest", "stochastic"] = "nearest"
    """zo2 full-parameter: how an update is stored into a home narrower than fp32 (stochastic: a
    random draw and a few elementwise passes more per parameter)."""
    adam_states: Literal["fp32", "int8"] = "fp32"
    """first-order: AdamW's moments, fp32 (8 bytes a parameter) or 8-bit block-wise (2, and a 4-byte
    scale per 256 values each)."""
    adam_master: Literal["fp32", "bf16"] = "fp32"
    """first-order: the optimizer's master, an fp32 copy or (bf16) the weights' own 16-bit home."""
    quantization: Literal["none", "int8", "nf4"] = "none"
    """LoRA: the frozen base's decoder-layer matrices stored quantized (model.types.QUANT_BYTES_PER_PARAM
    a weight at home, on the wire and on the device), dequantized for each product."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass(frozen=True)
class LayerTiming:
    """A decoder layer as measured on the compute device (hardware.profile.LayerPoint): its spec, the
    token count and sequence length it ran at, and its seconds per forward / backward."""

    dtype: Dtype
    tokens: int
    seq_len: int
    hidden: int
    spec: BlockSpec
    forward_s: float
    forward_no_grad_s: float
    backward_s: float


@dataclass(frozen=True)
class Machine:
    """The numbers the cost model needs, taken from a HardwareProfile (or given directly by tests).

    Rates are bytes (or FLOPs, or parameters) per second; capacities are bytes usable by the run.
    """

    name: str
    compute_device: Literal["cuda", "cpu"]
    device_bytes: int
    matmul_flops: tuple[tuple[str, float], ...]
    """(dtype, FLOP/s) for 'float32', 'bfloat16', 'float16'."""
    device_mem_bps: float
    h2d_bps: float
    d2h_bps: float
    duplex_h2d_bps: float
    duplex_d2h_bps: float
    host_ram_bytes: int
    pinned_bytes: int
    dram_bps: float
    """Host memory copy rate, bytes read + written per second (a copy of N bytes costs 2N)."""
    cpu_adam_params_per_s: float
    """The CPU AdamW with fp32 states and master (torch's fused kernel), all threads."""
    cpu_adam_compact: tuple[tuple[str, str, float], ...] = ()
    """(adam_states, adam_master, params/s) of the compact-state AdamW (kernels/adamw.py), as measured."""
    disk_path: str | None = None
    disk_free_bytes: int = 0
    disk_read_bps: float = 0.0
    disk_write_bps: float = 0.0
    disk_mixed_bps: float = 0.0
    """Bytes both ways per second with reads and writes at once (0: not measured; then a phase's
    reads and writes take their times added)."""
    matmul_points: tuple[tuple[str, int, float], ...] = ()
    """Optional (dtype, square matrix size, FLOP/s) as measured: how fast small products run."""
    log_softmax_elems_per_s: float = 0.0
    """The loss's log-softmax (and its backward) over logits on the compute device; 0: memory bound."""
    log_softmax_backward_elems_per_s: float = 0.0
    cpu_burst_loss: float = 0.0
    """Host compute seconds lost per second of bursty work in another thread (HardwareProfile
    host.burst_compute_loss); counted when the CPU is the compute device."""
    disk_read_loss_s_per_byte: float = 0.0
    """Host compute seconds lost per byte read from the swap disk by another thread."""
    disk_write_loss_s_per_byte: float = 0.0
    elementwise_points: tuple[tuple[float, ...], ...] = ()
    """Optional (fp32 tensor elements, randn params/s, in-place bytes/s, new-tensor bytes/s[, 2-norm
    bytes read/s]) on the compute device, by size (see hardware.profile.ElementwisePoint; without the
    fifth, a norm reads at the in-place rate). Empty: randn and elementwise
    work run at device_mem_bps (memory bound, as on a GPU)."""
    layer_timings: tuple[LayerTiming, ...] = ()
    """Optional measured layers, by token count: the cost model prices them and scales a model's
    forward and backward work by measured / priced (work.calibration). Empty: no scaling."""
    context_bytes: int = 0
    """cuda: device memory the process holds outside torch's allocator (the CUDA context), measured
    or assumed. device_bytes, free memory as a process holding its context saw it, leaves it out:
    the device offers the run device_bytes + context_bytes, and the device peak counts it."""
    library_workspace_bytes: int = 0
    """cuda: workspaces libraries keep allocated for the process's life (cuBLAS, cuBLASLt)."""
    allocator_slack: float = 0.0
    """cuda: what the caching allocator reserves beyond the tensors made and freed every pass
    (activations, logits and loss), as a fraction of them. 0 on a CPU (no caching allocator)."""

    def adam_params_per_s(self, states: str, master: str) -> float:
        """The CPU AdamW's rate in a state format; 0 when the profile did not measure it."""
        if (states, master) == ("fp32", "fp32"):
            return self.cpu_adam_params_per_s
        return next((r for st, ma, r in self.cpu_adam_compact if (st, ma) == (states, master)), 0.0)

    def flops(self, dtype: str) -> float:
        return dict(self.matmul_flops).get(dtype, 0.0)


@dataclass(frozen=True)
class Options:
    """The recipe's offload section, resolved: None means the planner chooses."""

    mode: Literal["auto", "in_memory", "stream"] = "auto"
    swap_dir: str | None = None
    device_memory_limit_bytes: int | None = None
    host_memory_limit_bytes: int | None = None
    prefetch_depth: int | None = None
    home_dtype: Dtype | None = None
    resident_layers: int | None = None
    weights_home: Tier | None = None
    optimizer_home: Tier | None = None
    activation: Activation | None = None


Z_PIECE = 1 << 24
"""zo2's piece size (Plan.z_piece): 16 M elements, 64 MB of fp32 per buffer. Large enough that a draw
or an elementwise op on a piece runs at the device's full rate; small enough that z, the direction and
the fp32 working copy of even OPT-175B's embedding take 200 MB, not 7.4 GB."""


# ---- a candidate the search prices ---------------------------------------------------------------


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


# ---- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TierBytes:
    device: int = 0
    pinned: int = 0
    pageable: int = 0
    ssd: int = 0

    def get(self, tier: Tier) -> int:
        return getattr(self, tier.value)


@dataclass(frozen=True)
class StepTimes:
    """Seconds per optimizer step that each resource is busy, and the step they add up to."""

    gpu_s: float = 0.0
    """Compute device: matrix products plus elementwise work (perturbations, updates)."""
    h2d_s: float = 0.0
    d2h_s: float = 0.0
    ssd_read_s: float = 0.0
    ssd_write_s: float = 0.0
    cpu_optimizer_s: float = 0.0
    dram_s: float = 0.0
    """Host memory copies made by the CPU (pageable <-> pinned staging)."""
    step_s: float = 0.0
    """The combined step under the overlap model (see plan/step_time.py)."""
    bottleneck: str = ""
    """The resource whose busy time sets step_s ('gpu', 'h2d', 'd2h', 'ssd', 'cpu_optimizer', 'dram')."""


@dataclass(frozen=True)
class BlockPlan:
    name: str
    """'embed', 'layers.N' or 'head'."""
    param_bytes: int
    """The block's weights in the home dtype."""
    weights_home: Tier
    """Where the weights live between uses; DEVICE = resident for the whole run."""
    optimizer_home: Tier | None
    """First-order: where fp32 master + m + v live (DEVICE for LoRA adapters). None for zo2 and for
    blocks with nothing to train."""
    activation: Activation | None
    """First-order: keep the block's saved activations on the device, swap them to pinned host
    memory, or keep only its input and recompute in backward, that input on the device
    ('recompute') or swapped to pinned host memory ('recompute-swap'). None for zo2."""
    params: int = 0
    trainable_params: int = 0
    optimizer_bytes: int = 0
    """Bytes of optimizer state (master weights if separate, m, v; zo2 momentum) at optimizer_home
    (for zo2 momentum: beside the weights, at weights_home)."""


@dataclass(frozen=True)
class Plan:
    method: Method
    compute_device: Literal["cuda", "cpu"]
    blocks: tuple[BlockPlan, ...]
    """In execution order (the forward's)."""
    prefetch_depth: int
    """Blocks fetched ahead of the one computing (0: fetch, then compute, synchronously)."""
    device_buffers: int
    """Device buffers for streamed blocks (fetching + computing; a zo2 layer goes home from its slot while it computes)."""
    home_dtype: Dtype
    """Dtype of trainable weights at home (frozen LoRA bases live in compute_dtype)."""
    wire_dtype: Dtype
    """Dtype of weights on the host<->device link."""
    compute_dtype: Dtype
    pinned_pool_bytes: int
    """Page-locked staging pool to allocate once (streaming buffers, gradient and activation swaps),
    not counting weights homed in PINNED."""
    swap_dir: str | None
    device_budget_bytes: int
    """Device bytes the plan may use (capacity less headroom)."""
    memory: TierBytes
    """Predicted peak bytes per tier."""
    capacity: TierBytes
    """Bytes each tier offers this run (after headroom); ssd: free space under swap_dir."""
    times: StepTimes
    tokens_per_s: float
    feasible: bool
    reasons: tuple[str, ...] = ()
    """Why the plan does not fit (empty when feasible)."""
    suggestions: tuple[str, ...] = ()
    """Changes that would make it fit (or run faster), each with its predicted step time."""
    micro_batch_size: int = 1
    """Examples per forward; a step runs tokens_per_step / (micro_batch_size * seq_len) of them."""
    micro_batches: int = 1
    seq_len: int = 0
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    """Model FLOPs of one step (forwards, backward, recomputation), for TFLOPS and utilisation."""
    tflops: float = 0.0
    gpu_utilization: float = 0.0
    """flops_per_step / step_s as a fraction of the device's best matmul rate."""
    lora: bool = False
    quantization: Literal["none", "int8", "nf4"] = "none"
    """LoRA: the format the frozen base's decoder-layer matrices are stored in (Workload.quantization)."""
    model: str = ""
    machine: str = ""
    notes: tuple[str, ...] = ()
    device_parts: tuple[tuple[str, int], ...] = ()
    """What memory.device is made of: (part, bytes), e.g. resident weights, activations, the CUDA
    context; the device peak is their sum."""
    device_context_bytes: int = 0
    """cuda: the CUDA context the device peak counts (outside torch's allocator): a run capping its
    allocator under offload.device_memory_limit (the whole process's memory) caps it at the limit
    less this."""
    z_buffer: ZBuffer = "block"
    """zo2: how a direction's z is held. 'block': drawn once per direction into an fp32 buffer the
    size of the largest trainable block, shared by its +eps and -eps passes. 'tensor': drawn tensor
    by tensor into a buffer the size of the largest trainable tensor, the block's generator replayed
    from its start for each pass (the same numbers; one more draw per direction, a block's z less
    device memory). First-order plans carry the default, unused."""
    home_rounding: Literal["nearest", "stochastic"] = "nearest"
    """zo2 full-parameter: how an update is stored into a home narrower than fp32 (train/rounding.py);
    nearest for an fp32 home, LoRA and first-order plans."""
    z_piece: int = Z_PIECE
    """zo2: z, the update direction and the fp32 working copy go through a tensor in pieces of at most
    this many elements (each piece one draw), so a 257 M-parameter embedding needs piece-sized
    buffers, not tensor-sized ones. Part of the arithmetic: z's numbers depend on it (checkpoints
    record it)."""

    @property
    def resident_blocks(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks if b.weights_home is Tier.DEVICE)

    def block(self, name: str) -> BlockPlan:
        return next(b for b in self.blocks if b.name == name)

    def to_dict(self) -> dict:
        return _encode(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        return _decode(cls, data)


def _encode(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(tp: object, value: object) -> object:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _decode(hints[k], v) for k, v in value.items() if k in names})
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if origin is tuple:
        (item, *_rest) = typing.get_args(tp)
        return tuple(_decode(item, v) for v in value)
    if origin is typing.Union or origin is _types.UnionType:
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decode(inner[0], value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value
