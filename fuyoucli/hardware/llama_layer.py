"""Hardware profile stage, the decoder layer the probe times, counted from its shape: a Llama layer's
parameters, products and elementwise work per token (plain integers; no torch, nothing of fuyou's).

model.arithmetic counts the Llama-like layers of a planned model with this same function, so the
layer a profile timed and a model's layers are priced from the same numbers (the calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

# The model stage counts elementwise work by tracing a forward of TRACE_BATCH x TRACE_TOKENS tokens on
# the meta device (model.inventory); the totals below are that trace's, divided the same way.
TRACE_BATCH, TRACE_TOKENS = 2, 8


@dataclass(frozen=True)
class LayerCounts:
    params: int
    tensors: tuple[int, ...]
    """Elements of each weight matrix (q, k, v, o, gate, up, down)."""
    matmul_flops_per_token: int
    attention_flops_per_token_per_key: int
    internal_elems_per_token: int
    elementwise_elems_per_token: int


def llama_layer(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, *,
                attention_bias: bool = False, output_bias: bool = False, mlp_bias: bool = False) -> LayerCounts:
    """A Llama decoder layer (attention with rotary embeddings, RMSNorms, a SiLU-gated MLP) by its shape;
    the elementwise count is the meta trace's total, linear in the widths (tests/unit/test_inventory.py
    checks it against the trace)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    tensors = (hidden * q, hidden * kv, hidden * kv, q * hidden, hidden * intermediate, hidden * intermediate,
               intermediate * hidden)
    params = sum(tensors) + 2 * hidden + (q + 2 * kv if attention_bias else 0) + (hidden if output_bias else 0) \
        + (2 * intermediate + hidden if mlp_bias else 0)
    gqa = q if 1 < kv_heads < heads else 0  # repeat_kv copies k and v unless heads share one (or none do)
    elementwise = 192 + 514 * hidden + 160 * kv + 80 * intermediate + 32 * head_dim + 64 * gqa
    return LayerCounts(params=params, tensors=tensors, matmul_flops_per_token=2 * sum(tensors),
                       attention_flops_per_token_per_key=4 * heads * head_dim,
                       internal_elems_per_token=q + 2 * kv + hidden + 2 * intermediate + hidden + 4 * hidden,
                       elementwise_elems_per_token=elementwise // (TRACE_BATCH * TRACE_TOKENS))
