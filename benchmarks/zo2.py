"""ZO2 benchmark: streamed vs in-memory MeZO, SSD streaming vs its I/O bound, and peak memory.

Each configuration runs in its own subprocess (so peak RSS is its own), on the same random-init
Llama-shaped model and the same batches, and the ratios are printed side by side:
  python benchmarks/zo2.py            # 1.3 GB model (24 layers)
  python benchmarks/zo2.py --quick    # ~0.1 GB model, a minute on 2 cores
  python benchmarks/zo2.py --device cuda
  python benchmarks/zo2.py --quick --variant conservative   # or momentum, sign
The SSD bound uses the disk figures of the saved hardware profile when one exists (`fuyou profile`),
else a short sequential read/write measurement in the swap directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=8000, batch=4, seq=64, steps=3),
    "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=16000, batch=4, seq=128, steps=4),
}


def run_one(cmd: list[str], what: str) -> dict:
    """Run one configuration in its own process (a fresh allocator and page cache state for each) and
    return the JSON object its last stdout line prints; its stderr tail and an exit on failure."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{what} run failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_model(folder: Path, size: dict) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size")
    config = AutoConfig.for_model("llama", max_position_embeddings=512, tie_word_embeddings=False,
                                  **{k: size[k] for k in keys})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rss_anon() -> int:
    """Anonymous resident memory (bytes): what the process holds, without file pages it merely maps."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """The highest anonymous RSS seen while running: a thread samples /proc/self/status every few ms,
    so a step's transient peak counts, not only what is left when the step returns."""

    def __init__(self, every_s: float = 0.005):
        import threading

        self.peak, self.every_s = rss_anon(), every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_anon())

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def one(args) -> dict:
    """Runs in a subprocess: one configuration, timed steps after one warm-up step."""
    import torch

    from fuyoucli.engine.lanes import lanes_for
    from fuyoucli.model.blocks import param_blocks
    from fuyoucli.plan.manual import fixed_plan
    from fuyoucli.plan.types import Tier
    from fuyoucli.recipe import ZO2Method
    from fuyoucli.train.zo import ZOReference
    from fuyoucli.train.zo_streamed import ZOStreamed
    from transformers import AutoModelForCausalLM

    size = SIZES[args.size]
    device = torch.device(args.device)
    torch.manual_seed(0)
    batches = [[{"input_ids": (ids := torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]))).to(device),
                 "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}]
               for _ in range(size["steps"] + 1)]
    method = ZO2Method(name="zo2", lr=1e-6, eps=1e-3, variant=args.variant)
    mode = args.one
    if mode == "memory":
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:  # streamed layers go from the file to their home without loading into the model
        from fuyoucli.model.loading import load_model
        from fuyoucli.recipe import ModelConfig, PeftConfig

        model = load_model(ModelConfig(path=args.model), PeftConfig(), seed=0, pad_token_id=0,
                           streamed_layers=set(range(size["num_hidden_layers"])))
    rss_loaded = rss_anon()
    store = None
    if mode == "memory":
        model.to(device)
        trainer = ZOReference(model, param_blocks(model), method, seed=0, head="causal_lm")
    else:
        home = {"pinned": Tier.PINNED, "pageable": Tier.PAGEABLE, "ssd": Tier.SSD}[mode]
        plan = fixed_plan(size["num_hidden_layers"], home, prefetch_depth=1, swap_dir=args.swap,
                          compute_device=device.type)
        trainer = ZOStreamed.from_plan(model, plan, method, seed=0, head="causal_lm", lanes=lanes_for(device))
        store = trainer.store
    rss_placed = rss_anon()
    times = []
    with AnonPeak() as sampled:
        for t, micro in enumerate(batches):
            start = time.perf_counter()
            trainer.step(t + 1, micro, lr=1e-6)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if t > 0:  # the first step warms up allocators and (streamed) fills the deferred-update pipeline
                times.append(time.perf_counter() - start)
    peak_anon = sampled.peak
    result = {"mode": mode, "step_s": sorted(times)[len(times) // 2], "rss_loaded": rss_loaded,
              "rss_placed": rss_placed, "rss_steps": peak_anon,
              "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if store is not None:
        steps = len(batches)
        result["bytes_read_per_step"] = store.stats.h2d_bytes / steps
        result["bytes_written_per_step"] = store.stats.d2h_bytes / max(steps - 1, 1)
        result["device_peak_bytes"] = trainer.arena.peak_bytes
        trainer.close()
    return result


def ssd_bandwidth(swap: Path) -> tuple[float, float, str]:
    """(read, write) bytes/s of the swap directory's disk: from the saved profile, else measured now."""
    try:
        from fuyoucli.hardware.profile import default_profile_path, load_profile

        path = default_profile_path()
        if path.is_file():
            prof = load_profile(str(path))
            if prof.disks:
                d = prof.disks[0]
                best_r = max(p.gbps for p in d.read) * 1e9
                best_w = max(p.gbps for p in d.write) * 1e9
                return best_r, best_w, f"profile {path} ({d.path})"
    except Exception:  # noqa: BLE001 - fall back to measuring
        pass
    from fuyoucli.engine.tiers import SsdStore, aligned_host

    store = SsdStore(swap, 256 << 20)
    try:
        buf = aligned_host(64 << 20)
        start = time.perf_counter()
        for i in range(4):
            store.write_sync(f"bench-{i}", buf)
        write = 4 * buf.numel() / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(4):
            store.read_sync(f"bench-{i}", buf)
        read = 4 * buf.numel() / (time.perf_counter() - start)
    finally:
        store.close()
    return read, write, f"measured now in {swap} ({'O_DIRECT' if store.direct else 'buffered+fsync'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--swap", default=None, help="swap directory for the SSD tier (default: a temp dir here)")
    parser.add_argument("--variant", default="sgd", choices=["sgd", "sign", "momentum", "conservative"],
                        help="the zo2 variant every mode runs (default sgd)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated subset of memory,pageable,pinned,ssd (default: all for the device)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    size_name = "quick" if args.quick else "full"
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        model_dir = Path(tmp) / "model"
        swap = Path(args.swap or Path(tmp) / "swap")
        model_bytes = build_model(model_dir, SIZES[size_name])
        modes = ["memory", "pageable", "pinned", "ssd"] if args.device == "cuda" else ["memory", "pageable", "ssd"]
        if args.modes:
            modes = [m for m in modes if m in args.modes.split(",")]
        results = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--one", mode, "--model", str(model_dir), "--size", size_name,
                   "--device", args.device, "--swap", str(swap), "--variant", args.variant]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{mode} run failed")
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        read_bps, write_bps, source = ssd_bandwidth(swap)

    mem = results["memory"]["step_s"] if "memory" in results else None
    size = SIZES[size_name]
    print(f"ZO2 benchmark ({size_name}): Llama-shaped, {size['num_hidden_layers']} layers, hidden {size['hidden_size']}, "
          f"{model_bytes / 2**20:.0f} MiB fp32; batch {size['batch']}x{size['seq']} tokens, q=1, variant {args.variant}; "
          f"device {args.device}")
    print("RSS columns: anonymous memory (MiB) after loading, after placing the weights, highest during the steps")
    print("(sampled every 5 ms); the last column is the process's peak RSS including mapped file pages.")
    print(f"{'mode':<10}{'step s':>9}{'vs memory':>11}{'loaded':>9}{'placed':>9}{'steps':>9}{'peak RSS':>10}{'device':>9}")
    for mode, r in results.items():
        device = r.get("device_peak_bytes")
        ratio = f"{r['step_s'] / mem:>10.2f}x" if mem else f"{'-':>11}"
        print(f"{mode:<10}{r['step_s']:>9.3f}{ratio}{r['rss_loaded'] / 2**20:>9.0f}"
              f"{r['rss_placed'] / 2**20:>9.0f}{r['rss_steps'] / 2**20:>9.0f}{r['rss_peak'] / 2**20:>10.0f}"
              f"{(device or 0) / 2**20:>9.0f}")
    if "ssd" not in results:
        return
    ssd = results["ssd"]
    io_s = ssd["bytes_read_per_step"] / read_bps + ssd["bytes_written_per_step"] / write_bps
    print(f"SSD tier: {ssd['bytes_read_per_step'] / 2**20:.0f} MiB read + {ssd['bytes_written_per_step'] / 2**20:.0f} MiB "
          f"written per step; disk {read_bps / 1e9:.2f} GB/s read, {write_bps / 1e9:.2f} GB/s write ({source})")
    if mem:
        bound = max(io_s, mem)
        print(f"SSD tier: I/O bound {io_s:.3f} s, compute bound (in-memory step) {mem:.3f} s; "
              f"measured {ssd['step_s']:.3f} s = {ssd['step_s'] / bound:.2f}x the larger bound")
    print(f"model bytes {model_bytes / 2**20:.0f} MiB; with SSD homing the process holds at most "
          f"{ssd['rss_steps'] / 2**20:.0f} MiB ({ssd['rss_steps'] / model_bytes:.2f}x the model), of which the "
          f"engine's device arena (on a CPU device it is host memory) is {ssd['device_peak_bytes'] / 2**20:.0f} MiB")
    host = ssd["rss_steps"] - ssd["device_peak_bytes"]
    print(f"host side (what stays in host RAM when the device is a GPU): {host / 2**20:.0f} MiB = "
          f"{host / model_bytes:.2f}x the model, with the libraries (the process held {ssd['rss_loaded'] / 2**20:.0f} "
          f"MiB after loading) and, on a CPU device, the activations and the heap glibc keeps for them")


if __name__ == "__main__":
    main()
