"""training.report_to: a short run's TensorBoard event file holds the loss scalars metrics.jsonl holds (read
back with tensorboard's own reader), and a tracker whose package is missing is one line before anything
is written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fuyoucli.cli.app import main


def write_recipe(path: Path, model: Path, data: Path, out: Path, report_to: str) -> Path:
    path.write_text(f"name: tracked\nmodel:\n  path: {model}\nmethod:\n  name: adamw\n  lr: 1.0e-3\n"
                    f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
                    f"training:\n  max_steps: 3\n  batch_size: 4\n  output_dir: {out}\n  report_to: {report_to}\n"
                    "hardware:\n  preset: cpu-laptop-8c-32g\n")
    return path


def run(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code, capsys.readouterr().err


def test_tensorboard_gets_the_scalars_metrics_jsonl_gets(capsys, tmp_path, tiny_models, text_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, "[tensorboard]")
    code, err = run(capsys, "finetune", str(recipe), "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/step_time_s", "train/tokens_per_s", "eval/loss", "eval/perplexity",
            "plan/step_s"} <= tags, tags

    def series(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _ in series("train/loss")] == [s for s, _ in train] == [1, 2, 3]
    assert [v for _, v in series("train/loss")] == pytest.approx([v for _, v in train], rel=1e-6)
    evals = [(r["step"], r["loss"]) for r in rows if r["kind"] == "eval"]
    assert [s for s, _ in series("eval/loss")] == [s for s, _ in evals]
    assert [v for _, v in series("eval/loss")] == pytest.approx([v for _, v in evals], rel=1e-6)

    # --overwrite starts the event files over with the run they belong to.
    code, err = run(capsys, "finetune", str(recipe), "--quiet", "--overwrite", "--set", "training.max_steps=2")
    assert code == 0, err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_models, text_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, "[wandb]")
    code, err = run(capsys, "finetune", str(recipe), "--quiet")
    err = err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "training.report_to: wandb needs the wandb package, which is not installed" in err
    assert not out.exists()


def test_report_to_is_refused_where_it_would_not_be_written(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out", "[tensorboard]")
    code, err = run(capsys, "finetune", str(recipe), "--quiet", "--nproc", "2")
    assert code == 2 and "single-process runs only" in err, err
    recipe.write_text(recipe.read_text().replace("[tensorboard]", "[tensorboard, tensorboard]"))
    code, err = run(capsys, "finetune", str(recipe), "--quiet")
    assert code == 2 and "names a tracker twice" in err, err
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_purges_the_steps_after_its_checkpoint(capsys, tmp_path, tiny_models, text_data):
    """Killed while writing its final model (after step 4; the checkpoint is step 2), then resumed: the event
    file reads as one run, steps 1-4 once each, with the losses metrics.jsonl ends with."""
    pytest.importorskip("tensorboard")
    import os
    import subprocess
    import sys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, "[tensorboard]")
    sets = ["--set", "training.max_steps=4", "--set", "training.checkpoint_every=2"]
    killed = subprocess.run([sys.executable, "-m", "fuyoucli", "finetune", str(recipe), "--quiet", *sets],
                            env={**os.environ, "FUYOU_CRASH_AT": "final_model:4"}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "model").exists()
    code, err = run(capsys, "finetune", str(recipe), "--quiet", "--resume", *sets)
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    series = [(e.step, e.value) for e in events.Scalars("train/loss")]
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _ in series] == [s for s, _ in train] == [1, 2, 3, 4]
    assert [v for _, v in series] == pytest.approx([v for _, v in train], rel=1e-6)
