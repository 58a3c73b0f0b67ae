"""Telemetry sinks without a run: the dashboard renders (and warns on drift), the trace is valid Chrome
trace JSON with one track per lane, JSON logs are one object per line, spans add up per lane."""

from __future__ import annotations

import io
import json

from rich.console import Console

from fuyoucli.telemetry.dashboard import DashboardSink, drift, sparkline
from fuyoucli.telemetry.events import CheckpointSaved, EvalDone, EvalStarted, RunFinished, RunStarted, StepDone
from fuyoucli.telemetry.jsonl import JsonLogSink
from fuyoucli.telemetry.timeline import LANES, Span, busy_seconds
from fuyoucli.telemetry.trace import TRACKS, TraceSink

PLANNED = {"step_s": 0.10, "gpu_s": 0.06, "h2d_s": 0.04, "d2h_s": 0.04, "ssd_read_s": 0.02, "ssd_write_s": 0.02,
           "cpu_optimizer_s": 0.0, "tokens_per_s": 10000.0, "device_bytes": 2.0 * 2**30, "pinned_bytes": 2.0**30}


def started(**kw) -> RunStarted:
    return RunStarted(name="t", method="zo2", model="m", device="cpu", offload="zo2 streamed", total_steps=10,
                      trainable_params=10, total_params=10, train_examples=8, eval_examples=2, output_dir="out",
                      notes=("a note [with brackets]",), planned=PLANNED, **kw)


def step(n: int, seconds: float, t0: float = 0.0) -> StepDone:
    spans = (Span("compute", "layers.0", t0, t0 + seconds * 0.6), Span("wait_fetch", "layers.1", t0 + 0.01, t0 + 0.02),
             Span("upload", "1 MB", t0, t0 + 0.03), Span("offload", "1 MB", t0 + 0.03, t0 + 0.05),
             Span("ssd_read", "block-0001", t0, t0 + 0.02), Span("ssd_write", "block-0001", t0 + 0.05, t0 + 0.06))
    extra = {"compute_s": seconds * 0.8, "wait_fetch_s": 0.01, "wait_ssd_s": 0.0, "h2d_s": 0.03, "d2h_s": 0.02,
             "ssd_read_s": 0.02, "ssd_write_s": 0.01, "cpu_optimizer_s": 0.0, "h2d_bytes": 1e6, "d2h_bytes": 1e6,
             "ssd_read_bytes": 1e6, "ssd_write_bytes": 1e6}
    return StepDone(step=n, loss=3.0 - 0.1 * n, lr=1e-3, tokens=1000, step_time_s=seconds, extra=extra, spans=spans,
                    started_s=t0)


def run_dashboard(seconds: float) -> str:
    out = io.StringIO()
    sink = DashboardSink(Console(file=out, force_terminal=True, width=120, height=40), sample_machine=False)
    sink.handle(started())
    for n in range(1, 8):
        sink.handle(step(n, seconds, t0=n * 1.0))
    sink.handle(EvalDone(step=7, loss=2.5, perplexity=12.2, accuracy=0.75, examples=2))
    sink.handle(CheckpointSaved(step=7, path="out/checkpoints/step-00000007", nbytes=10**6, seconds=0.2, kind="full"))
    rendered = io.StringIO()
    Console(file=rendered, width=120, force_terminal=False).print(sink.render())
    sink.handle(RunFinished(steps=7, wall_time_s=1.0, model_dir="out/model", first_eval=None, last_eval=None))
    sink.close()
    return rendered.getvalue() + out.getvalue()


def test_dashboard_renders_every_figure_beside_the_plan():
    text = run_dashboard(0.11)
    for needle in ("step 7/10", "ETA", "loss", "eval", "accuracy 75.0%", "step time", "tokens/s", "compute",
                   "waiting on fetch", "waiting on SSD", "CPU optimizer", "H2D", "SSD write", "checkpoint",
                   "step 7 (full", "done: 7 steps", "a note [with brackets]", "measured", "plan"):
        assert needle in text, needle
    assert "warning" not in text  # 110 ms against a 100 ms plan: within 25%


def test_dashboard_warns_when_the_step_time_drifts_from_the_plan():
    text = run_dashboard(0.2)
    assert "warning: the measured step time" in text and "100% above the plan" in text


def test_sparkline_and_drift():
    assert sparkline([1, 2, 3, 4]) == "▁▃▆█"
    assert sparkline([2, 2]) == "▁▁" and sparkline([]) == ""
    assert drift(0.125, 0.1) == 0.25 and drift(None, 0.1) is None and drift(0.1, 0.0) is None


def test_busy_seconds_counts_overlap_once():
    spans = [Span("upload", "a", 0.0, 1.0), Span("upload", "b", 0.5, 1.5), Span("upload", "c", 2.0, 2.5),
             Span("offload", "d", 0.0, 9.0)]
    assert busy_seconds(spans, "upload") == 2.0


def validate_chrome_trace(doc: dict) -> dict[str, list[dict]]:
    """The structure Perfetto and chrome://tracing read: returns the complete events per named track."""
    assert set(doc) >= {"traceEvents"} and isinstance(doc["traceEvents"], list)
    names = {}
    for ev in doc["traceEvents"]:
        assert ev["ph"] in ("M", "X") and isinstance(ev["pid"], int)
        if ev["ph"] == "M" and ev["name"] == "thread_name":
            names[ev["tid"]] = ev["args"]["name"]
    per_track: dict[str, list[dict]] = {}
    for ev in doc["traceEvents"]:
        if ev["ph"] == "X":
            assert isinstance(ev["name"], str) and ev["tid"] in names
            assert isinstance(ev["ts"], (int, float)) and isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0
            per_track.setdefault(names[ev["tid"]], []).append(ev)
    return per_track


def test_trace_sink_writes_a_few_steps_one_track_per_lane(tmp_path):
    path = tmp_path / "trace.json"
    sink = TraceSink(path, steps=3)
    sink.handle(started())
    for n in range(1, 8):
        sink.handle(step(n, 0.1, t0=100.0 + n))
    assert path.is_file()  # written once it had its steps, before the run ends
    sink.close()
    doc = json.loads(path.read_text())
    tracks = validate_chrome_trace(doc)
    assert set(tracks) == {"step", "compute", "upload", "offload", "ssd_read", "ssd_write"}
    assert [ev["name"] for ev in tracks["step"]] == ["step 2", "step 3", "step 4"]  # step 1 warms up
    assert any(ev["name"].startswith("waiting for the upload") for ev in tracks["compute"])
    assert tracks["step"][0]["ts"] == 0 and tracks["step"][1]["ts"] == 1e6
    assert TRACKS[1:] == LANES


def test_json_logs_are_one_object_per_line():
    out = io.StringIO()
    sink = JsonLogSink(out)
    sink.handle(started())
    sink.handle(step(1, 0.1))
    sink.handle(EvalDone(step=1, loss=2.0, perplexity=7.4, accuracy=None, examples=2))
    sink.handle(RunFinished(steps=1, wall_time_s=1.0, model_dir="m", first_eval=None, last_eval=None))
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in rows] == ["run_started", "step", "eval", "run_finished"]
    assert rows[1]["step"] == 1 and "spans" not in rows[1] and rows[1]["compute_s"] > 0


def test_only_the_dashboard_draws_and_the_timeline_is_plain_python():
    """STYLE.md 10: the engine and the trainers emit; the dashboard (and the CLI) draw."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).parents[2] / "fuyoucli"

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    for path in [*pkg.joinpath("engine").rglob("*.py"), *pkg.joinpath("telemetry").glob("*.py"),
                 pkg / "export.py", pkg / "checkpoint.py"]:
        if path.name not in ("dashboard.py", "console.py"):
            assert "rich" not in imports(path), path
    for name in ("timeline.py", "events.py", "trace.py", "report.py"):
        assert "torch" not in imports(pkg / "telemetry" / name), name


def test_dashboard_shows_the_device_peak_beside_the_plan():
    """A GPU run's steps carry the allocator's peak (metrics.jsonl device_peak_reserved_bytes); the
    dashboard puts it beside the plan's device bytes."""
    out = io.StringIO()
    sink = DashboardSink(Console(file=out, force_terminal=True, width=120, height=40), sample_machine=False)
    sink.handle(started())
    for n in range(1, 4):
        s = step(n, 0.1)
        sink.handle(StepDone(step=s.step, loss=s.loss, lr=s.lr, tokens=s.tokens, step_time_s=s.step_time_s,
                             extra={**s.extra, "device_peak_reserved_bytes": 3 * 2**30}, spans=s.spans))
    rendered = io.StringIO()
    Console(file=rendered, width=120, force_terminal=False).print(sink.render())
    sink.close()
    line = next(x for x in rendered.getvalue().splitlines() if "GPU peak" in x)
    assert "3.00 GiB reserved" in line and "plan 2.00 GiB" in line
    assert "GPU peak" not in run_dashboard(0.11)  # a CPU run has none


def test_dashboard_says_it_is_evaluating_until_the_evaluation_ends():
    """The first evaluation runs before step 1: without a sign the dashboard reads "step 0/10 0% ETA -" as if stuck."""
    sink = DashboardSink(Console(file=io.StringIO(), force_terminal=True, width=120, height=40), sample_machine=False)

    def shown() -> str:
        console = Console(record=True, width=120, file=io.StringIO())
        console.print(sink.render())
        return console.export_text()

    sink.handle(started())
    assert "evaluating" not in shown()
    sink.handle(EvalStarted(step=0, examples=2))
    assert "step 0/10" in shown() and "evaluating 2 examples…" in shown()
    sink.handle(EvalDone(step=0, loss=2.5, perplexity=12.2, accuracy=None, examples=2))
    assert "evaluating" not in shown()
    sink.close()


def test_a_run_emits_eval_started_before_each_evaluation(tmp_path, tiny_models, text_data):
    from fuyoucli.recipe import load_recipe
    from fuyoucli.train.run import finetune

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: t\nmodel:\n  path: {tiny_models['llama']}\nmethod:\n  name: zo2\n"
                      f"data:\n  train: {text_data}\n  max_length: 32\n  eval_fraction: 0.2\n"
                      f"training:\n  max_steps: 2\n  batch_size: 4\n  output_dir: {tmp_path / 'out'}\n")
    seen = []

    class Recorder:
        def handle(self, event):
            seen.append(type(event).__name__)

        def close(self):
            pass

    finetune(load_recipe(recipe), [Recorder()], plan=None)
    evals = [n for n in seen if n.startswith("Eval")]
    assert evals == ["EvalStarted", "EvalDone"] * 2, seen
