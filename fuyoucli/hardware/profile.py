"""Hardware profile stage: the HardwareProfile data every plan is computed from, and its JSON form.

Frozen dataclasses with units in field names, a versioned JSON schema validated on load, and
load_profile() (a file or a preset name), which train.plan_inputs turns into the planner's Machine.
Imports no torch and nothing from model/, plan/, engine/ or train/.

Why it is long: the whole schema of a saved profile, each measured figure a field with its unit
and validation, versioned and round-tripped as one unit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fuyoucli.errors import InputError
from fuyoucli.hardware.strict_json import FieldError, decode
from fuyoucli.resources import cache_dir

SCHEMA_VERSION = 1
PROFILE_FILENAME = "hardware_profile.json"

Dtype = Literal["bf16", "fp16", "fp32"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---- what a CUDA process holds beyond its tensors --------------------------------------------
# The planner's device peak is what nvidia-smi shows for the run's process; besides the tensors the
# plan places, a CUDA process holds the following. Estimates, not yet calibrated on a GPU (issue 16):
MIB, GIB = 1 << 20, 1 << 30
ASSUMED_CONTEXT_BYTES = GIB // 2
"""The CUDA context when the profile did not measure it (presets, older profiles): CUDA 12 contexts
with lazily loaded kernels take a few hundred MiB on recent GPUs; half a GiB is the round figure
presets have always set aside."""
BLAS_WORKSPACE_BYTES = 2 * 32 * MIB
"""cuBLAS and cuBLASLt workspaces: torch allocates one per (handle, stream) that runs a product,
from its caching allocator, and keeps it for the process's life; on Hopper each is 32 MiB (4-8 MiB
on older GPUs: the larger is assumed, the architecture is not in the profile). A run multiplies on
one stream; the two libraries' workspaces are counted separately (torch versions that share one
overstate by 32 MiB)."""
ALLOCATOR_SLACK = 0.25
"""torch's caching allocator keeps freed blocks for reuse and rounds blocks up (to 2 MiB segments
for large ones), so what it reserves exceeds what tensors hold. Tensors made and freed every pass
(activations, the logits and the loss) leave cached segments of one size that the next, larger
shape cannot reuse; the engine's buffers, allocated once, leave none. This fraction of the
per-pass tensors is added to the device peak."""


# ---- compute device -------------------------------------------------------------------------


@dataclass(frozen=True)
class MatmulPoint:
    """One square product (size x size) @ (size x size); FLOP/s counts 2*size**3 per product."""

    size: int
    flops: float

    def __post_init__(self) -> None:
        _require(self.size > 0 and self.flops > 0, "size and flops must be > 0")


@dataclass(frozen=True)
class MatmulRates:
    """Achieved matmul rate for one dtype at the sizes tried. No points: the dtype is unsupported there."""

    dtype: Dtype
    points: tuple[MatmulPoint, ...]

    @property
    def best_flops(self) -> float:
        return max((p.flops for p in self.points), default=0.0)

    @property
    def best_size(self) -> int:
        """The smallest size that reaches 90% of the best rate: below it the device is underfed."""
        best = self.best_flops
        return min((p.size for p in self.points if p.flops >= 0.9 * best), default=0)


@dataclass(frozen=True)
class ElementwisePoint:
    """fp32 elementwise rates on the compute device for tensors of `params` elements (ZO's work:
    drawing z, forming home + s*eps*z, updating; a model's norms, activations and residual adds).

    On a GPU these are memory bound; on a CPU drawing normals is compute bound (a few ns per number
    per generator) and a new result tensor costs its page faults once it is too big for the
    allocator to reuse (glibc hands blocks over ~32 MB back to the OS), so the size matters."""

    params: int
    randn_params_per_s: float  # zo2's z draw into a buffer (kernels/normal.py): fp32 normals per second
    inplace_gbps: float  # y.add_(x, alpha=a): 12 bytes per element (read x and y, write y)
    fresh_gbps: float  # torch.add(x, y, alpha=a) into a new tensor each call: the same 12 bytes
    norm_gbps: float = 0.0
    """torch.linalg.vector_norm(x): 4 bytes read per element (gradient clipping's norms; a reduction,
    slower per byte than an add on a CPU). 0: not measured (then priced at inplace_gbps)."""

    def __post_init__(self) -> None:
        _require(self.params > 0 and self.randn_params_per_s > 0 and self.inplace_gbps > 0 and self.fresh_gbps > 0,
                 "params and elementwise rates must be > 0")


@dataclass(frozen=True)
class LayerPoint:
    """One decoder layer run as a model runs it (transformers' Llama layer, random weights), timed per
    layer at one token count: the calibration of the planner's per-op pricing on this device.

    Products priced at the square-product rate and elementwise work at the isolated rates miss what a
    real layer adds: per-op dispatch and launch overhead, skinny products (few tokens per weight),
    caches shared between ops, new activations' pages. The planner prices this layer (its numbers
    below are the inventory's for it) and scales a model's forward and backward by measured /
    priced at the nearest token counts."""

    dtype: Dtype
    tokens: int  # per forward: batch x seq_len
    seq_len: int
    hidden: int
    params: int
    max_tensor_params: int
    matmul_flops_per_token: int
    attention_flops_per_token_per_key: int
    elementwise_elems_per_token: int
    forward_s: float  # with autograd recording (a first-order forward), per layer
    forward_no_grad_s: float  # inference (a zo2 forward), per layer
    backward_s: float  # every weight's gradient and the input's, per layer

    def __post_init__(self) -> None:
        _require(self.tokens > 0 and self.seq_len > 0 and self.hidden > 0 and self.params > 0,
                 "layer point sizes must be > 0")
        _require(self.forward_s > 0 and self.forward_no_grad_s > 0 and self.backward_s > 0,
                 "layer point times must be > 0")


@dataclass(frozen=True)
class ComputeDevice:
    """The device that runs forward/backward. kind 'cpu' means no CUDA: the CPU computes, and
    total/free memory are host RAM."""

    kind: Literal["cuda", "cpu"]
    name: str
    count: int
    total_memory_bytes: int
    free_memory_bytes: int
    memory_bandwidth_gbps: float  # large device-to-device copy, bytes read + written per second
    matmul: tuple[MatmulRates, ...]
    note: str = ""
    elementwise: tuple[ElementwisePoint, ...] = ()
    """By tensor size, ascending; empty in profiles measured before fuyou timed it (the planner then
    assumes memory-bound elementwise work at memory_bandwidth_gbps: optimistic on a CPU)."""
    log_softmax_elems_per_s: float = 0.0
    """fp32 log-softmax over a vocabulary-wide row (the loss over logits), elements per second; an
    exp and a log per element: compute bound on a CPU. 0: not measured (memory bound assumed)."""
    log_softmax_backward_elems_per_s: float = 0.0
    layers: tuple[LayerPoint, ...] = ()
    """By token count, ascending; empty in presets and in profiles measured before fuyou timed it
    (the planner then prices products and elementwise work at the isolated rates alone)."""
    context_bytes: int = 0
    """CUDA: device memory the profiling process held outside torch's caching allocator once its
    kernels had run (the CUDA context: code, runtime state): (total - free) - memory_reserved().
    free_memory_bytes was seen from that process, so excludes it. On a GPU that other processes used
    at the same time their memory is counted here too. 0: not measured (a CPU, a preset, an older
    profile; the planner then assumes ASSUMED_CONTEXT_BYTES on a GPU)."""

    def __post_init__(self) -> None:
        _require(self.count >= 1, "count must be >= 1")
        _require(self.context_bytes >= 0, "context_bytes must be >= 0")
        tokens = [(p.dtype, p.tokens) for p in self.layers]
        _require(tokens == sorted(set(tokens)), "layer points must have distinct (dtype, tokens), ascending")
        sizes = [p.params for p in self.elementwise]
        _require(sizes == sorted(set(sizes)), "elementwise points must have distinct, ascending params")
        _require(0 <= self.free_memory_bytes <= self.total_memory_bytes, "need 0 <= free_memory_bytes <= total")
        _require(self.memory_bandwidth_gbps > 0, "memory_bandwidth_gbps must be > 0")

    def matmul_flops(self, dtype: Dtype) -> float:
        """Best achieved FLOP/s for dtype; 0.0 when it was not measured or is unsupported."""
        return next((m.best_flops for m in self.matmul if m.dtype == dtype), 0.0)


# ---- host <-> device links ------------------------------------------------------------------


@dataclass(frozen=True)
class BandwidthPoint:
    size_bytes: int  # bytes per transfer
    gbps: float  # 1e9 bytes transferred per second

    def __post_init__(self) -> None:
        _require(self.size_bytes > 0 and self.gbps > 0, "size_bytes and gbps must be > 0")


@dataclass(frozen=True)
class BandwidthCurve:
    """Transfer rate by transfer size, sizes ascending."""

    points: tuple[BandwidthPoint, ...]

    def __post_init__(self) -> None:
        _require(len(self.points) > 0, "a bandwidth curve needs at least one point")
        sizes = [p.size_bytes for p in self.points]
        _require(sizes == sorted(set(sizes)), "points must have distinct, ascending size_bytes")

    @property
    def peak_gbps(self) -> float:
        return max(p.gbps for p in self.points)

    def gbps_at(self, size_bytes: int) -> float:
        """Rate for a transfer of size_bytes: linear in log2(size) between measured sizes, clamped
        outside them (small transfers are latency bound, so clamping below is optimistic)."""
        pts = self.points
        if size_bytes <= pts[0].size_bytes:
            return pts[0].gbps
        for lo, hi in zip(pts, pts[1:]):
            if size_bytes <= hi.size_bytes:
                t = math.log2(size_bytes / lo.size_bytes) / math.log2(hi.size_bytes / lo.size_bytes)
                return lo.gbps + t * (hi.gbps - lo.gbps)
        return pts[-1].gbps


@dataclass(frozen=True)
class Links:
    """Host<->compute-device copies. kind 'host_memcpy' (no CUDA): every curve is a copy between two
    host buffers, so 'pinned' and 'pageable' are the same memory and h2d/d2h are the same copy."""

    kind: Literal["host_device", "host_memcpy"]
    h2d_pinned: BandwidthCurve
    h2d_pageable: BandwidthCurve
    d2h_pinned: BandwidthCurve
    d2h_pageable: BandwidthCurve
    duplex_h2d_pinned: BandwidthCurve  # H2D rate while an equal D2H runs at the same time
    duplex_d2h_pinned: BandwidthCurve  # D2H rate while an equal H2D runs at the same time
    note: str = ""


# ---- host -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdamRate:
    """The CPU AdamW's rate in one state format (method.states, method.master), on adamw_threads threads."""

    states: str
    master: str
    params_per_s: float

    def __post_init__(self) -> None:
        _require(self.params_per_s > 0, "adamw rates must be > 0")


@dataclass(frozen=True)
class Host:
    """CPU, RAM and the CPU optimizer rate. dram_copy_gbps counts bytes read + written (as STREAM's
    Copy does), so it compares directly with AdamW's ~28 bytes moved per parameter."""

    cpu_model: str
    physical_cores: int
    logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    memlock_limit_bytes: int | None  # `ulimit -l`; None: unlimited
    pinned_allocatable_bytes: int | None  # None: not applicable (no CUDA device to pin for)
    pinned_probe_capped: bool  # True: the probe stopped at its cap or deadline; more may be pinnable
    dram_copy_gbps: float
    adamw_impl: str  # the torch optimizer call that was timed
    adamw_1thread_params_per_s: float  # fp32 params updated per second on one thread
    adamw_all_threads_params_per_s: float
    adamw_threads: int  # threads used for the 'all threads' figure
    note: str = ""
    burst_compute_loss: float = 0.0
    """Seconds a torch computation on the host loses per second of work another thread does in
    bursts (an engine's CPU optimizer worker, its SSD staging copies): beyond the work itself, what
    waking and sharing the cores costs. ~0 on an idle many-core host; several on a busy 2-core VM."""
    adamw_compact: tuple[AdamRate, ...] = ()
    """The compact-state AdamW's rate (kernels/adamw.py) for each format but fp32/fp32; empty in a
    profile measured before these formats existed."""

    def adamw_rate(self, states: str, master: str) -> float | None:
        """Parameters per second of the CPU AdamW in a state format (all threads); None: not measured."""
        if (states, master) == ("fp32", "fp32"):
            return self.adamw_all_threads_params_per_s
        return next((r.params_per_s for r in self.adamw_compact if (r.states, r.master) == (states, master)), None)

    def __post_init__(self) -> None:
        _require(self.physical_cores >= 1 and self.logical_cores >= self.physical_cores,
                 "need 1 <= physical_cores <= logical_cores")
        _require(0 <= self.ram_available_bytes <= self.ram_total_bytes, "need 0 <= ram_available_bytes <= total")
        _require(self.dram_copy_gbps > 0, "dram_copy_gbps must be > 0")
        _require(self.adamw_1thread_params_per_s > 0 and self.adamw_all_threads_params_per_s > 0,
                 "adamw rates must be > 0")
        _require(self.adamw_threads >= 1, "adamw_threads must be >= 1")


# ---- disks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskPoint:
    block_bytes: int  # bytes per read/write call
    threads: int  # calls in flight at once (queue depth)
    gbps: float

    def __post_init__(self) -> None:
        _require(self.block_bytes > 0 and self.threads > 0 and self.gbps > 0,
                 "block_bytes, threads and gbps must be > 0")


@dataclass(frozen=True)
class Disk:
    """Sequential throughput of one directory's filesystem. method 'o_direct' bypasses the page cache;
    'fsync+fadvise' writes through the cache, fsyncs, and drops the file's cached pages before reads;
    'fsync' could not drop them, so its reads may be cache speed (see note).

    first_write_gbps is the first pass over a new file (the filesystem allocates blocks: a checkpoint
    or a swap file's first step); `write` points overwrite those blocks, as an offload file does
    from then on, and are often faster. All write figures include a closing fsync."""

    path: str
    filesystem: str
    device: str
    free_bytes: int
    o_direct_supported: bool
    method: Literal["o_direct", "fsync+fadvise", "fsync"]
    test_file_bytes: int
    first_write_gbps: float
    read: tuple[DiskPoint, ...]
    write: tuple[DiskPoint, ...]
    note: str = ""
    read_compute_loss_s_per_gb: float = 0.0
    """Seconds a host torch computation loses per GB another thread reads from this disk (the I/O's
    own CPU time: syscalls, interrupts, a VM's block emulation). 0: not measured."""
    write_compute_loss_s_per_gb: float = 0.0
    mixed_gbps: float = 0.0
    """Reads and writes at once (one stream each, the largest block): bytes both ways per second.
    0: not measured (the planner then adds the read and write times as if one waited for the other)."""

    def __post_init__(self) -> None:
        _require(len(self.read) > 0 and len(self.write) > 0, "a disk needs read and write points")
        _require(self.free_bytes >= 0 and self.test_file_bytes >= 0, "byte counts must be >= 0")
        _require(self.first_write_gbps > 0, "first_write_gbps must be > 0")

    @property
    def read_gbps(self) -> float:
        return max(p.gbps for p in self.read)

    @property
    def write_gbps(self) -> float:
        return max(p.gbps for p in self.write)

    @property
    def best_read(self) -> DiskPoint:
        return max(self.read, key=lambda p: p.gbps)

    @property
    def best_write(self) -> DiskPoint:
        return max(self.write, key=lambda p: p.gbps)


# ---- the profile ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Provenance:
    source: Literal["measured", "preset"]
    mode: Literal["quick", "full", "preset"]
    created_at: str  # ISO 8601, UTC
    hostname: str
    fuyou_version: str
    torch_version: str
    python_version: str
    platform: str
    duration_s: float
    cpu_busy_percent_at_start: float = 0.0  # CPU use by other work just before measuring began
    cpu_busy_percent_at_end: float = 0.0  # ... and just after it ended (the probe itself idle)
    preset: str = ""  # the preset's name when source == 'preset'
    sources: str = ""  # where a preset's numbers come from
    note: str = ""


@dataclass(frozen=True)
class HardwareProfile:
    schema_version: int
    compute: ComputeDevice
    links: Links
    host: Host
    disks: tuple[Disk, ...]
    provenance: Provenance

    def __post_init__(self) -> None:
        _require(self.schema_version == SCHEMA_VERSION, f"schema_version must be {SCHEMA_VERSION}")

    @property
    def cpu_only(self) -> bool:
        return self.compute.kind == "cpu"


# ---- JSON -----------------------------------------------------------------------------------


def summary(profile: HardwareProfile) -> dict:
    """Headline figures derived from the data, for people and jq; load ignores this block."""
    return {
        "compute": f"{profile.compute.kind}: {profile.compute.name}",
        "matmul_best_flops": {m.dtype: m.best_flops for m in profile.compute.matmul},
        "randn_params_per_s": max((p.randn_params_per_s for p in profile.compute.elementwise), default=0.0),
        "link_kind": profile.links.kind,
        "h2d_pinned_peak_gbps": profile.links.h2d_pinned.peak_gbps,
        "d2h_pinned_peak_gbps": profile.links.d2h_pinned.peak_gbps,
        "dram_copy_gbps": profile.host.dram_copy_gbps,
        "adamw_all_threads_params_per_s": profile.host.adamw_all_threads_params_per_s,
        "disks": {d.path: {"read_gbps": d.read_gbps, "write_gbps": d.write_gbps, "mixed_gbps": d.mixed_gbps}
                  for d in profile.disks},
    }


def profile_to_json(profile: HardwareProfile) -> str:
    data = dataclasses.asdict(profile)
    data["summary"] = summary(profile)
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def profile_from_json(text: str, *, source: str = "profile") -> HardwareProfile:
    """Parse and validate; any problem is an InputError naming the source and the bad field."""
    rerun = "run `fuyou profile` to measure again"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON (line {exc.lineno}): {exc.msg}; {rerun}") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a JSON object, got {type(data).__name__}; {rerun}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InputError(f"{source}: no schema_version, not a fuyou hardware profile; {rerun}")
    if version < SCHEMA_VERSION:
        raise InputError(f"{source}: written with profile schema {version}, this fuyou reads schema "
                         f"{SCHEMA_VERSION}; {rerun}")
    if version > SCHEMA_VERSION:
        raise InputError(f"{source}: written with profile schema {version} by a newer fuyou; this one reads "
                         f"schema {SCHEMA_VERSION}: upgrade fuyou or {rerun}")
    data.pop("summary", None)
    try:
        return decode(HardwareProfile, data)
    except FieldError as exc:
        raise InputError(f"{source}: {exc}; {rerun}") from None


# ---- files ----------------------------------------------------------------------------------


def default_profile_path() -> Path:
    return cache_dir() / PROFILE_FILENAME


def save_profile(profile: HardwareProfile, path: Path | str) -> Path:
    """Write atomically (temp file + rename) so a planner never reads half a profile."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(profile_to_json(profile), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise InputError(f"cannot write hardware profile to {path}: {exc.strerror or exc}") from None
    return path


def load_profile(path_or_preset_name: str | Path | None = None) -> HardwareProfile:
    """A saved profile file, or a preset by name; None means the default profile path.

    Raises InputError (one line, listing the presets) when the file is missing, unreadable or invalid.
    """
    from fuyoucli.hardware import presets  # presets imports this module

    names = ", ".join(presets.preset_names())
    if path_or_preset_name is None:
        path = default_profile_path()
        if not path.is_file():
            raise InputError(f"no hardware profile at {path}: run `fuyou profile` to measure this machine, "
                             f"or name a preset ({names})")
    else:
        spec = str(path_or_preset_name)
        path = Path(spec).expanduser()
        if not path.exists():
            if spec in presets.preset_names():
                return presets.get_preset(spec)
            raise InputError(f"hardware profile {spec!r} is neither a file nor a preset; presets: {names}")
        if not path.is_file():
            raise InputError(f"hardware profile {spec!r} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read hardware profile {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return profile_from_json(text, source=str(path))
