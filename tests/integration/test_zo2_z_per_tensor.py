"""ZO2 with z drawn tensor by tensor (Plan.z_buffer 'tensor'): each pass replays the generator of
(seed, step, direction, block) from its start, one tensor at a time, into a buffer the size of the
largest tensor. The numbers are draw_z's, so the streamed run equals the in-memory reference bit for
bit (losses, projected gradients, candidates, weights, momentum), as the block-sized z buffer does;
what changes is the device memory, counted by the engine's arena and predicted by the plan.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from test_zo2_allocations import batches as wide_batches
from test_zo2_allocations import wide_model
from test_zo2_parity import CONS, CONS_ALL, MOMENTUM, ZO, assert_same, manual_plan, run_both, setup

from fuyoucli.engine.lanes import lanes_for
from fuyoucli.engine.tiers import DeviceBudgetExceeded
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.loading import load_model
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.zo import ZOReference
from fuyoucli.train.zo_streamed import ZOStreamed

pytestmark = pytest.mark.usefixtures("lanes_mode")


def per_tensor(plan: Plan) -> Plan:
    return dataclasses.replace(plan, z_buffer="tensor")


def largest_tensor(model, trainable_only: bool = True) -> int:
    return max(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_z_buffer(trainer: ZOStreamed, model) -> None:
    """The engine's z buffer holds one tensor: the largest trainable one."""
    assert trainer.z_per_tensor
    assert trainer.zbuf.numel() == largest_tensor(model)


# ---- parity with the in-memory reference -------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("home", [Tier.PAGEABLE, Tier.SSD])
def test_per_tensor_z_equals_reference(arch, home, tiny_models, text_data, tmp_path):
    """q=2, two micro-batches per step, every layer streamed from host memory or SSD files."""
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, ZO, accum=2)
    plan = per_tensor(manual_plan(2, home, swap_dir=tmp_path / "swap"))
    ref, streamed, trainer = run_both(recipe, tok, steps, plan)
    assert_same(ref, streamed)
    check_z_buffer(trainer, trainer.model)
    stats = trainer.store.stats
    assert stats.fetches == 2 * 4 + 2 and stats.writebacks == 2 * 4  # the schedule is the block mode's


@pytest.mark.parametrize("arch,home", [("llama", Tier.PINNED), ("llama", Tier.SSD), ("opt", Tier.PAGEABLE)])
def test_per_tensor_z_with_bf16_home_equals_reference(arch, home, tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, ZO, dtype="bfloat16")
    plan = per_tensor(manual_plan(2, home, swap_dir=tmp_path / "swap", compute_dtype="bfloat16",
                                  home_dtype="bfloat16"))
    ref, streamed, _ = run_both(recipe, tok, steps, plan, home_dtype=torch.bfloat16)
    assert_same(ref, streamed)


@pytest.mark.parametrize("arch,home,method,accum,dtype,outcomes", [
    ("llama", Tier.PAGEABLE, CONS, 2, "float32", {0, 1}),
    ("opt", Tier.SSD, CONS, 1, "float32", {0, 1, -1}),
    ("qwen2", Tier.SSD, CONS_ALL, 1, "float32", {1, -1}),
    ("llama", Tier.SSD, CONS, 1, "bfloat16", None),
])
def test_per_tensor_z_conservative_equals_reference(arch, home, method, accum, dtype, outcomes, tiny_models,
                                                    text_data, tmp_path):
    """The conservative variant: the first pass's z per tensor, the candidates' (already per tensor) in
    the same buffer; the same candidate losses, choices and weights as the reference."""
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, method, accum=accum, dtype=dtype)
    plan = per_tensor(manual_plan(2, home, swap_dir=tmp_path / "swap", compute_dtype=dtype, home_dtype=dtype))
    ref, streamed, _ = run_both(recipe, tok, steps, plan, home_dtype=getattr(torch, dtype))
    assert_same(ref, streamed)
    if outcomes is not None:
        assert {r.candidate for r in streamed[0]} == outcomes


@pytest.mark.parametrize("arch,home,dtype", [("qwen2", Tier.SSD, "float32"), ("opt", Tier.PINNED, "bfloat16")])
def test_per_tensor_z_momentum_equals_reference(arch, home, dtype, tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, MOMENTUM, dtype=dtype)
    plan = per_tensor(manual_plan(2, home, swap_dir=tmp_path / "swap", compute_dtype=dtype, home_dtype=dtype))
    ref, streamed, _ = run_both(recipe, tok, steps, plan, home_dtype=getattr(torch, dtype))
    assert_same(ref, streamed)


@pytest.mark.parametrize("variant,prefetch", [("sign", 0), ("sgd", 2)])
def test_per_tensor_z_at_other_prefetch_depths(variant, prefetch, tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["gpt2"], text_data, tmp_path, {**ZO, "variant": variant,
                                                                          "weight_decay": 0.1})
    plan = per_tensor(manual_plan(2, Tier.PINNED, prefetch=prefetch))
    ref, streamed, _ = run_both(recipe, tok, steps, plan)
    assert_same(ref, streamed)


def test_per_tensor_z_lora(tiny_models, text_data, tmp_path):
    """LoRA: the adapters stay resident and take z per tensor; the frozen base streams read-only."""
    peft = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, {**ZO, "lr": 5e-2}, peft=peft)
    ref, streamed, trainer = run_both(recipe, tok, steps, per_tensor(manual_plan(2, Tier.PAGEABLE)))
    assert_same(ref, streamed)
    adapters = [p.numel() for b in trainer.blocks for _, p in b.params]
    assert trainer.zbuf.numel() == max(adapters)


def test_reference_per_tensor_equals_reference_per_block(tiny_models, text_data, tmp_path):
    """The in-memory reference (what runs a plan that streams nothing) honours the plan too: z per
    tensor there gives the same numbers; build_trainer hands it the plan's choice."""
    from fuyoucli.train.trainers import InMemoryZO, build_trainer

    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path, {**CONS, "q": 2})
    outs = []
    for per in (False, True):
        model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
        ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm", z_per_tensor=per)
        results = [ref.step(t + 1, micro, lr=recipe.method.lr) for t, micro in enumerate(steps)]
        outs.append((results, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert_same(*outs)
    plan = per_tensor(fixed_plan(2, Tier.DEVICE))
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = build_trainer(model, recipe, SimpleNamespace(label_token_ids=()), plan, torch.device("cpu"))
    assert isinstance(trainer, InMemoryZO) and trainer.impl.z_per_tensor


# ---- pieces: tensors longer than Plan.z_piece go through the buffers piece by piece ---------------------

PIECE = 1000  # tiny models' matrices are 2k-16k elements; not a multiple of 16 (CPU normal_'s vector width)


@pytest.mark.parametrize("z_buffer", ["block", "tensor"])
@pytest.mark.parametrize("method,dtype,rounding", [
    ({**ZO, "weight_decay": 0.1}, "float32", "nearest"),
    (MOMENTUM, "bfloat16", "stochastic"),
    (CONS_ALL, "bfloat16", "stochastic"),
    ({**ZO, "variant": "sign"}, "bfloat16", "nearest"),
])
def test_pieces_equal_the_reference_drawn_in_the_same_pieces(z_buffer, method, dtype, rounding, tiny_models,
                                                             text_data, tmp_path):
    """z, the update, the rounding draws and the candidates go piece by piece: the streamed run equals
    the reference with the same piece size bit for bit, and the engine's working buffers are a piece
    long (a block's z in block mode)."""
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, method, dtype=dtype)
    plan = dataclasses.replace(manual_plan(2, Tier.SSD, swap_dir=tmp_path / "swap", compute_dtype=dtype,
                                           home_dtype=dtype), z_buffer=z_buffer, z_piece=PIECE)
    ref, streamed, trainer = run_both(recipe, tok, steps, plan, home_dtype=getattr(torch, dtype),
                                      home_rounding=rounding)
    assert_same(ref, streamed)
    assert largest_tensor(trainer.model) > 4 * PIECE
    assert trainer.dirbuf.numel() == PIECE
    assert trainer.home32 is None if dtype == "float32" else trainer.home32.numel() == PIECE
    assert (trainer.zbuf.numel() == PIECE) == (z_buffer == "tensor")


@pytest.mark.parametrize("source", ["generator", "counter"])
def test_the_piece_size_changes_z_only_for_tensors_longer_than_a_piece(source, tiny_models, text_data, tmp_path,
                                                                       monkeypatch):
    """From torch's generator (a CPU without a C compiler; CUDA): a tensor no longer than a piece is
    drawn in one call, as before pieces (a checkpoint without z_piece replays the same); a longer one
    gets other numbers, so the piece size is part of the arithmetic a checkpoint records. From the CPU's
    counter stream (kernels/normal.py) the pieces change nothing."""
    from fuyoucli.kernels.normal import COUNTER_SOURCE, z_source

    if source == "generator":
        monkeypatch.setenv("FUYOU_NATIVE_KERNELS", "0")
    elif z_source("cpu") != COUNTER_SOURCE:
        pytest.skip("no C compiler: no counter stream")
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, ZO)
    weights = {}
    for piece in (1 << 62, None, PIECE):
        model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
        kw = {} if piece is None else {"z_piece": piece}
        ref = ZOReference(model, param_blocks(model), recipe.method, seed=5, head="causal_lm", **kw)
        for t, micro in enumerate(steps):
            ref.step(t + 1, micro, lr=recipe.method.lr)
        weights[piece] = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole, default, small = weights[1 << 62], weights[None], weights[PIECE]
    assert all(torch.equal(whole[n], default[n]) for n in whole)
    short = [n for n, p in whole.items() if p.numel() <= PIECE]
    long = [n for n, p in whole.items() if p.numel() > PIECE]
    assert short and long
    if source == "counter":
        assert all(torch.equal(whole[n], small[n]) for n in whole)
    else:
        assert not any(torch.equal(whole[n], small[n]) for n in long)


def test_the_plan_sizes_the_work_buffers_by_the_piece():
    """OPT-13B (the 257 M-parameter embedding, 105 M-parameter MLP matrices): z per tensor, the
    direction and the fp32 working copy of a float16 home take a piece each, not a tensor each."""
    from pathlib import Path

    from fuyoucli.model.inventory import inventory
    from fuyoucli.plan.cost import estimate
    from fuyoucli.plan.types import Z_PIECE, Placement, Workload
    from fuyoucli.recipe import ModelConfig, PeftConfig
    from fuyoucli.train.plan_inputs import machine_from_profile
    from fuyoucli.hardware.presets import get_preset

    config = Path(__file__).parents[2] / "benchmarks" / "configs" / "opt-13b"
    inv = inventory(ModelConfig(path=str(config), dtype="float16"), PeftConfig())
    machine, _ = machine_from_profile(get_preset("rtx4090-768g-12nvme"))
    wl = Workload("zo2", False, "float16", batch_size=1, seq_len=2048)
    homes = tuple(Tier.DEVICE if b.name in ("embed", "head") else Tier.PINNED for b in inv.blocks)
    pl = Placement("float16", homes, (None,) * len(homes), (None,) * len(homes), 1, 1, z_buffer="tensor")
    parts = dict(estimate(inv, wl, machine, pl).device_parts)
    layer = max(b.params for b in inv.blocks if b.name.startswith("layers."))
    assert max(b.max_tensor_params for b in inv.blocks) > 2 * Z_PIECE
    assert parts["work buffers"] == layer * 2 + 3 * Z_PIECE * 4


# ---- memory: the arena's count, and the plan's prediction --------------------------------------------


def _run(model, plan, steps, method):
    trainer = ZOStreamed.from_plan(model, plan, method, seed=1, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [trainer.step(t + 1, micro, lr=method.lr).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        return trainer, losses
    finally:
        trainer.close()


def test_z_buffer_is_one_tensor_and_the_arena_saves_a_block(tmp_path):
    """A model whose layer (557k parameters) is four times its largest tensor (the MLP's 131k): per
    tensor, the engine's z buffer is that tensor's, and the arena's peak is lower by exactly a block's
    z less a tensor's; the losses and weights are the block mode's."""
    method = ZO2Method(name="zo2", lr=1e-3, eps=1e-3, q=2, weight_decay=0.1)
    steps = wide_batches(3)
    runs = {}
    for mode in ("block", "tensor"):
        model = wide_model()
        plan = dataclasses.replace(fixed_plan(2, Tier.SSD, swap_dir=str(tmp_path / mode)), z_buffer=mode)
        trainer, losses = _run(model, plan, steps, method)
        runs[mode] = (trainer, losses, {n: p.detach().clone() for n, p in model.named_parameters()})
    block, tensor = runs["block"][0], runs["tensor"][0]
    model = wide_model()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    biggest = largest_tensor(model.model.layers[0])
    assert biggest == model.model.layers[0].mlp.up_proj.weight.numel() and 4 * biggest <= layer
    assert block.zbuf.numel() == max(layer, model.model.embed_tokens.weight.numel())
    check_z_buffer(tensor, model)
    assert largest_tensor(model) == biggest
    assert block.arena.peak_bytes - tensor.arena.peak_bytes == 4 * (block.zbuf.numel() - tensor.zbuf.numel())
    assert runs["tensor"][1] == runs["block"][1]
    assert all(torch.equal(runs["tensor"][2][n], runs["block"][2][n]) for n in runs["block"][2])


def test_planned_per_tensor_run_stays_within_the_plans_device_peak():
    """The planner, given a device that holds the streamed run with a tensor's z but not with a block's,
    plans z per tensor; the engine runs that plan within its predicted device peak, and the same plan
    with a block's z overruns the budget (the arena enforces it)."""
    from fuyoucli.model.inventory import inventory_from_config
    from fuyoucli.plan.cost import estimate
    from fuyoucli.plan.search import make_plan
    from fuyoucli.plan.types import Machine, Options, Placement, Workload

    model = wide_model()
    inv = inventory_from_config(model.config)
    wl = Workload("zo2", False, "float32", batch_size=2, seq_len=8, q=2)
    machine = Machine(name="toy-gpu", compute_device="cuda", device_bytes=0,
                      matmul_flops=(("float32", 1e12),), device_mem_bps=1e11, h2d_bps=1e9, d2h_bps=1e9,
                      duplex_h2d_bps=8e8, duplex_d2h_bps=8e8, host_ram_bytes=10**10, pinned_bytes=10**10,
                      dram_bps=1e10, cpu_adam_params_per_s=1e9)
    homes = tuple(Tier.DEVICE if b.name in ("embed", "head") else Tier.PINNED for b in inv.blocks)
    need = {}
    for mode in ("block", "tensor"):
        pl = Placement("float32", homes, (None,) * len(homes), (None,) * len(homes), 1, 1, z_buffer=mode)
        need[mode] = estimate(inv, wl, machine, pl).memory.device
    assert need["block"] - need["tensor"] > 4 * 400_000  # a layer's z less a tensor's
    # a device whose budget after the 8% headroom is the per-tensor run's peak (one example per forward)
    machine = dataclasses.replace(machine, device_bytes=int(need["tensor"] / 0.92) + 1)
    plan = make_plan(inv, wl, machine, Options(mode="stream", prefetch_depth=1), suggest=False)
    assert plan.feasible and plan.z_buffer == "tensor" and plan.micro_batch_size == 1
    assert plan.memory.device == need["tensor"] <= plan.device_budget_bytes < need["block"]
    steps = [[{k: v[i: i + 1] for k, v in mb.items()} for mb in micro for i in range(2)] for micro in wide_batches(2)]
    method = ZO2Method(name="zo2", lr=1e-3, eps=1e-3, q=2)
    trainer, _ = _run(wide_model(), plan, steps, method)
    assert trainer.arena.peak_bytes <= plan.memory.device
    # what the arena charges without allocating it, before a step: the resident blocks' homes and the
    # compute copy the passes read (the model's own parameters), as planned
    parts = dict(plan.device_parts)
    assert parts["resident compute copy"] == parts["resident weights"] > 0
    fresh = ZOStreamed.from_plan(wide_model(), plan, method, seed=1, head="causal_lm",
                                 lanes=lanes_for(torch.device("cpu")))
    try:
        held = fresh.arena.used_bytes - sum(fresh.arena._sizes.values())
    finally:
        fresh.close()
    assert held == parts["resident weights"] + parts["resident compute copy"]
    check_z_buffer(trainer, model)
    with pytest.raises(DeviceBudgetExceeded, match="device memory budget exceeded"):
        _run(wide_model(), dataclasses.replace(plan, z_buffer="block"), steps, method)
