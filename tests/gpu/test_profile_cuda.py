"""The CUDA half of the hardware probe, on a real GPU: matmul, device copy, links, pinned memory.

Prints the figures (run with -s) so a GPU session can record them; asserts only invariants.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fuyoucli.hardware import probe
from fuyoucli.hardware.disk import MIB, DiskSpec
from fuyoucli.hardware.profile import profile_from_json, profile_to_json

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SMALL = dataclasses.replace(
    probe.QUICK, matmul_sizes_cuda=(1024, 4096), matmul_time_s=0.05, link_sizes_bytes=(MIB, 64 * MIB),
    link_time_s=0.02, copy_bytes=256 * MIB, copy_time_s=0.05, adamw_params=1_000_000, adamw_time_s=0.05,
    pinned_cap_bytes=2 << 30, pinned_chunk_bytes=512 * MIB, pinned_time_s=5.0,
    disk=DiskSpec(64 * MIB, (MIB,), (1, 4), 0.1),
)


def test_cuda_profile(tmp_path: Path) -> None:
    prof = probe.probe([tmp_path], spec=SMALL)
    c, links, host = prof.compute, prof.links, prof.host
    assert c.kind == "cuda" and not prof.cpu_only and c.count == torch.cuda.device_count()
    assert 0 < c.free_memory_bytes <= c.total_memory_bytes
    assert all(c.matmul_flops(dt) > 0 for dt in probe.DTYPES)
    assert c.matmul_flops("bf16") > c.matmul_flops("fp32")  # tensor cores vs plain fp32 (TF32 off)
    assert links.kind == "host_device"
    for curve in (links.h2d_pinned, links.h2d_pageable, links.d2h_pinned, links.d2h_pageable,
                  links.duplex_h2d_pinned, links.duplex_d2h_pinned):
        assert [p.size_bytes for p in curve.points] == [MIB, 64 * MIB] and min(p.gbps for p in curve.points) > 0
    assert host.pinned_allocatable_bytes is not None and host.pinned_allocatable_bytes > 0
    assert profile_from_json(profile_to_json(prof)) == prof
    assert list(tmp_path.iterdir()) == []
    print(f"\n{c.name}: bf16 {c.matmul_flops('bf16') / 1e12:.0f} TFLOP/s, fp16 {c.matmul_flops('fp16') / 1e12:.0f}, "
          f"fp32 {c.matmul_flops('fp32') / 1e12:.1f}; device copy {c.memory_bandwidth_gbps:.0f} GB/s")
    print(f"H2D pinned {links.h2d_pinned.peak_gbps:.1f} GB/s, pageable {links.h2d_pageable.peak_gbps:.1f}; "
          f"D2H pinned {links.d2h_pinned.peak_gbps:.1f}, pageable {links.d2h_pageable.peak_gbps:.1f}; "
          f"duplex {links.duplex_h2d_pinned.peak_gbps:.1f} + {links.duplex_d2h_pinned.peak_gbps:.1f}")
    print(f"pinned allocatable >= {host.pinned_allocatable_bytes / 2**30:.1f} GiB (capped={host.pinned_probe_capped}); "
          f"memlock {host.memlock_limit_bytes}")
