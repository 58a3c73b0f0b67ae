"""`fuyou plan RECIPE --dry-run`: every shipped recipe on every preset, JSON output, infeasible runs, what-ifs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuyoucli.cli.app import main
from fuyoucli.hardware.presets import preset_names

ROOT = Path(__file__).parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def write_recipe(path: Path, model: Path, data: Path, method: str = "zo2", extra: str = "") -> Path:
    path.write_text(f"name: plan-test\nmodel:\n  path: {model}\nmethod:\n  name: {method}\n"
                    f"data:\n  train: {data}\n  max_length: 64\ntraining:\n  max_steps: 3\n  batch_size: 4\n{extra}")
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_plans_on_every_preset(capsys, recipe):
    for preset in preset_names():
        code, out, err = run(capsys, "plan", str(recipe), "--dry-run", "--json", "--preset", preset)
        assert code in (0, 2), (preset, err)
        doc = json.loads(out)
        assert doc["feasible"] is (code == 0)
        assert doc["step_time_s"] > 0 and doc["tokens_per_s"] > 0 and doc["bottleneck"]
        assert set(doc["peak_bytes"]) == {"gpu", "pinned", "host", "ssd"}
        assert [b["block"] for b in doc["placement"]][0] == "embed"


def test_report_shows_tiers_placement_and_times(capsys):
    code, out, _ = run(capsys, "plan", str(ROOT / "recipes" / "zo2-sentiment.yaml"), "--dry-run",
                       "--preset", "rtx4090-pcie4-1nvme-128g")
    assert code == 0
    for text in ("Memory per tier", "Placement", "layers.0-29", "device", "Step time by resource", "tokens/s",
                 "TFLOPS", "bottleneck"):
        assert text in out, text


def test_dry_run_is_required(capsys):
    code, _, err = run(capsys, "plan", str(RECIPES[0]), "--preset", "cpu-laptop-8c-32g")
    assert code == 2 and "--dry-run" in err


def test_no_profile_says_how_to_get_one(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FUYOU_CACHE_DIR", str(tmp_path / "cache"))
    code, _, err = run(capsys, "plan", str(RECIPES[0]), "--dry-run")
    assert code == 2 and "fuyou profile" in err and "hardware.preset" in err


def test_recipe_hardware_section_and_offload_overrides(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data,
                          extra="hardware:\n  preset: rtx4090-pcie4-1nvme-128g\noffload:\n  mode: stream\n"
                                "  prefetch_depth: 2\n")
    code, out, err = run(capsys, "plan", str(recipe), "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    homes = {b["block"]: b["weights_home"] for b in doc["placement"]}
    assert homes == {"embed": "device", "layers.0": "pinned", "layers.1": "pinned", "head": "device"}
    assert doc["plan"]["prefetch_depth"] == 2 and doc["machine"] == "rtx4090-pcie4-1nvme-128g"


def test_infeasible_exits_2_with_the_reason_and_suggestions(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, method="adamw",
                          extra="offload:\n  device_memory_limit: 100kB\n")
    code, out, err = run(capsys, "plan", str(recipe), "--dry-run", "--preset", "rtx4090-pcie4-1nvme-128g")
    assert code == 2
    assert "Does not fit" in out and "device memory: needs" in out
    assert "remove offload.device_memory_limit: fits" in out
    assert err.startswith("fuyou: error: device memory: needs")


def test_offload_settings_the_method_does_not_use_are_errors(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, extra="offload:\n  activations: swap\n")
    code, _, err = run(capsys, "plan", str(recipe), "--dry-run", "--preset", "cpu-laptop-8c-32g")
    assert code == 2 and "offload.activations applies to first-order runs" in err


def test_what_if_opt13b_on_an_rtx4090_box_from_config_json_only(capsys, tmp_path, text_data):
    folder = tmp_path / "opt-13b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "opt", "hidden_size": 5120, "ffn_dim": 20480, "num_hidden_layers": 40,
        "num_attention_heads": 40, "max_position_embeddings": 2048, "word_embed_proj_dim": 5120,
        "vocab_size": 50272, "do_layer_norm_before": True}))
    recipe = write_recipe(tmp_path / "r.yaml", folder, text_data)
    recipe.write_text(recipe.read_text().replace(f"  path: {folder}\n", f"  path: {folder}\n  dtype: bfloat16\n"))
    code, out, err = run(capsys, "plan", str(recipe), "--dry-run", "--json", "--preset", "rtx4090-pcie4-1nvme-128g")
    assert code == 0, err
    doc = json.loads(out)
    assert 12.8e9 < doc["model"]["params"] < 12.9e9
    # the model's own dtype at home (26 GB of bf16 weights), updates rounded stochastically (issue 19)
    assert (doc["plan"]["home_dtype"], doc["plan"]["home_rounding"]) == ("bfloat16", "stochastic")
    assert any(b["weights_home"] == "pinned" for b in doc["placement"])
    assert doc["peak_bytes"]["gpu"] <= doc["capacity_bytes"]["gpu"]
    # fp32 homes (51 GB, also fitting in 128 GB of RAM) put twice the bytes on the link: link-bound, slower
    code, out, err = run(capsys, "plan", str(recipe), "--dry-run", "--json", "--preset", "rtx4090-pcie4-1nvme-128g",
                         "--set", "offload.home_dtype=float32")
    exact = json.loads(out)
    assert code == 0 and exact["plan"]["home_dtype"] == "float32" and exact["bottleneck"] in ("h2d", "d2h")
    layer = {b["block"]: b["bytes"] for b in doc["placement"]}["layers.0"]
    assert 2 * layer == {b["block"]: b["bytes"] for b in exact["placement"]}["layers.0"]  # half on the link
    # on this preset the engine's unfused elementwise work bounds a 16-bit step (rounding included):
    # when float32 homes would be faster the plan says so
    if exact["step_time_s"] < doc["step_time_s"]:
        assert any("offload.home_dtype: float32 would take" in n for n in doc["plan"]["notes"])
    else:
        assert not any("offload.home_dtype: float32" in n for n in doc["plan"]["notes"])
    # with 16 GB of host RAM, fp32 weights do not fit: an SSD swap_dir would
    code, out, err = run(capsys, "plan", str(recipe), "--dry-run", "--preset", "rtx3090-pcie4-1nvme-64g",
                         "--set", "offload.home_dtype=float32", "--set", "offload.host_memory_limit=16GB")
    assert code == 2 and "host RAM: needs" in out and "set offload.swap_dir" in out
