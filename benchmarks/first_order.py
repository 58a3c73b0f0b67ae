"""First-order benchmark: streamed AdamW (weights and optimizer states on host or SSD) vs in-memory AdamW,
and each streamed step against the sum and the max of its parts.

Each configuration runs in its own subprocess on the same random-init Llama-shaped model and batches:
  python benchmarks/first_order.py            # ~0.1 GB model, a few minutes on 2 cores
  python benchmarks/first_order.py --full     # ~0.5 GB model
  python benchmarks/first_order.py --device cuda
Parts of a streamed step, measured in the same run:
  compute    the device's time in block forward/backward (the trainer's timeline, after weights arrived);
  transfer   time in lane copies (weights up, gradients down, swapped activations), CPU runs;
             on CUDA, bytes over the link at a pinned-copy bandwidth measured here;
  cpu_adam   the CPU optimizer's time in AdamW arithmetic (and gradient norms): its worker thread on
             a GPU machine; inline, between the blocks' compute, on a CPU-only one (engine/optimizer.py);
  ssd        wall time with at least one read or write in flight on the swap disk (measured), and
             the bytes moved against the disk's bandwidth (saved hardware profile, else measured now,
             as benchmarks/zo2.py does) for comparison.
If the parts overlapped perfectly the step would take their max; with no overlap, their sum. On a
CPU-only machine compute and cpu_adam run one after the other on the same cores, so their max is not
reachable there; only the SSD overlaps them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from zo2 import build_model, run_one, ssd_bandwidth  # noqa: E402 - the same model builder and disk figures

SIZES = {
    "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000, batch=4, seq=64, steps=5),
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=10, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=16000, batch=4, seq=128, steps=3),
}
# mode: (weights home, optimizer home, activation, max_grad_norm)
MODES = {
    "host": ("pageable", "pageable", "recompute", None),
    "host-keep": ("pageable", "pageable", "keep", None),
    "host-clip": ("pageable", "pageable", "recompute", 1.0),
    "ssd": ("ssd", "ssd", "recompute", None),
    "ssd-clip": ("ssd", "ssd", "recompute", 1.0),
}


class TimedLanes:
    """Delegates to real lanes and adds up the seconds spent in copy calls (exact for CPU lanes,
    where a copy is done when the call returns)."""

    def __init__(self, inner):
        self.inner, self.copy_s, self._lock = inner, 0.0, threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self.copy_s += time.perf_counter() - t0

    def upload(self, dst, src, after=None):
        return self._timed(self.inner.upload, dst, src, after)

    def offload(self, dst, src, after=None):
        return self._timed(self.inner.offload, dst, src, after)


def time_ssd(store) -> list[tuple[float, float]]:
    """Record (start, end) of every read and write on `store` (benchmark instrumentation)."""
    spans: list[tuple[float, float]] = []
    for name in ("read_sync", "write_sync"):
        def timed(key, buf, _fn=getattr(store, name)):
            t0 = time.perf_counter()
            try:
                return _fn(key, buf)
            finally:
                spans.append((t0, time.perf_counter()))
        setattr(store, name, timed)
    return spans


def busy_s(spans: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds within [start, end] covered by at least one span (concurrent I/O counts once)."""
    total, reach = 0.0, start
    for a, b in sorted((max(a, start), min(b, end)) for a, b in spans if b > start and a < end):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def one(args) -> dict:
    """Runs in a subprocess: one configuration, timed steps after one warm-up step."""
    import torch
    from transformers import AutoModelForCausalLM

    from fuyoucli.engine.lanes import lanes_for
    from fuyoucli.plan.manual import fixed_plan
    from fuyoucli.plan.types import Tier
    from fuyoucli.recipe import AdamWMethod
    from fuyoucli.train.first_order import AdamWReference
    from fuyoucli.train.first_order_streamed import AdamWStreamed

    size = SIZES[args.size]
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = [[{"input_ids": (ids := torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]))).to(device),
                 "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}]
               for _ in range(size["steps"] + 1)]
    mode = args.one
    clip = MODES[mode][3] if mode in MODES else None
    method = AdamWMethod(name="adamw", lr=1e-5, max_grad_norm=clip)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if mode == "memory":
        trainer = AdamWReference(model.to(device), method, head="causal_lm")
    else:
        home, opt, act, _ = MODES[mode]
        plan = fixed_plan(size["num_hidden_layers"], Tier(home), method="adamw", optimizer_home=Tier(opt),
                          activation=act, prefetch_depth=1, swap_dir=args.swap, compute_device=device.type)
        lanes = TimedLanes(lanes_for(device))
        trainer = AdamWStreamed.from_plan(model, plan, method, head="causal_lm", lanes=lanes)
        spans = time_ssd(trainer.engine.ssd) if trainer.engine.ssd is not None else []
    def counters() -> dict:
        return dict(t=time.perf_counter(), copy=lanes.copy_s, adam=trainer.cpu.busy_s,
                    ssd=(trainer.engine.ssd.bytes_read + trainer.engine.ssd.bytes_written) if trainer.engine.ssd else 0,
                    link=trainer.store.stats.h2d_bytes + trainer.updates.grad_bytes + 2 * trainer.acts.swapped_bytes)

    # One warm-up step (allocators, first touch of host buffers and optimizer states), then a window
    # of consecutive steps: a deferred update overlaps the next step's forward, so steps are not
    # separated; the window ends when the last step's updates are written home.
    trainer.step(batches[0], lr=1e-5)
    if mode == "memory":
        sync()
        start = time.perf_counter()
        for micro in batches[1:]:
            trainer.step(micro, lr=1e-5)
        sync()
        return {"mode": mode, "step_s": (time.perf_counter() - start) / (len(batches) - 1)}
    trainer.settle()
    sync()
    a = counters()
    compute = 0.0
    for micro in batches[1:]:
        trainer.step(micro, lr=1e-5)
        compute += sum(t1 - t0 for _, _, t0, t1 in trainer.timeline)  # the timeline holds the last step
    trainer.settle()
    sync()
    b, steps = counters(), len(batches) - 1
    result = {"mode": mode, "step_s": (b["t"] - a["t"]) / steps, "compute": compute / steps,
              "copy": (b["copy"] - a["copy"]) / steps, "cpu_adam": (b["adam"] - a["adam"]) / steps,
              "ssd_bytes": (b["ssd"] - a["ssd"]) / steps, "link_bytes": (b["link"] - a["link"]) / steps,
              "ssd_busy": busy_s(spans, a["t"], b["t"]) / steps}
    trainer.close()
    return result


def link_bandwidth(device: str) -> float:
    """Pinned host -> device copy bandwidth, bytes/s (CUDA), measured now."""
    import torch

    src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=device)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(4):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 4 * src.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--swap", default=None, help="swap directory for the SSD tier (default: a temp dir here)")
    parser.add_argument("--modes", default=",".join(["memory", *MODES]))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    size_name = "full" if args.full else "quick"
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        model_dir = Path(tmp) / "model"
        swap = Path(args.swap or Path(tmp) / "swap")
        model_bytes = build_model(model_dir, SIZES[size_name])
        results = {}
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--one", mode, "--model", str(model_dir), "--size", size_name,
                   "--device", args.device, "--swap", str(swap)]
            results[mode] = run_one(cmd, mode)
        read_bps, write_bps, source = ssd_bandwidth(swap) if any(m.startswith("ssd") for m in results) else (1, 1, "")
    link_bps = link_bandwidth(args.device) if args.device == "cuda" else None

    size = SIZES[size_name]
    mem = results.get("memory", {}).get("step_s")
    print(f"First-order benchmark ({size_name}): Llama-shaped, {size['num_hidden_layers']} layers, hidden "
          f"{size['hidden_size']}, {model_bytes / 2**20:.0f} MiB fp32; batch {size['batch']}x{size['seq']} tokens; "
          f"device {args.device}; prefetch depth 1; activations recomputed unless -keep; "
          f"{size['steps']} consecutive steps after a warm-up")
    if source:
        print(f"SSD: {read_bps / 1e9:.2f} GB/s read, {write_bps / 1e9:.2f} GB/s write ({source})")
    print(f"{'mode':<11}{'step s':>8}{'vs mem':>8}{'compute':>9}{'transfer':>9}{'cpu_adam':>9}{'ssd':>7}"
          f"{'sum':>7}{'max':>7}{'step/sum':>9}{'step/max':>9}{'ssd GB':>8}{'at bw s':>8}")
    for mode, r in results.items():
        line = f"{mode:<11}{r['step_s']:>8.3f}" + (f"{r['step_s'] / mem:>7.2f}x" if mem else f"{'':>8}")
        if mode != "memory":
            transfer = r["copy"] if link_bps is None else r["link_bytes"] / link_bps
            ssd = r["ssd_busy"]
            parts = [r["compute"], transfer, r["cpu_adam"], ssd]
            line += "".join(f"{p:>9.3f}" for p in parts[:3]) + f"{ssd:>7.3f}{sum(parts):>7.3f}{max(parts):>7.3f}"
            line += f"{r['step_s'] / sum(parts):>8.2f}x{r['step_s'] / max(parts):>8.2f}x"
            if r["ssd_bytes"]:
                at_bw = r["ssd_bytes"] / (2 / (1 / read_bps + 1 / write_bps))
                line += f"{r['ssd_bytes'] / 1e9:>8.3f}{at_bw:>8.3f}"
        print(line)
    print("step/max <= 1.2 means the parts overlap almost perfectly; step/sum < 1 means some overlap at all. "
          "-clip modes defer every update until the global norm is known (they overlap the next forward).")


if __name__ == "__main__":
    main()
