"""A .gguf file read as it is: its header as a config-and-tokenizer folder, and its tensors one at a time
under their Hugging Face names, so a quantized LoRA base never expands the file to fp32 on disk.

Model stage. transformers reads a GGUF only whole (every tensor dequantized to fp32 in memory, which
model.loading.gguf_to_folder then saves: 538 MB for SmolLM2-135M's 70 MB Q4_1 file, and for a 70B
model more RAM than a desktop has). Here the gguf package's reader maps the file and `GGUFSource`
hands model.lazy one tensor at a time: dequantized with gguf's own kernels where it must be, or, for a
Q8_0 matrix kept in int8 (model.quantization: int8), its blocks as they are (the same layout:
kernels.quant). Names follow gguf's tensor-name map; Llama-architecture files store q and k with
their rows permuted for llama.cpp's rotary layout, which is undone here as transformers undoes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fuyoucli.errors import ModelError
from fuyoucli.kernels.quant import QuantizedWeight, from_q8_0
from fuyoucli.resources import cache_dir, cached_folder, gguf_key, reading_gguf

Q8_0_BLOCK_BYTES = 34
"""llama.cpp's Q8_0 block: an fp16 scale, then 32 int8 codes."""


def header_folder(gguf: Path, converted: Path) -> Path:
    """A folder holding the file's config.json and tokenizer, no weights, made once and cached (the
    `converted` folder of a full conversion, when one exists, serves as it is). Appears atomically."""
    if (converted / "config.json").is_file():
        return converted

    def fill(tmp: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        with reading_gguf(gguf):
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return cached_folder(cache_dir() / "gguf-header" / f"{gguf.stem}-{gguf_key(gguf)}", fill)


class GGUFSource:
    """The tensors of a .gguf file under Hugging Face names (model.lazy's TensorSource interface), and
    its Q8_0 matrices as int8 blocks."""

    def __init__(self, path: Path, config):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        self.path = path
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot read GGUF file {path}: {e}") from e
        arch_field = self.reader.fields.get("general.architecture")
        self.arch = str(arch_field.contents()) if arch_field is not None else ""
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == self.arch), None)
        if arch is None:
            raise ModelError(f"{path.name}: the gguf package has no tensor names for architecture {self.arch!r}")
        self.names = get_tensor_name_map(arch, config.num_hidden_layers)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.heads = getattr(config, "num_attention_heads", None)
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads

    def _gguf_name(self, key: str) -> str | None:
        module, _, suffix = key.rpartition(".")
        name = self.names.get_name(module)
        return None if name is None else f"{name}.{suffix}"

    def _tensor(self, key: str):
        name = self._gguf_name(key)
        if name is None or name not in self.tensors:
            raise KeyError(key)
        return self.tensors[name]

    def has(self, key: str) -> bool:
        name = self._gguf_name(key)
        return name is not None and name in self.tensors

    def shape(self, key: str) -> torch.Size:
        return torch.Size(reversed([int(n) for n in self._tensor(key).shape]))  # GGUF lists the fastest dim first

    def _rows(self, key: str, rows: int) -> np.ndarray | None:
        """The row order that undoes llama.cpp's q/k permutation (None: the rows are as stored)."""
        if self.arch != "llama" or self.heads is None or not (".attn_q." in (self._gguf_name(key) or "")
                                                              or ".attn_k." in (self._gguf_name(key) or "")):
            return None
        heads = self.heads if ".attn_q." in self._gguf_name(key) else self.kv_heads
        return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(-1)

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        from gguf import dequantize

        t = self._tensor(key)
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(self.shape(key))
        order = self._rows(key, values.shape[0]) if values.ndim == 2 else None
        if order is not None:
            values = values[order]
        elif not values.flags.writeable:  # a view of the mapped file (F32 tensors): torch wants its own
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    def quantized(self, key: str, fmt: str) -> QuantizedWeight | None:
        """The matrix as stored, when the file holds it in format `fmt` (Q8_0 for int8); else None."""
        from gguf import GGMLQuantizationType

        t = self._tensor(key)
        rows, cols = self.shape(key)
        if fmt != "int8" or t.tensor_type != GGMLQuantizationType.Q8_0 or cols % 32:
            return None
        blocks = np.asarray(t.data).reshape(rows, cols // 32, Q8_0_BLOCK_BYTES)
        order = self._rows(key, rows)
        if order is not None:
            blocks = blocks[order]
        scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return from_q8_0(torch.from_numpy(codes.copy()), torch.from_numpy(scale.copy()), (rows, cols))

    def close(self) -> None:
        self.tensors.clear()
        self.reader = None
