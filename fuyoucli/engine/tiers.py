"""Memory tiers: the compute device (with a byte budget), host memory (pinned or pageable), and SSD files.

Engine stage. Everything is allocated once at start from the plan's sizes; the hot loop only copies.
On the CPU "device" the arena is a real separate set of buffers and its budget is enforced by its
own accounting, so a plan that under-predicts device memory fails loudly in tests.
SSD blocks are files under the swap directory, read and written by a thread pool straight into
aligned host buffers with O_DIRECT where the filesystem allows it (else buffered I/O, with fsync
and a page-cache drop so the traffic reaches the drive). Files are removed on close, on error and on
Ctrl-C (the owner calls close() from a finally block).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from fuyoucli.errors import FuyouError, ResourceError
from fuyoucli.telemetry.timeline import NULL

ALIGN = 4096


class DeviceBudgetExceeded(FuyouError):
    exit_code = 3


class DeviceArena:
    """Allocates device buffers against a byte budget and tracks the high-water mark."""

    def __init__(self, device: torch.device, budget_bytes: int | None):
        self.device, self.budget_bytes = device, budget_bytes
        self.used_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}

    def alloc(self, numel: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        nbytes = numel * dtype.itemsize
        self.charge(nbytes, what)
        tensor = torch.empty(numel, dtype=dtype, device=self.device)
        self._sizes[id(tensor)] = nbytes
        return tensor

    def alloc_aligned(self, nbytes: int, align: int, what: str) -> torch.Tensor:
        """`nbytes` rounded up to whole `align` pages, as a uint8 tensor starting on an `align`
        boundary (host memory: O_DIRECT reads and writes go straight into it). Charged what it holds."""
        padded = -(-nbytes // align) * align
        return _aligned_part(self.alloc(padded + align, torch.uint8, what), padded, align)

    def charge(self, nbytes: int, what: str) -> None:
        """Count bytes the engine holds on the device without allocating them here (hidden states)."""
        if self.budget_bytes is not None and self.used_bytes + nbytes > self.budget_bytes:
            raise DeviceBudgetExceeded(
                f"device memory budget exceeded by {what}: {self.used_bytes + nbytes:,} bytes needed, "
                f"budget {self.budget_bytes:,}; the plan under-estimated device memory")
        self.used_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)

    def release(self, nbytes: int) -> None:
        self.used_bytes -= nbytes

    def free(self, tensor: torch.Tensor) -> None:
        self.release(self._sizes.pop(id(tensor)))


def release_freed_host_memory() -> bool:
    """Give the pages of freed host memory back to the OS (glibc's malloc_trim).

    Loading a model leaves its temporaries' memory in glibc's heap: blocks of a few MiB come from the
    heap once glibc has raised its mmap threshold, and freed blocks between live ones are never
    unmapped, so a model whose layers went to SSD would still hold a large share of their size in
    RAM. WeightStore calls this once it has placed the streamed blocks' weights at their homes. (A
    fixed mmap threshold would return such blocks at every free instead, but then every activation
    is faulted in afresh, which slows a CPU-device step far more than one trim costs.)
    True when memory was released; False where the C library has no malloc_trim (nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return False
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return trim(0) == 1


def aligned_host(nbytes: int, *, pin_with=None) -> torch.Tensor:
    """A uint8 host tensor of `nbytes` (rounded up to ALIGN) whose address is ALIGN-aligned (O_DIRECT)."""
    padded = -(-nbytes // ALIGN) * ALIGN
    raw = torch.empty(padded + ALIGN, dtype=torch.uint8)
    if pin_with is not None:
        raw = pin_with(raw)
    return _aligned_part(raw, padded, ALIGN)


def _aligned_part(raw: torch.Tensor, padded: int, align: int) -> torch.Tensor:
    """The `padded` bytes of uint8 `raw` (allocated `align` bytes larger) that start on an `align` boundary."""
    offset = (-raw.data_ptr()) % align
    return raw[offset: offset + padded]


def o_direct_works(directory: Path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / ".fuyou-odirect-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        buf = aligned_host(ALIGN)
        os.pwrite(fd, memoryview(buf.numpy()), 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


SWAP_MARGIN_BYTES = 256 << 20
"""Free space the swap store leaves on swap_dir's disk beyond its block files (the filesystem's own
metadata, other writers, the page cache's dirty data). Preflight checks the same number before a run
starts, so a run that passes it never stops for space when the store opens."""


class SsdStore:
    """One file per key under `swap_dir/fuyou-<pid>/`; async reads and writes on a thread pool."""

    recorder = NULL
    """Where timed spans of file reads and writes go (a telemetry Timeline); NULL records nothing."""

    def __init__(self, swap_dir: str | Path, needed_bytes: int, threads: int = 4):
        base = Path(swap_dir).expanduser()
        base.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(base).free
        if needed_bytes + SWAP_MARGIN_BYTES > free:
            raise ResourceError(
                f"not enough free space in swap_dir {base}: {needed_bytes / 2**30:.2f} GiB of block files "
                f"plus a {SWAP_MARGIN_BYTES >> 20} MiB margin need room, {free / 2**30:.2f} GiB free; "
                "point offload.swap_dir at a larger disk")
        self.root = base / f"fuyou-swap-{os.getpid()}"
        self.root.mkdir(exist_ok=True)
        self.direct = o_direct_works(self.root)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fuyou-ssd")
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0
        self.busy_s = 0.0

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.bin"

    def _open(self, key: str, write: bool) -> int:
        flags = (os.O_WRONLY | os.O_CREAT) if write else os.O_RDONLY
        if self.direct:
            flags |= os.O_DIRECT
        return os.open(self._path(key), flags, 0o600)

    def write_sync(self, key: str, buf: torch.Tensor) -> None:
        start = time.perf_counter()
        fd = self._open(key, write=True)
        try:
            view = memoryview(buf.numpy())
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
            if not self.direct:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ResourceError(f"disk full writing {self._path(key)}: free space in offload.swap_dir") from e
            raise
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_written += len(view)
        self.recorder.span("ssd_write", key, start, time.perf_counter())

    def read_sync(self, key: str, buf: torch.Tensor) -> None:
        start = time.perf_counter()
        fd = self._open(key, write=False)
        try:
            view = memoryview(buf.numpy())
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], done)
                if n == 0:
                    raise OSError(f"short read of {self._path(key)}")
                done += n
        finally:
            os.close(fd)
        with self._lock:
            self.bytes_read += len(view)
        self.recorder.span("ssd_read", key, start, time.perf_counter())

    def submit(self, fn, *args) -> Future:
        """Run an I/O job (a chain of read/upload or offload/write) on the store's threads."""
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)
