"""`fuyou report OUTPUT_DIR`: a run's summary from its metrics.jsonl, and a PNG plot when matplotlib is
installed (the optional `plot` extra).

Telemetry stage: reads what the JSONL sink wrote; no torch, no rich (the CLI draws the summary).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from fuyoucli.checkpoint import checkpoint_root, list_checkpoints
from fuyoucli.errors import InputError

SPLIT = (("compute", "compute_s"), ("waiting on fetch", "wait_fetch_s"), ("waiting on SSD", "wait_ssd_s"),
         ("CPU optimizer (busy)", "cpu_optimizer_s"))
LINKS = (("H2D", "h2d"), ("D2H", "d2h"), ("SSD read", "ssd_read"), ("SSD write", "ssd_write"))


NUMBERS = {"train": ("step", "loss", "step_time_s"), "eval": ("step", "loss", "perplexity")}
"""The fields the summary computes with, per row kind: a row without one is not a row fuyou wrote."""


def load_rows(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        raise InputError(f"no metrics.jsonl in {output_dir}: point fuyou report at a run's training.output_dir")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}): not a metrics.jsonl that fuyou wrote") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if not (isinstance(row, dict) and "step" in row):
            continue
        missing = [k for k in NUMBERS.get(row.get("kind"), ())
                   if isinstance(row.get(k), bool) or not isinstance(row.get(k), (int, float))]
        if missing:
            raise InputError(f"{path}:{number}: a {row['kind']} row without a number for {', '.join(missing)}: "
                             "not a row fuyou wrote (edited?); fix or remove that line")
        rows.append(row)
    return rows


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(output_dir: Path) -> dict:
    output_dir = Path(output_dir)
    rows = load_rows(output_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    out: dict = {"output_dir": str(output_dir), "steps": len(train), "evals": evals}
    if train:
        k = max(1, min(10, len(train) // 4))
        times = sorted(r["step_time_s"] for r in train)
        total_time = sum(times)
        out.update(
            first_step=train[0]["step"], last_step=train[-1]["step"],
            loss_start=_mean([r["loss"] for r in train[:k]]), loss_end=_mean([r["loss"] for r in train[-k:]]),
            loss_min=min(r["loss"] for r in train), tokens=sum(r.get("tokens", 0) for r in train),
            train_time_s=total_time, step_time_mean_s=total_time / len(train),
            step_time_median_s=statistics.median(times), step_time_p95_s=times[min(len(times) - 1, int(0.95 * len(times)))],
        )
        out["tokens_per_s"] = out["tokens"] / total_time if total_time > 0 else None
        out["split"] = {label: _mean([r[key] for r in train if key in r]) for label, key in SPLIT
                        if any(key in r for r in train)}
        links = {}
        for label, key in LINKS:
            busy = sum(r.get(f"{key}_s", 0.0) for r in train)
            moved = sum(r.get(f"{key}_bytes", 0.0) for r in train)
            if moved:
                links[label] = {"bytes": moved, "busy_s": busy, "gbps": moved / busy / 1e9 if busy else None}
        out["links"] = links
    found = list_checkpoints(checkpoint_root(output_dir))
    out["checkpoints"] = [p.name for p in found]
    out["model"] = str(output_dir / "model") if (output_dir / "model").is_dir() else None
    return out


def plot(output_dir: Path, target: Path | None = None) -> Path | None:
    """report.png (loss and eval loss, tokens/s, compute share of each step); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = load_rows(output_dir)
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    split = [r for r in train if "compute_s" in r and r["step_time_s"] > 0]
    panels = 3 if split else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.6 * panels), sharex=True)
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax = axes[1]
    ax.plot([r["step"] for r in train], [r["tokens"] / r["step_time_s"] if r["step_time_s"] > 0 else 0 for r in train],
            lw=1)
    ax.set_ylabel("tokens/s")
    if split:
        ax = axes[2]
        ax.plot([r["step"] for r in split], [r["compute_s"] / r["step_time_s"] for r in split], lw=1, label="compute")
        ax.plot([r["step"] for r in split], [(r["wait_fetch_s"] + r["wait_ssd_s"]) / r["step_time_s"] for r in split],
                lw=1, label="waiting on weights")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of step")
        ax.legend(loc="upper right")
    axes[-1].set_xlabel("step")
    fig.suptitle(Path(output_dir).name)
    fig.tight_layout()
    target = target or Path(output_dir) / "report.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
