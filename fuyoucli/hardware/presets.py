"""Hardware profile stage, what-if machines: named HardwareProfiles for planning without the hardware.

These are PRESETS, not measurements: vendor peak figures and common rules of thumb
(PCIe, NVMe, CPU AdamW rates), each line saying where its number comes from and which ones are assumptions.
A measured profile (`fuyou profile`) always beats a preset. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from fuyoucli.errors import InputError
from fuyoucli.hardware.profile import (
    ASSUMED_CONTEXT_BYTES, SCHEMA_VERSION, AdamRate, BandwidthCurve, BandwidthPoint, ComputeDevice, Disk,
    DiskPoint, ElementwisePoint, HardwareProfile, Host, Links, MatmulPoint, MatmulRates, Provenance,
)

GB, GIB, MIB = 10**9, 1 << 30, 1 << 20
TFLOPS = 1e12
# Rule of thumb: CPU AdamW (torch fused, fp32) moves ~28 bytes per parameter and ran at ~0.8 G
# params/s per core on a small VM (fuyou's own probe measured 0.7-0.8 on one core of a Xeon VM).
ADAMW_BYTES_PER_PARAM = 28
ADAMW_PER_CORE_PARAMS_PER_S = 0.8e9
# The compact-state AdamW (kernels/adamw.py: a few elementwise passes per value in cache-sized chunks,
# compute bound, so it scales with cores), per core, as fuyou's probe measured it on one core of a
# 2-core EPYC VM where fused fp32 AdamW ran at 1.7-1.8 G params/s: (method.states, method.master) -> rate.
COMPACT_ADAMW_PER_CORE_PARAMS_PER_S = {("int8", "fp32"): 0.22e9, ("fp32", "bf16"): 0.21e9, ("int8", "bf16"): 0.13e9}
# Assumptions, not sourced: a STREAM-style copy reaches ~70% of DRAM's theoretical bandwidth;
# pageable copies reach ~half the pinned rate; with both directions busy each keeps ~80%.
DRAM_EFFICIENCY = 0.7
PAGEABLE_FRACTION = 0.5
DUPLEX_FRACTION = 0.8
# Elementwise work. A GPU's is memory bound: torch.randn (Philox) writes its 4 bytes per normal at
# about the copy rate, and adds run at it; the caching allocator makes new tensors free. On a CPU, zo2
# draws z from compiled counter-based normals on one thread whatever the core count (kernels/normal.py:
# 0.9 G/s on a 2-core Xeon VM, measured by fuyou's probe, against torch's generator's 0.2-0.3; assumed
# 0.8 G/s for a laptop core), and a new tensor over glibc's reuse limit costs page faults: new-tensor
# adds ran at ~1/3 of the in-place rate on that VM (assumed).
CPU_RANDN_PARAMS_PER_S = 0.8e9
CPU_FRESH_FRACTION = 1 / 3
# Rule of thumb: one NVMe Gen4 drive sustains 3-4 GB/s in practice; writes drop when its cache fills.
NVME_GEN4_READ_GBPS, NVME_GEN4_WRITE_GBPS = 3.5, 3.0


@dataclass(frozen=True)
class _Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float
    fp16_tflops: float
    fp32_tflops: float
    memory_gbps: float


@dataclass(frozen=True)
class _Box:
    description: str
    gpu: _Gpu | None  # None: CPU only
    link_gbps: float  # pinned, each way; for a CPU-only box: host memcpy
    cpu: str
    cores: int
    threads: int
    ram_bytes: int
    dram_theoretical_gbps: float
    nvme_count: int
    sources: str


# Vendor sheets: NVIDIA Ada whitepaper (RTX 4090: 165.2 TFLOPS dense FP16/BF16 with FP32 accumulate,
# 82.6 FP32, 1008 GB/s), GA102 whitepaper (RTX 3090: 71 / 35.6 TFLOPS, 936 GB/s), A100 datasheet
# (80GB PCIe: 312 dense BF16/FP16, 19.5 FP32, 1935 GB/s), H100/H200 datasheets (SXM: ~989 dense
# BF16/FP16, 67 FP32; 3.35 TB/s HBM3 / 4.8 TB/s HBM3e). common rules of thumb round these to 165/71/312/990.
RTX4090 = _Gpu("NVIDIA GeForce RTX 4090 (preset)", 24 * GIB, 165.2, 165.2, 82.6, 1008)
RTX3090 = _Gpu("NVIDIA GeForce RTX 3090 (preset)", 24 * GIB, 71.0, 71.0, 35.6, 936)
A100_80G_PCIE = _Gpu("NVIDIA A100 80GB PCIe (preset)", 80 * GIB, 312.0, 312.0, 19.5, 1935)
H100_SXM = _Gpu("NVIDIA H100 80GB SXM (preset)", 80 * GIB, 989.0, 989.0, 67.0, 3350)
# H200: an H200 measured ~790 TFLOP/s bf16 (8192^3, random data) and ~4300 GB/s
# device copy counting read+write, and nvidia-smi showed 143771 MiB; those measured figures are used over the
# 989 / 4800 datasheet peaks. fp16 assumed equal to bf16 (same tensor-core rate on Hopper).
H200 = _Gpu("NVIDIA H200 (preset)", 143771 * MIB, 790.0, 790.0, 67.0, 4300)

_BOXES: dict[str, _Box] = {
    "rtx4090-pcie4-1nvme-128g": _Box(
        "consumer desktop: RTX 4090, PCIe 4.0 x16, 16-core CPU, 128 GB 2-channel DDR5, one NVMe Gen4",
        RTX4090, 25.0, "16-core desktop CPU (preset)", 16, 32, 128 * GB, 89.6, 1,
        "Ada whitepaper; rules of thumb (PCIe 4 pinned ~25 GB/s, DDR5 2-channel ~90 GB/s theoretical "
        "= DDR5-5600, NVMe Gen4 sustained 3-4 GB/s); CPU core count assumed",
    ),
    "rtx3090-pcie4-1nvme-64g": _Box(
        "older desktop: RTX 3090, PCIe 4.0 x16, 12-core CPU, 64 GB 2-channel DDR4-3200, one NVMe Gen4",
        RTX3090, 25.0, "12-core desktop CPU (preset)", 12, 24, 64 * GB, 51.2, 1,
        "GA102 whitepaper; rules of thumb (PCIe 4 pinned ~25 GB/s, NVMe Gen4 3-4 GB/s); DDR4-3200 x 2 "
        "channels = 51.2 GB/s theoretical; CPU core count assumed",
    ),
    "a100-80g-pcie4-server": _Box(
        "server: A100 80GB PCIe, PCIe 4.0 x16, 32-core CPU, 512 GB 8-channel DDR4-3200, one NVMe Gen4",
        A100_80G_PCIE, 25.0, "32-core server CPU (preset)", 32, 64, 512 * GB, 204.8, 1,
        "A100 datasheet; rules of thumb (PCIe 4 pinned ~25 GB/s); DDR4-3200 x 8 channels = 204.8 GB/s "
        "theoretical (one socket); core count, RAM size and one NVMe drive assumed",
    ),
    "rtx4090-768g-12nvme": _Box(
        "Fuyou/LoHan paper testbed: RTX 4090, PCIe 4.0, 768 GB DDR4-3200, 12 NVMe Gen4 in RAID0",
        RTX4090, 25.0, "server CPU (preset)", 32, 64, 768 * GB, 204.8, 12,
        "the Fuyou paper's testbed (arXiv 2403.06504: 768 GB DDR4-3200, 12 NVMe Gen4 RAID0); RAID0 "
        "figures assume linear scaling of one drive's sustained rate, an upper bound; CPU assumed "
        "32 cores with 8 DDR4-3200 channels",
    ),
    "h100-80g-pcie5-server": _Box(
        "server: H100 80GB SXM, PCIe 5.0 host link, 56-core CPU, 1 TB 8-channel DDR5-4800, one NVMe Gen4",
        H100_SXM, 50.0, "56-core server CPU (preset)", 56, 112, 1000 * GB, 307.2, 1,
        "H100 datasheet; rules of thumb (PCIe 5 ~50 GB/s each way, H100 ~990 TFLOPS); DDR5-4800 x 8 "
        "channels = 307.2 GB/s theoretical; CPU and RAM size assumed",
    ),
    "h200-141g-pcie5-16c-128g": _Box(
        "one H200 server: PCIe 5.0, 16 cores, 128 GiB RAM, one NVMe Gen4",
        H200, 50.0, "16-core server CPU (preset)", 16, 16, 128 * GIB, 307.2, 1,
        "measured on an H200 (bf16 ~790 TFLOP/s, device copy ~4.3 TB/s); H200 datasheet "
        "(141 GB, fp32 67 TFLOPS); rules of thumb (PCIe 5 ~50 GB/s); DRAM channels and NVMe assumed",
    ),
    "cpu-laptop-8c-32g": _Box(
        "CPU-only laptop: 8 cores with AVX2, 32 GB LPDDR5-6400 (128-bit), one NVMe Gen4",
        None, 0.0, "8-core laptop CPU (preset)", 8, 16, 32 * GB, 102.4, 1,
        "LPDDR5-6400 x 128 bit = 102.4 GB/s theoretical; matmul rates assumed (fp32 ~60% of 8 cores x "
        "32 FLOP/cycle x 3 GHz; bf16/fp16 without native kernels ~100 GFLOP/s); NVMe a Gen4 rule of thumb",
    ),
}


def preset_names() -> list[str]:
    return list(_BOXES)


def preset_description(name: str) -> str:
    return _BOXES[name].description


def get_preset(name: str) -> HardwareProfile:
    """The named preset as a HardwareProfile; InputError listing the names when unknown."""
    box = _BOXES.get(name)
    if box is None:
        raise InputError(f"unknown hardware preset {name!r}; presets: {', '.join(_BOXES)}")
    return _build(name, box)


def _curve(gbps: float) -> BandwidthCurve:
    # One point: the large-transfer rate. gbps_at() clamps, so every size gets this figure.
    return BandwidthCurve(points=(BandwidthPoint(size_bytes=64 * MIB, gbps=gbps),))


def _matmul(bf16: float, fp16: float, fp32: float, size: int) -> tuple[MatmulRates, ...]:
    return tuple(MatmulRates(dtype=dt, points=(MatmulPoint(size=size, flops=tf * TFLOPS),))
                 for dt, tf in (("bf16", bf16), ("fp16", fp16), ("fp32", fp32)))


def _build(name: str, box: _Box) -> HardwareProfile:
    from fuyoucli import __version__

    dram_copy_gbps = box.dram_theoretical_gbps * DRAM_EFFICIENCY
    adamw_all = min(box.cores * ADAMW_PER_CORE_PARAMS_PER_S, dram_copy_gbps * GB / ADAMW_BYTES_PER_PARAM)
    if box.gpu is None:
        compute = ComputeDevice(
            kind="cpu", name=box.cpu, count=1, total_memory_bytes=box.ram_bytes,
            free_memory_bytes=int(0.9 * box.ram_bytes), memory_bandwidth_gbps=dram_copy_gbps,
            matmul=_matmul(0.1, 0.1, 0.46, 1024), note="preset: CPU only",
            elementwise=(ElementwisePoint(params=1 << 24, randn_params_per_s=CPU_RANDN_PARAMS_PER_S,
                                          inplace_gbps=dram_copy_gbps, fresh_gbps=dram_copy_gbps * CPU_FRESH_FRACTION),),
        )
        memcpy = _curve(dram_copy_gbps / 2)  # a copy moves each byte twice through DRAM
        links = Links(kind="host_memcpy", h2d_pinned=memcpy, h2d_pageable=memcpy, d2h_pinned=memcpy,
                      d2h_pageable=memcpy, duplex_h2d_pinned=_curve(dram_copy_gbps / 4),
                      duplex_d2h_pinned=_curve(dram_copy_gbps / 4), note="preset: no CUDA, host memcpy")
    else:
        g = box.gpu
        compute = ComputeDevice(
            kind="cuda", name=g.name, count=1, total_memory_bytes=g.memory_bytes,
            free_memory_bytes=g.memory_bytes - ASSUMED_CONTEXT_BYTES,  # what a process sees: its context is out
            memory_bandwidth_gbps=g.memory_gbps, matmul=_matmul(g.bf16_tflops, g.fp16_tflops, g.fp32_tflops, 8192),
            note="preset: vendor figures (upper bounds for what a measurement will show)",
            elementwise=(ElementwisePoint(params=1 << 26, randn_params_per_s=g.memory_gbps * GB / 4,
                                          inplace_gbps=g.memory_gbps, fresh_gbps=g.memory_gbps),),
        )
        pinned, pageable = _curve(box.link_gbps), _curve(box.link_gbps * PAGEABLE_FRACTION)
        duplex = _curve(box.link_gbps * DUPLEX_FRACTION)
        links = Links(kind="host_device", h2d_pinned=pinned, h2d_pageable=pageable, d2h_pinned=pinned,
                      d2h_pageable=pageable, duplex_h2d_pinned=duplex, duplex_d2h_pinned=duplex,
                      note="preset: PCIe rule of thumb; pageable and duplex assumed")
    host = Host(
        cpu_model=box.cpu, physical_cores=box.cores, logical_cores=box.threads, ram_total_bytes=box.ram_bytes,
        ram_available_bytes=int(0.9 * box.ram_bytes), memlock_limit_bytes=None,
        pinned_allocatable_bytes=None if box.gpu is None else int(0.8 * box.ram_bytes),
        pinned_probe_capped=False, dram_copy_gbps=dram_copy_gbps,
        adamw_impl="torch.optim.AdamW(fused=True)", adamw_1thread_params_per_s=ADAMW_PER_CORE_PARAMS_PER_S,
        adamw_all_threads_params_per_s=adamw_all, adamw_threads=box.cores,
        adamw_compact=tuple(AdamRate(st, ma, box.cores * rate)
                            for (st, ma), rate in COMPACT_ADAMW_PER_CORE_PARAMS_PER_S.items()),
        note="preset: RAM available and pinnable assumed 90% / 80% of total; AdamW from the per-core rate "
             "capped by DRAM copy bandwidth / 28 bytes per parameter; compact-state AdamW per core, uncapped",
    )
    nvme = "md RAID0 of %d NVMe Gen4" % box.nvme_count if box.nvme_count > 1 else "NVMe Gen4"
    disk = Disk(
        path="/nvme", filesystem="ext4", device=nvme, free_bytes=box.nvme_count * 2 * 10**12,
        o_direct_supported=True, method="o_direct", test_file_bytes=0,
        first_write_gbps=NVME_GEN4_WRITE_GBPS * box.nvme_count,
        read=(DiskPoint(block_bytes=MIB, threads=4, gbps=NVME_GEN4_READ_GBPS * box.nvme_count),),
        write=(DiskPoint(block_bytes=MIB, threads=4, gbps=NVME_GEN4_WRITE_GBPS * box.nvme_count),),
        note=f"preset: {box.nvme_count} x sustained Gen4 rate; 2 TB free per drive assumed",
    )
    return HardwareProfile(
        schema_version=SCHEMA_VERSION, compute=compute, links=links, host=host, disks=(disk,),
        provenance=Provenance(source="preset", mode="preset", created_at="", hostname="", fuyou_version=__version__,
                              torch_version="", python_version="", platform="", duration_s=0.0, preset=name,
                              sources=box.sources),
    )
