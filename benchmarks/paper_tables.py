"""The planner against published figures (issue 4 acceptance): ZO2's GPU memory for OPT 1.3B..175B and
its PCIe lower bound, Fuyou's GPT-3 13B TFLOPS on an RTX 4090, and 175B fitting at all.

    .venv/bin/python benchmarks/paper_tables.py

Models are config.json files under benchmarks/configs (no weights); machines are hardware presets.
Prints predicted vs published with the ratio; nothing here is measured on this machine.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from fuyoucli.hardware.presets import get_preset  # noqa: E402
from fuyoucli.model.inventory import inventory  # noqa: E402
from fuyoucli.plan.memory import DEVICE_HEADROOM  # noqa: E402
from fuyoucli.plan.search import make_plan  # noqa: E402
from fuyoucli.plan.types import Options, Tier, Workload  # noqa: E402
from fuyoucli.train.plan_inputs import machine_from_profile  # noqa: E402
from fuyoucli.recipe import ModelConfig, PeftConfig  # noqa: E402

# ZO2 (arXiv 2503.12668), OPT, batch 1, seq 2048, fp16, parameters offloaded to CPU: GPU memory in GB.
ZO2_GPU_GB = {"opt-1.3b": 3.75, "opt-13b": 6.18, "opt-30b": 8.86, "opt-66b": 12.07, "opt-175b": 18.04}
# Fuyou (arXiv 2403.06504): GPT-3 13B on one RTX 4090, model TFLOPS with 12 and with 1 NVMe SSD.
FUYOU_13B_TFLOPS = {12: 156.0, 1: 70.0}
FUYOU_BATCH = 32  # assumption: the batch of Fuyou's 13B runs is not in BACKGROUND.md; seq 1024 is


def inv(name: str):
    return inventory(ModelConfig(path=str(HERE / "configs" / name), dtype="float16"), PeftConfig())


def zo2_table() -> None:
    machine, _ = machine_from_profile(get_preset("rtx4090-768g-12nvme"))
    print("ZO2, OPT, batch 1, seq 2048, fp16 weights (stochastic rounding) streamed from pinned host RAM (testbed preset: PCIe 4, 25 GB/s"
          " each way, 20 GB/s duplex)")
    print("  free: the plan on the 24 GB card; at ZO2's: the plan when the card offers exactly ZO2's figure after headroom")
    print(f"{'model':10} {'ZO2 GB':>7} {'free GB':>8} {'z':>6} {'step s':>7} {'at ZO2 GB':>9} {'z':>6} {'depth':>5} {'step s':>7} "
          f"{'bound s':>8} {'free/bound':>10}")
    wl = Workload("zo2", False, "float16", batch_size=1, seq_len=2048, home_rounding="stochastic")
    for name, published in ZO2_GPU_GB.items():
        model = inv(name)
        # ZO2 streams every decoder layer (three buffers) whatever the GPU has free: mode stream
        free = make_plan(model, wl, machine, Options(mode="stream", home_dtype="float16"), suggest=False)
        limit = int(published * 1e9 / (1 - DEVICE_HEADROOM))  # the device then offers ZO2's bytes
        tight = make_plan(model, wl, machine, Options(mode="stream", home_dtype="float16",
                                                      device_memory_limit_bytes=limit), suggest=False)
        weights = 2 * model.params
        bound = max(weights / machine.h2d_bps, weights / machine.d2h_bps, free.flops_per_step / machine.flops("float16"))
        at = (f"{tight.memory.device / 1e9:9.2f} {tight.z_buffer:>6} {tight.prefetch_depth:5d} {tight.times.step_s:7.2f}"
              if tight.feasible else f"{'no fit':>9} {'':>6} {'':>5} {'':>7}")
        print(f"{name:10} {published:7.2f} {free.memory.device / 1e9:8.2f} {free.z_buffer:>6} {free.times.step_s:7.2f} {at} "
              f"{bound:8.2f} {free.times.step_s / bound:10.2f}")


def fuyou_table() -> None:
    testbed, _ = machine_from_profile(get_preset("rtx4090-768g-12nvme"), "/nvme/fuyou")
    one_ssd = dataclasses.replace(testbed, disk_read_bps=testbed.disk_read_bps / 12,
                                  disk_write_bps=testbed.disk_write_bps / 12, disk_free_bytes=2 * 10**12)
    print(f"\nFuyou, GPT-3, AdamW full-parameter, fp16, batch {FUYOU_BATCH} (assumed), seq 1024, RTX 4090 testbed "
          "preset (768 GB DDR4, NVMe Gen4 x12 RAID0 or x1), swap_dir on the NVMe")
    print(f"{'model':10} {'states':>6} {'SSDs':>4} {'TFLOPS pred':>11} {'Fuyou':>6} {'ratio':>6} {'step s':>8} {'bottleneck':>13} "
          f"{'resident':>8}")
    wl = Workload("adamw", False, "float16", batch_size=FUYOU_BATCH, seq_len=1024)
    for name in ("gpt3-13b", "gpt3-175b"):
        model = inv(name)
        for ssds, machine, placement in ((12, testbed, "auto"), (1, one_ssd, "auto"), (12, testbed, "ssd"),
                                         (1, one_ssd, "ssd")):
            # 'ssd': Fuyou's own placement, fp32 master + Adam states on the SSD whatever the RAM
            opts = Options(swap_dir="/nvme/fuyou", optimizer_home=Tier.SSD if placement == "ssd" else None)
            p = make_plan(model, wl, machine, opts)
            published = FUYOU_13B_TFLOPS.get(ssds) if name == "gpt3-13b" else None
            ratio = f"{p.tflops / published:6.2f}" if published else "     -"
            pub = f"{published:6.0f}" if published else "     -"
            state = f"{p.tflops:11.1f}" if p.feasible else "  no fit   "
            print(f"{name:10} {placement:>6} {ssds:4d} {state} {pub} {ratio} {p.times.step_s:8.1f} {p.times.bottleneck:>13} "
                  f"{len(p.resident_blocks):8d}")
            if not p.feasible:
                print("    " + "; ".join(p.reasons))


if __name__ == "__main__":
    zo2_table()
    fuyou_table()
