"""The planner's predicted step time against measured steps on this machine (issue 4 acceptance).

For each model size and placement, one subprocess: the real planner (fuyoucli.train.planning.plan_recipe
on the recipe, the model's config-only inventory and this machine's profile) predicts the step, then
the trainer fuyou would run for that plan (fuyoucli.train.trainers.build_trainer) runs it on the same
random-init Llama-shaped model and full-length batches (language-modelling loss on every position,
as the planner assumes for text). Prints predicted, measured (the median of --steps steps after a
warm-up step, with their range: single steps on a shared VM move by 10-30%) and ratio:

    .venv/bin/python benchmarks/plan_vs_measured.py                 # measures a profile first (~40 s)
    .venv/bin/python benchmarks/plan_vs_measured.py --profile FILE  # or plans from a saved one
    .venv/bin/python benchmarks/plan_vs_measured.py --sizes small --rows zo2-memory,zo2-ssd

Rows: zo2 in memory (the reference), zo2 streamed from host memory (weights_home pageable: on a CPU
the "device" is host memory too, so this is the engine's own cost) and from SSD (O_DIRECT under a
temporary swap_dir here), AdamW in memory, and AdamW streamed when build_trainer supports it.
Sensitive to other processes and to the VM's own drift: each row prints the load average before and
after it, its steps' range, and "layer now/profile": a profiled decoder layer timed again just before
the row, over its time in the profile (1.00: the machine runs as fast as when it was profiled).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

SIZES = {
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000, tie_word_embeddings=False, batch=4, seq=64),
    "medium": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=10, num_attention_heads=16,
                   num_key_value_heads=16, vocab_size=16000, tie_word_embeddings=False, batch=4, seq=128),
    # SmolLM2-135M's shape (tied embeddings, grouped-query attention) at the zo2-sentiment recipe's batch
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, batch=16, seq=96),
}
# row -> (method, recipe offload overrides)
ROWS = {
    "zo2-memory": ("zo2", {"mode": "in_memory"}),
    "zo2-host": ("zo2", {"mode": "stream", "weights_home": "pageable"}),
    "zo2-ssd": ("zo2", {"mode": "stream", "weights_home": "ssd"}),
    "adamw-memory": ("adamw", {"mode": "in_memory"}),
    "adamw-host": ("adamw", {"mode": "stream", "weights_home": "pageable", "optimizer_home": "host"}),
    "adamw-ssd": ("adamw", {"mode": "stream", "weights_home": "ssd", "optimizer_home": "ssd"}),
}
MODEL_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings")


def build_model(folder: Path, size: dict) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", max_position_embeddings=512, **{k: size[k] for k in MODEL_KEYS})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def write_recipe(path: Path, model: Path, data: Path, swap: Path, size: dict, method: str, offload: dict,
                 profile: Path) -> Path:
    lines = [f"name: plan-vs-measured", "model:", f"  path: {model}", "  dtype: float32",
             "method:", f"  name: {method}", f"  lr: {1e-6 if method == 'zo2' else 1e-5}",
             "data:", "  format: text", f"  train: {data}", f"  max_length: {size['seq']}",
             "training:", "  max_steps: 4", f"  batch_size: {size['batch']}", "  seed: 0",
             "hardware:", f"  profile: {profile}", "offload:"]
    if offload.get("mode") != "in_memory":
        lines.append(f"  swap_dir: {swap}")
    lines += [f"  {k}: {v}" for k, v in offload.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def one(args) -> dict:
    """In a subprocess: plan the recipe, build the trainer that plan gets, time its steps."""
    import faulthandler
    from types import SimpleNamespace

    faulthandler.dump_traceback_later(args.row_timeout - 10, exit=True)  # a hang leaves its stacks on stderr

    import torch
    from transformers import AutoModelForCausalLM

    from fuyoucli.hardware.profile import load_profile
    from fuyoucli.model.inventory import inventory
    from fuyoucli.train.planning import plan_recipe
    from fuyoucli.recipe import load_recipe
    from fuyoucli.train.trainers import build_trainer, streams

    recipe = load_recipe(args.recipe)
    size = SIZES[args.size]
    plan = plan_recipe(recipe, inventory(recipe.model, recipe.peft), load_profile(recipe.hardware.profile))
    result = {"predicted_s": plan.times.step_s, "bottleneck": plan.times.bottleneck, "feasible": plan.feasible,
              "times": {k: getattr(plan.times, k) for k in ("gpu_s", "h2d_s", "d2h_s", "ssd_read_s", "ssd_write_s",
                                                            "cpu_optimizer_s", "dram_s")},
              "homes": sorted({b.weights_home.value for b in plan.blocks}), "depth": plan.prefetch_depth,
              "micro": plan.micro_batch_size}
    if not plan.feasible:
        return {**result, "skipped": "; ".join(plan.reasons)}
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32)
    data = SimpleNamespace(label_token_ids=())
    try:
        trainer = build_trainer(model, recipe, data, plan if streams(plan) else None, device)
    except Exception as exc:  # noqa: BLE001 - e.g. a trainer that does not exist yet for this plan
        return {**result, "skipped": f"{type(exc).__name__}: {exc}".splitlines()[0][:160]}
    gen = torch.Generator().manual_seed(1)
    times, parts = [], []
    try:
        for step in range(1, args.steps + 2):
            micro = []
            for _ in range(plan.micro_batches):
                ids = torch.randint(0, size["vocab_size"], (plan.micro_batch_size, size["seq"]), generator=gen)
                micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
            start = time.perf_counter()
            out = trainer.step(step, micro, 1e-6)
            if step > 1:  # the first step warms allocators up and fills the deferred-update pipeline
                times.append(time.perf_counter() - start)
                parts.append({k: v for k, v in out.extra.items() if k.endswith("_s")})
    finally:
        # A trainer whose close() hangs (seen: the streamed AdamW engine with states on SSD, its
        # pool waiting on a read-ahead queue) must not lose the row: close in a thread, with a limit.
        import threading

        closer = threading.Thread(target=trainer.close, daemon=True)
        closer.start()
        closer.join(60)
        if closer.is_alive():
            import faulthandler

            faulthandler.dump_traceback(all_threads=True)  # to stderr: where it waits
            result["note"] = "trainer.close() hung"
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    measured_parts = {k: median([p.get(k, 0.0) for p in parts]) for k in (parts[0] if parts else {})}
    return {**result, "measured_s": median(times), "all_s": times, "measured_parts": measured_parts}


def load_average() -> float:
    return os.getloadavg()[0]


def machine_speed(prof) -> str:
    """How fast the machine is just before a row, against the profile the row is planned from: one
    profiled decoder layer's forward + backward timed again now (~1 s). A shared VM's speed drifts by
    10-30% over minutes; a row whose ratio is off while this is far from 1.00 was measured in a slow
    (or fast) spell the profile did not see."""
    import dataclasses

    from fuyoucli.hardware import probe

    points = [p for p in prof.compute.layers if p.dtype == "fp32"]
    if not points:
        return "-"
    ref = min(points, key=lambda p: abs(p.tokens - 256))
    spec = dataclasses.replace(probe.FULL, layer_tokens_cpu=(ref.tokens,), layer_time_s=0.5)
    now = probe.measure_layers(spec, cuda=False)
    if not now:
        return "-"
    return f"{(now[0].forward_s + now[0].backward_s) / (ref.forward_s + ref.backward_s):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="hardware profile JSON to plan from (default: measure one now)")
    parser.add_argument("--save-profile", help="also save the profile measured now to this file")
    parser.add_argument("--sizes", default="small,medium", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the profile and the runs (default: torch's own choice); on a "
                             "shared machine 1 avoids timing how long a busy core takes to wake a second thread")
    parser.add_argument("--detail", action="store_true",
                        help="under each row, the predicted busy seconds per resource and the lanes' measured ones")
    parser.add_argument("--row-timeout", type=int, default=900, help="seconds before a row is abandoned")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag, given, known in (("--rows", args.rows, ROWS), ("--sizes", args.sizes, SIZES)):
        unknown = [x for x in given.split(",") if x not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the row subprocesses inherit it
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args)), flush=True)
        os._exit(0)  # worker threads of a trainer that did not close must not hold the exit

    with tempfile.TemporaryDirectory(dir=".", prefix="plan-vs-measured-") as tmp:
        tmp = Path(tmp).resolve()
        swap = tmp / "swap"
        swap.mkdir()
        from fuyoucli.hardware.profile import load_profile

        if args.profile:
            profile = Path(args.profile).resolve()
        else:
            from fuyoucli.hardware.probe import probe
            from fuyoucli.hardware.profile import save_profile

            print(f"measuring this machine's profile (load average {load_average():.2f}) ...", flush=True)
            profile = save_profile(probe([swap]), tmp / "profile.json")
            if args.save_profile:
                save_profile(load_profile(str(profile)), Path(args.save_profile))
        prof = load_profile(str(profile))
        data = tmp / "train.txt"
        data.write_text("unused: the benchmark feeds random full-length batches\n")
        import torch

        print(f"torch threads {torch.get_num_threads()}; niceness {os.nice(0)}")
        print(f"profile: {profile if args.profile else 'measured now'}; CPU busy at probe start/end "
              f"{prof.provenance.cpu_busy_percent_at_start:.0f}%/{prof.provenance.cpu_busy_percent_at_end:.0f}%; "
              f"randn {max((p.randn_params_per_s for p in prof.compute.elementwise), default=0) / 1e9:.3f} G/s, "
              f"best fp32 matmul {prof.compute.matmul_flops('fp32') / 1e9:.0f} GFLOP/s")
        header = (f"{'size':8} {'row':13} {'plan':22} {'predicted s':>11} {'measured s':>10} {'ratio':>6} "
                  f"{'bottleneck':>10} {'load':>9}  steps (min-max)  layer now/profile")
        print(header)
        rows_out = []
        for size_name in args.sizes.split(","):
            size = SIZES[size_name]
            model = tmp / f"model-{size_name}"
            build_model(model, size)
            for row in args.rows.split(","):
                method, offload = ROWS[row]
                recipe = write_recipe(tmp / f"{size_name}-{row}.yaml", model, data, swap, size, method, offload,
                                      profile)
                speed = machine_speed(prof)
                before = load_average()
                cmd = [sys.executable, __file__, "--one", row, "--recipe", str(recipe), "--size", size_name,
                       "--steps", str(args.steps), "--threads", str(args.threads), "--row-timeout", str(args.row_timeout)]
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.row_timeout,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
                except subprocess.TimeoutExpired as exc:
                    err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
                    print(f"{size_name:8} {row:13} timed out after {args.row_timeout} s; its threads' stacks:\n{err[-4000:]}",
                          flush=True)
                    continue
                after = load_average()
                if out.returncode != 0:
                    hung = "Timeout (0:" in out.stderr  # faulthandler's dump of a hang
                    print(f"{size_name:8} {row:13} {'hung; stacks:' if hung else 'failed:'} "
                          f"{out.stderr[-4000:] if hung else out.stderr.strip().splitlines()[-1][:150]}", flush=True)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                plan = f"{'/'.join(r['homes'])} d{r['depth']} mb{r['micro']}"
                if "skipped" in r:
                    print(f"{size_name:8} {row:13} {plan:22} {r['predicted_s']:11.3f} {'-':>10} {'-':>6} "
                          f"{r['bottleneck']:>10}  skipped: {r['skipped']}", flush=True)
                    continue
                ratio = r["measured_s"] / r["predicted_s"]
                rows_out.append((size_name, row, ratio))
                print(f"{size_name:8} {row:13} {plan:22} {r['predicted_s']:11.3f} {r['measured_s']:10.3f} "
                      f"{ratio:6.2f} {r['bottleneck']:>10} {before:4.1f}-{after:<4.1f}  "
                      f"{min(r['all_s']):.3f}-{max(r['all_s']):.3f}  {speed} {r.get('note', '')}", flush=True)
                if args.detail:
                    pred = " ".join(f"{k[:-2]} {v:.3f}" for k, v in r["times"].items())
                    meas = " ".join(f"{k[:-2]} {v:.3f}" for k, v in r["measured_parts"].items() if v)
                    print(f"{'':22} predicted: {pred}\n{'':22} measured:  {meas or 'one compute span'}", flush=True)
                if "hung" in r.get("note", ""):
                    print(out.stderr[-8000:], flush=True)
        if rows_out:
            worst = max(rows_out, key=lambda x: abs(x[2] - 1))
            within = sum(1 for *_, q in rows_out if 0.75 <= q <= 1.25)
            print(f"{within}/{len(rows_out)} rows within 25% (measured/predicted in [0.75, 1.25]); "
                  f"worst {worst[0]} {worst[1]} at {worst[2]:.2f}")


if __name__ == "__main__":
    main()
