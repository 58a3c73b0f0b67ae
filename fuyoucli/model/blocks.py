"""Split a Hugging Face decoder model into ordered parameter blocks: embeddings, each layer, head.

The block is the unit of streaming and of zeroth-order randomness: a perturbation is seeded by
(run seed, step, direction, block), so every implementation that walks the same blocks in the same
order draws the same numbers. Discovery is generic (no per-architecture tables); imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fuyoucli.errors import ModelError
from fuyoucli.kernels.normal import splitmix64


@dataclass(frozen=True)
class ParamBlock:
    name: str
    """'embed', 'layers.N' or 'head'."""
    params: tuple[tuple[str, nn.Parameter], ...]
    """(qualified name, parameter) in the model's registration order; each shared tensor appears once."""

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list: the longest ModuleList whose children all share one class."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) != 1:
                continue
            if expected is not None and len(module) == expected:
                return name, module
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of identical blocks; "
            "fuyou supports Hugging Face decoder models built as embeddings -> layers -> norm -> head"
        )
    return best


_EMBED_HINTS = ("embed", "wte", "wpe", "project_in")


def param_blocks(model: nn.Module, trainable_only: bool = True) -> list[ParamBlock]:
    """Blocks in execution order. Parameters outside the layers go to 'embed' when they belong to an
    embedding (they run before the first layer) and to 'head' otherwise (final norm, output head)."""
    layer_path, layers = find_layer_list(model)
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    prefix = layer_path + "."
    embed: list = []
    head: list = []
    per_layer: list[list] = [[] for _ in layers]
    for name, param in model.named_parameters():  # named_parameters yields a tied tensor once
        if trainable_only and not param.requires_grad:
            continue
        if name.startswith(prefix):
            index = int(name[len(prefix):].split(".", 1)[0])
            per_layer[index].append((name, param))
        elif id(param) in embeddings or any(h in name for h in _EMBED_HINTS):
            embed.append((name, param))
        else:
            head.append((name, param))
    blocks = [ParamBlock("embed", tuple(embed))]
    blocks += [ParamBlock(f"layers.{i}", tuple(ps)) for i, ps in enumerate(per_layer)]
    blocks.append(ParamBlock("head", tuple(head)))
    return [b for b in blocks if b.params]


def block_seed(run_seed: int, step: int, direction: int, block_index: int) -> int:
    """A 63-bit seed from four integers (splitmix64 mixing), independent of execution order."""
    x = 0
    for value in (run_seed, step, direction, block_index):
        x = splitmix64(x + (value & 0xFFFFFFFFFFFFFFFF))
    return x & 0x7FFFFFFFFFFFFFFF


def block_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def execution_index(name: str, n_layers: int) -> int:
    """A block's position in a pass (0 embed, 1..n_layers the layers, n_layers + 1 head): the number the
    streamed engines key a block by, and the block of a block_seed."""
    if name == "embed":
        return 0
    if name == "head":
        return n_layers + 1
    return int(name.split(".", 1)[1]) + 1
