"""Load a model without materializing its streamed layers: they go from the safetensors file straight to
their home (host RAM or SSD), one tensor at a time, so a model larger than RAM can be homed on an SSD.

The skeleton is built on the meta device (parameters only: buffers such as rotary frequencies are
computed for real), the resident parameters are read from the file, and the streamed layers get empty
parameters whose shape and data the engine asks `TensorSource` for when it places each layer. Used only when every parameter the
model has is in the file under its own name (a new classification head or renamed checkpoint keys
fall back to the ordinary load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Container

import torch

from fuyoucli.errors import ModelError


class _AllLayers:
    def __contains__(self, index: object) -> bool:
        return True


ALL_LAYERS = _AllLayers()
"""lazy_load's streamed_layers when every decoder layer is left empty (a quantized base fills them)."""


class TensorSource:
    """Tensors of a safetensors model folder (one file or an index of shards), read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ModelError(f"no safetensors weights in {folder}")
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def has(self, key: str) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._handle(key).get_slice(key).get_shape())

    def _handle(self, key: str):
        from safetensors import safe_open

        file = self.weight_map[key]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "pt")
        return self._open[file]

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        return self._handle(key).get_tensor(key).to(dtype)

    def close(self) -> None:
        """Drop the file mappings (their pages would otherwise stay in the process's RSS)."""
        self._open.clear()


def lazy_load(source, config, *, dtype: torch.dtype, trust_remote_code: bool,
              streamed_layers: Container[int]) -> tuple[torch.nn.Module, TensorSource] | None:
    """The model with the parameters of `streamed_layers` left empty and every other one read from
    `source` (a TensorSource, or model.gguf's GGUFSource: has, shape, read, close); None when the
    source does not hold every one of the model's keys."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from fuyoucli.model.blocks import find_layer_list

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # not done on an empty skeleton; a tied head must not count as a missing key
    tied = _tied_names(model)
    if not all(source.has(name) or name in tied for name in model.state_dict()):
        return None
    prefix = find_layer_list(model)[0] + "."

    def streamed(name: str) -> bool:
        return name.startswith(prefix) and int(name[len(prefix):].split(".", 1)[0]) in streamed_layers

    for name, param in list(model.named_parameters()):  # a tied tensor appears once, under its first name
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        # A streamed parameter gets an empty real tensor: the engine reads its shape and data from the
        # source when it places the layer at home (a meta tensor could not take its data later).
        data = torch.empty(0, dtype=dtype) if streamed(name) else source.read(name, dtype)
        module._parameters[attr] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
    for name, buf in model.named_buffers():
        if source.has(name):
            buf.data = source.read(name, buf.dtype)
    model.tie_weights()
    model.eval()  # as from_pretrained leaves it: dropout off until a trainer asks for train mode
    return model, source


def _tied_names(model) -> set[str]:
    """State-dict names that are aliases of another parameter (a tied head), absent from the file."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases.add(name)
        else:
            seen[id(tensor)] = name
    return aliases
