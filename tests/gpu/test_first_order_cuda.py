"""Offloaded first-order AdamW on a real GPU: CudaLanes (pinned memory, upload/offload streams, events;
gradients go down on the offload stream while the backward continues) against the in-memory AdamW
reference on the same GPU, like with like: every block's AdamW runs on the CPU in both (the reference
with `host_optimizer`, the engine with embeddings/head states on the host too), deterministic algorithms,
no TF32 (tests/gpu/conftest.py). What is left to differ is the device's own round-off between a whole-model
and a block-wise backward of the same kernels, so fp32 must agree to 1e-5 (the CPU suite: 1e-5), and
anything larger is an ordering bug. Run once more under TORCH_CUDA_SANITIZER=1 by scripts/gpu_check.sh."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from test_first_order_parity import LORA, lr_at, setup  # noqa: E402

from fuyoucli.engine.lanes import CudaLanes, RecordingLanes  # noqa: E402
from fuyoucli.model.loading import load_model  # noqa: E402
from fuyoucli.plan.manual import fixed_plan  # noqa: E402
from fuyoucli.plan.types import Tier  # noqa: E402
from fuyoucli.train.first_order import AdamWReference  # noqa: E402
from fuyoucli.train.first_order_streamed import AdamWStreamed  # noqa: E402

STEPS = 6


def _to_cuda(steps):
    return [[{k: v.cuda() for k, v in mb.items()} for mb in micro] for micro in steps[:STEPS]]


def run_both(recipe, tok, steps, plan, lanes=None, host_optimizer=True, **kwargs):
    """`host_optimizer`: the reference runs AdamW on the CPU, as the engine does for every block whose
    states the plan homes on the host (LoRA adapters train on the device in both)."""
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, device="cuda")
    ref = AdamWReference(model, recipe.method, head="causal_lm", host_optimizer=host_optimizer)
    ref_losses = [ref.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
    ref_weights = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, device="cpu")
    trainer = AdamWStreamed.from_plan(model, plan, recipe.method, head="causal_lm", lanes=lanes or CudaLanes("cuda"), **kwargs)
    try:
        losses = [trainer.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
        trainer.materialize()
    finally:
        trainer.close()
    weights = {n: p.detach().float().cpu() for n, p in model.named_parameters()}
    return (losses, weights), (ref_losses, ref_weights), trainer


def check(got, want, tol):
    assert got[0] == pytest.approx(want[0], rel=tol, abs=tol)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=tol, atol=tol, msg=name)


CASES = [
    (Tier.PINNED, Tier.PAGEABLE, "keep", 1.0),
    (Tier.PAGEABLE, Tier.PAGEABLE, "swap", None),
    (Tier.SSD, Tier.SSD, "recompute", 1.0),
    (Tier.PINNED, Tier.SSD, ("swap", "recompute"), None),
    (Tier.PAGEABLE, Tier.SSD, ("recompute-swap", "keep"), 1.0),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("home,opt,act,clip", CASES)
def test_first_order_cuda_equals_cuda_reference(home, opt, act, clip, dtype, tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, clip=clip, dtype=dtype)
    plan = fixed_plan(2, home, method="adamw", optimizer_home=opt, activation=act, swap_dir=str(tmp_path / "swap"),
                      compute_dtype=dtype, home_dtype=dtype, compute_device="cuda",
                      resident_optimizer_home=Tier.PAGEABLE)
    got, want, _ = run_both(recipe, tok, _to_cuda(steps), plan)
    check(got, want, 1e-5 if dtype == "float32" else 1e-2)
    assert torch.cuda.max_memory_allocated() > 0


def test_lora_cuda_streams_base_from_ssd(tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, peft=LORA, lr=5e-2)
    plan = fixed_plan(2, Tier.SSD, method="adamw", activation="keep", swap_dir=str(tmp_path / "swap"),
                      compute_device="cuda")
    got, want, trainer = run_both(recipe, tok, _to_cuda(steps), plan, host_optimizer=False)
    check(got, want, 1e-5)
    assert trainer.store.stats.writebacks == 0


@pytest.mark.parametrize("fmt,home,act", [("nf4", Tier.PINNED, "keep"), ("int8", Tier.SSD, "swap")])
def test_lora_cuda_over_a_quantized_base(fmt, home, act, tiny_models, text_data, tmp_path):
    """model.quantization on CUDA: the quantized bytes stream into a byte-laid device slot, bitsandbytes'
    CUDA kernel (nf4) or the int8 product dequantizes them there, saved codes are found again by byte
    offset for the backward."""
    if fmt == "nf4":
        pytest.importorskip("bitsandbytes")
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, peft=LORA, lr=5e-2)
    recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": fmt})})
    plan = fixed_plan(2, home, method="adamw", activation=act, swap_dir=str(tmp_path / "swap"), compute_device="cuda")
    got, want, trainer = run_both(recipe, tok, _to_cuda(steps), plan, host_optimizer=False)
    check(got, want, 1e-5)
    assert trainer.store.stats.writebacks == 0 and trainer.store.stats.d2h_bytes == 0


def test_slow_cpu_optimizer_and_resident_blocks_on_host(tiny_models, text_data, tmp_path):
    """The CPU worker slowed down, embeddings/head updated on the host and uploaded back: every wait
    (gradient copy before the update, update before the next fetch, upload before the next use) holds."""
    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path)
    plan = fixed_plan(2, Tier.PINNED, method="adamw", optimizer_home=Tier.PAGEABLE, activation="swap",
                      resident_optimizer_home=Tier.PAGEABLE, compute_device="cuda")
    lanes = RecordingLanes(CudaLanes("cuda"))
    got, want, _ = run_both(recipe, tok, _to_cuda(steps), plan, lanes=lanes, on_job=lambda e: time.sleep(0.01))
    check(got, want, 1e-5)
    kinds = {k for k, _ in lanes.log}
    assert {"upload", "offload", "compute_wait", "host_wait"} <= kinds
