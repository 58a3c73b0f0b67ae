"""The real measurement functions at small sizes, and a whole probe with a tiny spec, on this machine."""

from __future__ import annotations

import dataclasses
import resource
from pathlib import Path

import pytest
import torch

from fuyoucli.hardware import hostinfo, interference, probe
from fuyoucli.hardware.disk import MIB, DiskSpec
from fuyoucli.hardware.profile import profile_from_json, profile_to_json

TINY = dataclasses.replace(
    probe.QUICK, mode="quick", matmul_sizes_cpu=(64, 128), matmul_sizes_cuda=(256, 512), matmul_time_s=0.01,
    link_sizes_bytes=(64 * 1024, MIB), link_time_s=0.01, copy_bytes=4 * MIB, copy_time_s=0.01,
    adamw_params=40_000, adamw_time_s=0.01, pinned_cap_bytes=64 * MIB, pinned_chunk_bytes=16 * MIB,
    pinned_time_s=1.0, disk=DiskSpec(8 * MIB, (MIB,), (1, 2), 0.02),
    elementwise_sizes_cpu=(1 << 12, 1 << 16), elementwise_sizes_cuda=(1 << 16,), elementwise_time_s=0.01,
    elementwise_footprint_bytes=4 * MIB, matmul_footprint_bytes=MIB, interference_time_s=0.05, log_softmax_rows=2,
    interference_file_bytes=32 * MIB, layer_tokens_cpu=(8, 32), layer_time_s=0.01, layer_count=2,
    layer_shape_cpu=(64, 128, 4), layer_tokens_cuda=(64, 256), layer_shape_cuda=(256, 512, 4),
)


def test_seconds_per_call_runs_at_least_the_budget() -> None:
    calls = []
    s = probe.seconds_per_call(lambda: calls.append(1), lambda: None, 0.01)
    assert s > 0 and len(calls) >= 2  # one warm-up, then timed calls


@pytest.mark.parametrize("dtype", probe.DTYPES)
def test_matmul_rates_on_cpu(dtype: str) -> None:
    rates = probe.measure_matmul(dtype, TINY, cuda=False)
    sizes = [p.size for p in rates.points]
    # The first size always runs; a larger one is skipped when the first predicts it would blow the
    # time budget (a slow dtype, or a busy machine), so only the prefix is certain.
    assert rates.dtype == dtype and sizes in ([64], [64, 128])
    assert rates.best_flops > 0 and rates.best_size in sizes


def test_host_copy_and_memcpy_links() -> None:
    assert probe.measure_copy_gbps("cpu", 4 * MIB, 0.01) > 0
    links = probe.measure_links(TINY, cuda=False)
    assert links.kind == "host_memcpy" and "host memcpy" in links.note
    for curve in (links.h2d_pinned, links.d2h_pageable, links.duplex_h2d_pinned, links.duplex_d2h_pinned):
        assert [p.size_bytes for p in curve.points] == [64 * 1024, MIB] and min(p.gbps for p in curve.points) > 0


def test_elementwise_rates_on_cpu() -> None:
    points = probe.measure_elementwise(TINY, cuda=False)
    assert [p.params for p in points] == [1 << 12, 1 << 16]
    assert all(p.randn_params_per_s > 0 and p.inplace_gbps > 0 and p.fresh_gbps > 0 for p in points)


def test_elementwise_points_time_the_norm_too() -> None:
    points = probe.measure_elementwise(TINY, cuda=False)
    assert all(p.norm_gbps > 0 for p in points)


def test_layers_are_timed_per_layer_with_the_inventory_numbers_of_the_layer_that_ran() -> None:
    from fuyoucli.model.arithmetic import known_inventory

    points = probe.measure_layers(TINY, cuda=False)
    assert [(p.dtype, p.tokens, p.seq_len, p.hidden) for p in points] == [("fp32", 8, 8, 64), ("fp32", 32, 32, 64)]
    layer = known_inventory(dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=4, num_hidden_layers=2, vocab_size=256,
                                 max_position_embeddings=512)).blocks[1]
    for p in points:
        assert (p.params, p.matmul_flops_per_token, p.elementwise_elems_per_token) == \
            (layer.params, layer.matmul_flops_per_token, layer.elementwise_elems_per_token)
        assert p.forward_s > 0 and p.forward_no_grad_s > 0 and p.backward_s > 0


def test_adamw_rate_restores_thread_count() -> None:
    before = torch.get_num_threads()
    rate, impl = probe.measure_adamw(40_000, 1, 0.01)
    assert rate > 0 and impl.startswith("torch.optim.AdamW(")
    assert torch.get_num_threads() == before


def test_pinned_memory_is_not_applicable_without_cuda() -> None:
    assert probe.measure_pinned_allocatable(TINY, cuda=False) == (None, False)


def test_memlock_limit_matches_ulimit() -> None:
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    assert hostinfo.memlock_limit_bytes() == (None if soft == resource.RLIM_INFINITY else soft)


def test_the_context_is_the_memory_in_use_less_what_the_allocator_reserved() -> None:
    gib = 1 << 30
    assert probe.context_bytes(total_bytes=80 * gib, free_bytes=79 * gib, reserved_bytes=gib // 4) == 3 * gib // 4
    assert probe.context_bytes(total_bytes=80 * gib, free_bytes=80 * gib, reserved_bytes=0) == 0
    assert probe.context_bytes(total_bytes=gib, free_bytes=gib, reserved_bytes=1) == 0  # never negative


def test_whole_probe_with_tiny_spec(tmp_path: Path) -> None:
    steps = []
    prof = probe.probe([tmp_path], spec=TINY, on_step=lambda label, i, n: steps.append((label, i, n)))
    assert steps[0][0] == f"disk {tmp_path.resolve()}" and steps[-1][0] == "done"
    assert [i for _l, i, _n in steps] == list(range(len(steps)))
    cuda = torch.cuda.is_available()
    assert prof.compute.kind == ("cuda" if cuda else "cpu") and prof.cpu_only == (not cuda)
    if not cuda:  # the CPU is the compute device, its memory is RAM, and links are host memcpy
        assert prof.compute.total_memory_bytes == prof.host.ram_total_bytes
        assert prof.links.kind == "host_memcpy" and prof.host.pinned_allocatable_bytes is None
        assert prof.compute.context_bytes == 0  # no CUDA context to measure
    else:  # a context of its own: kernels loaded, more than nothing and less than the device
        assert 0 < prof.compute.context_bytes < prof.compute.total_memory_bytes
    assert all(prof.compute.matmul_flops(dt) > 0 for dt in probe.DTYPES)
    assert prof.compute.memory_bandwidth_gbps > 0 and prof.host.dram_copy_gbps > 0
    assert len(prof.compute.elementwise) == (1 if cuda else 2) and prof.compute.log_softmax_elems_per_s > 0
    assert [p.tokens for p in prof.compute.layers] == list(TINY.layer_tokens_cuda if cuda else TINY.layer_tokens_cpu)
    assert prof.host.adamw_1thread_params_per_s > 0 and prof.host.adamw_threads == torch.get_num_threads()
    assert prof.host.physical_cores >= 1 and prof.host.cpu_model
    assert prof.disks[0].read_gbps > 0 and prof.disks[0].write_gbps > 0
    assert prof.provenance.source == "measured" and prof.provenance.duration_s > 0
    assert prof.provenance.torch_version == torch.__version__
    assert profile_from_json(profile_to_json(prof)) == prof
    assert list(tmp_path.iterdir()) == []


def test_interference_measurements(tmp_path: Path) -> None:
    assert interference.measure_burst_loss(TINY) >= 0
    spec = dataclasses.replace(TINY, interference_file_bytes=64 * MIB,
                               disk=DiskSpec(64 * MIB, (MIB,), (1,), 0.02))
    read_loss, write_loss = interference.measure_io_loss(tmp_path, spec)
    assert read_loss >= 0 and write_loss >= 0
    assert list(tmp_path.iterdir()) == []  # the test file has no name and is gone
