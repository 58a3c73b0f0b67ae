"""The compiled kernels of adamw_chunk.c (the AdamW chunk, bf16 stochastic rounding for a CPU device's
homes, and the counter-based normals of zo2's z on a CPU device), built on first use with the
machine's C compiler and loaded through ctypes; None where they cannot be (no compiler, or the build
fails) or are not wanted (FUYOU_NATIVE_KERNELS=0), and then kernels/adamw.py, engine/rounding.py and
kernels/normal.py run their torch ops (normal.py: torch's generator).

Why a C file and not a library: bitsandbytes' CPU 8-bit blockwise update and torchao's AdamW8bit ran
about 10x slower than the torch ops on this project's CPU, and torch.compile (inductor's C++) of the
same chunk ran at 0.10 G params/s on one thread here, no faster than the torch ops. This file, one
pass over memory, ran the int8-moment update 2.6x faster than the torch ops on this project's 2-core
VM (benchmarks/compact_optimizer.py prints both, side by side).
Not bit for bit the torch ops: its sqrt is correctly rounded and torch's, on large tensors, is not
always (about 0.6% of values one unit off, measured here); a run and its resume on one machine use
the same kernel, so they stay exact, and the in-memory reference and the streamed engine call the
same one.

The shared object is cached in fuyou's cache folder (resources.cache_dir: kernels/), named by a hash of
the source, the compiler and the CPU's flags (it is built for this CPU: -march=native), and written
atomically, so concurrent first uses do not see half a file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from fuyoucli.resources import cache_dir  # a leaf module: the cache folder's rule, nothing of the engine

SOURCE = Path(__file__).with_name("adamw_chunk.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]
"""-ffp-contract=off: no multiply-add is fused unless the source says so (fmaf), as in torch's kernels;
-fno-math-errno lets sqrtf be the instruction (the values' bits do not change)."""

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_flags(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"adamw_chunk-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def adamw_chunk():
    """The compiled chunk function, or None (see the module docstring). Called for every chunk: after
    the first build or load it is a dictionary read, no lock."""
    return _kernel("adamw")


def sr_bf16():
    """fuyou_sr_bf16(dst, src, n, key, offset): bf16 stochastic rounding of n fp32 values, value i
    drawing from (key, offset + i); or None (see the module docstring)."""
    return _kernel("sr_bf16")


def normal():
    """fuyou_normal(out, n, key, offset): values offset .. offset + n of the counter-based normal stream
    of `key` (kernels/normal.py), or None (see the module docstring)."""
    return _kernel("normal")


def _kernel(name: str):
    if os.environ.get("FUYOU_NATIVE_KERNELS", "1") == "0":
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                _loaded.update(_load())
    return _loaded[name]


def _load() -> dict[str, object]:
    none = {"adamw": None, "sr_bf16": None, "normal": None}
    cc = _compiler()
    if cc is None:
        return none
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError):
        return none
    ptr, f32, i64, u64 = ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_uint64
    adamw = lib.fuyou_adamw_chunk
    adamw.argtypes = [ptr, ptr, u64, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                      f32, f32, f32, f32, f32, f32, f32]
    adamw.restype = None
    sr = lib.fuyou_sr_bf16
    sr.argtypes = [ptr, ptr, i64, u64, u64]
    sr.restype = None
    normal = lib.fuyou_normal
    normal.argtypes = [ptr, i64, u64, u64]
    normal.restype = None
    return {"adamw": adamw, "sr_bf16": sr, "normal": normal}


def kernel_name() -> str:
    """Which AdamW chunk kernel compact formats run here (benchmarks/compact_optimizer.py prints it)."""
    return "compiled C (kernels/adamw_chunk.c)" if adamw_chunk() is not None else "plain torch ops"
