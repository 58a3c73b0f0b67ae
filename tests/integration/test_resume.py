"""Checkpoints and exact resume: a `fuyou finetune` killed (SIGKILL, Ctrl-C) mid-step or mid-checkpoint-write,
then resumed, ends with the same loss sequence and the same final weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fuyoucli.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.jsonl import comparable, read_metrics
from fuyoucli.train.run import finetune

STEPS = 10

METHODS = {
    "zo2": "method:\n  name: zo2\n  lr: 1.0e-2\n  eps: 1.0e-2\n  q: 2\n",
    "adamw": "method:\n  name: adamw\n  lr: 3.0e-3\n",
}


def write_recipe(path: Path, model: Path, data: Path, out: Path, method: str, extra: str = "") -> Path:
    path.write_text(
        f"name: resume-test\nmodel:\n  path: {model}\n{METHODS[method]}"
        f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"training:\n  max_steps: {STEPS}\n  batch_size: 16\n  seed: 1\n  eval_every: 3\n  checkpoint_every: 2\n"
        f"  keep_checkpoints: 2\n  output_dir: {out}\n{extra}"
    )
    return path


STREAM_SSD = "offload:\n  mode: stream\n  swap_dir: {swap}\n  weights_home: ssd\nhardware:\n  preset: cpu-laptop-8c-32g\n"
OPT_SSD = "  optimizer_home: ssd\n"


def launch(recipe: Path, *args: str, crash_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("FUYOU_CRASH_AT", None)
    if crash_at:
        env["FUYOU_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "fuyoucli", "finetune", str(recipe), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def train_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            steps.append(row["step"])
    return steps


def wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any(s >= step for s in train_steps(out)):
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()


def comparable_rows(out: Path) -> list[dict]:
    return [comparable(r) for r in read_metrics(out / "metrics.jsonl")]


def assert_same_run(a: Path, b: Path) -> None:
    assert comparable_rows(b) == comparable_rows(a)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# How each run is stopped, in order; after the last, the test resumes it to the end in-process.
# crash NAME:STEP: SIGKILL at that point (FUYOU_CRASH_AT); sigkill/sigint N: a signal once step N is logged.
CASES = {
    "zo2-in-memory": ("zo2", "", [("crash", "checkpoint:4")]),
    "adamw-in-memory": ("adamw", "", [("sigint", 3), ("sigkill", 6)]),
    "zo2-streamed-ssd": ("zo2", STREAM_SSD, [("crash", "step:5"), ("crash", "checkpoint:8")]),
    # Weights and AdamW states on SSD, clipping on (updates deferred past the step's end), dropout.
    "adamw-streamed-ssd": ("adamw", STREAM_SSD.replace("hardware", OPT_SSD + "hardware"), [("crash", "step:5")]),
}


def interrupt(case: str, recipe: Path, out: Path, swap: Path) -> None:
    """Start and stop the run as CASES says (several `fuyou finetune` processes, one after another)."""
    method, extra, interruptions = CASES[case]
    for i, (how, where) in enumerate(interruptions):
        args = ("--resume",) if i else ()
        if how == "crash":
            proc = launch(recipe, *args, crash_at=where)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == -signal.SIGKILL, err
        else:
            proc = launch(recipe, *args)
            wait_for_step(proc, out, where)
            proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGINT)
            _, err = proc.communicate(timeout=300)
            if how == "sigint":
                assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
                saved = list_checkpoints(out / "checkpoints")[-1]
                assert int(saved.name.split("-")[1]) == max(train_steps(out))  # the step it stopped after
            else:
                assert proc.returncode == -signal.SIGKILL, err
        if where == "checkpoint:4":  # killed mid-write: a hidden temporary folder, never a half checkpoint
            assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
            assert any(p.name.startswith(".step-00000004.tmp-") for p in (out / "checkpoints").iterdir())
        if extra:
            assert any(p.name.startswith("fuyou-swap-") for p in swap.iterdir())  # SIGKILL leaves swap files


def test_killed_runs_resume_to_the_same_weights_and_losses(tmp_path, tiny_models, text_data):
    """In-memory zo2 and AdamW (gpt2: dropout, so the RNG state must resume too), zo2 and AdamW streamed from
    SSD, each stopped mid-step or mid-checkpoint-write (the cases run side by side to save wall time)."""
    from concurrent.futures import ThreadPoolExecutor

    setups = {}
    for case, (method, extra, _) in CASES.items():
        d = tmp_path / case
        d.mkdir()
        extra = extra.format(swap=d / "swap")
        model = tiny_models["gpt2" if method == "adamw" else "llama"]
        setups[case] = (write_recipe(d / "ref.yaml", model, text_data, d / "ref", method, extra),
                        write_recipe(d / "r.yaml", model, text_data, d / "run", method, extra), d)
    with ThreadPoolExecutor(len(CASES)) as pool:
        running = {case: pool.submit(interrupt, case, r, d / "run", d / "swap") for case, (_, r, d) in setups.items()}
        for ref, _, _ in setups.values():  # the uninterrupted runs, meanwhile, in this process
            finetune(load_recipe(ref))
        for job in running.values():
            job.result()
    for case, (_, recipe, d) in setups.items():
        out = d / "run"
        finetune(load_recipe(recipe), resume=True)
        assert_same_run(d / "ref", out)
        assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())
        assert len(list_checkpoints(out / "checkpoints")) <= 2
        if CASES[case][1]:
            assert not any((d / "swap").iterdir())  # the killed runs' stale swap folders removed, this run's closed


def test_zo2_seed_ledger_checkpoints_replay_exactly(tmp_path, tiny_models, text_data):
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    model = tiny_models["opt"]
    finetune(load_recipe(write_recipe(tmp_path / "ref.yaml", model, text_data, ref_out, "zo2")))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model, text_data, out, "zo2", "  zo_ledger_steps: 5\n"))
    finetune(recipe)
    # Checkpoints at 2 (full), 4 and 6 (ledgers over 2), 8 (full: 6 steps since 2). Keeping 2 keeps 6 and 8,
    # and 2, the base 6 replays on.
    found = {p.name: json.loads((p / "state.json").read_text()) for p in list_checkpoints(out / "checkpoints")}
    assert sorted(found) == ["step-00000002", "step-00000006", "step-00000008"]
    ledger = found["step-00000006"]
    assert ledger["ledger_base"] == "step-00000002" and [e[0] for e in ledger["ledger"]] == [3, 4, 5, 6]
    assert not list((out / "checkpoints" / "step-00000006").glob("weights*"))
    assert "ledger" not in found["step-00000008"]
    finetune(recipe, resume=str(out / "checkpoints" / "step-00000006"))
    assert_same_run(ref_out, out)


def test_a_seed_ledger_replays_only_with_the_z_that_made_it(tmp_path, tiny_models, text_data, monkeypatch):
    """A ledger holds projected gradients, not z: drawn another way (here torch's CPU generator, as on a
    machine without a C compiler; likewise another device) its steps would give other weights. Resume
    and export refuse it with the way out, and change nothing; the full checkpoint it extends resumes."""
    from fuyoucli.export import export_checkpoint
    from fuyoucli.kernels.normal import z_source

    out = tmp_path / "run"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_models["opt"], text_data, out, "zo2",
                                      "  zo_ledger_steps: 5\n"), ["training.max_steps=7"])
    finetune(recipe)
    ledger = out / "checkpoints" / "step-00000006"
    state = json.loads((ledger / "state.json").read_text())
    assert state["ledger_base"] == "step-00000002" and state["trainer"]["z_source"] == z_source("cpu")
    monkeypatch.setenv("FUYOU_NATIVE_KERNELS", "0")
    if z_source("cpu") == state["trainer"]["z_source"]:
        pytest.skip("no C compiler: z is drawn by torch's generator either way")
    with pytest.raises(CheckpointError, match="seed ledger: its z was drawn by counter-normal-1 and would be drawn "
                                              "here by torch-cpu.*--resume .*step-00000002"):
        finetune(recipe, resume=str(ledger))
    with pytest.raises(CheckpointError, match="seed ledger: its z was drawn by counter-normal-1.*export the full "
                                              "checkpoint it extends"):
        export_checkpoint(ledger, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()
    assert json.loads((ledger / "state.json").read_text()) == state
    finetune(recipe, resume=str(out / "checkpoints" / "step-00000002"))
    assert train_steps(out)[-1] == 7


def test_corrupt_missing_and_foreign_checkpoints_are_refused(tmp_path, tiny_models, text_data):
    out = tmp_path / "run"
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, "zo2")
    recipe = load_recipe(recipe_path, ["training.max_steps=4"])
    finetune(recipe)
    ckpt = list_checkpoints(out / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match="different run: method.lr"):
        finetune(load_recipe(recipe_path, ["training.max_steps=4", "method.lr=0.5"]), resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        finetune(recipe, resume=str(tmp_path / "nowhere"))
    weights = ckpt / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged: weights.safetensors does not match its checksum"):
        finetune(recipe, resume=True)
    (ckpt / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        finetune(recipe, resume=str(ckpt))


def test_a_second_ctrl_c_while_stopping_prints_no_traceback(tmp_path, tiny_models, text_data):
    """Ctrl-C, then Ctrl-C again 50 ms later (and every 50 ms until the process ends): the first stops the run
    after a checkpoint; the later ones land while it shuts down (its atexit callbacks included) and must not
    print an "Exception ignored in atexit callback ... KeyboardInterrupt" traceback."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, "zo2")
    proc = subprocess.Popen([sys.executable, "-m", "fuyoucli", "finetune", str(recipe), "--quiet",
                             "--set", "training.max_steps=100000", "--set", "training.eval_every=0",
                             "--set", "hardware.preset=cpu-laptop-8c-32g"],  # no profiling
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    saved = list_checkpoints(out / "checkpoints")
    assert saved
    for ckpt in saved:  # verified against its checksum manifest
        load_checkpoint(ckpt)
