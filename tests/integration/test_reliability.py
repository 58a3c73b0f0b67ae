"""What a careless or hostile user can do to a run folder (issue 17): a second process on a live run, an
export onto its own source, kills during the final save or an export, damaged checkpoints, a start that
completed no step, a diverging loss, the final weights of a LoRA run, data that changed under a resume.
Real files and real processes throughout; each test failed before its fix."""

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
import torch
from safetensors.torch import load_file

from fuyoucli.checkpoint import MANIFEST, _file_entry, _write_manifest, list_checkpoints
from fuyoucli.cli.app import main


def write_recipe(path: Path, model: Path, data: Path, out: Path, *, steps: int = 4, method: str = "adamw",
                 lr: str = "3.0e-3", extra: str = "") -> Path:
    path.write_text(
        f"name: reliability\nmodel:\n  path: {model}\nmethod:\n  name: {method}\n  lr: {lr}\n"
        f"data:\n  train: {data}\n  max_length: 24\n  eval_fraction: 0.1\n"
        f"training:\n  max_steps: {steps}\n  batch_size: 8\n  seed: 1\n  checkpoint_every: 2\n"
        f"  keep_checkpoints: 2\n  output_dir: {out}\n{extra}")
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return info.value.code, captured.out + captured.err


def error_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.startswith("fuyou: error:")]
    assert len(lines) == 1, text
    return lines[0]


def spawn(*args: str, crash_at: str | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FUYOU_CRASH_AT"}
    if crash_at:
        env["FUYOU_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "fuyoucli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def train_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum('"train"' in line for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models, text_data) -> tuple[Path, Path]:
    """(recipe, output folder) of a finished 4-step AdamW run with a checkpoint at step 2."""
    from fuyoucli.recipe import load_recipe
    from fuyoucli.train.run import finetune

    root = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(root / "r.yaml", tiny_models["llama"], text_data, root / "run")
    finetune(load_recipe(recipe))
    return recipe, root / "run"


# ---- 1: one process per folder -----------------------------------------------------------------------


def test_a_second_process_on_a_live_run_is_refused_naming_the_holder(tmp_path, tiny_models, text_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, steps=100000)
    first = spawn("finetune", recipe, "--quiet")
    try:
        deadline = time.monotonic() + 180
        while first.poll() is None and train_rows(out) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        others = [spawn("finetune", recipe, "--resume", "--quiet"), spawn("finetune", recipe, "--overwrite", "--quiet"),
                  spawn("export", out, tmp_path / "hf")]
        for proc in others:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 1, err
            assert "Traceback" not in err and f"PID {first.pid}" in error_line(err), err
        assert first.poll() is None  # untouched: it is still training, its checkpoints and model in place
        assert (out / "checkpoints").is_dir()
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # A SIGKILL leaves the lock file behind but no lock: the next run takes the folder over.
    assert (out / ".fuyou.lock").read_text().strip() == str(first.pid)
    rerun = spawn("finetune", recipe, "--overwrite", "--quiet", "--set", "training.max_steps=2")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert (out / "model").is_dir() and not (out / ".fuyou.lock").exists()


# ---- 2: an export never writes onto its source -------------------------------------------------------


def test_export_onto_or_inside_or_around_its_source_is_refused(capsys, tmp_path, finished_run):
    _, run = finished_run
    ckpt = run / "checkpoints" / "step-00000002"
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    link = tmp_path / "link"
    link.symlink_to(run)
    for source, dest in [(run, run), (ckpt, ckpt), (run, run / "inside"), (ckpt, run), (run / "model", run),
                         (run, link), (run, tmp_path / "link" / "model" / "x")]:
        code, text = cli(capsys, "export", source, dest, "--overwrite")
        assert code == 2 and "source" in error_line(text), (source, dest, text)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


# ---- 3: what a kill leaves behind is removed by the next run or export -------------------------------


def test_killed_final_save_and_export_leave_no_temporaries_after_the_next_run(capsys, tmp_path, tiny_models,
                                                                           text_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, steps=3)
    proc = spawn("finetune", recipe, "--quiet", crash_at="final_model:3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert [p.name for p in out.iterdir() if p.name.startswith(".model.tmp-")]
    code, text = cli(capsys, "finetune", recipe, "--resume", "--quiet")
    assert code == 0, text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".model.")]

    proc = spawn("export", out, tmp_path / "hf", crash_at="export:3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp-")]
    code, text = cli(capsys, "export", out, tmp_path / "hf")
    assert code == 0, text
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


# ---- 5: every file of a checkpoint is checked before anything is touched -----------------------------


def _mutations(path: Path):
    """(label, function that damages `path` in place) for one checkpoint file."""
    def truncate():
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    def flip(at: float):
        def run():
            data = bytearray(path.read_bytes())
            data[int(len(data) * at)] ^= 0x5A
            path.write_bytes(bytes(data))
        return run

    keys = list(json.loads(path.read_text())) if path.suffix == ".json" else []
    yield "truncate", truncate
    for at in (0.0, 0.3, 0.99):
        yield f"flip@{at}", flip(at)
    yield "delete", path.unlink
    if keys:
        for key in keys:
            def drop(key=key):
                doc = json.loads(path.read_text())
                del doc[key]
                path.write_text(json.dumps(doc))

            def edit(key=key):
                doc = json.loads(path.read_text())
                value = doc[key]
                doc[key] = (value - 1 if value else 7) if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    else {} if isinstance(value, (list, str)) else [] if isinstance(value, dict) else 1
                path.write_text(json.dumps(doc))
            yield f"drop {key}", drop
            yield f"edit {key}", edit


def test_fuzzed_checkpoints_are_refused_in_one_line_before_metrics_are_touched(capsys, tmp_path, finished_run):
    recipe_path, finished = finished_run
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_path.read_text().replace(str(finished), str(out)))
    ckpt = out / "checkpoints" / "step-00000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    metrics = (out / "metrics.jsonl").read_bytes()
    tried = 0
    for name in sorted(p.name for p in pristine.iterdir()):
        for label, damage in _mutations(ckpt / name):
            shutil.rmtree(ckpt)
            shutil.copytree(pristine, ckpt)
            damage()
            code, text = cli(capsys, "finetune", recipe, "--resume", str(ckpt), "--quiet")
            assert code == 2 and "checkpoint" in error_line(text), (name, label, text)
            assert (out / "metrics.jsonl").read_bytes() == metrics, (name, label)
            tried += 1
    assert tried > 30
    # A state.json whose checksum was made to match (a bug, or a hand edit that re-signed it) is still checked.
    for key in ("data", "rng", "keys", "total_steps"):
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        doc = json.loads((ckpt / "state.json").read_text())
        doc[key] = {"python": [3, [1, 2], None]} if key == "rng" else {} if key == "keys" else "x"
        (ckpt / "state.json").write_text(json.dumps(doc))
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        files["state.json"] = _file_entry(ckpt / "state.json")
        _write_manifest(ckpt, files)
        code, text = cli(capsys, "finetune", recipe, "--resume", str(ckpt), "--quiet")
        assert code == 2 and "damaged" in error_line(text), (key, text)
        assert (out / "metrics.jsonl").read_bytes() == metrics, key


# ---- 6: a start that completed no step is not a run --------------------------------------------------


def test_a_start_killed_before_its_first_step_is_no_run(capsys, tmp_path, tiny_models, text_data):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, steps=2)
    proc = spawn("finetune", recipe, "--quiet", crash_at="step:1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert (out / "metrics.jsonl").is_file() and train_rows(out) == 0
    code, text = cli(capsys, "finetune", recipe, "--resume", "--quiet")
    assert code == 2 and "without --resume" in error_line(text), text
    code, text = cli(capsys, "finetune", recipe, "--quiet")
    assert code == 0, text
    assert train_rows(out) == 2 and (out / "model").is_dir()


# ---- 7: a loss that stops being finite stops the run -------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_non_finite_loss_stops_the_run_with_exit_4(capsys, tmp_path, tiny_models, text_data, dtype):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, steps=60, lr="1.0e30",
                          extra="  eval_before: false\n")
    recipe.write_text(recipe.read_text().replace("  checkpoint_every: 2\n", "  checkpoint_every: 0\n")
                      .replace("model:\n", f"model:\n  dtype: {dtype}\n"))
    code, text = cli(capsys, "finetune", recipe, "--quiet")
    assert code == 4 and "lower method.lr" in error_line(text), text
    assert not (out / "model").exists()
    steps = train_rows(out)
    # fp32: the first non-finite step ends it; fp16: at most 17 skipped in a row (2**16 halved to its floor).
    assert steps <= (3 if dtype == "float32" else 20), steps


# ---- 13: a run folder exports its final model, and says which step -----------------------------------


def test_lora_run_exports_its_final_weights_merged(capsys, tmp_path, tiny_models, text_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    lora = "peft:\n  type: lora\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, extra=lora)
    code, text = cli(capsys, "finetune", recipe, "--quiet")
    assert code == 0, text
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]),
                                          out / "model").merge_and_unload().state_dict()
    code, text = cli(capsys, "export", out, tmp_path / "merged", "--merge")
    assert code == 0 and "step 4 (final model)" in text, text
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(merged[k], reference[k]) for k in merged) and len(merged) > 0
    code, text = cli(capsys, "export", out / "model", tmp_path / "adapter")
    assert code == 0 and "step 4" in text, text
    exported, saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), \
        load_file(out / "model" / "adapter_model.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    code, text = cli(capsys, "export", out / "checkpoints" / "step-00000002", tmp_path / "two")
    assert code == 0 and "step 2 (checkpoint)" in text, text
    shutil.rmtree(out / "model")  # as a run killed before its final save leaves it
    code, text = cli(capsys, "export", out, tmp_path / "none")
    assert code == 2 and "did not finish" in error_line(text) and "step-00000002" in text, text


# ---- 15: a resume on other data is refused unless allowed --------------------------------------------


def test_resume_after_the_data_changed_is_refused_unless_allowed(capsys, tmp_path, tiny_models, text_data):
    data = tmp_path / "data.jsonl"
    shutil.copy(text_data, data)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], data, out)
    assert cli(capsys, "finetune", recipe, "--quiet")[0] == 0
    with data.open("a") as f:
        f.write(json.dumps({"text": "an extra line that was not there"}) + "\n")
    metrics = (out / "metrics.jsonl").read_bytes()
    code, text = cli(capsys, "finetune", recipe, "--resume", "--quiet")
    assert code == 2 and "other data" in error_line(text) and "--allow-data-change" in text, text
    assert (out / "metrics.jsonl").read_bytes() == metrics
    code, text = cli(capsys, "finetune", recipe, "--resume", "--allow-data-change", "--plain")
    assert code == 0 and "warning: data.train" in text, text
    assert list_checkpoints(out / "checkpoints")
