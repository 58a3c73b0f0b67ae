"""A LoRA run over a quantized frozen base (model.quantization: int8 | nf4): the streamed engine equals the
in-memory run on the same quantized weights bit for bit (first-order AdamW and zo2, host and SSD homes,
synchronous and simulated-asynchronous lanes), and the quantized bytes are what streams."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.engine.lanes import lanes_for
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.loading import load_model
from fuyoucli.model.quantized import QuantLinear
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Tier
from fuyoucli.train.first_order_streamed import AdamWStreamed
from fuyoucli.train.zo import ZOReference
from fuyoucli.train.zo_streamed import ZOStreamed

import test_first_order_parity as fo
import test_zo2_parity as zo

pytestmark = pytest.mark.usefixtures("lanes_mode")

LORA = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def quantized(recipe, fmt: str):
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": fmt})})


def _same(got, want):
    losses, weights = got
    ref_losses, ref_weights = want
    assert losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name


# 'keep' and 'swap': the backward finds the codes and scales it saved in the block's byte-laid slot
@pytest.mark.parametrize("fmt,home,activation", [("int8", Tier.PAGEABLE, "recompute"), ("nf4", Tier.SSD, "keep"),
                                                 ("nf4", Tier.PINNED, "swap"), ("int8", Tier.SSD, "keep")])
def test_adamw_lora_over_a_quantized_base_streams_like_in_memory(fmt, home, activation, tiny_models, text_data,
                                                                 tmp_path):
    recipe, tok, steps = fo.setup(tiny_models["llama"], text_data, tmp_path, peft=LORA)
    recipe = quantized(recipe, fmt)
    steps = steps[:8]
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    ref = fo.AdamWReference(model, recipe.method, head="causal_lm")
    want = ([ref.step(micro, lr=fo.lr_at(t)).loss for t, micro in enumerate(steps)],
            {n: p.detach().clone() for n, p in model.named_parameters()})
    assert want[0][-1] < want[0][0]  # the adapters learned over the quantized base
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    plan = fo.plan(home, Tier.PAGEABLE, activation, tmp_path)
    trainer = AdamWStreamed.from_plan(model, plan, recipe.method, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [trainer.step(micro, lr=fo.lr_at(t)).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        got = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
        stats = trainer.store.stats
    finally:
        trainer.close()
    _same(got, want)
    assert stats.d2h_bytes == 0 and stats.writebacks == 0  # the base never changes
    assert not (tmp_path / "swap").exists() or not any((tmp_path / "swap").iterdir())


@pytest.mark.parametrize("fmt,home", [("int8", Tier.SSD), ("nf4", Tier.PAGEABLE)])
def test_zo2_lora_over_a_quantized_base_streams_like_in_memory(fmt, home, tiny_models, text_data, tmp_path):
    recipe, tok, steps = zo.setup(tiny_models["llama"], text_data, tmp_path, {**zo.ZO, "lr": 5e-2}, peft=LORA)
    recipe = quantized(recipe, fmt)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm", home_dtype=torch.float32)
    want = ([ref.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)],
            {n: p.detach().clone() for n, p in model.named_parameters()})
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = ZOStreamed.from_plan(model, zo.manual_plan(2, home, swap_dir=tmp_path / "swap"), recipe.method, seed=5,
                                   head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        got = (losses, {n: p.detach().clone() for n, p in model.named_parameters()})
        assert trainer.store.stats.writebacks == 0
    finally:
        trainer.close()
    _same(got, want)


def _medium_llama(folder):
    """A llama whose matrices are large enough (128 x 256) that blocks and alignment are a small share."""
    from tiny import make_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = make_tokenizer()
    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  vocab_size=len(tok), tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_bytes_streamed_per_step_shrink_with_the_format(text_data, tmp_path):
    """What crosses the link per step: nf4 about a quarter of the bf16 base, int8 about a half."""
    folder = _medium_llama(tmp_path / "m")
    moved = {}
    for fmt in ("none", "int8", "nf4"):
        recipe, tok, steps = fo.setup(folder, text_data, tmp_path, peft=LORA, dtype="bfloat16")
        recipe = quantized(recipe, fmt)
        model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
        plan = fixed_plan(2, Tier.PAGEABLE, method="adamw", optimizer_home=Tier.PAGEABLE, activation="recompute",
                          compute_dtype="bfloat16", home_dtype="bfloat16")
        trainer = AdamWStreamed.from_plan(model, plan, recipe.method, head="causal_lm",
                                          lanes=lanes_for(torch.device("cpu")))
        try:
            trainer.step(steps[0], lr=1e-3)
            moved[fmt] = trainer.store.stats.h2d_bytes
        finally:
            trainer.close()
    assert 0.25 <= moved["nf4"] / moved["none"] <= 0.30, moved
    assert 0.50 <= moved["int8"] / moved["none"] <= 0.56, moved
