"""Hardware profile stage, disk part: sequential read/write throughput of one directory's filesystem.

Imports no torch. The test file is anonymous (O_TMPFILE, or unlinked the moment it is created with
signals held off), so no exit path - return, exception, Ctrl-C, even SIGKILL - can leave it behind:
the kernel frees its blocks when the descriptor closes, and a finally block closes it.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from fuyoucli.errors import InputError, ResourceError
from fuyoucli.hardware.profile import Disk, DiskPoint

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
MAX_TEST_FILE_BYTES = 2 * GIB
MAX_FREE_FRACTION = 0.05  # never use more than this share of the free space
MIN_TEST_FILE_BYTES = 8 * MIB
PROBE_PREFIX = ".fuyou-disk-probe-"
_ALIGN = 4096  # O_DIRECT needs buffers, offsets and sizes aligned to the logical block size
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class DiskSpec:
    """How hard to test: file size cap, block sizes, threads (queue depth), and a time cap per config."""

    max_file_bytes: int
    blocks_bytes: tuple[int, ...]
    threads: tuple[int, ...]
    config_time_s: float


QUICK = DiskSpec(max_file_bytes=256 * MIB, blocks_bytes=(1 * MIB,), threads=(1, 4), config_time_s=0.4)
FULL = DiskSpec(max_file_bytes=2 * GIB, blocks_bytes=(128 * KIB, 1 * MIB, 8 * MIB), threads=(1, 4),
                config_time_s=1.5)


def check_disk_path(path: str | Path) -> Path:
    """The resolved directory, or an InputError (exit 2) saying why it cannot be tested."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"--disk {path}: no such directory")
    if not p.is_dir():
        raise InputError(f"--disk {path}: not a directory")
    fd = open_test_file(p)
    os.close(fd)
    return p.resolve()


def test_file_bytes(free_bytes: int, spec: DiskSpec) -> int:
    """min(spec cap, 2 GiB, 5% of free), rounded down to a whole number of the largest block."""
    block = max(spec.blocks_bytes)
    cap = min(spec.max_file_bytes, MAX_TEST_FILE_BYTES, int(free_bytes * MAX_FREE_FRACTION))
    return cap // block * block


def filesystem_of(path: Path) -> tuple[str, str]:
    """(filesystem type, device) of the mount holding path; ('unknown', '') when psutil cannot tell."""
    import psutil

    best = None
    real = str(path.resolve())
    for part in psutil.disk_partitions(all=True):
        mp = part.mountpoint.rstrip("/") or "/"
        if real == mp or real.startswith(mp if mp.endswith("/") else mp + "/"):
            if best is None or len(mp) > len(best.mountpoint.rstrip("/") or "/"):
                best = part
    return (best.fstype, best.device) if best else ("unknown", "")


def measure_disk(path: str | Path, spec: DiskSpec = QUICK, on_progress: Optional[Callable[[str], None]] = None,
                 *, allow_o_direct: bool = True) -> Disk:
    """Write then read one anonymous test file at each (block, threads) of spec; see the module doc.
    allow_o_direct=False takes the buffered fallback even where O_DIRECT works (to test it)."""
    directory = check_disk_path(path)
    free_bytes = shutil.disk_usage(directory).free
    size = test_file_bytes(free_bytes, spec)
    if size < max(MIN_TEST_FILE_BYTES, max(spec.blocks_bytes)):
        raise ResourceError(f"--disk {path}: only {free_bytes / GIB:.2f} GiB free; fuyou tests with at most 5% "
                            f"of free space and needs {MIN_TEST_FILE_BYTES // MIB} MiB: free space or pick another disk")
    fstype, device = filesystem_of(directory)
    say = on_progress or (lambda _label: None)
    fd = open_test_file(directory)
    try:
        direct = allow_o_direct and _enable_o_direct(fd)
        can_drop = hasattr(os, "posix_fadvise")
        method = "o_direct" if direct else ("fsync+fadvise" if can_drop else "fsync")
        # One random buffer shared by all writers: some drives and VM layers compress zeros.
        src = mmap.mmap(-1, max(spec.blocks_bytes))
        src.write(os.urandom(len(src)))
        configs = [(b, t) for b in spec.blocks_bytes for t in spec.threads]
        # The first pass covers the whole file so every later read hits written blocks (reading a
        # preallocated hole returns zeros without touching the device). It is also the only
        # allocating write; the timed write configs after it overwrite.
        say("disk first write")
        first = _point(fd, True, size, max(spec.blocks_bytes), max(spec.threads), None, src)
        writes: list[DiskPoint] = []
        reads: list[DiskPoint] = []
        for block, threads in configs:
            say(f"disk write {_fmt_block(block)} x{threads}")
            writes.append(_point(fd, True, size, block, threads, spec.config_time_s, src))
        for block, threads in configs:
            say(f"disk read {_fmt_block(block)} x{threads}")
            if not direct:
                _drop_cache(fd)
            reads.append(_point(fd, False, size, block, threads, spec.config_time_s, src))
        say("disk read and write at once")
        if not direct:
            _drop_cache(fd)
        mixed = _mixed_gbps(fd, size, max(spec.blocks_bytes), spec.config_time_s, src)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ResourceError(f"--disk {path}: disk filled up during the test") from None
        raise ResourceError(f"--disk {path}: I/O error during the test: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return Disk(
        path=str(directory), filesystem=fstype, device=device, free_bytes=free_bytes,
        o_direct_supported=direct, method=method, test_file_bytes=size, first_write_gbps=first.gbps,
        write=tuple(writes), read=tuple(reads), note=_note(fstype, direct, can_drop), mixed_gbps=mixed,
    )


def _fmt_block(block_bytes: int) -> str:
    return f"{block_bytes // MIB} MiB" if block_bytes >= MIB else f"{block_bytes // KIB} KiB"


def _note(fstype: str, direct: bool, can_drop: bool) -> str:
    notes = []
    if fstype in ("tmpfs", "ramfs"):
        notes.append(f"{fstype} lives in RAM: these are memory speeds, not a drive's")
    if not direct:
        notes.append("O_DIRECT is not supported here: writes were buffered then fsync'd"
                     + ("; the file's cached pages were dropped (posix_fadvise DONTNEED) before each read"
                        if can_drop else "; the page cache could not be dropped, so reads may be cache speed"))
    return "; ".join(notes)


def open_test_file(directory: Path) -> int:
    """A read-write descriptor on a file with no name in directory."""
    try:
        if hasattr(os, "O_TMPFILE"):
            try:
                return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
            except OSError as exc:
                if exc.errno in _NOT_WRITABLE:
                    raise
                # EOPNOTSUPP/EISDIR/EINVAL: this filesystem or kernel has no O_TMPFILE; name it, then unlink.
        name = directory / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.tmp"
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        # Hold signals so none lands between create and unlink; they are delivered right after.
        blocked = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if blocked else None
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.unlink(name)
            except BaseException:
                os.close(fd)
                raise
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return fd
    except OSError as exc:
        if exc.errno in _NOT_WRITABLE:
            raise InputError(f"--disk {directory}: not writable ({exc.strerror})") from None
        raise InputError(f"--disk {directory}: cannot create a test file ({exc.strerror or exc})") from None


def _enable_o_direct(fd: int) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
    except OSError:
        return False  # EINVAL: e.g. tmpfs refuses the flag outright
    # Some filesystems accept the flag and then fail the first I/O; find out now.
    try:
        os.pwrite(fd, mmap.mmap(-1, _ALIGN), 0)
    except OSError:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return False
    return True


def _drop_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        # DONTNEED only drops clean pages, so flush the dirty ones first.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _point(fd: int, write: bool, file_bytes: int, block: int, threads: int,
           time_s: float | None, src: mmap.mmap) -> DiskPoint:
    done_bytes, elapsed_s = run_io(fd, write, file_bytes, block, threads, time_s, src)
    return DiskPoint(block_bytes=block, threads=threads, gbps=done_bytes / elapsed_s / 1e9)


def run_io(fd: int, write: bool, file_bytes: int, block: int, threads: int,
           time_s: float | None, src: mmap.mmap) -> tuple[int, float]:
    """Threads take consecutive blocks from one counter: one sequential stream with `threads` calls in
    flight. Stops at the end of the file or after time_s. Writes count their fsync."""
    n_blocks = file_bytes // block
    counter = itertools.count()  # next() on it is atomic under the GIL
    deadline = None if time_s is None else time.perf_counter() + time_s

    def next_offset() -> int | None:
        k = next(counter)
        if k >= n_blocks or (deadline is not None and time.perf_counter() > deadline):
            return None
        return k * block

    return _io_threads(fd, src, block, [(write, next_offset)] * threads)


def _mixed_gbps(fd: int, file_bytes: int, block: int, time_s: float, src: mmap.mmap) -> float:
    """Bytes per second both ways with one reader (first half of the file) and one writer (second half)
    at once, one call of `block` bytes each in flight: an offload engine's read-ahead of the next
    block's state beside the write-behind of the last one. Many drives (and VM block layers) serve
    such a mix slower than the same reads and writes one after the other."""
    half = file_bytes // 2 // block
    if half < 1:
        return 0.0
    deadline = time.perf_counter() + time_s

    def stream(first: int):
        blocks = itertools.cycle(range(first, first + half))
        return lambda: None if time.perf_counter() > deadline else next(blocks) * block

    done, elapsed = _io_threads(fd, src, block, [(False, stream(0)), (True, stream(half))])
    return done / elapsed / 1e9


def _io_threads(fd: int, src: mmap.mmap, block: int,
                streams: list[tuple[bool, Callable[[], int | None]]]) -> tuple[int, float]:
    """One thread per (write, next_offset) stream, each reading or writing `block` bytes at the offsets
    it is given until it gets None: (bytes moved, seconds), with a closing fsync when any stream wrote."""
    done = [0] * len(streams)
    errors: list[BaseException] = []
    stop = threading.Event()
    start = time.perf_counter()

    def worker(i: int) -> None:
        write, next_offset = streams[i]
        buf = memoryview(src)[:block] if write else mmap.mmap(-1, block)
        try:
            while not stop.is_set():
                offset = next_offset()
                if offset is None:
                    return
                (_pwrite_all if write else _pread_all)(fd, buf, offset)
                done[i] += block
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread below
            errors.append(exc)
            stop.set()
        finally:
            if isinstance(buf, memoryview):
                buf.release()
            else:
                buf.close()

    pool = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"fuyou-disk-{i}")
            for i in range(len(streams))]
    try:
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
        if any(write for write, _ in streams):
            os.fsync(fd)
    finally:
        # On Ctrl-C the workers must finish their current call before the caller closes fd, or a
        # reused descriptor number could be written to.
        stop.set()
        for t in pool:
            if t.is_alive():
                t.join()
    return sum(done), time.perf_counter() - start


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    pos = 0
    while pos < len(buf):
        pos += os.pwrite(fd, buf[pos:], offset + pos)


def _pread_all(fd: int, buf: mmap.mmap, offset: int) -> None:
    n = os.preadv(fd, [buf], offset)
    if n != len(buf):
        raise OSError(errno.EIO, f"short read at {offset}: {n} of {len(buf)} bytes")
