"""Run a Hugging Face model one block at a time, through its own modules.

The streamed engines need layer-major execution (every hidden stream through layer i while layer i is
on the device) without copying modeling code or patching transformers. Three calls do it:
- `capture`: run the model's own decoder with each layer swapped for a recorder. This computes the
  embeddings (block 'embed') and records exactly what the decoder passes to every layer (attention
  mask, rotary cos/sin, position ids...), prepared once per batch.
- `run_layer`: call layer i on a hidden state with its recorded arguments.
- `run_head`: run the whole model again with layer 0 replaced by an injector that returns the final
  hidden state and the other layers by pass-throughs; the model's own code then applies the final norm,
  the head, and (for classification heads) the pooling. Only the embedding lookup is repeated.
The swaps are undone in `finally` blocks; they touch only this model instance's layer list.
A stand-in returns what the real layers return: a tensor (llama, opt, gpt2...) or a tuple whose first
item is the hidden state (falcon, bloom), as `run_layer` saw the first time it ran a real layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from fuyoucli.model.blocks import find_layer_list


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, index: int, calls: list, stop: bool, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_inner", inner)  # not registered: parameters stay where they are
        self.index, self.calls, self.stop, self.as_tuple = index, calls, stop, as_tuple

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)

    def forward(self, hidden, *args, **kwargs):
        if self.index == 0:
            self.calls.append(("hidden", hidden))
        self.calls.append((args, kwargs))
        if self.stop:
            raise _Stop
        return (hidden,) if self.as_tuple else hidden


class _Injector(_Recorder):
    def __init__(self, inner: nn.Module, hidden: torch.Tensor | None, as_tuple: bool, on_inject=None):
        super().__init__(inner, -1, [], False, as_tuple)
        self.hidden, self.on_inject = hidden, on_inject

    def forward(self, hidden, *args, **kwargs):
        if self.on_inject is not None:
            self.on_inject()
        out = hidden if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


@dataclass
class Prepared:
    """One micro-batch after the embed block: the first hidden state and each layer's call arguments."""

    hidden: torch.Tensor
    layer_args: list[tuple[tuple, dict[str, Any]]]


class BlockRunner:
    def __init__(self, model: nn.Module):
        self.model = model
        self.layer_path, self.layers = find_layer_list(model)
        owner_path = self.layer_path.rsplit(".", 1)[0] if "." in self.layer_path else ""
        self.decoder = model.get_submodule(owner_path) if owner_path else model
        self.n_layers = len(self.layers)
        self.tuple_output = False
        """Whether a layer returns a tuple (hidden, ...) rather than the hidden state; the decoder loop
        then takes `outputs[0]`, which on a bare tensor would pick the first sequence of the batch. Set by
        `run_layer` from a real layer's output, which the engines always run before `run_head`; a capture
        made before it records the same arguments either way."""

    def _swap(self, replacements: list[nn.Module]) -> list[nn.Module]:
        originals = list(self.layers)
        for i, module in enumerate(replacements):
            self.layers[i] = module
        return originals

    def _restore(self, originals: list[nn.Module]) -> None:
        for i, module in enumerate(originals):
            self.layers[i] = module

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Prepared:
        """The embed block: the hidden state entering layer 0 and every layer's call arguments."""
        calls: list = []
        recorders = [_Recorder(layer, i, calls, i == self.n_layers - 1, self.tuple_output)
                     for i, layer in enumerate(self.layers)]
        originals = self._swap(recorders)
        try:
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass
        finally:
            self._restore(originals)
        hidden = calls[0][1]
        return Prepared(hidden=hidden, layer_args=calls[1:])

    def run_layer(self, index: int, hidden: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        args, kwargs = prepared.layer_args[index]
        out = self.layers[index](hidden, *args, **kwargs)
        self.tuple_output = isinstance(out, tuple)
        return out[0] if self.tuple_output else out

    def run_head(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 before_head: Callable[[], None] | None = None) -> torch.Tensor:
        """Logits from the final hidden state, through the model's own norm, head and pooling.
        `before_head()` runs when the hidden state is injected, after the repeated embedding lookup."""
        layers = list(self.layers)
        replacements = [_Injector(layers[0], hidden, self.tuple_output, before_head)]
        replacements += [_Injector(layer, None, self.tuple_output) for layer in layers[1:]]
        originals = self._swap(replacements)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._restore(originals)
        return out.logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Block by block, all in place: must equal model(...).logits (tested per architecture)."""
        prepared = self.capture(input_ids, attention_mask)
        hidden = prepared.hidden
        for i in range(self.n_layers):
            hidden = self.run_layer(i, hidden, prepared)
        return self.run_head(hidden, input_ids, attention_mask)
