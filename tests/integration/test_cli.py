"""The real `fuyou` command in a subprocess: a run end to end, and bad input as one line with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def fuyou(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fuyoucli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def write_recipe(path: Path, model: Path, data: Path, out: Path, extra: str = "") -> Path:
    path.write_text(
        f"name: cli-test\nmodel:\n  path: {model}\nmethod:\n  name: adamw\n  lr: 1.0e-3\n"
        f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"training:\n  max_steps: 3\n  batch_size: 4\n  output_dir: {out}\n{extra}"
    )
    return path


def test_help_lists_only_working_commands():
    result = fuyou("--help")
    assert result.returncode == 0
    assert "finetune" in result.stdout
    result = fuyou("finetune", "--help")
    assert result.returncode == 0 and "--set" in result.stdout and "--overwrite" in result.stdout


def test_finetune_end_to_end_and_refuses_to_clobber(tmp_path, tiny_models, text_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["qwen2"], text_data, out)
    result = fuyou("finetune", str(recipe), "--set", "training.max_steps=4")
    assert result.returncode == 0, result.stderr
    assert "done: 4 steps" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert (out / "model" / "config.json").is_file()

    before = (out / "metrics.jsonl").read_bytes()
    again = fuyou("finetune", str(recipe))
    assert again.returncode != 0
    assert "already holds a run" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing lost
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 4]  # before and after
    # --overwrite replaces the run; eval_before: false skips the starting model's evaluation.
    assert fuyou("finetune", str(recipe), "--overwrite", "--quiet", "--set", "training.eval_before=false").returncode == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3]


BAD = {
    "unknown_key": ("  seeed: 3\n", ["r.yaml:15", "unknown key 'training.seeed'", "did you mean 'seed'"]),
    "wrong_type": ("  grad_accum: many\n", ["training.grad_accum = 'many'", "integer"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_one_line_exit_2(case, tmp_path, tiny_models, text_data):
    extra, expected = BAD[case]
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out", extra)
    result = fuyou("finetune", str(recipe))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("case", ["missing_model", "missing_data", "malformed", "empty", "missing_file"])
def test_bad_paths_and_files_exit_2(case, tmp_path, tiny_models, text_data):
    recipe = tmp_path / "r.yaml"
    if case == "missing_model":
        write_recipe(recipe, tmp_path / "nomodel", text_data, tmp_path / "out")
        expected = "model.path not found"
    elif case == "missing_data":
        write_recipe(recipe, tiny_models["llama"], tmp_path / "nodata.jsonl", tmp_path / "out")
        expected = "data.train not found"
    elif case == "malformed":
        recipe.write_text("model: {path: x\n")
        expected = "malformed YAML"
    elif case == "empty":
        recipe.write_text("")
        expected = "empty"
    else:
        recipe = tmp_path / "absent.yaml"
        expected = "recipe file not found"
    result = fuyou("finetune", str(recipe))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_data_record_is_one_line(tmp_path, tiny_models):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": oops}\n')
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], data, tmp_path / "out")
    result = fuyou("finetune", str(recipe))
    assert result.returncode == 2
    assert "bad.jsonl:2" in result.stderr and "Traceback" not in result.stderr


def test_debug_env_shows_the_traceback(tmp_path):
    result = fuyou("finetune", str(tmp_path / "absent.yaml"), env={"FUYOU_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_ctrl_c_exits_130_and_keeps_what_was_written(tmp_path, tiny_models, text_data):
    import signal
    import time

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out)
    proc = subprocess.Popen([sys.executable, "-m", "fuyoucli", "finetune", str(recipe), "--set",
                             "training.max_steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert sum(r["kind"] == "train" for r in rows) >= 2
