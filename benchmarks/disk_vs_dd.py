"""Benchmark: fuyou's disk probe against `dd` with O_DIRECT on the same directory, interleaved.

Hardware profile stage check (issue 3 acceptance: read/write within 30% of dd). Each round runs the
probe once (one thread, whole 1 GiB file per config: dd's access pattern) and then dd, and prints
both; the end prints the median ratio probe/dd. Run:
    .venv/bin/python benchmarks/disk_vs_dd.py [DIR] [ROUNDS]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fuyoucli.hardware.disk import GIB, MIB, DiskSpec, measure_disk

FILE_BYTES = 1 * GIB
BLOCKS = (1 * MIB, 8 * MIB)


def _dd_gbps(args: list[str]) -> float:
    """dd's bytes / seconds from its last line, e.g. '1073741824 bytes (...) copied, 0.7 s, 1.4 GB/s'."""
    last = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr.splitlines()[-1]
    total = int(re.match(r"(\d+) bytes", last).group(1))
    return total / float(re.search(r"copied, ([\d.]+) s", last).group(1)) / 1e9


def _source() -> Path:
    # dd copies from a file; keep it in RAM (tmpfs) so dd times the target drive, not the source.
    # dd still alternates reading it and writing, so its write figures include those memory reads.
    shm = Path("/dev/shm")
    src = (shm if shm.is_dir() else Path(tempfile.gettempdir())) / "fuyou-dd-src"
    if not src.exists() or src.stat().st_size != FILE_BYTES:
        with open(src, "wb") as f:
            for _ in range(FILE_BYTES // MIB):
                f.write(os.urandom(MIB))
    return src


def _dd_round(directory: Path, src: Path, block: int) -> dict[str, float]:
    target = directory / ".fuyou-dd-test"
    count = FILE_BYTES // block
    out = [f"of={target}", f"bs={block}", f"count={count}", "oflag=direct"]
    try:
        target.unlink(missing_ok=True)
        # conv=fsync: the probe also ends each write pass with an fsync.
        first = _dd_gbps([f"if={src}", *out, "conv=fsync"])
        over = _dd_gbps([f"if={src}", *out, "conv=fsync,notrunc"])
        read = _dd_gbps([f"if={target}", "of=/dev/null", f"bs={block}", "iflag=direct"])
        target.unlink()
        # From /dev/zero dd spends no time reading a source; the probe writes from one random buffer.
        first0 = _dd_gbps(["if=/dev/zero", *out, "conv=fsync"])
        over0 = _dd_gbps(["if=/dev/zero", *out, "conv=fsync,notrunc"])
    finally:
        target.unlink(missing_ok=True)
    return {"first write": first, "overwrite": over, "read": read, "first write zero-src": first0,
            "overwrite zero-src": over0}


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    spec = DiskSpec(max_file_bytes=FILE_BYTES, blocks_bytes=BLOCKS, threads=(1,), config_time_s=600.0)
    src = _source()
    ratios: dict[str, list[float]] = {}
    try:
        for r in range(rounds):
            disk = measure_disk(directory, spec)
            ours = {"first write 8M": disk.first_write_gbps}
            for p in disk.write:
                ours[f"overwrite {p.block_bytes // MIB}M"] = p.gbps
            for p in disk.read:
                ours[f"read {p.block_bytes // MIB}M"] = p.gbps
            dd: dict[str, float] = {}
            for block in BLOCKS:
                for kind, gbps in _dd_round(directory, src, block).items():
                    dd[f"{kind} {block // MIB}M"] = gbps
            for key in list(ours):
                if not key.startswith("read"):
                    kind, _, bs = key.rpartition(" ")
                    ours[f"{kind} zero-src {bs}"] = ours[key]
            for key in ours:
                ratios.setdefault(key, []).append(ours[key] / dd[key])
            src_gbps = _dd_gbps([f"if={src}", "of=/dev/null", "bs=8M"])
            print(f"round {r} ({disk.method}, {disk.filesystem}; dd source read {src_gbps:.1f} GB/s): "
                  + "  ".join(f"{k} {ours[k]:.2f}/{dd[k]:.2f}" for k in ours) + "  [fuyou/dd GB/s]")
    finally:
        src.unlink(missing_ok=True)
    for key, values in ratios.items():
        print(f"median fuyou/dd {key}: {statistics.median(values):.2f}  (min {min(values):.2f}, max {max(values):.2f})")


if __name__ == "__main__":
    main()
