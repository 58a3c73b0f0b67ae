"""The planner prices compact AdamW states (method.states: int8, method.master: bf16): bytes per tier,
the CPU optimizer's measured rate for the format, and the note when a run's states would fit in host
RAM or move fewer bytes. The README's 7B plans are these."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fuyoucli.errors import InputError
from fuyoucli.hardware.presets import get_preset
from fuyoucli.model.inventory import inventory
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.planning import plan_recipe

LLAMA_7B = Path(__file__).parents[2] / "benchmarks" / "configs" / "llama-7b"
PRESET = "rtx4090-pcie4-1nvme-128g"  # a 24 GB consumer GPU; planned with 64 GB of host RAM


def recipe(tmp_path, data, offload=None, **method):
    return validate_recipe({
        "model": {"path": str(LLAMA_7B), "dtype": "bfloat16"},
        "method": {"name": "adamw", "lr": 1e-5, **method},
        "data": {"train": [str(data)], "max_length": 1024},
        "training": {"max_steps": 10, "batch_size": 4},
        "offload": {"swap_dir": str(tmp_path), "host_memory_limit": "64GB", **(offload or {})},
    })


def plan_for(r):
    return plan_recipe(r, inventory(r.model, r.peft), get_preset(PRESET))


def layer_bytes_per_param(p) -> float:
    b = next(b for b in p.blocks if b.name.startswith("layers.") and b.optimizer_home not in (None, Tier.DEVICE))
    return (b.param_bytes + b.optimizer_bytes) / b.trainable_params


def test_7b_fp32_states_need_the_ssd_and_compact_states_fit_in_ram(tmp_path, text_data):
    fp32 = plan_for(recipe(tmp_path, text_data))
    compact = plan_for(recipe(tmp_path, text_data, states="int8", master="bf16"))
    assert fp32.feasible and compact.feasible
    assert any(b.optimizer_home is Tier.SSD for b in fp32.blocks) and fp32.memory.ssd > 0
    assert not any(b.optimizer_home is Tier.SSD for b in compact.blocks) and compact.memory.ssd == 0
    assert layer_bytes_per_param(fp32) == pytest.approx(14)  # bf16 weights + fp32 master, m, v
    assert layer_bytes_per_param(compact) == pytest.approx(4 + 8 / 256, abs=1e-3)  # bf16 master + 8-bit m, v
    assert compact.times.step_s < fp32.times.step_s
    # the fp32 plan says what a compact format would take instead
    assert any(n.startswith("method.states: int8 would fit in host RAM:") for n in fp32.notes), fp32.notes


def test_the_cpu_optimizer_is_priced_at_the_formats_measured_rate(tmp_path, text_data):
    profile = get_preset(PRESET)
    r = recipe(tmp_path, text_data, {"optimizer_home": "host", "resident_layers": 0, "prefetch_depth": 1},
               states="int8")
    base = plan_recipe(r, inventory(r.model, r.peft), profile)
    slower = dataclasses.replace(profile, host=dataclasses.replace(profile.host, adamw_compact=tuple(
        dataclasses.replace(a, params_per_s=a.params_per_s / 2) for a in profile.host.adamw_compact)))
    halved = plan_recipe(r, inventory(r.model, r.peft), slower)
    assert [b.optimizer_home for b in halved.blocks] == [b.optimizer_home for b in base.blocks]
    host_params = sum(b.trainable_params for b in base.blocks if b.optimizer_home is Tier.PAGEABLE)
    rate = profile.host.adamw_rate("int8", "fp32")
    assert base.times.cpu_optimizer_s == pytest.approx(host_params / rate, rel=1e-6)
    assert halved.times.cpu_optimizer_s == pytest.approx(2 * base.times.cpu_optimizer_s, rel=1e-6)


def test_a_profile_without_the_formats_rate_is_one_line(tmp_path, text_data):
    profile = get_preset(PRESET)
    old = dataclasses.replace(profile, host=dataclasses.replace(profile.host, adamw_compact=()))
    r = recipe(tmp_path, text_data, states="int8")
    with pytest.raises(InputError, match=r"no rate for the CPU AdamW with method.states: int8, master: fp32 .*"
                                         r"run `fuyou profile` again"):
        plan_recipe(r, inventory(r.model, r.peft), old)
    plan_recipe(recipe(tmp_path, text_data), inventory(r.model, r.peft), old)  # the default format needs none


def test_a_run_that_does_not_fit_is_told_about_compact_states(tmp_path, text_data):
    r = validate_recipe({
        "model": {"path": str(LLAMA_7B), "dtype": "bfloat16"},
        "method": {"name": "adamw", "lr": 1e-5},
        "data": {"train": [str(text_data)], "max_length": 1024},
        "training": {"max_steps": 10, "batch_size": 4},
        "offload": {"host_memory_limit": "64GB"},  # no swap_dir: 14 bytes a parameter do not fit
    })
    p = plan_for(r)
    assert not p.feasible
    assert any(s.startswith("use method.states: int8") for s in p.suggestions), p.suggestions
