"""Dropout's random numbers as a pure function of (step, micro-batch, block), for first-order training.

Trainer stage, shared by the in-memory AdamW reference and the streamed engine; imports torch,
model/blocks and (for a GPU's generator) engine/lanes only. The reference runs micro-batch-major, the
engine layer-major (and runs a dropped layer again in its backward), so the global RNG would hand a
(micro-batch, block) forward different masks in each. Instead each such forward draws from the global
RNG reseeded by `block_seed(step seed, micro-batch, block)`. The step seed is one draw from the global
CPU RNG at the start of a step, so a checkpoint's saved RNG state resumes it, and the global RNG is
otherwise left as it was.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from fuyoucli.engine.lanes import seed_device
from fuyoucli.model.blocks import block_seed, find_layer_list


def draw_step_seed() -> int:
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def forward_seed(step_seed: int, micro_batch: int, block: int) -> int:
    """Blocks numbered in execution order: 0 embed, 1..n the layers, n + 1 the head."""
    return block_seed(step_seed, 0, micro_batch, block)


def reseed(device: torch.device, seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    seed_device(device, seed)


@contextmanager
def seeded(device: torch.device, seed: int | None):
    """Run a block's forward with the RNG reseeded by `seed` (None: as it is), then put the RNG back.
    Yields a function that reseeds again (the head's, once the model has re-run its embeddings)."""
    if seed is None:
        yield None
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        reseed(device, seed)
        yield lambda: reseed(device, seed)


@contextmanager
def seeded_model(model: nn.Module, device: torch.device, step_seed: int, micro_batch: int):
    """One whole-model forward with each block's randomness seeded as the streamed engine seeds it: the
    embeddings from the start, each layer as it is entered, the head when the last layer returns."""
    _, layers = find_layer_list(model)
    n = len(layers)

    def at(block: int):
        return lambda *_: reseed(device, forward_seed(step_seed, micro_batch, block))

    hooks = [layer.register_forward_pre_hook(at(i + 1)) for i, layer in enumerate(layers)]
    hooks.append(layers[n - 1].register_forward_hook(at(n + 1)))
    try:
        with seeded(device, forward_seed(step_seed, micro_batch, 0)):
            yield
    finally:
        for hook in hooks:
            hook.remove()
