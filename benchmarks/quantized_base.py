"""A LoRA run over a quantized frozen base (model.quantization): bytes moved and step time per format,
side by side with the 16-bit base, streamed from host RAM and from the SSD, and the in-memory step.

  python benchmarks/quantized_base.py                  # ~0.2 GB bf16 model, a few minutes on 2 cores
  python benchmarks/quantized_base.py --swap /mnt/nvme/tmp

One subprocess per (format, home): a bfloat16 Llama-shaped model (random init) with LoRA adapters on
q/k/v/o, AdamW, every decoder layer streamed from its home (pageable host RAM, or the SSD) with one
block of prefetch, activations recomputed; a warm-up step, then consecutive steps. Printed: the
streamed step, host->device (on a CPU: copies into the compute slots) and SSD bytes per step, the
in-memory step over the same quantized base, and each against the bf16 base's.
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

FORMATS = ["none", "int8", "nf4"]
HOMES = ["pageable", "ssd"]
SIZE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=8000, batch=4, seq=64, steps=3)


def one(args) -> dict:
    """Runs in a subprocess: one format and home, streamed and in memory."""
    import torch

    from fuyoucli.engine.lanes import lanes_for
    from fuyoucli.model.loading import load_model
    from fuyoucli.plan.manual import fixed_plan
    from fuyoucli.plan.types import Tier
    from fuyoucli.recipe import AdamWMethod, ModelConfig, PeftConfig
    from fuyoucli.train.first_order import AdamWReference
    from fuyoucli.train.first_order_streamed import AdamWStreamed

    fmt, home = args.one.split("/")
    torch.manual_seed(0)
    batches = [[{"input_ids": (ids := torch.randint(0, SIZE["vocab_size"], (SIZE["batch"], SIZE["seq"]))),
                 "attention_mask": torch.ones_like(ids), "labels": ids}] for _ in range(SIZE["steps"] + 1)]
    method = AdamWMethod(name="adamw", lr=1e-4, max_grad_norm=None)
    cfg = ModelConfig(path=args.model, dtype="bfloat16", quantization=fmt)
    lora = PeftConfig(type="lora", r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    def timed(step) -> float:
        step(batches[0])
        t0 = time.perf_counter()
        for micro in batches[1:]:
            step(micro)
        return (time.perf_counter() - t0) / (len(batches) - 1)

    t0 = time.perf_counter()
    model = load_model(cfg, lora, seed=0, pad_token_id=0)
    load_s = time.perf_counter() - t0
    ref = AdamWReference(model, method, head="causal_lm")
    in_memory_s = timed(lambda micro: ref.step(micro, lr=1e-4))
    ref = model = None  # free the in-memory run before the streamed one loads
    model = load_model(cfg, lora, seed=0, pad_token_id=0)
    plan = fixed_plan(SIZE["num_hidden_layers"], Tier(home), method="adamw", optimizer_home=Tier.PAGEABLE,
                      activation="recompute", prefetch_depth=1, swap_dir=args.swap, compute_dtype="bfloat16",
                      home_dtype="bfloat16")
    trainer = AdamWStreamed.from_plan(model, plan, method, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        trainer.step(batches[0], lr=1e-4)
        trainer.settle()
        stats, ssd = trainer.store.stats, trainer.engine.ssd
        read = (lambda: ssd.bytes_read) if ssd is not None else (lambda: 0)
        h0, s0, t0 = stats.h2d_bytes, read(), time.perf_counter()
        for micro in batches[1:]:
            trainer.step(micro, lr=1e-4)
        trainer.settle()
        steps = len(batches) - 1
        return {"step_s": (time.perf_counter() - t0) / steps, "h2d_bytes": (stats.h2d_bytes - h0) / steps,
                "ssd_bytes": (read() - s0) / steps, "in_memory_s": in_memory_s, "load_s": load_s}
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swap", default=None, help="a folder on the SSD (default: a temp dir here)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory(dir=args.swap or ".") as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, SIZE)
        import torch
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(model_dir)
        results = {}
        for home in HOMES:
            for fmt in FORMATS:
                cmd = [sys.executable, __file__, "--one", f"{fmt}/{home}", "--model", str(model_dir),
                       "--swap", str(Path(tmp) / "swap")]
                results[(fmt, home)] = run_one(cmd, f"{fmt}/{home}")
    print(f"LoRA (r 16, q/k/v/o) AdamW over a bf16 Llama-shaped base: {SIZE['num_hidden_layers']} layers, hidden "
          f"{SIZE['hidden_size']}, every layer streamed; batch {SIZE['batch']}x{SIZE['seq']}; {SIZE['steps']} steps "
          "after a warm-up")
    print(f"{'home':<9}{'base':<6}{'step s':>8}{'vs bf16':>9}{'h2d MB/step':>12}{'vs bf16':>9}{'ssd MB/step':>12}"
          f"{'in-memory s':>12}{'vs bf16':>9}{'load s':>8}")
    for (fmt, home), r in results.items():
        b = results[("none", home)]
        print(f"{home:<9}{fmt:<6}{r['step_s']:>8.3f}{r['step_s'] / b['step_s']:>8.2f}x{r['h2d_bytes'] / 1e6:>12.1f}"
              f"{r['h2d_bytes'] / b['h2d_bytes']:>8.2f}x{r['ssd_bytes'] / 1e6:>12.1f}{r['in_memory_s']:>12.3f}"
              f"{r['in_memory_s'] / b['in_memory_s']:>8.2f}x{r['load_s']:>8.1f}")


if __name__ == "__main__":
    main()
