"""HardwareProfile schema: JSON round trip, validation on load, presets, default path. No torch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fuyoucli.errors import InputError
from fuyoucli.hardware import presets
from fuyoucli.hardware.profile import (
    SCHEMA_VERSION, BandwidthCurve, BandwidthPoint, HardwareProfile, MatmulPoint, MatmulRates,
    default_profile_path, load_profile, profile_from_json, profile_to_json, save_profile,
)


@pytest.mark.parametrize("name", presets.preset_names())
def test_every_preset_loads_by_name_and_round_trips(name: str) -> None:
    prof = load_profile(name)
    assert prof.provenance.source == "preset" and prof.provenance.preset == name
    assert prof.compute.matmul_flops("bf16") > 0
    assert prof.links.h2d_pinned.peak_gbps > 0 and prof.disks[0].read_gbps > 0
    assert profile_from_json(profile_to_json(prof)) == prof


def test_required_presets_ship() -> None:
    required = {"rtx4090-pcie4-1nvme-128g", "rtx3090-pcie4-1nvme-64g", "a100-80g-pcie4-server", "rtx4090-768g-12nvme"}
    assert required <= set(presets.preset_names())
    assert load_profile("cpu-laptop-8c-32g").cpu_only


def test_unknown_preset_is_one_line_listing_presets() -> None:
    with pytest.raises(InputError) as info:
        load_profile("rtx9090")
    message = str(info.value)
    assert "\n" not in message and "rtx4090-pcie4-1nvme-128g" in message and info.value.exit_code == 2


def test_missing_default_profile_says_how_to_make_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FUYOU_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(InputError, match="run `fuyou profile`"):
        load_profile(None)


def test_save_then_load_from_default_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FUYOU_CACHE_DIR", str(tmp_path / "cache"))
    prof = load_profile("rtx3090-pcie4-1nvme-64g")
    path = save_profile(prof, default_profile_path())
    assert path == tmp_path / "cache" / "hardware_profile.json"
    assert load_profile(None) == prof == load_profile(path)
    assert [p.name for p in path.parent.iterdir()] == ["hardware_profile.json"]  # no temp file left


def test_cache_dir_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("FUYOU_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_profile_path() == tmp_path / "xdg" / "fuyou" / "hardware_profile.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec says to ignore relative values
    assert default_profile_path().parent.parent.name == ".cache"
    monkeypatch.setenv("FUYOU_CACHE_DIR", str(tmp_path / "mine"))
    assert default_profile_path() == tmp_path / "mine" / "hardware_profile.json"


def _preset_dict() -> dict:
    return json.loads(profile_to_json(load_profile("rtx4090-pcie4-1nvme-128g")))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(schema_version=SCHEMA_VERSION - 1), "schema 0, this fuyou reads schema 1"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "upgrade fuyou"),
    (lambda d: d.pop("schema_version"), "not a fuyou hardware profile"),
    (lambda d: d["host"].pop("dram_copy_gbps"), "host.dram_copy_gbps: missing"),
    (lambda d: d["host"].update(dram_gbps=1.0), "host: unknown field 'dram_gbps'"),
    (lambda d: d["compute"].update(kind="tpu"), "compute.kind: 'tpu' is not one of"),
    (lambda d: d["compute"].update(count=True), "compute.count: expected an integer"),
    (lambda d: d["disks"][0]["read"][0].update(gbps="fast"), "disks[0].read[0].gbps: expected a finite number"),
    (lambda d: d["disks"][0]["read"][0].update(gbps=-1.0), "disks[0].read[0]: block_bytes, threads and gbps must be > 0"),
    (lambda d: d["links"]["h2d_pinned"].update(points=[]), "links.h2d_pinned: a bandwidth curve needs"),
])
def test_invalid_profiles_give_one_located_line(edit, expected: str) -> None:
    data = _preset_dict()
    edit(data)
    with pytest.raises(InputError) as info:
        profile_from_json(json.dumps(data), source="p.json")
    assert expected in str(info.value) and str(info.value).startswith("p.json: ")
    assert "\n" not in str(info.value)


def test_corrupt_and_missing_files(tmp_path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"schema_version": 1, ')
    with pytest.raises(InputError, match="not valid JSON"):
        load_profile(bad)
    with pytest.raises(InputError, match="neither a file nor a preset; presets: "):
        load_profile(tmp_path / "absent.json")
    with pytest.raises(InputError, match="not a file"):
        load_profile(tmp_path)


def test_summary_block_is_ignored_on_load_and_numbers_survive_exactly() -> None:
    prof = load_profile("a100-80g-pcie4-server")
    data = json.loads(profile_to_json(prof))
    assert data["summary"]["matmul_best_flops"]["bf16"] == 312e12
    data["summary"] = {"anything": "goes"}
    assert profile_from_json(json.dumps(data)) == prof
    assert isinstance(prof, HardwareProfile) and dataclasses.is_dataclass(prof)


def test_bandwidth_curve_interpolates_in_log_size_and_clamps() -> None:
    mib = 1 << 20
    curve = BandwidthCurve(points=(BandwidthPoint(mib, 4.0), BandwidthPoint(16 * mib, 12.0)))
    assert curve.gbps_at(mib // 2) == 4.0 and curve.gbps_at(64 * mib) == 12.0
    assert curve.gbps_at(4 * mib) == pytest.approx(8.0)  # halfway in log2 between 1 and 16 MiB
    assert curve.peak_gbps == 12.0
    with pytest.raises(ValueError):
        BandwidthCurve(points=(BandwidthPoint(16 * mib, 1.0), BandwidthPoint(mib, 2.0)))


def test_matmul_best_size_is_smallest_size_near_the_best() -> None:
    rates = MatmulRates("bf16", (MatmulPoint(512, 50e9), MatmulPoint(1024, 95e9), MatmulPoint(2048, 100e9)))
    assert rates.best_flops == 100e9 and rates.best_size == 1024
    assert MatmulRates("fp16", ()).best_flops == 0.0


def test_profile_presets_and_disk_modules_import_no_torch() -> None:
    # The pure planner imports profile.py (and through load_profile, presets.py): no torch there.
    import ast

    hardware = Path(__file__).parents[2] / "fuyoucli" / "hardware"
    for name in ("__init__.py", "profile.py", "strict_json.py", "presets.py", "disk.py", "hostinfo.py"):
        tree = ast.parse((hardware / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{name} imports torch"


def test_a_profile_saved_before_elementwise_rates_still_loads() -> None:
    data = json.loads(profile_to_json(load_profile("cpu-laptop-8c-32g")))
    assert data["compute"]["elementwise"]  # presets carry them
    del data["compute"]["elementwise"]
    prof = profile_from_json(json.dumps(data))
    assert prof.compute.elementwise == () and prof.schema_version == SCHEMA_VERSION


def test_the_cuda_context_round_trips_and_older_profiles_load_without_it() -> None:
    prof = load_profile("rtx4090-pcie4-1nvme-128g")
    assert prof.compute.context_bytes == 0  # a preset measures nothing: the planner assumes one
    measured = dataclasses.replace(prof, compute=dataclasses.replace(prof.compute, context_bytes=527_433_728))
    data = json.loads(profile_to_json(measured))
    assert data["compute"]["context_bytes"] == 527_433_728
    assert profile_from_json(json.dumps(data)) == measured
    del data["compute"]["context_bytes"]  # a profile saved before fuyou measured it
    assert profile_from_json(json.dumps(data)).compute.context_bytes == 0
    data["compute"]["context_bytes"] = -1
    with pytest.raises(InputError, match="compute: context_bytes must be >= 0"):
        profile_from_json(json.dumps(data))


def test_gpu_presets_leave_the_assumed_context_out_of_free_memory() -> None:
    from fuyoucli.hardware.profile import ASSUMED_CONTEXT_BYTES

    for name in presets.preset_names():
        c = load_profile(name).compute
        if c.kind == "cuda":
            assert c.total_memory_bytes - c.free_memory_bytes == ASSUMED_CONTEXT_BYTES


def test_gpu_presets_draw_normals_at_memory_speed() -> None:
    prof = load_profile("rtx4090-pcie4-1nvme-128g")
    (point,) = prof.compute.elementwise
    assert point.randn_params_per_s == pytest.approx(prof.compute.memory_bandwidth_gbps * 1e9 / 4)
    assert point.inplace_gbps == point.fresh_gbps == prof.compute.memory_bandwidth_gbps
