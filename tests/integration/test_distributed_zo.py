"""Data-parallel zeroth-order training (issue 9): two gloo ranks on CPU processes equal one process with the
same examples per step, loss for loss and weight for weight.

Why they are equal bit for bit: every rank draws the same z (seeded by seed, step, direction, block) and
evaluates whole micro-batches of the step, each exactly as the single process does (same weights, same
tensors, same thread count); only each rank's (loss sum, target count) is all-reduced, in float64, and the
sums of a few fp32 loss sums of similar size are exact in float64 whatever the order. The test still
states a tolerance (1e-12 relative) so that a future change of summation order reads as a small
difference, not as a failure of the design.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fuyoucli.distributed.zo_parallel import Ranks
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.jsonl import comparable, read_metrics
from fuyoucli.train.run import finetune

ROOT = Path(__file__).parents[2]


def write_recipe(path: Path, model: Path, data: Path, out: Path, *, accum: int = 4, variant: str = "sgd") -> Path:
    path.write_text(f"""name: zo-dp
model: {{path: {model}}}
method: {{name: zo2, lr: 1.0e-2, eps: 1.0e-2, q: 2, variant: {variant}}}
data: {{train: {data}, max_length: 24, max_eval_examples: 8}}
training: {{max_steps: 4, batch_size: 2, grad_accum: {accum}, seed: 3, eval_every: 2, checkpoint_every: 2,
           output_dir: {out}}}
offload: {{mode: in_memory}}
""")
    return path


def run_ranks(recipe: Path, nproc: int, *sets: str, resume: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the reference runs with one thread too (see module doc)
    args = [sys.executable, "-m", "fuyoucli", "finetune", str(recipe), "--nproc", str(nproc), "--plain",
            *[a for s in sets for a in ("--set", s)], *(["--resume", resume] if resume else [])]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)


def reference(recipe_path: Path, *sets: str, resume: str | None = None) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(load_recipe(recipe_path, list(sets)), sinks=[], resume=resume)
    finally:
        torch.set_num_threads(threads)
    return Path(load_recipe(recipe_path, list(sets)).training.output_dir)


def test_two_gloo_ranks_equal_one_process(tiny_models, text_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "one")
    one = reference(recipe)
    done = run_ranks(recipe, 2, f"training.output_dir={tmp_path / 'two'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 ranks" in done.stdout and done.stdout.count("done: 4 steps") == 1  # rank 0 alone reports

    ref, got = read_metrics(one / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["kind"] for r in got] == [r["kind"] for r in ref] == ["eval", "train", "train", "eval", "train",
                                                                    "train", "eval"]
    for a, b in zip(ref, got):
        a, b = comparable(a), comparable(b)
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-12, abs=0), (a["step"], key)
            else:
                assert b[key] == a[key], (a["step"], key)
    print("per-step losses, 1 process vs 2 ranks:",
          [(r["loss"], g["loss"]) for r, g in zip(ref, got) if r["kind"] == "train"])
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # in fact bit for bit (see module doc)

    w_ref = load_file(str(one / "model" / "model.safetensors"))
    w_got = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert w_ref.keys() == w_got.keys()
    assert all(torch.equal(w_ref[k], w_got[k]) for k in w_ref)

    # The ranks' checkpoint is the in-memory zo2 format: one process resumes it and ends where both runs did.
    two = reference(recipe, f"training.output_dir={tmp_path / 'two'}",
                    resume=str(tmp_path / "two" / "checkpoints" / "step-00000002"))
    assert [comparable(r) for r in read_metrics(two / "metrics.jsonl")] == [comparable(r) for r in ref]
    w_resumed = load_file(str(two / "model" / "model.safetensors"))
    assert all(torch.equal(w_ref[k], w_resumed[k]) for k in w_ref)

    # ... and two ranks resume the one process's checkpoint, ending where it did.
    done = run_ranks(recipe, 2, resume=str(one / "checkpoints" / "step-00000002"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [comparable(r) for r in read_metrics(one / "metrics.jsonl")] == [comparable(r) for r in ref]
    w_resumed = load_file(str(one / "model" / "model.safetensors"))
    assert all(torch.equal(w_ref[k], w_resumed[k]) for k in w_ref)


def test_ranks_share_micro_batches_contiguously_and_unevenly():
    shares = [Ranks(r, 3).share(list(range(7))) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4], [5, 6]]
    assert [Ranks(r, 2).bounds(4) for r in range(2)] == [(0, 2), (2, 4)]
    assert Ranks(0, 1).sum([1.5, 2.0]) == [1.5, 2.0] and Ranks(0, 1).any(True)
