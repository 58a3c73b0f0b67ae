"""What a run shows and leaves: plain lines when piped, JSON logs, the live dashboard in a real terminal
(tmux 120x40), a Perfetto trace with the engine's lanes, per-resource times in metrics.jsonl, `fuyou report`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fuyoucli.cli.app import main
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.jsonl import read_metrics
from fuyoucli.telemetry.trace import TraceSink
from fuyoucli.train.run import finetune

sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from test_telemetry import validate_chrome_trace  # noqa: E402

METHODS = {"zo2": "method:\n  name: zo2\n  lr: 1.0e-2\n  eps: 1.0e-2\n", "adamw": "method:\n  name: adamw\n  lr: 3.0e-3\n"}
STREAM = ("offload:\n  mode: stream\n  swap_dir: {swap}\n  weights_home: ssd\n{opt}"
          "hardware:\n  preset: cpu-laptop-8c-32g\n")


def write_recipe(path: Path, model: Path, data: Path, out: Path, method: str = "adamw", extra: str = "",
                 steps: int = 4) -> Path:
    path.write_text(f"name: display-test\nmodel:\n  path: {model}\n{METHODS[method]}"
                    f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
                    f"training:\n  max_steps: {steps}\n  batch_size: 16\n  eval_every: 2\n  output_dir: {out}\n{extra}")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_piped_output_is_plain_lines_then_report(capsys, tmp_path, tiny_models, text_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out)
    code, stdout, err = run_cli(capsys, "finetune", str(recipe), "--trace", str(tmp_path / "t.json"))
    assert code == 0, err
    assert "step     1/4" in stdout and "done: 4 steps" in stdout and "╭" not in stdout
    tracks = validate_chrome_trace(json.loads((tmp_path / "t.json").read_text()))
    assert {"step", "compute"} <= set(tracks)

    code, stdout, err = run_cli(capsys, "report", str(out))
    assert code == 0, err
    for needle in ("train loss", "eval loss", "tokens", "step time", "final model"):
        assert needle in stdout, needle
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "install matplotlib" in stdout
    else:
        assert (out / "report.png").stat().st_size > 1000
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nowhere"))
    assert code == 2 and "no metrics.jsonl" in err


def test_json_logs(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out")
    code, stdout, err = run_cli(capsys, "finetune", str(recipe), "--json-logs")
    assert code == 0, err
    events = [json.loads(line)["event"] for line in stdout.splitlines()]
    assert events[0] == "run_started" and events.count("step") == 4 and events[-1] == "run_finished"


@pytest.mark.parametrize("method", ["zo2", "adamw"])
def test_streamed_runs_trace_every_lane_and_log_where_the_time_went(method, tmp_path, tiny_models, text_data):
    opt = "  optimizer_home: ssd\n" if method == "adamw" else ""
    extra = STREAM.format(swap=tmp_path / "swap", opt=opt)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out",
                                      method, extra, steps=5))
    finetune(recipe, sinks=[TraceSink(tmp_path / "t.json")])
    tracks = validate_chrome_trace(json.loads((tmp_path / "t.json").read_text()))
    expected = {"step", "compute", "ssd_read", "ssd_write"} | ({"cpu_optimizer"} if method == "adamw" else set())
    assert expected <= set(tracks), set(tracks)
    if method == "zo2":  # a CPU device's slots are host memory: the SSD threads read into and write from them
        assert not {"upload", "offload"} & set(tracks), set(tracks)
    rows = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["kind"] == "train"]
    for key in ("compute_s", "wait_fetch_s", "wait_ssd_s", "h2d_s", "ssd_read_s", "cpu_optimizer_s",
                "h2d_bytes", "ssd_read_bytes"):
        assert all(key in r for r in rows), key
    assert all(r["compute_s"] <= r["step_time_s"] for r in rows)
    assert sum(r["ssd_read_bytes"] for r in rows) > 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_dashboard_in_a_real_terminal(tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out", steps=30)
    rc, session = tmp_path / "rc", f"fuyou-test-{uuid.uuid4().hex[:8]}"
    command = f"{sys.executable} -m fuyoucli finetune {recipe} --set training.checkpoint_every=10 2> {tmp_path / 'err'}; " \
              f"echo $? > {rc}; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "40", command], check=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not rc.exists():
            time.sleep(0.5)
        time.sleep(0.3)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert rc.read_text().strip() == "0", (tmp_path / "err").read_text()
    assert "Traceback" not in screen and not (tmp_path / "err").read_text().strip()
    for needle in ("╭─ fuyou · display-test · adamw", "step 30/30", "100%", "step time", "tokens/s", "checkpoint",
                   "done: 30 steps", "╰"):
        assert needle in screen, screen
    assert max(len(line) for line in screen.splitlines()) <= 120
