"""What the user reads is what fuyou meant to print: square brackets survive rich (help text, names, paths,
the install hint), and piped output has no carriage-return progress bars and no hard-wrapped lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def fuyou(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    return subprocess.run([sys.executable, "-m", "fuyoucli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_help_keeps_the_extras_brackets():
    result = fuyou("finetune", "--help")
    assert result.returncode == 0, result.stderr
    assert "the [deepspeed] extra" in " ".join(result.stdout.split()), result.stdout


def test_piped_run_keeps_brackets_and_long_paths_on_one_line(tmp_path, tiny_models, text_data):
    # A long output path with brackets in it; a run name with brackets.
    out = tmp_path / ("a-rather-long-folder-name-for-the-outputs-of-this-run" * 2) / "out[run]"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: trial[best]\nmodel:\n  path: {tiny_models['llama']}\nmethod:\n  name: zo2\n"
                      f"data:\n  train: {text_data}\n  max_length: 32\n"
                      f"training:\n  max_steps: 2\n  batch_size: 4\n  output_dir: {out}\n"
                      "offload:\n  mode: in_memory\n")
    result = fuyou("finetune", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout and "\r" not in result.stderr, result.stderr
    assert "trial[best]" in result.stdout
    # The path is printed whole on one line (rich used to break it at 80 columns).
    assert any(str(out) in line for line in result.stdout.splitlines()), result.stdout

    report = fuyou("report", str(out))
    assert report.returncode == 0, report.stderr
    assert str(out) in report.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install 'fuyoucli[plot]'" in report.stdout, report.stdout
    else:
        pytest.skip("matplotlib is installed: the install hint is not printed")
