"""Choose a hyperparameter on the validation split, never on the test set.

Runs `fuyou finetune RECIPE` once per value of one recipe setting, each with
data.validation_fraction > 0: the run trains without those examples and evaluates on them instead of
the held-out test set (the recipes fix data.split_seed, so the test set is the same as in
benchmarks/quality.py and none of it is seen here). Prints the validation metric before and after
for every value and marks the best; put the winner in the recipe, then measure it with quality.py.

    .venv/bin/python benchmarks/sweep.py zo2-sentiment method.lr 1e-6,1e-5,5e-5
    .venv/bin/python benchmarks/sweep.py zo2-lora-sentiment method.lr 1e-3,3e-3 --set training.max_steps=50

Finished runs are reused (runs/sweep/<recipe>/<setting>=<value>), as in quality.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from quality import RECIPES, ROOT, machine, run_one  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("setting", help="a recipe key, e.g. method.lr")
    parser.add_argument("values", help="comma-separated values to try")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--max-eval", type=int, default=500, help="validation examples scored per run")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every run")
    parser.add_argument("--set", action="append", default=[], help="more recipe overrides, KEY=VALUE")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "sweep"))
    parser.add_argument("--fresh", action="store_true", help="rerun runs already done")
    args = parser.parse_args()
    metric = RECIPES[args.recipe][0]
    lower_better = metric == "perplexity"
    rows = []
    for value in args.values.split(","):
        out = Path(args.runs) / args.recipe / f"{args.setting}={value}"
        out.parent.mkdir(parents=True, exist_ok=True)
        sets = [f"data.validation_fraction={args.validation_fraction}", f"data.max_eval_examples={args.max_eval}",
                f"{args.setting}={value}", *args.set]
        r = run_one(args.recipe, args.seed, sets, out, args.fresh)
        rows.append((value, r))
        print(f"{args.setting}={value}: validation {metric} {r['before'][metric]:.4f} -> {r['after'][metric]:.4f}, "
              f"loss {r['before']['loss']:.3f} -> {r['after']['loss']:.3f} ({r['wall_s'] / 60:.1f} min)", flush=True)
    pick = (min if lower_better else max)(rows, key=lambda vr: (vr[1]["after"][metric], -vr[1]["after"]["loss"]))
    fmt = (lambda v: f"{100 * v:.1f}%") if metric == "accuracy" else (lambda v: f"{v:.2f}")
    print(f"\n{args.recipe}, seed {args.seed}, {rows[0][1]['after']['examples']} validation examples "
          f"({', '.join(args.set) or 'recipe as shipped'}); machine: {machine()}\n")
    print(f"| {args.setting} | validation {metric} before | after | eval loss after | steps | run time |")
    print("|---|---|---|---|---|---|")
    for value, r in rows:
        mark = " (chosen)" if (value, r) == pick else ""
        print(f"| {value}{mark} | {fmt(r['before'][metric])} | {fmt(r['after'][metric])} | {r['after']['loss']:.3f} | "
              f"{r['steps']} | {r['wall_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
