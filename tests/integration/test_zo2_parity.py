"""ZO2 streamed from host memory and from SSD files equals the in-memory MeZO reference, bit for bit
(fp32 on the CPU): same losses every step, same weights at the end. The heart of the suite."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.engine.lanes import RecordingLanes, lanes_for
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.schedule import check_schedule, pass_schedule
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.data import batches, build_datasets, collate
from fuyoucli.train.zo import ZOReference
from fuyoucli.train.zo_streamed import ZOStreamed

pytestmark = pytest.mark.usefixtures("lanes_mode")


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


def run_streamed(recipe, tok, steps, plan, lanes=None, record_ops=False):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = ZOStreamed.from_plan(model, plan, recipe.method, seed=5, head="causal_lm",
                                   lanes=lanes or lanes_for(torch.device("cpu")))
    if record_ops:
        trainer.engine.ops.start()
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return losses, weights, trainer
    finally:
        trainer.close()


ZO = {"name": "zo2", "lr": 1e-2, "eps": 1e-2, "q": 2}


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2", "gpt2", "falcon", "bloom"])
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
    lanes = RecordingLanes(lanes_for(torch.device("cpu")))
    _, _, trainer = run_streamed(recipe, tok, steps[:2], manual_plan(2, Tier.PAGEABLE, prefetch=1), lanes, record_ops=True)
    names = {u.index: u.name for u in trainer.store.units.values()}  # the operations on streamed blocks
    trace = [(op.kind, names[op.block]) for op in trainer.engine.ops.done
             if op.kind in ("fetch", "apply", "write_home", "compute", "evict") and op.block in names]
    check_schedule(pass_schedule([False, True, True, False], 1), 2)
    # Per block, every time: fetched, its deferred update applied and sent home at once (a pass after
    # the first step, or a flush), then computed (not in a flush), then evicted.
    forms = (("fetch", "compute", "evict"), ("fetch", "apply", "write_home", "compute", "evict"),
             ("fetch", "apply", "write_home", "evict"))
    for name in ("layers.0", "layers.1"):
        kinds = " ".join(k for k, n in trace if n == name).replace("fetch", "|fetch").split("|")[1:]
        assert kinds and all(tuple(g.split()) in forms for g in kinds), kinds
        assert ("fetch", "apply", "write_home", "compute", "evict") in [tuple(g.split()) for g in kinds]
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
    trainer = ZOStreamed.from_plan(model, plan, method, seed=5, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
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
    trainer = ZOStreamed.from_plan(model, manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap"), recipe.method, seed=5,
                                   head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
    finally:
        trainer.close()
    assert losses == ref_losses
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), ref_weights[name]), name


# ---- variants conservative and momentum, streamed -----------------------------------------------------


def run_both(recipe, tok, steps, plan, home_dtype=torch.float32, home_rounding="nearest"):
    """(reference results, streamed results, streamed trainer) for the same steps: every ZOStepResult.
    The reference draws z in the plan's pieces (Plan.z_piece), as the engine does."""
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm", home_dtype=home_dtype,
                      home_rounding=home_rounding, z_piece=plan.z_piece)
    ref_out = [ref.step(t + 1, micro, lr=recipe.method.lr) for t, micro in enumerate(steps)]
    ref_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = ZOStreamed.from_plan(model, plan, recipe.method, seed=5, head="causal_lm", lanes=lanes_for(torch.device("cpu")),
                                   home_rounding=home_rounding)
    try:
        out = [trainer.step(t + 1, micro, lr=recipe.method.lr) for t, micro in enumerate(steps)]
        trainer.materialize()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        trainer.close()
    return (ref_out, ref_weights), (out, weights), trainer


def assert_same(ref, streamed):
    (ref_out, ref_weights), (out, weights) = ref, streamed
    assert [r.loss for r in out] == [r.loss for r in ref_out]
    assert [r.projected_grads for r in out] == [r.projected_grads for r in ref_out]
    assert [(r.applied_lr, r.candidate, r.candidate_losses) for r in out] == \
        [(r.applied_lr, r.candidate, r.candidate_losses) for r in ref_out]
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name


# lr large enough that some steps are rejected (here about half) and some reversed
CONS = {**ZO, "variant": "conservative", "lr": 5e-2, "weight_decay": 0.1}
CONS_ALL = {**CONS, "lr": 4e-2, "q": 1}  # on qwen2, 8 steps reach all three outcomes (z: the CPU counter stream)


@pytest.mark.parametrize("arch,home,method,accum,outcomes", [
    ("llama", Tier.PAGEABLE, CONS, 2, {0, 1}), ("opt", Tier.SSD, CONS, 1, {0, 1, -1}),
    ("qwen2", Tier.PINNED, CONS_ALL, 1, {1, -1})])
def test_zo2_conservative_streamed_equals_reference(arch, home, method, accum, outcomes, tiny_models, text_data,
                                                    tmp_path):
    """Conservative ZO-SGD: the second streamed pass (w, w - u, w + u; candidates formed from the home
    copy and z from the seed) gives the reference's candidate losses, choices and weights, bit for bit."""
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, method, accum=accum)
    ref, streamed, trainer = run_both(recipe, tok, steps, manual_plan(2, home, swap_dir=tmp_path / "swap"))
    assert_same(ref, streamed)
    out = streamed[0]
    assert all(r.applied_lr == r.candidate * recipe.method.lr for r in out)
    assert {r.candidate for r in out} == outcomes
    applied = sum(1 for r in out[:-1] if r.candidate != 0)
    stats = trainer.store.stats
    assert stats.fetches == 2 * 2 * 4 + 2 * (out[-1].candidate != 0)  # two passes a step, plus the final flush
    assert stats.writebacks == 2 * (applied + (out[-1].candidate != 0))  # a rejected step writes nothing back


def test_zo2_conservative_takes_every_candidate(tiny_models, text_data, tmp_path):
    """Over steps with a large lr, the conservative step keeps w - u, rejects and reverses: each outcome
    is reached (so the parity tests cover all three), and the kept loss is the lowest candidate's."""
    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path, CONS_ALL)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm")
    seen = set()
    for t in range(8):
        r = ref.step(t + 1, steps[t % 4], lr=recipe.method.lr)
        minus, home, plus = r.candidate_losses
        assert {1: minus, 0: home, -1: plus}[r.candidate] == min(r.candidate_losses)
        seen.add(r.candidate)
    assert seen == {1, 0, -1}


def test_zo2_conservative_replays_from_the_ledger(tiny_models, text_data, tmp_path):
    """The ledger records c * lr: replaying it (reference and streamed) rebuilds the weights exactly, and
    a rejected step (lr 0) replays as a no-op."""
    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path, CONS_ALL)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm")
    ledger = []
    for t in range(8):
        r = ref.step(t + 1, steps[t % 4], lr=recipe.method.lr)
        ledger.append((t + 1, r.projected_grads, r.applied_lr))
    assert any(lr == 0 for _, _, lr in ledger) and any(lr < 0 for _, _, lr in ledger)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    fresh = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    again = ZOReference(fresh, param_blocks(fresh), recipe.method, seed=5, head="causal_lm")
    for entry in ledger:
        before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
        again.replay(*entry)
        if entry[2] == 0:
            assert all(torch.equal(p.detach(), before[n]) for n, p in fresh.named_parameters())
    assert all(torch.equal(p.detach(), final[n]) for n, p in fresh.named_parameters())

    fresh = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    streamed = ZOStreamed.from_plan(fresh, manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap"), recipe.method, seed=5,
                                    head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        streamed.load_state({f"param.{n}": t for n, t in start.items()})
        for entry in ledger:
            streamed.replay(*entry)
        streamed.materialize()
    finally:
        streamed.close()
    assert all(torch.equal(p.detach(), final[n]) for n, p in fresh.named_parameters())


MOMENTUM = {**ZO, "variant": "momentum", "momentum": 0.8, "weight_decay": 0.1}


@pytest.mark.parametrize("arch,home", [("llama", Tier.PAGEABLE), ("qwen2", Tier.SSD), ("opt", Tier.PINNED)])
def test_zo2_momentum_streamed_equals_reference(arch, home, tiny_models, text_data, tmp_path):
    """Variant momentum streamed: each layer's fp32 momentum lives at the layer's home (SSD files beside
    the weights), fetched and written back with it; losses, weights and momentum equal the reference's."""
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, MOMENTUM)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm")
    ref_losses = [ref.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
    ref_state = {k: v.clone() for k, v in ref.state_tensors().items()}
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    swap = tmp_path / "swap"
    trainer = ZOStreamed.from_plan(model, manual_plan(2, home, swap_dir=swap), recipe.method, seed=5, head="causal_lm",
                                   lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [trainer.step(t + 1, micro, lr=recipe.method.lr).loss for t, micro in enumerate(steps)]
        if home is Tier.SSD:
            files = sorted(p.name for p in next(swap.iterdir()).iterdir())
            assert files == ["block-0001.bin", "block-0002.bin", "momentum-0001.bin", "momentum-0002.bin"]
        state = {k: v for _, shard in trainer.state_shards() for k, v in shard.items()}
        stats = trainer.store.stats
    finally:
        trainer.close()
    assert losses == ref_losses
    assert state.keys() == ref_state.keys() and any(k.startswith("momentum.") for k in state)
    for k in state:
        assert torch.equal(state[k], ref_state[k]), k
    # weights and momentum cross together once an update is pending (steps 2-4 and the checkpoint's flush):
    # 2 layers x (weights + momentum) up and down; step 1 fetches the weights alone
    assert stats.fetches == 2 + 4 * 3 + 4 and stats.writebacks == 4 * 3 + 4


def test_zo2_momentum_streamed_resumes_from_a_checkpoint(tiny_models, text_data, tmp_path):
    """A streamed momentum run loads a checkpoint (weights and momentum, here the reference's after 2
    steps) and continues exactly as the reference does."""
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, MOMENTUM)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm")
    for t in range(2):
        ref.step(t + 1, steps[t], lr=recipe.method.lr)
    saved = {k: v.clone() for k, v in ref.state_tensors().items()}
    ref_losses = [ref.step(t + 1, steps[t], lr=recipe.method.lr).loss for t in (2, 3)]
    ref_state = ref.state_tensors()
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = ZOStreamed.from_plan(model, manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap"), recipe.method, seed=5,
                                   head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        trainer.load_state(saved)
        losses = [trainer.step(t + 1, steps[t], lr=recipe.method.lr).loss for t in (2, 3)]
        state = {k: v for _, shard in trainer.state_shards() for k, v in shard.items()}
    finally:
        trainer.close()
    assert losses == ref_losses
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


@pytest.mark.parametrize("variant", ["momentum", "conservative"])
def test_lora_zo2_variants_streamed(variant, tiny_models, text_data, tmp_path):
    """LoRA: adapters (and their momentum) resident, the frozen base streamed read-only, both passes."""
    peft = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    method = {**(MOMENTUM if variant == "momentum" else CONS), "lr": 5e-2}
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, method, peft=peft)
    ref, streamed, trainer = run_both(recipe, tok, steps, manual_plan(2, Tier.PAGEABLE))
    assert_same(ref, streamed)
    assert trainer.store.stats.writebacks == 0


@pytest.mark.parametrize("variant", ["momentum", "conservative"])
def test_zo2_variants_with_bf16_home(variant, tiny_models, text_data, tmp_path):
    """bf16 compute and home: the update and the candidates go through the fp32 working copy, rounded
    once, as in the reference; the momentum stays fp32."""
    method = {**(MOMENTUM if variant == "momentum" else CONS)}
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, method, dtype="bfloat16")
    plan = manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap", compute_dtype="bfloat16", home_dtype="bfloat16")
    ref, streamed, _ = run_both(recipe, tok, steps, plan, home_dtype=torch.bfloat16)
    assert_same(ref, streamed)


@pytest.mark.parametrize("variant", ["conservative", "momentum"])
def test_zo2_variant_runs_resume_from_a_seed_ledger(variant, tiny_models, text_data, tmp_path):
    """Whole runs streamed from SSD: checkpoints every 2 steps, seed ledgers in between (conservative: the
    ledger holds c * lr, rejected steps 0); resumed from a ledger, the run ends with the same metrics
    and the same saved weights as a run never stopped."""
    import json

    from safetensors.torch import load_file

    from fuyoucli.checkpoint import list_checkpoints
    from fuyoucli.telemetry.jsonl import comparable, read_metrics
    from fuyoucli.train.run import finetune

    method = CONS_ALL if variant == "conservative" else MOMENTUM

    def recipe(out):
        return validate_recipe({
            "model": {"path": str(tiny_models["llama"])}, "method": method,
            "data": {"train": [str(text_data)], "max_length": 24, "eval_fraction": 0.1},
            "training": {"max_steps": 8, "batch_size": 4, "seed": 3, "eval_every": 4, "checkpoint_every": 2,
                         "keep_checkpoints": 2, "zo_ledger_steps": 5, "output_dir": str(out)}})

    plan = manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap")
    finetune(recipe(tmp_path / "ref"), plan=plan)
    finetune(recipe(tmp_path / "run"), plan=plan)
    ledger = json.loads((tmp_path / "run" / "checkpoints" / "step-00000006" / "state.json").read_text())["ledger"]
    assert [e[0] for e in ledger] == [3, 4, 5, 6]
    rows = read_metrics(tmp_path / "ref" / "metrics.jsonl")
    if variant == "conservative":
        kept = {int(r["step"]): r["zo_candidate"] for r in rows if r["kind"] == "train"}
        assert [e[2] for e in ledger] == [kept[s] * method["lr"] for s in (3, 4, 5, 6)]
        assert set(kept.values()) - {1.0}  # some step rejected or reversed
    finetune(recipe(tmp_path / "run"), plan=plan, resume=str(tmp_path / "run" / "checkpoints" / "step-00000006"))
    assert [comparable(r) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [comparable(r) for r in rows]
    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(tmp_path / "run" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list_checkpoints(tmp_path / "run" / "checkpoints")) <= 3
