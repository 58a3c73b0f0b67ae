"""ZO2 on a real GPU: CudaLanes (pinned memory, upload/offload streams, events) against the in-memory
reference on the same GPU. z comes from the CUDA generator in both, so fp32 should match exactly;
the tolerance covers kernels whose reductions may differ between the two call paths."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from test_zo2_parity import ZO, manual_plan, setup  # noqa: E402

from fuyoucli.engine.lanes import CudaLanes  # noqa: E402
from fuyoucli.model.blocks import param_blocks  # noqa: E402
from fuyoucli.model.loading import load_model  # noqa: E402
from fuyoucli.plan.types import Tier  # noqa: E402
from fuyoucli.train.zo import ZOReference  # noqa: E402
from fuyoucli.train.zo_streamed import ZOStreamed  # noqa: E402


def _to_cuda(steps):
    return [[{k: v.cuda() for k, v in mb.items()} for mb in micro] for micro in steps]


@pytest.mark.parametrize("z_buffer", ["block", "tensor"])
@pytest.mark.parametrize("home", [Tier.PINNED, Tier.PAGEABLE, Tier.SSD])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zo2_cuda_streamed_equals_cuda_reference(home, dtype, z_buffer, tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, ZO, accum=2, dtype=dtype)
    steps = _to_cuda(steps)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, device="cuda")
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm")
    ref_losses = [ref.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
    ref_weights = {n: p.detach().float().cpu() for n, p in model.named_parameters()}

    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, device="cpu")
    plan = dataclasses.replace(manual_plan(2, home, prefetch=1, swap_dir=tmp_path / "swap", compute_dtype=dtype),
                               z_buffer=z_buffer)
    trainer = ZOStreamed.from_plan(model, plan, recipe.method, seed=5, head="causal_lm", lanes=CudaLanes("cuda"))
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
    finally:
        trainer.close()
    tol = 0.0 if dtype == "float32" else 1e-2
    assert losses == pytest.approx(ref_losses, rel=tol, abs=tol)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().float().cpu(), ref_weights[name], rtol=tol, atol=tol or 1e-6)
    assert torch.cuda.max_memory_allocated() > 0
