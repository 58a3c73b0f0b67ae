"""ZO2 streamed from host memory and from SSD files equals the in-memory MeZO reference, bit for bit
(fp32 on the CPU): same losses every step, same weights at the end. The heart of the suite."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.engine.lanes import CpuLanes, RecordingLanes
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.schedule import check_schedule, pass_schedule
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.data import batches, build_datasets, collate
from fuyoucli.train.zo import ZOReference
from fuyoucli.train.zo_streamed import ZOStreamed


def manual_plan(n_layers: int, home: Tier, *, prefetch: int = 1, swap_dir=None, budget=None,
                compute_dtype="float32", home_dtype="float32") -> Plan:
    return fixed_plan(n_layers, home, prefetch_depth=prefetch, swap_dir=str(swap_dir) if swap_dir else None,
                      compute_dtype=compute_dtype, device_budget_bytes=budget, home_dtype=home_dtype)


def setup(model_dir, data, tmp_path, method, peft=None, accum=1, dtype="float32"):
    doc = {"model": {"path": str(model_dir), "dtype": dtype}, "method": method,
           "data": {"train": [str(data)], "max_length": 24, "eval_fraction": 0.0},
           "training": {"max_steps": 4, "batch_size": 3, "grad_accum": accum, "seed": 5,
                        "output_dir": str(tmp_path / "out")}}
    if peft:
        doc["peft"] = peft
    recipe = validate_recipe(doc)
    tok = load_tokenizer(recipe.model)
    ds = build_datasets(recipe.data, tok, seed=5)
    it = iter(batches(ds.train, 3, seed=5, epoch=0))
    steps = [[collate(next(it), ds.pad_token_id) for _ in range(accum)] for _ in range(4)]
    return recipe, tok, steps


def run_reference(recipe, tok, steps, home_dtype=torch.float32):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm", home_dtype=home_dtype)
    losses = [ref.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def run_streamed(recipe, tok, steps, plan, lanes=None):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = ZOStreamed(model, plan, recipe.method, seed=5, head="causal_lm", lanes=lanes or CpuLanes())
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return losses, weights, trainer
    finally:
        trainer.close()


ZO = {"name": "zo2", "lr": 1e-2, "eps": 1e-2, "q": 2}


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "gpt2"])
@pytest.mark.parametrize("home", [Tier.PAGEABLE, Tier.SSD])
def test_zo2_streamed_equals_reference(arch, home, tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, ZO, accum=2)
    ref_losses, ref_weights = run_reference(recipe, tok, steps)
    plan = manual_plan(2, home, swap_dir=tmp_path / "swap")
    losses, weights, trainer = run_streamed(recipe, tok, steps, plan)
    assert losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    stats = trainer.store.stats
    assert stats.fetches == 2 * 4 + 2  # each layer once per step, plus the final flush
    assert stats.writebacks == 2 * 4  # steps 2..4 carry step 1..3's update, the flush carries step 4's
    if home is Tier.SSD:
        assert not any((tmp_path / "swap").iterdir())  # swap files removed on close


@pytest.mark.parametrize("variant", ["sgd", "sign"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_zo2_variants_and_prefetch_depths(variant, prefetch, tiny_models, text_data, tmp_path):
    method = {**ZO, "variant": variant, "weight_decay": 0.1}
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, method)
    ref_losses, ref_weights = run_reference(recipe, tok, steps)
    losses, weights, trainer = run_streamed(recipe, tok, steps, manual_plan(2, Tier.PINNED, prefetch=prefetch))
    assert losses == ref_losses
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)
    assert trainer.store.residency.peak_on_device <= prefetch + 1


@pytest.mark.parametrize("home", [Tier.PAGEABLE, Tier.SSD])
def test_lora_zo2_streams_the_frozen_base_read_only(home, tiny_models, text_data, tmp_path):
    peft = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, {**ZO, "lr": 5e-2}, peft=peft)
    ref_losses, ref_weights = run_reference(recipe, tok, steps)
    losses, weights, trainer = run_streamed(recipe, tok, steps, manual_plan(2, home, swap_dir=tmp_path / "swap"))
    assert losses == ref_losses
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)
    assert trainer.store.stats.writebacks == 0  # the base never changes


def test_schedule_order_is_respected(tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["opt"], text_data, tmp_path, ZO)
    lanes = RecordingLanes(CpuLanes())
    _, _, trainer = run_streamed(recipe, tok, steps[:2], manual_plan(2, Tier.PAGEABLE, prefetch=1), lanes)
    trace = trainer.store.stats.trace
    check_schedule(pass_schedule([False, True, True, False], 1), 2)
    # Per block: fetch before compute before evict, every time.
    for name in ("layers.0", "layers.1"):
        kinds = [k for k, n in trace if n == name]
        assert kinds == ["fetch", "compute", "evict"] * (len(kinds) // 3)
    # Prefetch depth 1: layers.1 is fetched before layers.0 computes.
    assert trace.index(("fetch", "layers.1")) < trace.index(("compute", "layers.0"))


def test_device_budget_is_enforced(tiny_models, text_data, tmp_path):
    from fuyoucli.engine.tiers import DeviceBudgetExceeded

    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, ZO)
    with pytest.raises(DeviceBudgetExceeded, match="budget"):
        run_streamed(recipe, tok, steps, manual_plan(2, Tier.PAGEABLE, budget=10_000))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lr_zero_leaves_weights_bit_identical(dtype, tiny_models, text_data, tmp_path):
    """No perturb/restore drift (MeZO issue 42): with lr=0, 100 steps leave every weight bit-identical."""
    from fuyoucli.recipe import ZO2Method

    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path, ZO, dtype=dtype)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = ZO2Method(name="zo2", lr=1e-3, eps=1e-2)
    plan = manual_plan(2, Tier.PAGEABLE, compute_dtype=dtype, home_dtype=dtype)
    trainer = ZOStreamed(model, plan, method, seed=5, head="causal_lm", lanes=CpuLanes())
    for t in range(100):
        trainer.step(t + 1, steps[t % 4], lr=0.0)
    trainer.materialize()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), start[n]), n


def test_full_run_streamed_from_ssd_equals_in_memory_run(tiny_models, sentiment_data, tmp_path):
    """The whole loop (evals, flushes, saving) on a classification task: metrics and saved weights match."""
    from safetensors.torch import load_file

    from fuyoucli.telemetry.jsonl import comparable, read_metrics
    from fuyoucli.train.run import finetune

    def recipe(out):
        return validate_recipe({
            "model": {"path": str(tiny_models["opt"])},
            "method": {"name": "zo2", "lr": 1e-2, "eps": 1e-2},
            "data": {"train": [str(sentiment_data)], "format": "classification", "max_length": 32,
                     "label_words": {"positive": " great", "negative": " terrible"}, "eval_fraction": 0.25},
            "training": {"max_steps": 6, "batch_size": 4, "grad_accum": 2, "eval_every": 3, "seed": 3,
                         "output_dir": str(out)},
        })

    finetune(recipe(tmp_path / "mem"))
    finetune(recipe(tmp_path / "ssd"), plan=manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap"))
    strip = lambda rows: [comparable(r) for r in rows]  # noqa: E731 - no clock readings, no byte counts
    mem, ssd = read_metrics(tmp_path / "mem" / "metrics.jsonl"), read_metrics(tmp_path / "ssd" / "metrics.jsonl")
    assert [r["kind"] for r in mem].count("eval") == 3 and "accuracy" in mem[0]
    assert strip(ssd) == strip(mem)
    a, b = load_file(tmp_path / "mem" / "model" / "model.safetensors"), load_file(tmp_path / "ssd" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any((tmp_path / "swap").iterdir())


@pytest.mark.parametrize("home", [Tier.PINNED, Tier.SSD])
def test_zo2_bf16_home_weights_equal_reference(home, tiny_models, text_data, tmp_path):
    """Home weights stored in bfloat16 (half the bytes on the link and at home): still the reference's
    arithmetic, updates through fp32 and rounded once."""
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, ZO, dtype="bfloat16")
    ref_losses, ref_weights = run_reference(recipe, tok, steps, home_dtype=torch.bfloat16)
    plan = manual_plan(2, home, swap_dir=tmp_path / "swap", compute_dtype="bfloat16", home_dtype="bfloat16")
    losses, weights, trainer = run_streamed(recipe, tok, steps, plan)
    assert losses == ref_losses
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)
    unit = next(iter(trainer.store.units.values()))
    assert trainer.store.stats.h2d_bytes == trainer.store.stats.fetches * unit.numel * 2  # bf16 on the link


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lazy_load_streams_layers_from_the_file(arch, tiny_models, text_data, tmp_path):
    """Streamed layers never load into the model: they go from safetensors to their SSD home tensor by
    tensor. Tied heads (qwen2, gpt2) still tie. Same losses and weights as the reference."""
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, ZO)
    ref_losses, ref_weights = run_reference(recipe, tok, steps)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, streamed_layers={0, 1})
    layer_params = [p for n, p in model.named_parameters() if ".0." in n or ".1." in n]
    assert layer_params and all(p.numel() == 0 for p in layer_params)
    assert all(p.numel() > 0 for n, p in model.named_parameters() if ".0." not in n and ".1." not in n)
    trainer = ZOStreamed(model, manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap"), recipe.method, seed=5,
                         head="causal_lm", lanes=CpuLanes())
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
    finally:
        trainer.close()
    assert losses == ref_losses
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref_weights[name]), name
