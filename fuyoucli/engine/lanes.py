"""Lanes: the ONLY module that touches CUDA streams and events.

Three lanes move and compute data: `upload` (host -> device), `compute` (the model), `offload`
(device -> host). Everything else asks a Lanes object to copy, to mark a point, or to wait for a mark;
it never sees a stream. Three implementations share one interface:
- CudaLanes: two side streams plus the current stream, ordered by events (the real thing);
- CpuLanes: the CPU stands in for the device; copies are synchronous, so marks are always complete;
- RecordingLanes: wraps another and logs every operation, so tests can check ordering rules
  (a block is never computed before its fetch completed, never evicted while in use).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Mark:
    """A point on one lane; `waited on` means every operation before it on that lane has finished."""

    lane: str
    event: Any = None  # torch.cuda.Event on CUDA; None where the operation was synchronous


class CpuLanes:
    """The CPU as the compute device: every copy is done when the call returns."""

    kind = "cpu"

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: Mark | None = None) -> Mark:
        dst.copy_(src)
        return Mark("upload")

    def offload(self, dst: torch.Tensor, src: torch.Tensor, after: Mark | None = None) -> Mark:
        dst.copy_(src)
        return Mark("offload")

    def mark_compute(self) -> Mark:
        return Mark("compute")

    def compute_wait(self, mark: Mark) -> None:
        pass

    def host_wait(self, mark: Mark) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # nothing to pin for: host and "device" are the same memory system

    def peak_device_bytes(self) -> int | None:
        return None  # the engine's own arena accounting is the measure on the CPU


class CudaLanes:
    """Upload and offload on their own streams; compute on the current stream.

    Why each wait exists:
    - an upload into a slot waits for `after` (the compute that last read the slot, or the offload
      that last copied out of it), else it would overwrite weights still in use;
    - compute waits for the upload's event before using the slot;
    - an offload waits for the compute mark after the update, else it would copy stale weights;
    - the host waits for an offload before reusing the host buffer (e.g. to write it to SSD).
    """

    kind = "cuda"

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self._upload = torch.cuda.Stream(self.device)
        self._offload = torch.cuda.Stream(self.device)
        self._lock = threading.Lock()  # I/O threads enqueue uploads too

    def _copy(self, stream, lane: str, dst: torch.Tensor, src: torch.Tensor, after: Mark | None) -> Mark:
        with self._lock, torch.cuda.stream(stream):
            if after is not None and after.event is not None:
                stream.wait_event(after.event)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        return Mark(lane, event)

    def upload(self, dst: torch.Tensor, src: torch.Tensor, after: Mark | None = None) -> Mark:
        return self._copy(self._upload, "upload", dst, src, after)

    def offload(self, dst: torch.Tensor, src: torch.Tensor, after: Mark | None = None) -> Mark:
        return self._copy(self._offload, "offload", dst, src, after)

    def mark_compute(self) -> Mark:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Mark("compute", event)

    def compute_wait(self, mark: Mark) -> None:
        if mark.event is not None:
            torch.cuda.current_stream(self.device).wait_event(mark.event)

    def host_wait(self, mark: Mark) -> None:
        if mark.event is not None:
            mark.event.synchronize()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def peak_device_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device)


@dataclass
class RecordingLanes:
    """Logs (operation, label) for every call, then delegates; `label` is set by the caller per block."""

    inner: Any
    log: list[tuple[str, str]] = field(default_factory=list)
    label: str = ""

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def upload(self, dst, src, after=None):
        self.log.append(("upload", self.label))
        return self.inner.upload(dst, src, after)

    def offload(self, dst, src, after=None):
        self.log.append(("offload", self.label))
        return self.inner.offload(dst, src, after)

    def mark_compute(self):
        return self.inner.mark_compute()

    def compute_wait(self, mark):
        self.log.append(("compute_wait", mark.lane))
        self.inner.compute_wait(mark)

    def host_wait(self, mark):
        self.log.append(("host_wait", mark.lane))
        self.inner.host_wait(mark)

    def synchronize(self):
        self.inner.synchronize()

    def pin(self, tensor):
        return self.inner.pin(tensor)

    def peak_device_bytes(self):
        return self.inner.peak_device_bytes()


def lanes_for(device: torch.device) -> CpuLanes | CudaLanes:
    return CudaLanes(device) if device.type == "cuda" else CpuLanes(device)
