"""The live dashboard of `fuyou finetune` on a terminal: one sink over the run's events (rich Live).

Telemetry stage, the only place besides the CLI that draws with rich. Shows progress with an ETA, the
loss with a sparkline, the last evaluation, tokens/s and the step time split into compute / waiting
on a fetch / waiting on SSD / CPU optimizer, the links' measured rates, each figure beside what the
plan predicted (with a warning when the step time drifts more than 25% from it), and the machine:
GPU (NVML, when nvidia-ml-py is installed), CPU and RAM (psutil), the swap disk's MB/s (psutil disk
counters). Sampling the machine never fails the run: a figure that cannot be read shows as "-".
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from pathlib import Path

from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fuyoucli.telemetry.events import (CheckpointSaved, EvalDone, EvalStarted, Event, RunFinished, RunInterrupted,
                                       RunStarted, StepDone)

DRIFT = 0.25
SPARK = "▁▂▃▄▅▆▇█"
GiB = 1 << 30


def sparkline(values: list[float], width: int = 40) -> str:
    values = [v for v in values if v == v][-width:]  # drop NaN
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)


def _dur(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def drift(measured_s: float | None, planned_s: float | None) -> float | None:
    """measured / planned - 1, or None when either is unknown."""
    if not measured_s or not planned_s:
        return None
    return measured_s / planned_s - 1.0


def _disk_of(path: str | None) -> str | None:
    """The psutil disk-counter name of the device holding `path` (e.g. 'nvme0n1p2'), when it can be told."""
    if not path:
        return None
    try:
        import psutil

        target = os.path.realpath(Path(path).expanduser())
        best = None
        for part in psutil.disk_partitions(all=False):
            if (target == part.mountpoint or target.startswith(part.mountpoint.rstrip("/") + "/")) and \
                    (best is None or len(part.mountpoint) > len(best.mountpoint)):
                best = part
        if best is None:
            return None
        name = os.path.basename(os.path.realpath(best.device))
        return name if name in psutil.disk_io_counters(perdisk=True) else None
    except Exception:  # noqa: BLE001 - a figure the dashboard cannot read is shown as "-"
        return None


class _Machine:
    """Samples CPU, RAM, the swap disk and the GPU (each optional)."""

    def __init__(self, swap_dir: str | None, gpu: bool):
        self.disk = _disk_of(swap_dir)
        self._last_disk: tuple[float, int, int] | None = None
        self.nvml = None
        if gpu:
            try:
                import pynvml  # nvidia-ml-py

                pynvml.nvmlInit()
                self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:  # noqa: BLE001 - no NVML: no GPU figures
                self.nvml = None

    def sample(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        try:
            import psutil

            out["cpu_percent"] = psutil.cpu_percent(interval=None)
            vm = psutil.virtual_memory()
            out["ram_used"], out["ram_total"] = float(vm.total - vm.available), float(vm.total)
            if self.disk is not None:
                c = psutil.disk_io_counters(perdisk=True)[self.disk]
                now = time.monotonic()
                if self._last_disk is not None and now > self._last_disk[0]:
                    dt = now - self._last_disk[0]
                    out["disk_read_bps"] = (c.read_bytes - self._last_disk[1]) / dt
                    out["disk_write_bps"] = (c.write_bytes - self._last_disk[2]) / dt
                self._last_disk = (now, c.read_bytes, c.write_bytes)
        except Exception:  # noqa: BLE001
            pass
        if self.nvml is not None:
            try:
                nv, handle = self.nvml
                out["gpu_util"] = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                out["gpu_used"], out["gpu_total"] = float(mem.used), float(mem.total)
            except Exception:  # noqa: BLE001
                pass
        return out


class DashboardSink:
    def __init__(self, console: Console | None = None, *, swap_dir: str | None = None, refresh_per_second: float = 2.0,
                 sample_machine: bool = True):
        from rich.live import Live

        self.console = console or Console(highlight=False)
        self.swap_dir, self.sample_machine = swap_dir, sample_machine
        self.started: RunStarted | None = None
        self.step = 0
        self.losses: deque[float] = deque(maxlen=60)
        self.step_times: deque[float] = deque(maxlen=20)
        self.extras: deque[dict] = deque(maxlen=20)
        self.last: StepDone | None = None
        self.last_eval: EvalDone | None = None
        self.evaluating: EvalStarted | None = None
        self.checkpoint: CheckpointSaved | None = None
        self.t0 = time.monotonic()
        self.first_step_at: float | None = None
        self.steps_timed = 0
        self.machine: _Machine | None = None
        self.machine_now: dict = {}
        self._running = False
        self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=refresh_per_second,
                         transient=False, redirect_stdout=False, redirect_stderr=False)

    # -- events -------------------------------------------------------------------------------------

    def handle(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.started, self.step = event, event.start_step
            c = self.console
            c.print(f"[bold]fuyou[/] {escape(event.name)}: {escape(event.method)} on {escape(event.model)}"
                    + (f" (resuming after step {event.start_step})" if event.start_step else ""), highlight=False)
            c.print(f"  device {event.device}, offload {event.offload}", markup=False, highlight=False)
            c.print(f"  {event.trainable_params:,} trainable of {event.total_params:,} parameters; "
                    f"{event.train_examples} train / {event.eval_examples} eval examples -> {event.output_dir}",
                    markup=False, highlight=False)
            for note in event.notes:
                c.print(f"  {note}", markup=False, highlight=False)
            if self.sample_machine:
                self.machine = _Machine(self.swap_dir, gpu=event.device.startswith("cuda"))
            self.live.start()
            self._running = True
        elif isinstance(event, StepDone):
            now = time.monotonic()
            if self.first_step_at is None:
                self.first_step_at = now - event.step_time_s
            self.step, self.last = event.step, event
            self.steps_timed += 1
            self.losses.append(event.loss)
            self.step_times.append(event.step_time_s)
            self.extras.append(event.extra)
            if self.machine is not None:
                self.machine_now = self.machine.sample()
        elif isinstance(event, EvalStarted):
            self.evaluating = event
        elif isinstance(event, EvalDone):
            self.last_eval, self.evaluating = event, None
        elif isinstance(event, CheckpointSaved):
            self.checkpoint = event
        elif isinstance(event, RunInterrupted):
            self._stop()
            where = f"; checkpoint {event.checkpoint}" if event.checkpoint else ""
            hint = f"; {event.resume_hint}" if event.checkpoint and event.resume_hint else ""
            self.console.print(f"stopped after step {event.step}{where}{hint}", markup=False, highlight=False)
        elif isinstance(event, RunFinished):
            self._stop()
            self.console.print(f"done: {event.steps} steps in {event.wall_time_s:.1f} s; model saved to "
                               f"{event.model_dir}", markup=False, highlight=False)
            for label, ev in (("before", event.first_eval), ("after", event.last_eval)):
                if ev is not None and event.first_eval and event.last_eval:
                    self.console.print(f"  {label}: {_eval_text(ev)}", markup=False, highlight=False)
        if self._running:
            self.live.refresh()

    def _stop(self) -> None:
        if self._running:
            self._running = False
            self.live.stop()

    def close(self) -> None:
        self._stop()

    # -- drawing ------------------------------------------------------------------------------------

    def measured_step_s(self) -> float | None:
        """Median of the recent steps, leaving out the first two of the run (warm-up)."""
        times = list(self.step_times)[2:] if self.steps_timed <= len(self.step_times) else list(self.step_times)
        return statistics.median(times) if times else None

    def recent_extra(self) -> dict[str, float]:
        """Each per-step figure's median over the recent steps (one slow step does not jump the display)."""
        extras = list(self.extras)[2:] if self.steps_timed <= len(self.extras) else list(self.extras)
        extras = extras or list(self.extras)[-1:]
        keys = {k for e in extras for k, v in e.items() if isinstance(v, (int, float))}
        return {k: statistics.median(e[k] for e in extras if k in e) for k in keys}

    def render(self):
        try:
            return self._render()
        except Exception as e:  # noqa: BLE001 - the display must never stop a run
            return Text(f"(dashboard: {type(e).__name__}: {e}; the run goes on, metrics.jsonl has every step)")

    def _render(self):
        s = self.started
        if s is None:
            return Text("")
        total, start = max(1, s.total_steps), s.start_step
        done_here = self.step - start
        elapsed = time.monotonic() - self.t0
        eta = None
        if done_here > 0 and self.first_step_at is not None:
            per_step = (time.monotonic() - self.first_step_at) / done_here
            eta = per_step * (total - self.step)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=self.step, width=60),
                    Text(f"step {self.step}/{total}  {self.step / total:.0%}  elapsed {_dur(elapsed)}  "
                         + (f"evaluating {self.evaluating.examples} examples…" if self.evaluating
                            else f"ETA {_dur(eta) if eta is not None else '-'}")))

        plan = s.planned
        last = self.last
        x = self.recent_extra()
        measured = self.measured_step_s()
        tok_s = (last.tokens / measured) if last and measured else None
        rows = Table(box=None, padding=(0, 2), show_edge=False, header_style="bold")
        rows.add_column("")
        rows.add_column("measured", justify="right")
        rows.add_column("plan", justify="right")
        rows.add_column("", justify="left")
        d = drift(measured, plan.get("step_s"))
        rows.add_row("step time", _s(measured), _s(plan.get("step_s")),
                     Text(f"{d:+.0%}", style="yellow" if abs(d) > DRIFT else "dim") if d is not None else "")
        rows.add_row("tokens/s", f"{tok_s:,.0f}" if tok_s else "-",
                     f"{plan['tokens_per_s']:,.0f}" if plan.get("tokens_per_s") else "-", "")
        if "compute_s" in x:
            rows.add_row("  compute", _s(x.get("compute_s")), _s(plan.get("gpu_s")), "")
            rows.add_row("  waiting on fetch", _s(x.get("wait_fetch_s")), "", "")
            rows.add_row("  waiting on SSD", _s(x.get("wait_ssd_s")), "", "")
            rows.add_row("  CPU optimizer", _s(x.get("cpu_optimizer_s")), _s(plan.get("cpu_optimizer_s")), "busy")
            for label, key, nbytes in (("H2D", "h2d", "h2d_bytes"), ("D2H", "d2h", "d2h_bytes"),
                                       ("SSD read", "ssd_read", "ssd_read_bytes"),
                                       ("SSD write", "ssd_write", "ssd_write_bytes")):
                busy, moved = x.get(f"{key}_s"), x.get(nbytes, 0.0)
                rate = f"{moved / busy / 1e9:.2f} GB/s" if busy and moved else "-"
                rows.add_row(f"  {label}", _s(busy), _s(plan.get(f"{key}_s")),
                             f"{moved / 1e6:,.1f} MB at {rate}" if moved else "")
        else:
            rows.add_row("  compute", _s(measured), _s(plan.get("gpu_s")), "in memory: all of the step")

        loss = Table.grid(padding=(0, 2))
        loss.add_row(Text("loss", style="bold"), f"{last.loss:.4f}" if last else "-",
                     Text(sparkline(list(self.losses)), style="cyan"),
                     f"lr {last.lr:.2e}" if last else "")
        if self.last_eval:
            e = self.last_eval
            loss.add_row(Text("eval", style="bold"), f"{e.loss:.4f}",
                         f"ppl {e.perplexity:.2f}" + (f"  accuracy {e.accuracy:.1%}" if e.accuracy is not None else ""),
                         f"at step {e.step}")

        m = self.machine_now
        machine = Table.grid(padding=(0, 2))
        gpu = (f"{m['gpu_util']:.0f}% util, {m['gpu_used'] / GiB:.1f} / {m['gpu_total'] / GiB:.1f} GiB"
               if "gpu_util" in m else "none (computing on the CPU)" if s.device == "cpu"
               else "- (install nvidia-ml-py for GPU figures)")
        machine.add_row(Text("GPU", style="bold"), gpu,
                        f"plan {plan['device_bytes'] / GiB:.1f} GiB" if plan.get("device_bytes") and "gpu_util" in m else "")
        if "device_peak_reserved_bytes" in x:  # the allocator's high-water mark, from the step's metrics
            machine.add_row(Text("GPU peak", style="bold"), f"{x['device_peak_reserved_bytes'] / GiB:.2f} GiB reserved",
                            f"plan {plan['device_bytes'] / GiB:.2f} GiB" if plan.get("device_bytes") else "", "")
        ram = f"{m['ram_used'] / GiB:.1f} / {m['ram_total'] / GiB:.1f} GiB" if "ram_used" in m else "-"
        cpu = f"{m['cpu_percent']:.0f}%" if "cpu_percent" in m else "-"
        pinned = f"pinned {plan['pinned_bytes'] / GiB:.2f} GiB (plan)" if plan.get("pinned_bytes") else ""
        machine.add_row(Text("CPU", style="bold"), cpu, f"RAM {ram}", pinned)
        if "disk_read_bps" in m:
            machine.add_row(Text("swap disk", style="bold"),
                            f"read {m['disk_read_bps'] / 1e6:,.0f} MB/s  write {m['disk_write_bps'] / 1e6:,.0f} MB/s",
                            "", "")
        if self.checkpoint:
            c = self.checkpoint
            machine.add_row(Text("checkpoint", style="bold"), f"step {c.step} ({c.kind}, {c.nbytes / 1e6:,.1f} MB, "
                            f"{c.seconds:.1f} s)", Text(os.path.basename(c.path), overflow="ellipsis"), "")

        parts = [bar, Text(""), loss, Text(""), rows, Text(""), machine]
        if d is not None and abs(d) > DRIFT:
            parts.append(Text(f"warning: the measured step time ({_s(measured)}) is {abs(d):.0%} "
                              f"{'above' if d > 0 else 'below'} the plan's ({_s(plan.get('step_s'))}): the hardware "
                              "profile may be stale (`fuyou profile`) or the machine busy", style="bold yellow"))
        return Panel(Group(*parts), title=f"fuyou · {escape(s.name)} · {escape(s.method)}", title_align="left", border_style="blue")


def _eval_text(e: EvalDone) -> str:
    text = f"eval loss {e.loss:.4f}  ppl {e.perplexity:.2f}"
    if e.accuracy is not None:
        text += f"  accuracy {e.accuracy:.1%}"
    return text
