"""Model stage, the data: a model's blocks in execution order, with their sizes and work per token.

Frozen dataclasses of plain numbers, built from a config alone (model.inventory, model.arithmetic)
and read by the planner. Imports nothing: every later stage may use these.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

QUANT_BYTES_PER_PARAM: dict[str, float] = {"int8": 1 + 2 / 32, "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}
"""Bytes a weight stored by model.quantization takes (kernels.quant's formats, priced here for the
planner, which imports no torch): int8, a byte and an fp16 scale per 32; nf4, half a byte, an 8-bit
absmax per 64 and an fp32 scale per 256 of those."""


@dataclass(frozen=True)
class BlockSpec:
    """One block of the model as the inventory sees it (config only, no weights)."""

    name: str
    """'embed', 'layers.N' or 'head' (the names fuyoucli.model.blocks gives)."""
    params: int
    """Parameters owned by the block (a tied head's weight belongs to 'embed')."""
    trainable_params: int
    """Of those, the ones the recipe trains (all of them, or the LoRA adapters / a new head)."""
    max_tensor_params: int
    """The largest single tensor of the block (sizes per-tensor work buffers such as a ZO direction z)."""
    matmul_flops_per_token: int
    """Forward FLOPs per token of the block's matrix products (2 per multiply-add; a tied head counts here)."""
    attention_flops_per_token_per_key: int
    """Forward FLOPs per token per attended key (QK^T and AV: 4 * heads * head_dim); 0 outside attention."""
    attention_window: int | None
    """Sliding-window size when the block attends to at most that many keys; None: the whole sequence."""
    boundary_elems_per_token: int
    """Elements per token of the hidden state the block hands on (its output)."""
    internal_elems_per_token: int
    """Elements per token the block keeps for its backward (and allocates at peak in a forward)."""
    elementwise_elems_per_token: int = 0
    """Elements read plus written per token by the block's forward outside matrix products and
    attention (norms, activations, rotary embeddings, residual adds, casts, copies), as traced on the
    meta device (the loss: ModelInventory.loss_elems_per_position). Memory-bound work, and on a CPU
    a large share of a forward's time."""
    quantizable_params: int = 0
    """Of the frozen parameters, the decoder layer's nn.Linear weights: what model.quantization stores
    quantized (model.quantized); 0 outside the decoder layers and in an inventory that trains them."""

    def forward_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token at this sequence length; causal attention sees (seq+1)/2 keys on average."""
        keys = (seq_len + 1) // 2 if self.attention_window is None else min(self.attention_window, (seq_len + 1) // 2)
        return self.matmul_flops_per_token + self.attention_flops_per_token_per_key * keys

    def param_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelInventory:
    """A model's blocks in execution order, from its config alone."""

    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    tied_embeddings: bool
    blocks: tuple[BlockSpec, ...]
    source: str = ""
    """Where the config came from (for reports)."""
    loss_elems_per_position: int = 0
    """Elements the loss (train.losses: fp32 cross-entropy) reads plus writes per scored position,
    outside the head's product: a few passes over the vocabulary (or the labels)."""

    @property
    def params(self) -> int:
        return sum(b.params for b in self.blocks)

    @property
    def trainable_params(self) -> int:
        return sum(b.trainable_params for b in self.blocks)
