"""The CPU optimizer's close() never hangs on jobs it will not run (engine/optimizer.py).

Seen in a benchmark: closing a streamed AdamW trainer with SSD-homed states while a step's updates
were queued. shutdown(cancel_futures=True) drained the queue while the worker took a job from it,
so update k ran after updates 0..k-1 were cancelled, and waited forever for staging buffers held by
the reads made for them. This builds that state directly: reads announced for blocks 0..2, then
only block 2's update queued, which needs more buffers than exist until 0 and 1 are updated."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fuyoucli.engine.lanes import CpuLanes
from fuyoucli.engine.optimizer import AdamBlock, Closed, CpuAdam, HostGrads
from fuyoucli.engine.tiers import SsdStore
from fuyoucli.plan.types import Tier


def test_close_ends_an_update_waiting_for_buffers_of_updates_that_never_run(tmp_path):
    shapes = [torch.Size([64, 32])]
    blocks = [AdamBlock(k, f"layers.{k}", shapes, lambda: [torch.zeros(64, 32)], Tier.SSD) for k in range(4)]
    ssd = SsdStore(tmp_path, 1 << 20)
    started = threading.Event()
    cpu = CpuAdam(blocks, lambda ps, key: torch.optim.AdamW(ps, lr=1e-3), lanes=CpuLanes(), ssd=ssd, read_ahead=1,
                  on_job=lambda key: started.set())
    try:
        cpu.begin([0, 1, 2, 3])  # reads block 0 ahead
        grads = HostGrads(torch.ones(64 * 32), [True], None)
        # Block 2's update reads 1 and 2 first (three buffers in use), then wants a fourth for 3.
        fut = cpu.update(2, grads, lr=1e-3, publish=lambda master: None)
        assert started.wait(30)
        for _ in range(600):  # until it waits for the fourth buffer (the read of block 3 is announced)
            if cpu._next == 4:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        assert not fut.done()
        closer = threading.Thread(target=cpu.close, daemon=True)
        closer.start()
        closer.join(30)
        assert not closer.is_alive(), "CpuAdam.close() hung"
        assert fut.done() and isinstance(fut.exception(), Closed)
    finally:
        ssd.close()
    assert list(tmp_path.iterdir()) == []


def test_close_after_queued_updates_returns_and_finished_updates_are_kept(tmp_path):
    shapes = [torch.Size([16])]
    blocks = [AdamBlock(k, f"layers.{k}", shapes, lambda: [torch.zeros(16)], Tier.SSD) for k in range(3)]
    ssd = SsdStore(tmp_path, 1 << 20)
    cpu = CpuAdam(blocks, lambda ps, key: torch.optim.AdamW(ps, lr=0.1), lanes=CpuLanes(), ssd=ssd, read_ahead=1)
    try:
        cpu.begin([0, 1, 2])
        futs = [cpu.update(k, HostGrads(torch.ones(16), [True], None), lr=0.1, publish=lambda m: None)
                for k in range(3)]
        futs[-1].result(timeout=30)
        cpu.drain()
        moved = cpu.master(0)
        assert bool((moved < 0).all())  # a real update ran: AdamW's first step moves every weight by -lr
        cpu.close()
        assert all(f.done() for f in futs)
    finally:
        ssd.close()


def test_inline_jobs_run_in_the_callers_thread_and_ctrl_c_reaches_it(tmp_path):
    """thread=False (a CPU device): an update has run when update() returns, on the caller's thread,
    and reads states from SSD as the worker would; a KeyboardInterrupt inside a job is not turned into
    a Future's exception that nobody reads: it stops the caller."""
    shapes = [torch.Size([16])]
    blocks = [AdamBlock(k, f"layers.{k}", shapes, lambda: [torch.zeros(16)], Tier.SSD) for k in range(3)]
    ssd = SsdStore(tmp_path, 1 << 20)
    where: list[str] = []

    def on_job(key):
        where.append(threading.current_thread().name)
        if key == 2:
            raise KeyboardInterrupt

    cpu = CpuAdam(blocks, lambda ps, key: torch.optim.AdamW(ps, lr=0.1), lanes=CpuLanes(), ssd=ssd, read_ahead=1,
                  on_job=on_job, thread=False)
    try:
        cpu.begin([0, 1, 2])
        for k in range(2):
            fut = cpu.update(k, HostGrads(torch.ones(16), [True], None), lr=0.1, publish=lambda m: "published")
            assert fut.done() and fut.result().published == "published"
        assert where == [threading.current_thread().name] * 2
        with pytest.raises(KeyboardInterrupt):
            cpu.update(2, HostGrads(torch.ones(16), [True], None), lr=0.1, publish=lambda m: None)
        assert bool((cpu.master(1) < 0).all()) and bool((cpu.master(2) == 0).all())
        cpu.close()
    finally:
        ssd.close()
    assert list(tmp_path.iterdir()) == []
