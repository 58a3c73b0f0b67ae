"""Compact AdamW states (method.states / method.master): the CPU optimizer's rate per format, and the
SSD-homed streamed AdamW step with compact states against fp32 states.

  python benchmarks/compact_optimizer.py                 # both parts, ~0.1 GB model, a few minutes on 2 cores
  python benchmarks/compact_optimizer.py --part rate     # the optimizer alone
  python benchmarks/compact_optimizer.py --part ssd --swap /mnt/nvme/tmp
  python benchmarks/compact_optimizer.py --part ssd --batch 1 --seq 16   # little compute: the disk bounds the step

Part 1, the optimizer pipeline alone, for each format: the engine's CPU optimizer (CpuAdam, states in
host RAM, its worker thread as on a GPU machine) updating a model's worth of layer-shaped blocks from
bf16 gradients already in host memory, the new bf16 weights written to their homes: parameters per
second, against the kernel alone (kernels/adamw.py: its compiled chunk where a C compiler is, else
its torch ops; what `fuyou profile` measures) and torch's fused
fp32 AdamW (the profile's `adamw_all_threads_params_per_s`), all measured in this run on this machine.

Part 2, an SSD-homed step: a bf16 Llama-shaped model whose streamed layers keep weights and AdamW
states on the SSD, one subprocess per format, a warm-up step and then consecutive steps; step time,
bytes to and from the drive, and the ratio to the fp32-state step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from zo2 import build_model, run_one  # noqa: E402 - the same random-init Llama builder

FORMATS = [("fp32", "fp32"), ("int8", "fp32"), ("fp32", "bf16"), ("int8", "bf16")]
SIZE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=8000, batch=4, seq=64, steps=3)


def pipeline_rate(states: str, master: str, layers: int, reps: int) -> float:
    """Parameters per second of CpuAdam updating `layers` layer-shaped blocks (host-homed states,
    worker thread), gradients in host memory, new weights published to bf16 homes."""
    import torch

    from fuyoucli.engine.lanes import CpuLanes
    from fuyoucli.engine.optimizer import AdamBlock, CpuAdam, HostGrads
    from fuyoucli.plan.types import Tier
    from fuyoucli.recipe import AdamWMethod
    from fuyoucli.train.first_order_updates import cpu_adamw

    h, f = SIZE["hidden_size"], SIZE["intermediate_size"]
    shapes = [torch.Size(s) for s in ((h, h), (h, h), (h, h), (h, h), (f, h), (f, h), (h, f), (h,), (h,))]
    n = sum(s.numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)
    homes = {k: (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16) for k in range(layers)}
    method = AdamWMethod(name="adamw", lr=1e-4, weight_decay=0.01, states=states, master=master)
    from fuyoucli.train.first_order import adam_format
    fmt = adam_format(method)
    blocks = [AdamBlock(k, f"layers.{k}", shapes,
                        (lambda k=k: [v.float() for v in _views(homes[k], shapes)]), Tier.PAGEABLE,
                        (lambda k=k: homes[k]) if master == "bf16" else None) for k in range(layers)]
    cpu = CpuAdam(blocks, cpu_adamw(method, 0), lanes=CpuLanes(), ssd=None, thread=True, fmt=fmt)
    grads = {k: torch.randn(n, generator=gen).to(torch.bfloat16) for k in range(layers)}

    def publish(k):
        return lambda new: homes[k].copy_(new)

    def one_pass():
        for k in range(layers):
            cpu.update(k, HostGrads(grads[k], [True] * len(shapes), None), lr=1e-4, publish=publish(k))
        cpu.drain()

    try:
        one_pass()  # first touch of states and workspaces
        start = time.perf_counter()
        for _ in range(reps):
            one_pass()
        return reps * layers * n / (time.perf_counter() - start)
    finally:
        cpu.close()


def _views(flat, shapes):
    from fuyoucli.engine.flat import views_of
    return views_of(flat, shapes)


def rate_part(layers: int, reps: int) -> None:
    import torch

    from fuyoucli.hardware.probe import measure_adamw, measure_compact_adamw

    threads = torch.get_num_threads()
    n = 1 << 24
    fused, impl = measure_adamw(n, threads, 1.0)
    from fuyoucli.kernels.native import kernel_name

    print(f"CPU optimizer rate, {threads} threads, {layers} blocks of a hidden-{SIZE['hidden_size']} layer "
          f"(states in host RAM, worker thread); torch {impl}: {fused / 1e9:.3f} G params/s (fp32 states); "
          f"compact formats' chunk: {kernel_name()} (FUYOU_NATIVE_KERNELS=0: the torch ops)")
    print(f"{'states':<7}{'master':<7}{'kernel G/s':>11}{'pipeline G/s':>13}{'pipe/kernel':>12}{'pipe/fused':>11}")
    for states, master in FORMATS:
        kernel = fused if (states, master) == ("fp32", "fp32") else \
            measure_compact_adamw(n, threads, 1.0, states, master)
        pipe = pipeline_rate(states, master, layers, reps)
        print(f"{states:<7}{master:<7}{kernel / 1e9:>11.3f}{pipe / 1e9:>13.3f}{pipe / kernel:>11.2f}x"
              f"{pipe / fused:>10.2f}x")


def one(args) -> dict:
    """Runs in a subprocess: one format's SSD-homed streamed steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuyoucli.engine.lanes import lanes_for
    from fuyoucli.plan.manual import fixed_plan
    from fuyoucli.plan.types import Tier
    from fuyoucli.recipe import AdamWMethod
    from fuyoucli.train.first_order_streamed import AdamWStreamed

    states, master = args.one.split("/")
    SIZE.update(batch=args.batch, seq=args.seq)
    torch.manual_seed(0)
    batches = [[{"input_ids": (ids := torch.randint(0, SIZE["vocab_size"], (SIZE["batch"], SIZE["seq"]))),
                 "attention_mask": torch.ones_like(ids), "labels": ids}] for _ in range(SIZE["steps"] + 1)]
    method = AdamWMethod(name="adamw", lr=1e-5, max_grad_norm=None, states=states, master=master)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    plan = fixed_plan(SIZE["num_hidden_layers"], Tier.SSD, method="adamw", optimizer_home=Tier.SSD,
                      activation="recompute", prefetch_depth=1, swap_dir=args.swap, compute_dtype="bfloat16",
                      home_dtype="bfloat16")
    trainer = AdamWStreamed.from_plan(model, plan, method, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        trainer.step(batches[0], lr=1e-5)
        trainer.settle()
        ssd = trainer.engine.ssd
        b0, t0, adam0 = ssd.bytes_read + ssd.bytes_written, time.perf_counter(), trainer.cpu.busy_s
        for micro in batches[1:]:
            trainer.step(micro, lr=1e-5)
        trainer.settle()
        steps = len(batches) - 1
        return {"step_s": (time.perf_counter() - t0) / steps,
                "ssd_bytes": (ssd.bytes_read + ssd.bytes_written - b0) / steps,
                "cpu_adam_s": (trainer.cpu.busy_s - adam0) / steps}
    finally:
        trainer.close()


def ssd_part(swap: str | None, batch: int, seq: int) -> None:
    SIZE.update(batch=batch, seq=seq)
    with tempfile.TemporaryDirectory(dir=swap or ".") as tmp:
        model_dir = Path(tmp) / "model"
        model_bytes = build_model(model_dir, SIZE)
        results = {}
        for states, master in FORMATS:
            cmd = [sys.executable, __file__, "--one", f"{states}/{master}", "--model", str(model_dir),
                   "--swap", str(Path(tmp) / "swap"), "--batch", str(batch), "--seq", str(seq)]
            results[(states, master)] = run_one(cmd, f"{states}/{master}")
    base = results[("fp32", "fp32")]
    print(f"SSD-homed streamed AdamW step: Llama-shaped, {SIZE['num_hidden_layers']} layers, hidden "
          f"{SIZE['hidden_size']}, {model_bytes / 2**20:.0f} MiB fp32 at init, bf16 compute; weights and states of "
          f"every layer on the SSD; batch {SIZE['batch']}x{SIZE['seq']}; {SIZE['steps']} steps after a warm-up")
    print(f"{'states':<7}{'master':<7}{'step s':>8}{'vs fp32':>9}{'ssd GB/step':>12}{'cpu_adam s':>11}")
    for (states, master), r in results.items():
        print(f"{states:<7}{master:<7}{r['step_s']:>8.3f}{r['step_s'] / base['step_s']:>8.2f}x"
              f"{r['ssd_bytes'] / 1e9:>12.3f}{r['cpu_adam_s']:>11.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["rate", "ssd", "both"], default="both")
    parser.add_argument("--swap", default=None, help="a folder on the SSD (default: a temp dir here)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=SIZE["batch"], help="SSD part: sequences per step")
    parser.add_argument("--seq", type=int, default=SIZE["seq"], help="SSD part: tokens per sequence")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    if args.part in ("rate", "both"):
        rate_part(args.layers, args.reps)
    if args.part in ("ssd", "both"):
        ssd_part(args.swap, args.batch, args.seq)


if __name__ == "__main__":
    main()
