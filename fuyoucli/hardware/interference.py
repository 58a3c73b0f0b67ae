"""Hardware profile stage, measurement: what work in another thread costs a computation on the host.

On a CPU device fuyou's engines run side work in threads (SSD reads and writes, their staging
copies, the first-order CPU optimizer) while the model computes on the same cores. On a few busy
cores that costs more than the side work itself: an OpenMP team waits for whichever of its threads
the side work displaced. Measured as host compute seconds lost, against computing alone. Imports
torch inside functions only; called by probe.py.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fuyoucli.hardware import disk as disk_probe

if TYPE_CHECKING:
    from fuyoucli.hardware.probe import ProbeSpec

MIB = 1 << 20


def _seconds_per_call(fn: Callable[[], object], min_time_s: float) -> float:
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time_s:
        fn()
        calls += 1
    return (time.perf_counter() - start) / max(calls, 1)


def _products_per_s(stop_after_s: float) -> int:
    """Count 512-square fp32 products (a small layer's) done in stop_after_s on the host."""
    import torch

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < stop_after_s:
        torch.mm(a, b)
        n += 1
    return n


def _lost_s(background: Callable[[threading.Event], float], time_s: float) -> tuple[float, float]:
    """(host compute seconds lost, what background() returned) when background runs in a thread
    (until the event is set) while the host multiplies for time_s; against multiplying alone."""
    _products_per_s(0.1)  # warm
    alone = _products_per_s(time_s) / time_s
    stop = threading.Event()
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(background(stop)), daemon=True)
    worker.start()
    try:
        together = _products_per_s(time_s)
    finally:
        stop.set()
        worker.join()
    return max(0.0, time_s - together / alone), out[0] if out else 0.0


def measure_burst_loss(spec: "ProbeSpec") -> float:
    """Host compute seconds lost per second of bursty torch work in another thread: AdamW steps on
    4M parameters with 10 ms pauses, like an engine's CPU optimizer taking one block at a time."""
    import torch

    params = [torch.nn.Parameter(torch.randn(1 << 20)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4)
    step_s = _seconds_per_call(opt.step, 0.1)

    def bursts(stop: threading.Event) -> float:
        steps = 0
        while not stop.is_set():
            opt.step()
            steps += 1
            time.sleep(0.01)
        return steps * step_s  # the work done, in seconds it takes alone

    lost, work_s = _lost_s(bursts, spec.interference_time_s)
    return max(0.0, lost - work_s) / work_s if work_s > 0 else 0.0


def measure_io_loss(path: str | Path, spec: "ProbeSpec") -> tuple[float, float]:
    """(s per GB read, s per GB written): host compute seconds lost while another thread reads or
    writes 8 MiB blocks of a test file in `path` (O_DIRECT where it works), per GB moved."""
    import mmap

    directory = disk_probe.check_disk_path(path)
    size = min(spec.interference_file_bytes, disk_probe.test_file_bytes(shutil.disk_usage(directory).free, spec.disk))
    block = 8 * MIB
    if size < 4 * block:
        return 0.0, 0.0
    fd = disk_probe.open_test_file(directory)
    src = mmap.mmap(-1, block)
    src.write(os.urandom(block))
    try:
        disk_probe._enable_o_direct(fd)
        disk_probe.run_io(fd, True, size, block, 1, None, src)  # the file's blocks exist before reads
        out = []
        for write in (False, True):
            def io(stop: threading.Event, write: bool = write) -> float:
                moved = 0
                while not stop.is_set():
                    moved += disk_probe.run_io(fd, write, size, block, 1, 0.05, src)[0]
                return moved

            lost, moved = _lost_s(io, spec.interference_time_s)
            out.append(lost / (moved / 1e9) if moved else 0.0)
        return out[0], out[1]
    finally:
        os.close(fd)
        src.close()
