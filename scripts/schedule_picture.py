"""Draws one step of a `fuyou finetune --trace FILE` trace as a picture (one row per lane).

    .venv/bin/python scripts/schedule_picture.py TRACE.json docs/schedule.png [--step N] [--title TEXT]

The trace is fuyou's own (Chrome/Perfetto JSON, telemetry/trace.py: one track per lane, complete
events with microsecond times). The README's schedule picture is made this way from a real run.
Needs matplotlib (`pip install 'fuyoucli[plot]'`).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

COLORS = {"compute": "#4c72b0", "upload": "#55a868", "offload": "#c44e52", "ssd_read": "#8172b2",
          "ssd_write": "#937860", "cpu_optimizer": "#dd8452", "wait": "#bbbbbb"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace")
    parser.add_argument("png")
    parser.add_argument("--step", type=int, default=None, help="which traced step (default: the last)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(args.trace).read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X"]
    steps = sorted((e for e in spans if names.get(e["tid"]) == "step"), key=lambda e: e["ts"])
    if not steps:
        raise SystemExit(f"{args.trace}: no step spans (is it a `fuyou finetune --trace` file?)")
    step = steps[-1] if args.step is None else next(e for e in steps if str(args.step) in e["name"])
    t0, t1 = step["ts"], step["ts"] + step["dur"]
    rows: dict[str, list] = defaultdict(list)
    for e in spans:
        lane = names.get(e["tid"], str(e["tid"]))
        if lane == "step" or e["ts"] + e["dur"] < t0 or e["ts"] > t1:
            continue
        rows[lane].append(e)
    lanes = [lane for lane in names.values() if lane in rows]
    fig, ax = plt.subplots(figsize=(12, 0.55 * len(lanes) + 1.2))
    for y, lane in enumerate(reversed(lanes)):
        for e in rows[lane]:
            start, width = (e["ts"] - t0) / 1e3, e["dur"] / 1e3
            kind = "wait" if e["name"].startswith("waiting") else lane.split(" ")[0]
            ax.broken_barh([(start, width)], (y - 0.35, 0.7), color=COLORS.get(kind, "#64b5cd"), edgecolor="white",
                           linewidth=0.3)
            if width > (t1 - t0) / 1e3 / 40:
                ax.text(start + width / 2, y, e["name"].split(" ")[-1][:8], ha="center", va="center", fontsize=6,
                        color="white")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(list(reversed(lanes)))
    ax.set_xlabel("ms into the step")
    ax.set_xlim(0, (t1 - t0) / 1e3)
    process = next((e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"), "fuyou")
    ax.set_title(args.title or f"{process}: {step['name']}", fontsize=9)
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=130)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
