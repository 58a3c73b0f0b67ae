"""Plan stage, the memory model: peak bytes per tier of one candidate placement, and what each tier offers.

Pure arithmetic over model.types and plan.types (no torch, no I/O). The device peak is a sum of named
parts (resident weights, streaming buffers, activations, the logits, a CUDA process's own memory...),
which the Plan carries and a refusal lists. The only constants are headroom fractions and bytes per
parameter of known kernels, each with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fuyoucli.model.types import DTYPE_BYTES, QUANT_BYTES_PER_PARAM, ModelInventory
from fuyoucli.plan import work
from fuyoucli.plan.types import Z_PIECE, Machine, Options, Placement, Tier, TierBytes, Workload

# Headroom: fractions of each capacity the plan leaves free. Device: what no named part of the peak
# accounts for (attention kernels' scratch, tensors of an op's own) and the error of the parts that
# are estimates (the CUDA context when not measured, the allocator's slack): kept at its old value
# until a GPU run calibrates those parts. Host: the OS, Python, the tokenized data. SSD: filesystems
# slow down when nearly full.
DEVICE_HEADROOM = 0.08
HOST_HEADROOM = 0.10
SSD_HEADROOM = 0.05


# ---- what each tier offers ------------------------------------------------------------------------


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


# ---- bytes per block ------------------------------------------------------------------------------


def home_bytes(inv: ModelInventory, wl: Workload, home_dtype: str) -> list[int]:
    """Per block, the bytes that live at the weights' home (and stream when not resident). Under
    LoRA only the frozen base streams, read-only, in the compute dtype (its decoder layers' matrices
    quantized when model.quantization says so); adapters stay on the device."""
    compute_bytes, home_bytes_per_param = DTYPE_BYTES[wl.compute_dtype], DTYPE_BYTES[home_dtype]
    momentum_bytes = 4 if (wl.method == "zo2" and wl.zo_momentum) else 0
    out = []
    for s in inv.blocks:
        if wl.lora:
            quantized = s.quantizable_params if wl.quantization != "none" else 0
            out.append((s.params - s.trainable_params - quantized) * compute_bytes +
                       math.ceil(quantized * QUANT_BYTES_PER_PARAM.get(wl.quantization, 0.0)))
        elif wl.method == "zo2":
            out.append(s.params * home_bytes_per_param + s.trainable_params * momentum_bytes)
        else:
            out.append(s.params * compute_bytes)
    return out


# 8-bit moments (kernels/adamw.py): a byte per value and a 4-byte scale per block of 256, for m and v.
INT8_MOMENT_BYTES = 2 * (1 + 4 / 256)


def optimizer_bytes_per_param(wl: Workload, home: Tier | None = None, streamed: bool = True) -> float:
    """First-order AdamW state bytes per trainable parameter at its home: the moments (fp32: 8; int8:
    INT8_MOMENT_BYTES) and the master. Off the device (the CPU worker's states, engine/optimizer.py):
    an fp32 master (4) whatever the compute dtype (the weights' home keeps its own compute-dtype copy);
    a bf16 master of a streamed block is that home itself (0), of a resident one a host copy (2). On
    the device (the optimizer on the parameters themselves): an fp32 master copy only when the
    weights are not fp32 and the master is."""
    moments = 8 if wl.adam_states == "fp32" else INT8_MOMENT_BYTES
    if home is Tier.DEVICE:
        return moments + (4 if DTYPE_BYTES[wl.compute_dtype] != 4 and wl.adam_master == "fp32" else 0)
    if wl.adam_master == "bf16":
        return moments + (0 if streamed else 2)
    return moments + 4


@dataclass(frozen=True)
class BlockBytes:
    """Per block (inventory order), the bytes the memory and the time models both count."""

    home: list[int]
    """At the weights' home; what a fetch moves (home_bytes)."""
    write_back: list[int]
    """What goes home after the block ran: zo2's updated weights, first-order's gradients (compute dtype)."""
    on_device: list[int]
    """LoRA: the trainable adapters (and a new head), their fp32 copy and states, always on the device."""
    streamed: list[int]
    """Indices of the blocks whose weights stream (home off the device)."""


def block_bytes(inv: ModelInventory, wl: Workload, pl: Placement) -> BlockBytes:
    zo = wl.method == "zo2"
    compute_bytes = DTYPE_BYTES[wl.compute_dtype]
    momentum_bytes = 4 if (zo and wl.zo_momentum) else 0
    home = home_bytes(inv, wl, pl.home_dtype)
    write_back, on_device = [0] * len(inv.blocks), [0] * len(inv.blocks)
    for i, s in enumerate(inv.blocks):
        trainable = s.trainable_params
        if wl.lora:
            # the model's weights, their fp32 copy, and zo2's momentum or AdamW's master, m and v
            on_device[i] = trainable * (compute_bytes + 4 + (momentum_bytes if zo else 12))
        elif zo:
            write_back[i] = home[i] if trainable else 0  # the updated weights go home
        else:
            write_back[i] = trainable * compute_bytes  # gradients D2H, compute dtype
    streamed = [i for i in range(len(inv.blocks)) if pl.weights_home[i] is not Tier.DEVICE]
    return BlockBytes(home=home, write_back=write_back, on_device=on_device, streamed=streamed)


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
    compute_bytes = DTYPE_BYTES[wl.compute_dtype]
    upcast = 4 if compute_bytes != 4 else 0
    logits = micro_tokens * vocab * compute_bytes
    if wl.loss_positions_fraction >= 1:
        forward = micro_tokens * vocab * (upcast + 4)
        backward = micro_tokens * vocab * 12
    else:
        scored = min(micro_tokens, max(1, round(wl.loss_positions_fraction * micro_tokens)))
        forward = scored * vocab * (compute_bytes + upcast + 4)
        backward = scored * vocab * 12 + 2 * logits
    return logits + (forward if wl.method == "zo2" else max(forward, backward))


def dequantized_bytes(inv: ModelInventory, wl: Workload) -> int:
    """Device bytes of a quantized base's one matrix in use (model.quantized: dequantized for its
    product, freed after it; the backward's input gradient dequantizes again): the weight in the
    compute dtype, and int8's fp32 product (code * scale) before that cast, or nf4's fp32 block scales."""
    if not wl.lora or wl.quantization == "none":
        return 0
    largest = max((s.max_tensor_params for s in inv.blocks if s.quantizable_params), default=0)
    extra = 4 * largest if wl.quantization == "int8" else 4 * math.ceil(largest / 64)
    return largest * DTYPE_BYTES[wl.compute_dtype] + extra


# ---- one placement's peak ------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    memory: TierBytes
    pinned_pool_bytes: int
    device_buffers: int
    device_parts: tuple[tuple[str, int], ...]
    """What the device peak is made of (resident weights, buffers, activations, ...), for reasons."""


@dataclass
class _Host:
    """Bytes off the device, tallied while the parts are: host tiers, the SSD, the pinned staging pool."""

    pinned: int = 0
    pageable: int = 0
    ssd: int = 0
    pool: int = 0
    """Pinned staging, allocated once by the engine (not counting weights homed in pinned memory)."""


def memory_estimate(inv: ModelInventory, wl: Workload, machine: Machine, pl: Placement) -> MemoryEstimate:
    """Peak bytes per tier of one step under placement `pl`, the device's as named parts."""
    cpu = machine.compute_device == "cpu"
    blocks = block_bytes(inv, wl, pl)
    parts = {"resident weights": 0, "resident compute copy": 0, "streaming buffers": 0, "optimizer on device": 0,
             "activations": 0, "work buffers": 0, "adapters": sum(blocks.on_device)}
    host = _Host()
    gradient_buffer = _homes(inv, wl, pl, blocks, parts, host)
    buffers = _streaming_buffers(inv, wl, pl, blocks, cpu, gradient_buffer, parts, host)
    if wl.method == "zo2":
        parts["work buffers"] = _zo_work_buffers(inv, wl, pl, blocks)
    parts["activations"] = _activations(inv, wl, pl, host)
    parts["logits and loss"] = logits_and_loss_bytes(inv, wl, pl.micro_batch_size * wl.seq_len)
    parts["dequantized weight"] = dequantized_bytes(inv, wl)
    if not cpu:  # what a CUDA process holds beyond its tensors (hardware.profile says why)
        parts["CUDA context"] = machine.context_bytes
        parts["library workspaces"] = machine.library_workspace_bytes
        parts["allocator slack"] = int(machine.allocator_slack * (parts["activations"] + parts["logits and loss"]))
    if cpu:  # host RAM is the device; the 'host' tiers hold nothing separately
        parts["host-side"] = host.pinned + host.pageable
        host.pinned = host.pageable = host.pool = 0
    else:
        host.pinned += host.pool
    memory = TierBytes(device=sum(parts.values()), pinned=host.pinned, pageable=host.pageable, ssd=host.ssd)
    return MemoryEstimate(memory=memory, pinned_pool_bytes=host.pool, device_buffers=buffers,
                          device_parts=tuple((k, v) for k, v in parts.items() if v))


def _homes(inv: ModelInventory, wl: Workload, pl: Placement, blocks: BlockBytes, parts: dict[str, int],
           host: _Host) -> int:
    """Weights at their homes and first-order optimizer states at theirs; returns the largest block's
    gradients that go to a host optimizer (they pass through device and pinned buffers)."""
    first_order_full = wl.method != "zo2" and not wl.lora
    zo_full = wl.method == "zo2" and not wl.lora
    states_on_device = optimizer_bytes_per_param(wl, Tier.DEVICE)
    gradient_buffer = 0
    for i, s in enumerate(inv.blocks):
        weights_home, optimizer_home = pl.weights_home[i], pl.optimizer_home[i]
        if weights_home is Tier.DEVICE:
            parts["resident weights"] += blocks.home[i]
            if zo_full:  # zo2 keeps the home apart; the model's own compute-dtype weights are what the passes read
                parts["resident compute copy"] += s.params * DTYPE_BYTES[wl.compute_dtype]
        elif weights_home is Tier.PINNED:
            host.pinned += blocks.home[i]
        elif weights_home is Tier.PAGEABLE:
            host.pageable += blocks.home[i]
        else:
            host.ssd += blocks.home[i]
        if first_order_full and s.trainable_params:
            states = int(s.trainable_params * optimizer_bytes_per_param(wl, streamed=weights_home is not Tier.DEVICE))
            if optimizer_home is Tier.DEVICE:
                # states + fp32 gradient
                parts["optimizer on device"] += int(s.trainable_params * (states_on_device + 4))
            elif optimizer_home is Tier.SSD:
                host.ssd += states
            else:
                host.pageable += states
            if optimizer_home is not Tier.DEVICE:
                gradient_buffer = max(gradient_buffer, blocks.write_back[i])
    return gradient_buffer


def host_staging_buffers(depth: int, *, zo: bool, writeback: bool) -> int:
    """Pinned host staging a GPU run keeps for streamed homes, in buffers of the largest streamed
    block: a read buffer per device slot, a write buffer per slot where zo2 layers go home (what
    engine/store.py allocates), and first-order's one more."""
    return (depth + 1) * (2 if writeback else 1) + (0 if zo else 1)


def _streaming_buffers(inv: ModelInventory, wl: Workload, pl: Placement, blocks: BlockBytes, cpu: bool,
                       gradient_buffer: int, parts: dict[str, int], host: _Host) -> int:
    """Device slots for streamed blocks (fetching, computing: a zo2 layer goes home while it computes),
    their host staging, and first-order's gradient and SSD-optimizer buffers; returns the number of
    device slots."""
    zo = wl.method == "zo2"
    streamed = blocks.streamed
    writeback = any(blocks.write_back[i] for i in streamed) if zo else False
    largest = max((blocks.home[i] for i in streamed), default=0)
    depth = pl.prefetch_depth
    buffers = 0
    if streamed:
        # zo2's layers go home while their passes read them (plan/schedule.py): no slot is only draining
        buffers = depth + 1
        parts["streaming buffers"] = buffers * largest
        # on a CPU the device buffers are host memory: SSD reads land there directly, nothing is staged;
        # on a GPU each slot has a staging buffer for the reads and, when layers go home, one for the writes
        if not cpu and any(pl.weights_home[i] in (Tier.SSD, Tier.PAGEABLE) for i in streamed):
            host.pool += host_staging_buffers(depth, zo=zo, writeback=writeback) * largest
    if not zo and not wl.lora:
        on_ssd = [int(s.trainable_params * optimizer_bytes_per_param(
                      wl, streamed=pl.weights_home[i] is not Tier.DEVICE))
                  for i, s in enumerate(inv.blocks) if pl.optimizer_home[i] is Tier.SSD]
        if on_ssd:
            host.pageable += 3 * max(on_ssd)  # read-ahead, updating, writing back
        if gradient_buffer:
            parts["streaming buffers"] += 2 * gradient_buffer  # gradients of one block filling, one draining
            if not cpu:
                host.pool += 2 * gradient_buffer  # where they land on the host
    return buffers


def _zo_work_buffers(inv: ModelInventory, wl: Workload, pl: Placement, blocks: BlockBytes) -> int:
    """zo2's buffers, allocated once by the engine: the compute-dtype copy a streamed block computes with
    (cast(home +/- eps*z) is formed there), z in fp32 (z_buffer 'block': for the largest trainable
    block, one direction's z serving both its passes; 'tensor': a piece's, drawn again for each pass),
    and a piece's update direction (plus the fp32 working copy of a half-precision home): tensors go
    through them piece by piece (Z_PIECE elements, or the largest tensor if smaller)."""
    largest_block = max((s.trainable_params for s in inv.blocks), default=0)
    piece = min(Z_PIECE, max((min(s.max_tensor_params, s.trainable_params) for s in inv.blocks), default=0))
    compute_copy = 0 if wl.lora else max((inv.blocks[i].params for i in blocks.streamed), default=0) \
        * DTYPE_BYTES[wl.compute_dtype]
    z = piece if pl.z_buffer == "tensor" else largest_block
    return compute_copy + z * 4 + (2 if DTYPE_BYTES[pl.home_dtype] != 4 else 1) * piece * 4


def _activations(inv: ModelInventory, wl: Workload, pl: Placement, host: _Host) -> int:
    """The blocks' activations on the device (the head's vocabulary-wide tensors are the logits-and-loss
    part). zo2: the hidden states of every pass in flight (2q, or the conservative variant's 3) and one
    layer's internals. First-order: per layer, what the policy keeps ('keep': all it saved; 'recompute':
    its input), swaps to pinned host memory (allocated once with the staging pool) or brings back for
    its backward; the hidden state and its gradient; and the largest transient."""
    compute_bytes = DTYPE_BYTES[wl.compute_dtype]
    tokens, micro_tokens, hidden = wl.tokens_per_step, pl.micro_batch_size * wl.seq_len, inv.hidden_size
    layer_internal = max((s.internal_elems_per_token for s in inv.blocks if s.name != "head"), default=0)
    if wl.method == "zo2":
        streams = max(2 * wl.q, 3 if wl.zo_conservative else 0)
        return (streams * tokens * hidden + micro_tokens * layer_internal) * compute_bytes
    saved, transient = 0, micro_tokens * layer_internal * compute_bytes
    for i, s in enumerate(inv.blocks):
        policy = pl.activation[i]
        if not s.name.startswith("layers."):
            continue
        everything = tokens * s.internal_elems_per_token * compute_bytes
        checkpoint = tokens * s.boundary_elems_per_token * compute_bytes
        if policy == "keep":
            saved += everything
        elif policy == "swap":
            host.pool += everything
            transient = max(transient, 2 * micro_tokens * s.internal_elems_per_token * compute_bytes)
        elif policy == "recompute-swap":
            host.pool += checkpoint  # the layer's input waits in pinned host memory
            transient = max(transient, 2 * checkpoint)  # swapped in for its backward, the next one's coming
        else:
            saved += checkpoint
    return saved + 2 * tokens * hidden * compute_bytes + transient
