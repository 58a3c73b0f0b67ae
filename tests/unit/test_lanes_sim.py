"""The simulated asynchronous lanes behave like CUDA streams where it matters for correctness: a copy's
destination holds poison until its mark is waited on, a copy starts only after the mark it is ordered
after, a source changed before the copy is done changes what arrives, and a wait on nothing is refused
(as a CUDA event wait would be)."""

from __future__ import annotations

import math

import pytest
import torch

from fuyoucli.engine.lanes import (
    CpuLanes,
    LanesChoiceError,
    Mark,
    SimulatedAsyncLanes,
    lanes_for,
)


def slow_lanes() -> SimulatedAsyncLanes:
    return SimulatedAsyncLanes(max_delay_s=0.05, seed=3)


def test_destination_is_poisoned_until_the_mark_is_waited_on():
    lanes = slow_lanes()
    src = torch.arange(1000, dtype=torch.float32)
    dst = torch.zeros(1000)
    poisoned = 0
    for _ in range(20):  # half the copies finish at once by design; some of 20 are still in flight
        mark = lanes.upload(dst, src)
        if math.isnan(float(dst[0])):
            poisoned += 1
        lanes.host_wait(mark)
        assert torch.equal(dst, src)
    assert poisoned > 0


def test_integer_buffers_are_poisoned_too():
    lanes = SimulatedAsyncLanes(max_delay_s=0.2, seed=1)
    src = torch.full((64,), 7, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    mark = lanes.offload(dst, src)
    assert int(dst[0]) in (255, 7)  # poison, or the copy already landed
    lanes.host_wait(mark)
    assert torch.equal(dst, src)


def test_a_copy_waits_for_the_mark_it_is_ordered_after():
    """An upload into a buffer the offload lane is still reading out of waits for that offload: the
    offload's host copy gets the old contents, never the poison or the new ones."""
    lanes = slow_lanes()
    for _ in range(10):
        device = torch.full((4096,), 1.0)
        host = torch.zeros(4096)
        out = lanes.offload(host, device)
        lanes.upload(device, torch.full((4096,), 2.0), after=out)
        lanes.synchronize()
        assert torch.equal(host, torch.full((4096,), 1.0))
        assert torch.equal(device, torch.full((4096,), 2.0))


def test_a_source_changed_before_the_copy_is_done_changes_what_arrives():
    """What CUDA does to a writer that did not wait for a copy out of its buffer: the simulation reads
    the source when the copy completes, so the late write shows."""
    lanes = SimulatedAsyncLanes(max_delay_s=0.2, seed=0)
    seen_late_write = False
    for _ in range(10):
        src, dst = torch.ones(256), torch.zeros(256)
        mark = lanes.upload(dst, src)
        src.fill_(5.0)  # no wait: a bug
        lanes.host_wait(mark)
        seen_late_write |= bool(torch.equal(dst, src))
    assert seen_late_write


def test_failed_copies_surface_at_the_wait():
    lanes = slow_lanes()
    mark = lanes.upload(torch.zeros(3), torch.zeros(4))
    with pytest.raises(RuntimeError, match="simulated copy failed"):
        lanes.host_wait(mark)


@pytest.mark.parametrize("make", [CpuLanes, SimulatedAsyncLanes])
def test_a_wait_on_nothing_is_refused(make):
    lanes = make()
    with pytest.raises(TypeError, match="needs a Mark"):
        lanes.host_wait(None)
    with pytest.raises(TypeError, match="needs a Mark"):
        lanes.compute_wait(None)
    lanes.host_wait(Mark("compute"))  # a mark without an event is done


def test_lanes_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FUYOU_LANES", raising=False)
    assert type(lanes_for(cpu)) is CpuLanes
    monkeypatch.setenv("FUYOU_LANES", "async-sim")
    assert type(lanes_for(cpu)) is SimulatedAsyncLanes
    assert lanes_for(cpu).name == "simulated-async"
    assert type(lanes_for(cpu, "sync")) is CpuLanes
    monkeypatch.setenv("FUYOU_LANES", "gpu-please")
    with pytest.raises(LanesChoiceError, match="FUYOU_LANES='gpu-please' is not one of auto, sync, async-sim"):
        lanes_for(cpu)
    with pytest.raises(LanesChoiceError, match="CPU device"):
        lanes_for(torch.device("cuda"), "async-sim")
