"""The simulated asynchronous lanes are how a machine without a GPU sees a missing wait.

- A wait taken out of the engine (the CPU optimizer reading gradients without waiting for their copy)
  still passes parity with synchronous CPU lanes, which is why CI could not see such bugs before, and
  fails it under the simulation.
- `FUYOU_LANES=async-sim fuyou finetune` on a streamed AdamW recipe with clipping (updates deferred
  past the step's end, the optimizer on its worker thread) logs the in-memory run's per-step losses.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fuyoucli.engine.lanes import CpuLanes, SimulatedAsyncLanes
from fuyoucli.model.loading import load_model
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.jsonl import read_metrics
from fuyoucli.train.first_order_streamed import AdamWStreamed
from fuyoucli.train.first_order_updates import NonFiniteGradients
from fuyoucli.train.run import finetune
from test_first_order_parity import lr_at, reference, setup


class _SkipsOffloadWaits:
    """The bug under test: whoever waits for a device -> host copy goes on at once."""

    def host_wait(self, mark):
        if mark.lane != "offload":
            super().host_wait(mark)


class ForgetfulCpuLanes(_SkipsOffloadWaits, CpuLanes):
    pass


class ForgetfulSimLanes(_SkipsOffloadWaits, SimulatedAsyncLanes):
    pass


def _streamed_losses(recipe, tok, steps, lanes) -> list[float]:
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    plan = fixed_plan(2, Tier.PAGEABLE, method="adamw", optimizer_home=Tier.PAGEABLE, activation="recompute")
    trainer = AdamWStreamed.from_plan(model, plan, recipe.method, head="causal_lm", lanes=lanes, optimizer_thread=True)
    try:
        return [trainer.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
    finally:
        trainer.close()


def test_a_skipped_wait_passes_on_sync_lanes_and_fails_under_the_simulation(tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, clip=None)
    steps = steps[:6]
    want = reference(("llama", "noclip"), recipe, tok, steps)[0][:6]
    assert _streamed_losses(recipe, tok, steps, ForgetfulCpuLanes()) == pytest.approx(want, rel=1e-5)
    # The optimizer reads gradients still poisoned (NaN) by the copy in flight: the run stops on them
    # (overlapped updates check the norm), or, had it gone on, logs losses the reference never had.
    try:
        got = _streamed_losses(recipe, tok, steps, ForgetfulSimLanes(max_delay_s=0.01))
    except NonFiniteGradients:
        return
    assert any(not math.isfinite(x) for x in got) or max(abs(a - b) for a, b in zip(got, want)) > 1e-3


def _recipe(tmp_path, model, data, out, stream: bool):
    offload = "offload:\n  mode: stream\n  weights_home: pageable\n  optimizer_home: host\n" if stream else ""
    path = tmp_path / f"{out}.yaml"
    path.write_text(
        f"name: async-sim\nmodel:\n  path: {model}\nmethod:\n  name: adamw\n  lr: 3.0e-3\n  max_grad_norm: 0.5\n"
        f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.0\n"
        f"training:\n  max_steps: 6\n  batch_size: 8\n  grad_accum: 2\n  seed: 3\n  output_dir: {tmp_path / out}\n"
        f"{offload}hardware:\n  preset: cpu-laptop-8c-32g\n")
    return path


def test_cli_streamed_adamw_under_simulated_lanes_matches_in_memory(tiny_models, text_data, tmp_path):
    model = tiny_models["llama"]
    finetune(load_recipe(_recipe(tmp_path, model, text_data, "memory", stream=False)), plan=None)
    env = {**os.environ, "FUYOU_LANES": "async-sim"}
    proc = subprocess.run([sys.executable, "-m", "fuyoucli", "finetune",
                           str(_recipe(tmp_path, model, text_data, "streamed", stream=True))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "lanes: simulated-async" in proc.stdout
    assert "updates wait for the global norm" in proc.stdout  # clipping: the deferred path

    def losses(out):
        return [r["loss"] for r in read_metrics(tmp_path / out / "metrics.jsonl") if r.get("kind") == "train"]

    want, got = losses("memory"), losses("streamed")
    assert len(want) == 6 and want[-1] < want[0]
    assert got == pytest.approx(want, rel=1e-6)


def test_a_bad_lanes_choice_is_one_line(tiny_models, text_data, tmp_path):
    env = {**os.environ, "FUYOU_LANES": "fast"}
    proc = subprocess.run([sys.executable, "-m", "fuyoucli", "finetune",
                           str(_recipe(tmp_path, tiny_models["llama"], text_data, "bad", stream=True))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "FUYOU_LANES='fast' is not one of auto, sync, async-sim" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()
