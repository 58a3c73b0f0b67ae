"""Every benchmark of the project in one command; writes benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/run_all.py --quick     # a few minutes: smaller sizes, one seed
    .venv/bin/python benchmarks/run_all.py             # the full set (under an hour on a 2-core CPU)
    .venv/bin/python benchmarks/run_all.py --only zo2,quality --out /tmp/RESULTS.md

Each benchmark runs in its own process, one after the other (timings are only meaningful on an
otherwise idle machine: the load average before and after each is recorded next to its output).
RESULTS.md holds, per benchmark, the machine it ran on, the command that reproduces it, its wall time
and what it printed: streamed vs in-memory ratios for ZO2 and first-order, SSD tiers against their I/O
bounds, peak RSS vs model bytes, planner predicted vs measured step time, the paper-table comparison,
the disk probe against dd and the quality table (metric before/after over seeds, run time per recipe).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

# name -> (title, quick arguments, full arguments)
BENCHMARKS = {
    "paper_tables": ("Planner vs the ZO2 and Fuyou papers' published figures (presets, nothing measured)", [], []),
    "zo2": ("ZO2 streamed vs in-memory MeZO; SSD tier vs its I/O bound; RSS vs model bytes", ["--quick"], []),
    "first_order": ("Offloaded first-order AdamW: step vs its parts, streamed vs in memory", [], ["--full"]),
    "plan_vs_measured": ("Planner: predicted vs measured step time on this machine",
                         ["--sizes", "small", "--detail"], ["--sizes", "small,medium", "--detail"]),
    "disk_vs_dd": ("Disk probe vs dd (O_DIRECT)", [".", "1"], [".", "3"]),
    "quality": ("Quality: metric before/after fine-tuning, real SmolLM2-135M and real data, over seeds",
                ["--quick"], []),
}


def machine() -> str:
    sys.path.insert(0, str(HERE))
    from quality import machine as describe

    return describe()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick variant of every benchmark")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where to write the results")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds before one benchmark is abandoned")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    where = machine()
    started = datetime.datetime.now(datetime.timezone.utc)
    mode = "quick" if args.quick else "full"
    sections = [f"# Benchmark results ({mode})", "",
                f"Written by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
                f"{started:%Y-%m-%d %H:%M} UTC at commit {git_commit()}.", "",
                f"Machine for every row below: {where}.", ""]
    total = time.perf_counter()
    failed = []
    for name in names:
        title, quick, full = BENCHMARKS[name]
        extra = quick if args.quick else full
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
        if name == "quality":
            cmd += ["--json", str(ROOT / "runs" / "quality" / f"{mode}.json")]
        shown = " ".join(["python", f"benchmarks/{name}.py", *extra])
        print(f"== {name}: {shown}", flush=True)
        load0 = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            output, rc = proc.stdout, proc.returncode
            if rc != 0:
                output += "\n" + "\n".join(proc.stderr.strip().splitlines()[-15:])
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or "")
            output += f"\n(abandoned after {args.timeout} s)"
            rc = -1
        wall = time.perf_counter() - start
        load1 = os.getloadavg()[0]
        if rc != 0:
            failed.append(name)
        print(output, flush=True)
        lines = [line for line in output.splitlines() if "Writing model shards" not in line
                 and "real_accelerator.py" not in line and "Loading weights" not in line]
        sections += [f"## {title}", "",
                     f"`{shown}`: {wall / 60:.1f} min, load average {load0:.1f} before, {load1:.1f} after"
                     f"{'' if rc == 0 else f', FAILED (exit {rc})'}. Machine: {where}.", "",
                     "```", *lines, "```", ""]
        Path(args.out).write_text("\n".join(sections))  # after each benchmark: a partial run keeps what it did
    minutes = (time.perf_counter() - total) / 60
    sections.insert(4, f"All of it took {minutes:.1f} min." + (f" Failed: {', '.join(failed)}." if failed else ""))
    sections.insert(5, "")
    Path(args.out).write_text("\n".join(sections))
    print(f"wrote {args.out} ({minutes:.1f} min)")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
