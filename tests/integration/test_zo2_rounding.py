"""16-bit ZO homes: stochastic rounding keeps MeZO-sized updates that rounding to nearest drops.

With lr 1e-6 (MeZO's range) each step moves a weight by far less than half a bfloat16 step at its
magnitude: rounded to nearest the update mostly vanishes; rounded stochastically it survives in
expectation. Stochastic rounding is unbiased, not noise-free, so the check compares directions: the
projection of each run's total weight change on the fp32-home run's.
"""

from __future__ import annotations

import pytest
import torch

from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.data import batches, build_datasets, collate
from fuyoucli.train.zo import ZOReference

STEPS, LR = 30, 1e-6


def _run(recipe, tok, micro, home_dtype, rounding, seed=5):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=seed, head="causal_lm",
                      home_dtype=home_dtype, home_rounding=rounding)
    start = torch.cat([h.float().flatten() for b in ref.home for h in b])
    losses = [ref.step(t + 1, m, lr=LR).loss for t, m in enumerate(micro)]
    return torch.cat([h.float().flatten() for b in ref.home for h in b]) - start, losses


@pytest.fixture(scope="module")
def setup(tiny_models, text_data, tmp_path_factory):
    doc = {"model": {"path": str(tiny_models["llama"])}, "method": {"name": "zo2", "lr": LR, "eps": 1e-3, "q": 1},
           "data": {"train": [str(text_data)], "max_length": 24, "eval_fraction": 0.0},
           "training": {"max_steps": STEPS, "batch_size": 4, "seed": 5,
                        "output_dir": str(tmp_path_factory.mktemp("out"))}}
    recipe = validate_recipe(doc)
    tok = load_tokenizer(recipe.model)
    ds = build_datasets(recipe.data, tok, seed=5)
    it = iter(batches(ds.train, 4, seed=5, epoch=0))
    return recipe, tok, [[collate(next(it), ds.pad_token_id)] for _ in range(STEPS)]


def test_stochastic_rounding_follows_fp32_where_nearest_stalls(setup):
    recipe, tok, micro = setup
    d32, loss32 = _run(recipe, tok, micro, torch.float32, "nearest")
    d_near, _ = _run(recipe, tok, micro, torch.bfloat16, "nearest")
    d_sr, loss_sr = _run(recipe, tok, micro, torch.bfloat16, "stochastic")

    def projection(d):
        return float(d @ d32 / (d32 @ d32))

    assert projection(d_near) < 0.5, "nearest rounding should lose most sub-resolution updates"
    assert 0.8 <= projection(d_sr) <= 1.2
    # The loss curve follows fp32's within the spread between seeds (other z draws, same data).
    spread = max(max(abs(a - b) for a, b in zip(loss32, _run(recipe, tok, micro, torch.float32, "nearest", s)[1]))
                 for s in (6, 7))
    assert max(abs(a - b) for a, b in zip(loss32, loss_sr)) <= spread


def test_lr_zero_leaves_a_stochastic_bf16_home_bit_identical(setup):
    recipe, tok, micro = setup
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm",
                      home_dtype=torch.bfloat16, home_rounding="stochastic")
    before = [h.clone() for b in ref.home for h in b]
    for t, m in enumerate(micro[:3]):
        ref.step(t + 1, m, lr=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, [h for b in ref.home for h in b]))


# ---- streamed == in-memory with stochastic 16-bit homes -----------------------------------------------

ZO = {"name": "zo2", "lr": 1e-2, "eps": 1e-2, "q": 2}


@pytest.mark.usefixtures("lanes_mode")
@pytest.mark.parametrize("home,method", [
    ("pinned", ZO), ("ssd", {**ZO, "variant": "momentum", "momentum": 0.9}),
    ("pageable", {**ZO, "variant": "conservative", "lr": 5e-2, "weight_decay": 0.1}),
    ("pinned", {**ZO, "variant": "sign", "lr": 1e-3})])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_streamed_equals_in_memory_with_16_bit_homes(rounding, home, method, tiny_models, text_data, tmp_path):
    """bf16 homes, both roundings, every variant: the streamed engine stores exactly what the reference
    stores (losses, projected gradients, conservative choices, weights bit for bit)."""
    from test_zo2_parity import assert_same, manual_plan, run_both, setup as parity_setup

    from fuyoucli.plan.types import Tier

    recipe, tok, steps = parity_setup(tiny_models["llama"], text_data, tmp_path, method, dtype="bfloat16")
    plan = manual_plan(2, Tier(home), swap_dir=tmp_path / "swap", compute_dtype="bfloat16", home_dtype="bfloat16")
    ref, streamed, _ = run_both(recipe, tok, steps, plan, home_dtype=torch.bfloat16, home_rounding=rounding)
    assert_same(ref, streamed)
