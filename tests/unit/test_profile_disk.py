"""Disk probe on real temp directories: figures, sizing, fallback, and that no test file survives
success, an exception or SIGINT. No torch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fuyoucli.errors import InputError
from fuyoucli.hardware import disk
from fuyoucli.hardware.disk import GIB, MIB, DiskSpec

TINY = DiskSpec(max_file_bytes=8 * MIB, blocks_bytes=(256 * 1024, MIB), threads=(1, 2), config_time_s=0.05)
REPO = Path(__file__).resolve().parents[2]


def _open_files_under(pid: int | str, directory: Path) -> list[str]:
    """Targets of the process's descriptors inside directory (an unlinked file still shows here)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


def _assert_nothing_left(directory: Path) -> None:
    assert list(directory.iterdir()) == []
    if Path("/proc/self/fd").is_dir():
        assert _open_files_under("self", directory) == []


def test_measure_disk_small_file_gives_positive_figures_and_leaves_nothing(tmp_path: Path) -> None:
    result = disk.measure_disk(tmp_path, TINY)
    assert result.path == str(tmp_path.resolve()) and result.test_file_bytes == 8 * MIB
    assert [(p.block_bytes, p.threads) for p in result.read] == [(256 * 1024, 1), (256 * 1024, 2), (MIB, 1), (MIB, 2)]
    assert len(result.write) == 4 and result.first_write_gbps > 0
    assert result.read_gbps > 0 and result.write_gbps > 0 and result.free_bytes > 0
    assert result.mixed_gbps > 0  # one reader and one writer at once
    assert result.filesystem != "" and result.method in ("o_direct", "fsync+fadvise", "fsync")
    assert result.o_direct_supported == (result.method == "o_direct")
    _assert_nothing_left(tmp_path)


def test_buffered_fallback_fsyncs_and_drops_cache(tmp_path: Path) -> None:
    result = disk.measure_disk(tmp_path, TINY, allow_o_direct=False)
    assert not result.o_direct_supported and result.method == "fsync+fadvise"
    assert "fsync" in result.note and "DONTNEED" in result.note
    assert result.read_gbps > 0 and result.write_gbps > 0 and result.mixed_gbps > 0
    _assert_nothing_left(tmp_path)


def test_exception_mid_measurement_leaves_nothing(tmp_path: Path) -> None:
    calls = []

    def fail_on_third(label: str) -> None:
        calls.append(label)
        if len(calls) == 3:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        disk.measure_disk(tmp_path, TINY, on_progress=fail_on_third)
    _assert_nothing_left(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the open test file")
def test_sigint_during_measurement_leaves_nothing(tmp_path: Path) -> None:
    # Long configs so the interrupt surely lands while the test file is open and being written.
    code = textwrap.dedent(f"""
        from fuyoucli.hardware.disk import DiskSpec, measure_disk, MIB
        measure_disk({str(tmp_path)!r}, DiskSpec(64 * MIB, (MIB,), (4,), 30.0))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 20
        while not _open_files_under(proc.pid, tmp_path):
            assert proc.poll() is None and time.monotonic() < deadline, "probe never opened its test file"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert list(tmp_path.iterdir()) == []


def test_test_file_never_exceeds_5_percent_of_free_or_2_gib() -> None:
    assert disk.test_file_bytes(100 * GIB, disk.FULL) == 2 * GIB
    assert disk.test_file_bytes(10 * GIB, disk.FULL) == int(0.05 * 10 * GIB) // (8 * MIB) * (8 * MIB)
    assert disk.test_file_bytes(100 * GIB, disk.QUICK) == 256 * MIB
    assert disk.test_file_bytes(100 * MIB, disk.QUICK) == 5 * MIB


def test_too_little_free_space_is_a_resource_error(tmp_path: Path) -> None:
    from fuyoucli.errors import ResourceError

    huge = DiskSpec(max_file_bytes=2 * GIB, blocks_bytes=(shutil.disk_usage(tmp_path).free,), threads=(1,),
                    config_time_s=0.01)
    with pytest.raises(ResourceError, match="5% of free space"):
        disk.measure_disk(tmp_path, huge)


def test_bad_disk_paths_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such directory"):
        disk.check_disk_path(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        disk.check_disk_path(tmp_path / "f")


def make_unwritable(directory: Path) -> bool:
    """chmod for ordinary users; root ignores modes, so use the immutable attribute when possible."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        return True
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(directory)], capture_output=True).returncode == 0


def make_writable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
    directory.chmod(0o700)


def test_unwritable_disk_path_is_an_input_error(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not make_unwritable(locked):
        pytest.skip("cannot make a directory unwritable here (root without chattr)")
    try:
        with pytest.raises(InputError, match="not writable"):
            disk.check_disk_path(locked)
    finally:
        make_writable(locked)


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored; give the child the default so it gets KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
