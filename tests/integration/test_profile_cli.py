"""`fuyou profile` through the real CLI in a subprocess: quick measurement, presets, errors, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuyoucli.hardware import presets
from fuyoucli.hardware.profile import load_profile, profile_from_json

REPO = Path(__file__).resolve().parents[2]


def fuyou(*args: str, cache: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUYOU_CACHE_DIR": str(cache), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "fuyoucli", "profile", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """One real `fuyou profile --quick --json` on a temp disk, shared by the checks below."""
    root = tmp_path_factory.mktemp("quick")
    disk, cache = root / "disk", root / "cache"
    disk.mkdir()
    return fuyou("--quick", "--json", "--disk", str(disk), cache=cache), disk, cache


def test_quick_json_is_a_valid_profile_and_is_saved(quick_run) -> None:
    result, disk, cache = quick_run
    assert result.returncode == 0, result.stderr
    prof = profile_from_json(result.stdout, source="stdout")
    assert load_profile(cache / "hardware_profile.json") == prof
    assert f"saved hardware profile to {cache / 'hardware_profile.json'}" in result.stderr
    assert prof.provenance.mode == "quick" and prof.disks[0].path == str(disk.resolve())
    assert json.loads(result.stdout)["summary"]["disks"][str(disk.resolve())]["read_gbps"] > 0


def test_quick_profile_invariants(quick_run) -> None:
    result, disk, _cache = quick_run
    prof = profile_from_json(result.stdout)
    links = prof.links
    curves = (links.h2d_pinned, links.h2d_pageable, links.d2h_pinned, links.d2h_pageable,
              links.duplex_h2d_pinned, links.duplex_d2h_pinned)
    assert all(p.gbps > 0 for c in curves for p in c.points)
    assert [p.size_bytes for p in links.h2d_pinned.points] == [1 << 20, 16 << 20, 256 << 20]
    assert all(p.gbps > 0 for d in prof.disks for p in d.read + d.write)
    assert 0 < prof.disks[0].test_file_bytes <= min(2 << 30, 0.05 * prof.disks[0].free_bytes)
    assert prof.host.ram_available_bytes <= prof.host.ram_total_bytes
    if prof.cpu_only:
        assert links.kind == "host_memcpy" and prof.compute.kind == "cpu"
        assert prof.host.pinned_allocatable_bytes is None
    assert list(disk.iterdir()) == []  # the test file is gone


def test_table_output_names_the_cpu_as_compute_device(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = fuyou("--preset", "cpu-laptop-8c-32g", "--out", str(out), cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Compute device (cpu)" in result.stdout and "Links: host memcpy (no CUDA)" in result.stdout
    assert "not a measurement" in result.stdout and load_profile(out) == presets.get_preset("cpu-laptop-8c-32g")
    assert not (tmp_path / "hardware_profile.json").exists()  # a preset never replaces the measured profile


def test_list_presets_and_show_one_as_json(tmp_path: Path) -> None:
    listed = fuyou("--list-presets", "--json", cache=tmp_path)
    assert listed.returncode == 0 and list(json.loads(listed.stdout)) == presets.preset_names()
    shown = fuyou("--preset", "rtx4090-768g-12nvme", "--json", cache=tmp_path)
    assert shown.returncode == 0
    assert profile_from_json(shown.stdout) == presets.get_preset("rtx4090-768g-12nvme")


@pytest.mark.parametrize("args, message", [
    (["--preset", "rtx9090"], "fuyou: error: hardware profile 'rtx9090' is neither a file nor a preset; presets: "),
    (["--disk", "/definitely/not/here"], "fuyou: error: --disk /definitely/not/here: no such directory"),
    (["--disk", str(REPO / "pyproject.toml")], "not a directory"),
])
def test_known_failures_are_one_line_with_exit_code_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = fuyou(*args, cache=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr


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


def test_unwritable_disk_is_one_line_with_exit_code_2(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if not make_unwritable(locked):
        pytest.skip("cannot make a directory unwritable here")
    try:
        result = fuyou("--disk", str(locked), cache=tmp_path)
    finally:
        make_writable(locked)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not writable" in result.stderr


def test_corrupt_profile_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"schema_version": 0}))
    result = fuyou("--preset", str(bad), cache=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "schema 0" in result.stderr


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to see the open test file")
def test_ctrl_c_during_the_disk_test_removes_the_file(tmp_path: Path) -> None:
    disk, cache = tmp_path / "disk", tmp_path / "cache"
    disk.mkdir()
    env = {**os.environ, "FUYOU_CACHE_DIR": str(cache)}
    # The full profile's disk test (first step, 2 GiB cap) runs long enough to be caught in the act.
    proc = subprocess.Popen([sys.executable, "-m", "fuyoucli", "profile", "--disk", str(disk)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 60
        while not _has_open_file_in(proc.pid, disk):
            assert proc.poll() is None and time.monotonic() < deadline, "the disk test never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "fuyou: interrupted"
    assert list(disk.iterdir()) == [] and not (cache / "hardware_profile.json").exists()


def _has_open_file_in(pid: int, directory: Path) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"{directory}/"):
                return True
        except OSError:
            continue
    return False


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
    # ignored SIGINT ignored; give the child the default so it gets KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_first_run_says_it_is_profiling_the_machine(tmp_path, tiny_models, text_data):
    """With no saved profile (an empty FUYOU_CACHE_DIR) a run measures the machine for about a minute before
    anything else shows: a line on stderr says so at once, then one per phase. Stopped once seen. The
    swap_dir does not exist yet (the run creates it): its filesystem is measured through its parent."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: first\nmodel:\n  path: {tiny_models['llama']}\nmethod:\n  name: zo2\n"
                      f"data:\n  train: {text_data}\n  max_length: 32\n"
                      f"training:\n  max_steps: 2\n  output_dir: {tmp_path / 'out'}\n"
                      f"offload:\n  swap_dir: {tmp_path / 'swap' / 'not-yet'}\n")
    env = {**os.environ, "FUYOU_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "fuyoucli", "finetune", str(recipe), "--quiet"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:  # ends when the process does
            seen.append(line)
            if line.startswith("fuyou: profiling 1/"):
                break
    finally:
        proc.kill()
        proc.wait()
    assert any(s.startswith("fuyou: profiling this machine once (quick, about a minute") for s in seen), seen
    assert seen[-1].startswith("fuyou: profiling 1/"), seen
