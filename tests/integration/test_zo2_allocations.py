"""The streamed ZO2 step allocates nothing of a weight's size: z, the update direction, the perturbed
weights and the fp32 working copy are buffers the engine made once from its device arena.

Measured, not timed: torch's profiler (profile_memory) reports every allocation of the CPU allocator,
including the temporaries kernels make inside an op (the fp32 copy of a bf16 operand); the test
counts those of at least the smallest weight matrix's bytes during steps 2-4. The model is shaped so
that every weight matrix is larger than any activation of the batch (hidden 256, 2 x 8 tokens), so a
per-parameter temporary shows up and the forward's own activations do not.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fuyoucli.engine.lanes import lanes_for
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.zo_streamed import ZOStreamed

pytestmark = pytest.mark.usefixtures("lanes_mode")

HIDDEN, TOKENS = 256, (2, 8)
SMALLEST_MATRIX = HIDDEN * HIDDEN // 4  # k_proj/v_proj with 1 of 4 key-value heads
# The largest activation is the MLP's 16 x 512 = 8192 elements: half of it.


# The forward's products may take a workspace inside the op (oneDNN packs bf16 operands): that is the
# model's own compute, like its activations, and is left out (counted apart, in `products`).
PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


class LargeAllocations:
    """Records the sizes of the CPU allocations of at least `min_bytes` made inside the block."""

    def __init__(self, min_bytes: int):
        self.min_bytes = min_bytes
        self.seen: list[int] = []
        self.products: list[int] = []

    def __enter__(self) -> "LargeAllocations":
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = self._prof.profiler.kineto_results.events()
        spans = [(e.start_thread_id(), e.start_ns(), e.end_ns()) for e in events if e.name() in PRODUCTS]
        for e in events:
            if e.name() == "[memory]" and e.nbytes() >= self.min_bytes:
                inside = any(t == e.start_thread_id() and a <= e.start_ns() <= b for t, a, b in spans)
                (self.products if inside else self.seen).append(e.nbytes())


def wide_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, vocab_size=320,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def batches(n: int):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 320, TOKENS, generator=gen)
        out.append([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    return out


@pytest.mark.parametrize("variant,home,dtype", [
    ("sgd", Tier.PAGEABLE, "float32"),
    ("momentum", Tier.SSD, "float32"),
    ("conservative", Tier.PAGEABLE, "float32"),
    ("sign", Tier.PAGEABLE, "bfloat16"),
])
def test_streamed_steps_allocate_no_weight_sized_tensor(variant, home, dtype, tmp_path):
    method = ZO2Method(name="zo2", lr=1e-3, eps=1e-3, q=2, variant=variant, weight_decay=0.1)
    model = wide_model().to(getattr(torch, dtype))
    plan = fixed_plan(2, home, swap_dir=str(tmp_path / "swap"), compute_dtype=dtype, home_dtype=dtype)
    trainer = ZOStreamed.from_plan(model, plan, method, seed=1, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    steps = batches(4)
    try:
        trainer.step(1, steps[0], lr=1e-3)  # step 1 has no deferred update yet; steps 2.. have everything
        used, buffers = trainer.arena.used_bytes, len(trainer.arena._sizes)
        with LargeAllocations(SMALLEST_MATRIX * model.dtype.itemsize) as probe:
            for t in range(1, 4):
                trainer.step(t + 1, steps[t], lr=1e-3)
        assert probe.seen == []
        assert trainer.arena.used_bytes == used and len(trainer.arena._sizes) == buffers
    finally:
        trainer.close()


def test_the_probe_sees_a_per_parameter_temporary():
    """The measure itself: a perturbed copy made the old way (home + eps * z, a bf16 home) is seen: the
    scaled z, the fp32 copy of the home the mixed sum makes inside the op, and the sum."""
    weight = wide_model().model.layers[0].self_attn.k_proj.weight.detach()
    home, z = weight.to(torch.bfloat16), torch.randn(weight.shape)
    with LargeAllocations(SMALLEST_MATRIX * 2) as probe:
        _ = home + 1e-3 * z
    assert probe.seen == [SMALLEST_MATRIX * 4] * 3
