"""ZO2 with 16-bit weight homes (issue 19): what the home dtype and its rounding save and cost, side by side.

One random-init bfloat16 OPT-shaped model, one recipe (MeZO's lr 1e-6, batch 4), run through the real
CLI (`fuyou finetune`, one process each) with the decoder layers streamed from an SSD swap folder (and
from pageable host RAM), the weights at home as:
  float32 (every update exact), bfloat16 rounded to nearest, bfloat16 rounded stochastically.
Per run: the median step, link and SSD bytes per step (metrics), how far the weights moved from the
start (||w_N - w_0|| over every trainable tensor, read from the checkpoint at step N) and the projection
of that move on the float32 run's, <d, d32> / <d32, d32> (1: the same move; 0: none of it), and the
loss curve. Ratios are against the float32-home run of the same tier.

    python benchmarks/zo_homes.py --quick      # 4 layers, a few minutes on 2 cores
    python benchmarks/zo_homes.py              # 8 layers of hidden 768
    python benchmarks/zo_homes.py --tiers ssd --batch 1 --seq 16   # little compute: the disk bounds the step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import SHAPES, build_data, build_model, copy_tokenizer, recipe, run  # noqa: E402

# build_model reads gpu_check's table: these two shapes join it
SHAPES.update({"small": dict(hidden_size=384, ffn_dim=1536, num_hidden_layers=4, num_attention_heads=6),
               "medium": dict(hidden_size=768, ffn_dim=3072, num_hidden_layers=8, num_attention_heads=12)})
HOMES = (("float32", "nearest"), ("bfloat16", "nearest"), ("bfloat16", "stochastic"))


def home_weights(ckpt: Path) -> dict:
    import torch

    from fuyoucli.checkpoint import load_checkpoint

    tensors = load_checkpoint(ckpt).tensors
    return {k.removeprefix("param."): v.to(torch.float32) for k, v in tensors.items() if k.startswith("param.")}


def start_weights(model_dir: Path, names) -> dict:
    import torch
    from safetensors.torch import load_file

    raw = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for name in names:  # the checkpoint names the model's parameters; the file may drop a 'model.' prefix
        key = name if name in raw else name.removeprefix("model.")
        out[name] = raw[key].to(torch.float32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None, help="steps before the weights are compared")
    ap.add_argument("--tiers", default="ssd,pageable")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per example (default 64 quick, 128 full)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one here)")
    args = ap.parse_args()
    shape, seq = ("small", 64) if args.quick else ("medium", 128)
    seq = args.seq or seq
    steps = args.steps or (6 if args.quick else 10)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zo-homes-", dir="."))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, data = build_data(work, seq)
    model = work / f"model-{shape}"
    build_model(model, shape, "bfloat16", vocab=8000, seq=seq)
    copy_tokenizer(tok_dir, model)

    results = {}
    for tier in args.tiers.split(","):
        for dtype, rounding in HOMES:
            name = f"{tier}-{dtype}-{rounding}"
            out = work / name
            swap = f"  swap_dir: {work / 'swap'}\n" if tier == "ssd" else ""
            offload = (f"offload:\n  mode: stream\n  weights_home: {tier}\n{swap}  home_dtype: {dtype}\n"
                       + (f"  home_rounding: {rounding}\n" if dtype != "float32" else ""))
            path = recipe(work / f"{name}.yaml", model, data, out, method="zo2", batch=args.batch, seq=seq,
                          steps=steps + 1,
                          dtype="bfloat16", offload=offload)
            path.write_text(path.read_text().replace("  checkpoint_every: 0\n", f"  checkpoint_every: {steps}\n"))
            res = run(path, timeout_s=3600)
            if res["rc"] != 0:
                print(f"{name}: failed: {res['error']}")
                continue
            moved = home_weights(out / "checkpoints" / f"step-{steps:08d}")
            res["delta"] = {k: v - w for (k, v), w in zip(moved.items(), start_weights(model, moved).values())}
            results[name] = res
            print(f"{name}: done in {res['wall_s']:.0f} s", flush=True)

    print(f"\nZO2, bf16 OPT-shaped {shape} ({SHAPES[shape]['num_hidden_layers']} layers, hidden "
          f"{SHAPES[shape]['hidden_size']}), batch {args.batch} x {seq}, lr 1e-6, weights compared after {steps} steps")
    head = ("run", "step s", "x fp32", "link MB/step", "ssd MB/step", "||w-w0||", "proj on fp32", "loss first..last")
    print("  ".join(f"{h:>14}" for h in head))
    for tier in args.tiers.split(","):
        ref = results.get(f"{tier}-float32-nearest")
        for dtype, rounding in HOMES:
            res = results.get(f"{tier}-{dtype}-{rounding}")
            if res is None:
                continue
            timed = res["steps"][1:] or res["steps"]
            median = statistics.median(s["step_time_s"] for s in timed)
            link = statistics.median(s.get("h2d_bytes", 0) + s.get("d2h_bytes", 0) for s in timed) / 1e6
            ssd = statistics.median(s.get("ssd_read_bytes", 0) + s.get("ssd_write_bytes", 0) for s in timed) / 1e6
            d = res["delta"]
            norm = sum(float((t * t).sum()) for t in d.values()) ** 0.5
            proj = "-"
            if ref is not None:
                r = ref["delta"]
                proj = f"{sum(float((d[k] * r[k]).sum()) for k in d) / sum(float((r[k] * r[k]).sum()) for k in r):.3f}"
            x32 = "-"
            if ref is not None:
                ref_timed = ref["steps"][1:] or ref["steps"]
                x32 = f"{median / statistics.median(s['step_time_s'] for s in ref_timed):.2f}"
            losses = [s["loss"] for s in res["steps"]]
            cells = (f"{tier} {dtype[:4]} {rounding[:5]}", f"{median:.3f}", x32, f"{link:.1f}", f"{ssd:.1f}",
                     f"{norm:.3e}", proj, f"{losses[0]:.4f}..{losses[-1]:.4f}")
            print("  ".join(f"{c:>14}" for c in cells))


if __name__ == "__main__":
    main()
