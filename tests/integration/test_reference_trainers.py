"""The in-memory reference trainers on tiny real transformers models: they learn, they repeat
bit for bit, and what they save loads back."""

from __future__ import annotations

import math

import pytest
import torch

from fuyoucli.recipe import validate_recipe
from fuyoucli.telemetry.jsonl import read_metrics
from fuyoucli.train.run import finetune

ARCHS = ("llama", "opt", "gpt2", "qwen2")


def recipe(model, data, out, method, *, peft=None, data_extra=None, training_extra=None, head="causal_lm",
           dtype="float32"):
    doc = {
        "model": {"path": str(model), "dtype": dtype, "head": head},
        "method": method,
        "data": {"train": [str(data)], "format": "text", "max_length": 32, "eval_fraction": 0.2,
                 **(data_extra or {})},
        "training": {"max_steps": 12, "batch_size": 4, "seed": 1, "output_dir": str(out),
                     **(training_extra or {})},
    }
    if peft:
        doc["peft"] = peft
    return validate_recipe(doc)


def train_rows(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def eval_rows(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]


ADAMW = {"name": "adamw", "lr": 3e-3, "max_grad_norm": 1.0}
ZO2 = {"name": "zo2", "lr": 5e-3, "eps": 1e-3, "q": 4}


@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_lowers_heldout_loss(arch, tiny_models, text_data, tmp_path):
    result = finetune(recipe(tiny_models[arch], text_data, tmp_path / "run", ADAMW))
    before, after = result.first_eval.loss, result.last_eval.loss
    assert after < before - 0.3, (before, after)
    rows = train_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens", "step_time_s", "grad_norm"} <= set(rows[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_zo2_lowers_heldout_loss(arch, tiny_models, text_data, tmp_path):
    r = recipe(tiny_models[arch], text_data, tmp_path / "run", ZO2, training_extra={"max_steps": 40})
    result = finetune(r)
    assert result.last_eval.loss < result.first_eval.loss - 0.05, (result.first_eval.loss, result.last_eval.loss)


@pytest.mark.parametrize("method", [ADAMW, ZO2], ids=["adamw", "zo2"])
def test_same_seed_gives_bit_identical_metrics(method, tiny_models, text_data, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        finetune(recipe(tiny_models["llama"], text_data, out, method, training_extra={"max_steps": 5}))
        rows = read_metrics(out / "metrics.jsonl")
        runs.append([{k: v for k, v in row.items() if k != "step_time_s"} for row in rows])
    assert runs[0] == runs[1]
    other = tmp_path / "seed2"
    finetune(recipe(tiny_models["llama"], text_data, other, method, training_extra={"max_steps": 5, "seed": 2}))
    assert [r["loss"] for r in train_rows(other)] != [r["loss"] for r in runs[0] if r["kind"] == "train"]


def test_saved_full_model_loads_and_reproduces_eval(tiny_models, text_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = finetune(recipe(tiny_models["gpt2"], text_data, out, ADAMW, training_extra={"max_steps": 3}))
    assert (out / "model" / "model.safetensors").is_file()
    assert not list(out.glob(".model.tmp-*"))
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    # Evaluate the reloaded weights through a fresh zero-step run over the same data.
    check = finetune(recipe(out / "model", text_data, tmp_path / "check", {"name": "adamw", "lr": 1e-12},
                            training_extra={"max_steps": 1}))
    assert check.first_eval.loss == pytest.approx(result.last_eval.loss, rel=1e-5)
    assert sum(p.numel() for p in reloaded.parameters()) > 0


@pytest.mark.parametrize("method", [ADAMW, {**ZO2, "lr": 1e-2, "eps": 1e-2}], ids=["adamw", "zo2"])
def test_lora_trains_adapters_only_and_saves_an_adapter(method, tiny_models, text_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    peft = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    finetune(recipe(tiny_models["llama"], text_data, out, method, peft=peft, training_extra={"max_steps": 6}))
    adapter = out / "model" / "adapter_model.safetensors"
    assert adapter.is_file() and not (out / "model" / "model.safetensors").exists()
    weights = load_file(adapter)
    assert weights and all("lora_" in k for k in weights)
    assert any(float(v.abs().sum()) > 0 for k, v in weights.items() if "lora_B" in k)  # B starts at zero
    base = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    PeftModel.from_pretrained(base, out / "model")


def test_zo2_step_matches_the_mezo_formula(tiny_models, text_data, tmp_path):
    """One step by hand: w1 = w0 - lr * (L(w0 + eps z) - L(w0 - eps z)) / (2 eps) * z, with z from the block seeds."""
    from fuyoucli.kernels.normal import NormalStream
    from fuyoucli.model.blocks import block_seed, param_blocks
    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.train.data import batches, build_datasets, collate
    from fuyoucli.train.losses import batch_loss
    from fuyoucli.train.zo import ZOReference

    r = recipe(tiny_models["opt"], text_data, tmp_path / "run", {"name": "zo2", "lr": 1e-2, "eps": 1e-2})
    tok = load_tokenizer(r.model)
    data = build_datasets(r.data, tok, seed=0)
    batch = collate(next(iter(batches(data.train, 4, seed=0, epoch=0))), data.pad_token_id)
    model = load_model(r.model, r.peft, seed=0, pad_token_id=tok.pad_token_id)
    blocks = param_blocks(model)
    assert [b.name for b in blocks] == ["embed", "layers.0", "layers.1", "head"]
    w0 = [p.detach().clone() for b in blocks for _, p in b.params]
    zs = []
    for b, block in enumerate(blocks):
        stream = NormalStream("cpu", block_seed(1, 7, 0, b))
        zs += [stream.draw(p.numel()).view(p.shape) for _, p in block.params]

    def loss_at(scale):
        with torch.no_grad():
            for (p, w, z) in zip([p for b in blocks for _, p in b.params], w0, zs):
                p.copy_(w + scale * z)
            out = batch_loss(model, batch, head="causal_lm")
        return float(out.loss_sum) / out.count

    g = (loss_at(1e-2) - loss_at(-1e-2)) / 2e-2
    with torch.no_grad():
        for p, w in zip([p for b in blocks for _, p in b.params], w0):
            p.copy_(w)
    result = ZOReference(model, blocks, r.method, seed=1, head="causal_lm").step(7, [batch], lr=1e-2)
    assert result.projected_grads[0] == pytest.approx(g, rel=1e-6)
    for p, w, z in zip([p for b in blocks for _, p in b.params], w0, zs):
        torch.testing.assert_close(p.detach(), w - 1e-2 * g * z, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["sign", "momentum"])
def test_zo2_variants_learn(variant, tiny_models, text_data, tmp_path):
    lr = 4e-3 if variant == "sign" else 5e-4
    method = {**ZO2, "variant": variant, "lr": lr}
    result = finetune(recipe(tiny_models["qwen2"], text_data, tmp_path / "run", method,
                             training_extra={"max_steps": 40}))
    assert result.last_eval.loss < result.first_eval.loss - 0.05


def test_gradient_accumulation_equals_the_big_batch(tiny_models, text_data, tmp_path):
    big = finetune(recipe(tiny_models["llama"], text_data, tmp_path / "big", ADAMW,
                          training_extra={"max_steps": 3, "batch_size": 4}))
    acc = finetune(recipe(tiny_models["llama"], text_data, tmp_path / "acc", ADAMW,
                          training_extra={"max_steps": 3, "batch_size": 2, "grad_accum": 2}))
    big_rows, acc_rows = train_rows(tmp_path / "big"), train_rows(tmp_path / "acc")
    for b, a in zip(big_rows, acc_rows):
        assert a["tokens"] == b["tokens"] and a["target_tokens"] == b["target_tokens"] <= a["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert acc.last_eval.loss == pytest.approx(big.last_eval.loss, rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_adamw_learns(dtype, tiny_models, text_data, tmp_path):
    result = finetune(recipe(tiny_models["llama"], text_data, tmp_path / "run", ADAMW, dtype=dtype))
    assert result.last_eval.loss < result.first_eval.loss - 0.3
    rows = train_rows(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_sequence_classification_head_and_label_words(tiny_models, sentiment_data, tmp_path):
    common = {"format": "classification", "template": "{text} It was", "max_length": 32, "eval_fraction": 0.25}
    words = finetune(recipe(tiny_models["llama"], sentiment_data, tmp_path / "words", ADAMW,
                            data_extra={**common, "label_words": {"positive": " great", "negative": " terrible"}},
                            training_extra={"max_steps": 15}))
    assert words.last_eval.accuracy is not None and words.last_eval.accuracy >= 0.9
    head = finetune(recipe(tiny_models["llama"], sentiment_data, tmp_path / "head", ADAMW, head="sequence_classification",
                           data_extra={**common, "labels": ["negative", "positive"]},
                           training_extra={"max_steps": 15}))
    assert head.last_eval.accuracy >= 0.9
    assert head.last_eval.loss < head.first_eval.loss
