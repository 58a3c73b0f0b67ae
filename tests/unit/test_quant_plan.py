"""The planner prices a quantized LoRA base (model.quantization): its bytes at home, on the wire and on
the device, the dequantization's time, and the suggestion when a LoRA run does not fit. The README's
70B plans are these."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyoucli.hardware.presets import get_preset
from fuyoucli.model.inventory import inventory, lora_inventory
from fuyoucli.model.types import QUANT_BYTES_PER_PARAM
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import PeftConfig, validate_recipe
from fuyoucli.train.planning import plan_recipe

CONFIGS = Path(__file__).parents[2] / "benchmarks" / "configs"
LLAMA_70B = CONFIGS / "llama-70b"
LLAMA_7B = CONFIGS / "llama-7b"
LORA = {"type": "lora", "r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def recipe(data, model: Path, quantization: str, offload=None, max_length: int = 1024, batch_size: int = 4):
    return validate_recipe({
        "model": {"path": str(model), "dtype": "bfloat16", "quantization": quantization},
        "method": {"name": "adamw", "lr": 1e-4},
        "peft": LORA,
        "data": {"train": [str(data)], "max_length": max_length},
        "training": {"max_steps": 10, "batch_size": batch_size},
        "offload": {"host_memory_limit": "64GB", **(offload or {})},
    })


def plan_for(r, preset: str = "rtx4090-pcie4-1nvme-128g"):
    return plan_recipe(r, inventory(r.model, r.peft), get_preset(preset))


def base_bytes_per_param(p) -> float:
    b = next(b for b in p.blocks if b.name.startswith("layers."))
    return b.param_bytes / (b.params - b.trainable_params)


@pytest.mark.parametrize("preset", ["rtx4090-pcie4-1nvme-128g", "rtx3090-pcie4-1nvme-64g"])
def test_70b_lora_needs_the_ssd_in_bf16_and_fits_in_host_ram_in_nf4(preset, text_data):
    bf16 = plan_for(recipe(text_data, LLAMA_70B, "none"), preset)
    assert not bf16.feasible
    assert any("host RAM" in r for r in bf16.reasons), bf16.reasons
    assert bf16.suggestions[0].startswith("use model.quantization: nf4: fits"), bf16.suggestions
    nf4 = plan_for(recipe(text_data, LLAMA_70B, "nf4"), preset)
    assert nf4.feasible and nf4.memory.ssd == 0
    assert nf4.memory.device <= nf4.capacity.device
    assert nf4.memory.pinned + nf4.memory.pageable <= 64e9 * 0.9
    assert nf4.quantization == "nf4"
    # norms stay 16-bit: a decoder layer's frozen bytes are a hair over nf4's own per weight
    assert QUANT_BYTES_PER_PARAM["nf4"] < base_bytes_per_param(nf4) < QUANT_BYTES_PER_PARAM["nf4"] * 1.01
    assert base_bytes_per_param(bf16) == pytest.approx(2)


def test_a_streamed_quantized_base_moves_a_quarter_of_the_bytes_and_pays_its_dequantization(text_data):
    streamed = {"mode": "stream", "weights_home": "pinned", "resident_layers": 0}
    bf16, nf4, int8 = (plan_for(recipe(text_data, LLAMA_7B, q, streamed, max_length=256, batch_size=1))
                       for q in ("none", "nf4", "int8"))
    assert bf16.feasible and nf4.feasible and int8.feasible
    assert bf16.micro_batches == nf4.micro_batches == int8.micro_batches == 1
    assert 0.25 <= nf4.times.h2d_s / bf16.times.h2d_s <= 0.27
    assert 0.53 <= int8.times.h2d_s / bf16.times.h2d_s <= 0.54
    # the same products, plus each matrix dequantized in the forward and again in the backward
    assert nf4.times.gpu_s > bf16.times.gpu_s and int8.times.gpu_s > bf16.times.gpu_s
    parts = dict(nf4.device_parts)
    assert parts["dequantized weight"] == 4096 * 11008 * 2 + 4 * 4096 * 11008 // 64  # the largest matrix, bf16
    assert "dequantized weight" not in dict(bf16.device_parts)


def test_a_lora_base_on_the_ssd_is_told_what_quantizing_would_take(text_data, tmp_path):
    r = recipe(text_data, LLAMA_70B, "none", {"swap_dir": str(tmp_path)})
    p = plan_for(r)
    assert p.feasible and any(b.weights_home is Tier.SSD for b in p.blocks)
    note = next(n for n in p.notes if n.startswith("model.quantization: nf4"))
    assert "would fit in host RAM" in note and note.endswith("with the base on SSD"), note


def test_a_full_parameter_run_that_fits_nowhere_is_offered_lora_over_an_nf4_base(text_data):
    r = validate_recipe({
        "model": {"path": str(LLAMA_70B), "dtype": "bfloat16"},
        "method": {"name": "adamw", "lr": 1e-5},
        "data": {"train": [str(text_data)], "max_length": 1024},
        "training": {"max_steps": 10, "batch_size": 4},
        "offload": {"host_memory_limit": "64GB"},
    })
    p = plan_recipe(r, inventory(r.model, r.peft), get_preset("rtx4090-pcie4-1nvme-128g"),
                    lora_inventory=lambda: lora_inventory(r.model, PeftConfig(type="lora")))
    assert not p.feasible
    assert p.suggestions[0].startswith("use peft.type: lora and model.quantization: nf4: fits"), p.suggestions
