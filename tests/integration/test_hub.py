"""Hub ids (`model.path: org/name`): resolved through huggingface_hub's own cache, which each test fills
itself (tests/tiny.py fill_hub_cache) and reads with HF_HUB_OFFLINE=1: nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import fill_hub_cache


def fuyou(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuyoucli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def recipe(path: Path, model: str, data: Path, out: Path) -> Path:
    path.write_text(f"model:\n  path: {model}\nmethod:\n  name: adamw\n  lr: 1.0e-3\n"
                    f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
                    f"training:\n  max_steps: 2\n  batch_size: 4\n  output_dir: {out}\n"
                    "hardware:\n  preset: cpu-laptop-8c-32g\n")
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_trains_from_the_hub_cache_offline(tmp_path, offline_cache, tiny_models, text_data):
    snapshot = fill_hub_cache(offline_cache, "tiny-org/tiny-llama", tiny_models["llama"])
    out = tmp_path / "out"
    r = recipe(tmp_path / "r.yaml", "tiny-org/tiny-llama", text_data, out)
    result = fuyou("finetune", str(r), "--quiet", env={})
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row["kind"] == "train"] == [1, 2]
    assert (out / "model" / "config.json").is_file()
    saved = json.loads((out / "model" / "fuyou_recipe.json").read_text())
    assert saved["model"]["path"] == "tiny-org/tiny-llama"  # the id, not the snapshot folder
    assert not any(p.name.endswith(".incomplete") for p in offline_cache.rglob("*"))  # nothing fetched
    assert snapshot.is_dir()
    result = fuyou("generate", "tiny-org/tiny-llama", "--prompt", "the quick", "--max-new-tokens", "4", env={})
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert "generating from tiny-org/tiny-llama" in result.stderr


def test_plan_on_a_hub_id_needs_only_its_config(tmp_path, offline_cache, tiny_models, text_data):
    fill_hub_cache(offline_cache, "tiny-org/only-config", tiny_models["qwen2"], only=("config.json",))
    r = recipe(tmp_path / "r.yaml", "tiny-org/only-config", text_data, tmp_path / "out")
    result = fuyou("plan", str(r), "--dry-run", "--json", env={})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["model"]["type"] == "qwen2" and doc["model"]["layers"] == 2
    # The weights were never needed: training from the same cache says what is missing, in one line.
    result = fuyou("finetune", str(r), "--quiet", env={})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "tiny-org/only-config" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_unknown_hub_id_offline_is_one_line(tmp_path, offline_cache, text_data):
    out = tmp_path / "out"
    r = recipe(tmp_path / "r.yaml", "nobody/no-such-model", text_data, out)
    for command in (["finetune", str(r), "--quiet"], ["plan", str(r), "--dry-run"]):
        result = fuyou(*command, env={})
        err = result.stderr.strip()
        assert result.returncode == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("fuyou: error:"), err
        assert "'nobody/no-such-model' is not in the hub cache (HF_HUB_OFFLINE=1)" in err
        assert "r.yaml:2" in err
    assert not out.exists()


def test_a_missing_local_path_is_still_not_found(tmp_path, offline_cache, text_data):
    """Only a path that looks like org/name goes to the hub; anything else missing is a missing path."""
    r = recipe(tmp_path / "r.yaml", str(tmp_path / "models" / "mine"), text_data, tmp_path / "out")
    result = fuyou("plan", str(r), "--dry-run", env={})
    assert result.returncode == 2 and "model.path not found" in result.stderr, result.stderr


def test_a_sharded_model_needs_every_shard_its_index_names(tmp_path, offline_cache, tiny_models):
    """The weights of a sharded hub model are the shards its index names; a cache that lacks one is one line
    saying which (an extra copy of the weights in the repository is never needed)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from fuyoucli.errors import InputError
    from fuyoucli.resources import resolve_model_path

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).save_pretrained(folder, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["llama"] / name, folder / name)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (folder / "consolidated.safetensors").write_bytes(b"not needed")
    snapshot = fill_hub_cache(offline_cache, "tiny-org/sharded", folder,
                              only=tuple(p.name for p in folder.iterdir() if p.name != "consolidated.safetensors"))
    assert resolve_model_path("tiny-org/sharded") == snapshot
    (snapshot / shards[-1]).unlink()
    with pytest.raises(InputError, match=f"no safetensors weights \\({shards[-1]} missing\\): the hub cache holds "
                                         "only part of it"):
        resolve_model_path("tiny-org/sharded")
