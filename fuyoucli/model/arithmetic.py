"""Model inventory by config arithmetic, for architectures fuyou knows: no torch, no transformers.

The fast path of model.inventory: planning a 175B model should not wait seconds for torch and
transformers to import. For llama, mistral, qwen2, opt and gpt2 configs in their common forms (the
checks below), a config.json's numbers give exactly what the meta-device path measures: the same
blocks, parameter counts, FLOPs, activation sizes and traced elementwise counts (the trace's totals
at its fixed shape are linear in the widths; tests/unit/test_inventory.py checks equality against the
meta path). Anything else (LoRA, classification heads, other architectures or options, remote code)
returns None and the meta path builds the model.
"""

from __future__ import annotations

from fuyoucli.hardware.llama_layer import TRACE_BATCH, TRACE_TOKENS, llama_layer
from fuyoucli.model.types import BlockSpec, ModelInventory

# The meta path traces a forward of TRACE_BATCH x TRACE_TOKENS tokens; elementwise counts below are
# that trace's totals, divided the same way (the hardware probe times a Llama layer counted alike).
_TOKENS = TRACE_BATCH * TRACE_TOKENS
_POSITIONS = TRACE_BATCH * (TRACE_TOKENS - 1)

# Class defaults (transformers' config classes) for the keys read here, used when config.json omits them.
_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                  hidden_act="silu", sliding_window=None),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, hidden_act="silu",
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False),
    "opt": dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=2048, do_layer_norm_before=True, _remove_final_layer_norm=False,
                enable_bias=True, layer_norm_elementwise_affine=True, activation_function="relu",
                tie_word_embeddings=True),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", tie_word_embeddings=True),
}
_LLAMA_LIKE = ("llama", "mistral", "qwen2")


def known_inventory(cfg: dict, *, head: str = "causal_lm", lora: bool = False, trust_remote_code: bool = False,
                    source: str = "") -> ModelInventory | None:
    """The inventory of a config.json's contents, or None when this arithmetic does not cover it."""
    kind = cfg.get("model_type")
    if kind not in _DEFAULTS or lora or head != "causal_lm" or trust_remote_code:
        return None
    c = {**_DEFAULTS[kind], **cfg}
    if kind in _LLAMA_LIKE:
        return _llama_like(kind, c, source)
    if kind == "opt":
        return _opt(c, source)
    return _gpt2(c, source)


def _spec(name, params, tensors, flops, per_key, window, boundary, internal, elementwise_total) -> BlockSpec:
    return BlockSpec(name=name, params=params, trainable_params=params, max_tensor_params=max(tensors, default=0),
                     matmul_flops_per_token=flops, attention_flops_per_token_per_key=per_key, attention_window=window,
                     boundary_elems_per_token=boundary, internal_elems_per_token=internal,
                     elementwise_elems_per_token=elementwise_total // _TOKENS)


def _inventory(kind, c, h, vocab, layers, tied, blocks, source) -> ModelInventory:
    return ModelInventory(model_type=kind, hidden_size=h, num_layers=layers, vocab_size=vocab, tied_embeddings=tied,
                          blocks=tuple(blocks), source=source,
                          loss_elems_per_position=(4 + 56 * vocab) // _POSITIONS)


def _llama_like(kind: str, c: dict, source: str) -> ModelInventory | None:
    h, inter, L, heads = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["num_attention_heads"]
    kvh = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    if (hd * heads != h or c.get("hidden_act") != "silu" or c.get("pretraining_tp", 1) != 1
            or rope.get("rope_type", rope.get("type", "default")) != "default"
            or (kind == "qwen2" and c.get("use_sliding_window"))):
        return None
    vocab, tied = c["vocab_size"], bool(c["tie_word_embeddings"])
    layer = llama_layer(h, inter, heads, kvh, hd, attention_bias=kind == "qwen2" or bool(c.get("attention_bias")),
                        output_bias=kind != "qwen2" and bool(c.get("attention_bias")), mlp_bias=bool(c.get("mlp_bias")))
    window = c.get("sliding_window") if kind == "mistral" else None
    blocks = [_spec("embed", vocab * h, [vocab * h], 0, 0, None, h, h, 40 + 32 * h + (169 * hd) // 2)]
    blocks += [BlockSpec(name=f"layers.{i}", params=layer.params, trainable_params=layer.params,
                         max_tensor_params=max(layer.tensors), matmul_flops_per_token=layer.matmul_flops_per_token,
                         attention_flops_per_token_per_key=layer.attention_flops_per_token_per_key,
                         attention_window=window, boundary_elems_per_token=h,
                         internal_elems_per_token=layer.internal_elems_per_token,
                         elementwise_elems_per_token=layer.elementwise_elems_per_token) for i in range(L)]
    head_params = h + (0 if tied else vocab * h)
    blocks.append(_spec("head", head_params, [h] + ([] if tied else [vocab * h]), 2 * h * vocab, 0, None, 0,
                        h + 3 * vocab, 96 + 113 * h))
    return _inventory(kind, c, h, vocab, L, tied, blocks, source)


def _opt(c: dict, source: str) -> ModelInventory | None:
    h, ffn, L, heads = c["hidden_size"], c["ffn_dim"], c["num_hidden_layers"], c["num_attention_heads"]
    if (c.get("word_embed_proj_dim") or h) != h or not c["do_layer_norm_before"] or c["_remove_final_layer_norm"] \
            or not c["enable_bias"] or not c["layer_norm_elementwise_affine"] or c["activation_function"] != "relu":
        return None
    vocab, tied = c["vocab_size"], bool(c["tie_word_embeddings"])
    positions = c["max_position_embeddings"] + 2  # OPT's learned positions are offset by 2
    embed = [vocab * h, positions * h]
    tensors = [h * h] * 4 + [h * ffn, ffn * h]
    params = sum(tensors) + 4 * h + ffn + h + 4 * h  # biases of q, k, v, out, fc1, fc2; two layer norms
    blocks = [_spec("embed", sum(embed), embed, 0, 0, None, h, h, 176 + 112 * h)]
    blocks += [_spec(f"layers.{i}", params, tensors, 2 * sum(tensors), 4 * h, None, h, 4 * h + ffn + h + 4 * h,
                     64 + 228 * h + 32 * ffn) for i in range(L)]
    head_params = 2 * h + (0 if tied else vocab * h)
    blocks.append(_spec("head", head_params, [h] + ([] if tied else [vocab * h]), 2 * h * vocab, 0, None, 0,
                        h + 3 * vocab, 32 + 34 * h))
    return _inventory("opt", c, h, vocab, L, tied, blocks, source)


def _gpt2(c: dict, source: str) -> ModelInventory | None:
    h, L, heads = c["n_embd"], c["n_layer"], c["n_head"]
    inner = c.get("n_inner") or 4 * h
    if c["activation_function"] != "gelu_new" or c.get("add_cross_attention") or h % heads:
        return None
    vocab, tied = c["vocab_size"], bool(c["tie_word_embeddings"])
    embed = [vocab * h, c["n_positions"] * h]
    tensors = [h * 3 * h, h * h, h * inner, inner * h]
    params = sum(tensors) + 3 * h + h + inner + h + 4 * h  # Conv1D biases; two layer norms
    blocks = [_spec("embed", sum(embed), embed, 0, 0, None, h, h, 16 + 88 * h)]
    blocks += [_spec(f"layers.{i}", params, tensors, 2 * sum(tensors), 4 * h, None, h, 3 * h + h + inner + h + 4 * h,
                     64 + 196 * h + 288 * inner) for i in range(L)]
    head_params = 2 * h + (0 if tied else vocab * h)
    blocks.append(_spec("head", head_params, [h] + ([] if tied else [vocab * h]), 2 * h * vocab, 0, None, 0,
                        h + 3 * vocab, 32 + 34 * h))
    return _inventory("gpt2", c, h, vocab, L, tied, blocks, source)
