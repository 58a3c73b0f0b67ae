"""Offloaded first-order AdamW equals the in-memory AdamW reference (fp32 on the CPU, 20 steps, the same
batches): per-step losses within 1e-5 relative and final weights within 1e-5, with weights and
optimizer states on the host or on SSD, every activation policy, gradient accumulation, clipping
(updates deferred) or none (updates overlapped with the backward), and LoRA over a streamed base."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fuyoucli.engine.lanes import lanes_for
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.data import batches, build_datasets, collate
from fuyoucli.train.first_order import AdamWReference
from fuyoucli.train.first_order_streamed import AdamWStreamed

pytestmark = pytest.mark.usefixtures("lanes_mode")

STEPS = 20
DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16}
LORA = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """Tiny llama, qwen2 (tied embeddings) and opt (tied, learned positions) without dropout, so that
    these cases test placement alone (dropout parity has its own test: test_dropout_draws_the_reference_masks)."""
    from tiny import make_tokenizer, tiny_config
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("models") / "opt-nodrop"
    tok = make_tokenizer()
    config = tiny_config("opt", len(tok))
    config.dropout = 0.0
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"llama": tiny_models["llama"], "qwen2": tiny_models["qwen2"], "opt": folder}


def setup(model_dir, data, tmp_path, *, clip=1.0, accum=2, peft=None, lr=1e-2, dtype="float32"):
    doc = {"model": {"path": str(model_dir), "dtype": dtype},
           "method": {"name": "adamw", "lr": lr, "weight_decay": 0.1, "max_grad_norm": clip},
           "data": {"train": [str(data)], "max_length": 24, "eval_fraction": 0.0},
           "training": {"max_steps": STEPS, "batch_size": 3, "grad_accum": accum, "seed": 5,
                        "output_dir": str(tmp_path / "out")}}
    if peft:
        doc["peft"] = peft
    recipe = validate_recipe(doc)
    tok = load_tokenizer(recipe.model)
    ds = build_datasets(recipe.data, tok, seed=5)
    steps, epoch = [], 0
    while len(steps) < STEPS:
        it = iter(batches(ds.train, 3, seed=5, epoch=epoch))
        try:
            while len(steps) < STEPS:
                steps.append([collate(next(it), ds.pad_token_id) for _ in range(accum)])
        except StopIteration:
            epoch += 1
    return recipe, tok, steps


def lr_at(t: int) -> float:
    return 1e-2 * min(1.0, (t + 1) / 5)  # a warmup, so that per-step learning rates reach every block


_REFERENCE: dict = {}


def reference(key, recipe, tok, steps):
    """In-memory AdamW; cached per (model, method) for the module: several placements compare with it."""
    if key not in _REFERENCE:
        model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
        ref = AdamWReference(model, recipe.method, head="causal_lm")
        losses = [ref.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
        _REFERENCE[key] = losses, {n: p.detach().clone() for n, p in model.named_parameters()}
    return _REFERENCE[key]


def streamed(recipe, tok, steps, plan, **kwargs):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = AdamWStreamed.from_plan(model, plan, recipe.method, head="causal_lm", lanes=lanes_for(torch.device("cpu")), **kwargs)
    try:
        losses = [trainer.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer
    finally:
        trainer.close()


def assert_parity(got, want, learned=0.5):
    losses, weights = got[0], got[1]
    ref_losses, ref_weights = want
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-5, atol=1e-5, msg=name)
    # The weights moved: a run that never updated would not match a reference that learned.
    assert ref_losses[-1] < ref_losses[0] - learned


def plan(home, opt, act, tmp_path, **kw):
    return fixed_plan(2, home, method="adamw", optimizer_home=opt, activation=act, swap_dir=str(tmp_path / "swap"), **kw)


# (arch, weights home, optimizer home, activations per layer, clip, prefetch depth, CPU optimizer on its
# worker thread (as on a GPU) or inline (a CPU device's default)): every arch on host and on SSD, every
# activation policy, clipped (deferred updates) and not (updates overlapped with the backward), no
# prefetch to two blocks ahead, both ways of running the optimizer.
CASES = [
    ("llama", Tier.PAGEABLE, Tier.PAGEABLE, "recompute", 1.0, 1, True),
    ("opt", Tier.PINNED, Tier.PAGEABLE, "keep", 1.0, 0, False),
    ("qwen2", Tier.PAGEABLE, Tier.PAGEABLE, "swap", 1.0, 2, True),
    ("llama", Tier.SSD, Tier.SSD, ("swap", "keep"), 1.0, 1, False),
    ("opt", Tier.SSD, Tier.SSD, "recompute", 1.0, 2, True),
    ("qwen2", Tier.SSD, Tier.SSD, ("keep", "recompute"), 1.0, 0, False),
    ("llama", Tier.PINNED, Tier.SSD, "keep", None, 2, True),
    ("opt", Tier.PAGEABLE, Tier.PAGEABLE, "swap", None, 1, False),
    ("qwen2", Tier.SSD, Tier.SSD, "recompute", None, 1, True),
    ("llama", Tier.PAGEABLE, Tier.PAGEABLE, "recompute-swap", 1.0, 1, False),
    ("opt", Tier.SSD, Tier.SSD, ("recompute-swap", "keep"), None, 2, True),
    ("llama", Tier.SSD, Tier.SSD, "recompute", None, 1, False),
]


@pytest.mark.parametrize("arch,home,opt,act,clip,depth,thread", CASES,
                         ids=[f"{a}-{h.value}-{o.value}-{x if isinstance(x, str) else '+'.join(x)}-"
                              f"{'clip' if c else 'noclip'}-depth{d}-{'thread' if t else 'inline'}"
                              for a, h, o, x, c, d, t in CASES])
def test_streamed_adamw_equals_reference(arch, home, opt, act, clip, depth, thread, models, text_data, tmp_path):
    recipe, tok, steps = setup(models[arch], text_data, tmp_path, clip=clip)
    got = streamed(recipe, tok, steps, plan(home, opt, act, tmp_path, prefetch_depth=depth), optimizer_thread=thread)
    assert_parity(got, reference((arch, clip), recipe, tok, steps))
    trainer = got[2]
    assert trainer.cpu.thread is thread
    assert trainer.deferred == (clip is not None)
    assert trainer.store.stats.fetches == 2 * 2 * STEPS  # each layer up for the forward and the backward
    assert trainer.store.stats.writebacks == 0  # the CPU optimizer writes homes, the device never does
    assert trainer.store.residency.peak_on_device <= depth + 1
    swapped = {"swap", "recompute-swap"} & ({act} if isinstance(act, str) else set(act))
    assert (trainer.acts.swapped_bytes > 0) == bool(swapped)
    if Tier.SSD in (home, opt):
        assert not any((tmp_path / "swap").iterdir())  # block and state files removed on close
    if opt is Tier.SSD:
        n = sum(p.numel() for name, p in got[1].items() if ".layers." in name)
        assert trainer.cpu.ssd_bytes_read >= 3 * 4 * n * STEPS  # master, m, v read and written every step
        assert trainer.cpu.ssd_bytes_written >= 3 * 4 * n * STEPS


@pytest.mark.parametrize("arch,home,act", [("falcon", Tier.SSD, "recompute"), ("bloom", Tier.PAGEABLE, "swap")])
def test_layers_that_return_tuples_stream(arch, home, act, tiny_models, text_data, tmp_path):
    """falcon and bloom layers return (hidden, ...) and their decoder loops take outputs[0]: the block
    runner's stand-ins must return tuples too (no dropout in either by default)."""
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path)
    got = streamed(recipe, tok, steps, plan(home, Tier.PAGEABLE, act, tmp_path))
    assert_parity(got, reference((arch, 1.0), recipe, tok, steps))


@pytest.mark.parametrize("act", ["keep", "recompute", "swap", "recompute-swap"])
def test_dropout_draws_the_reference_masks(act, tiny_models, text_data, tmp_path):
    """gpt2 with its default dropout (0.1 on embeddings, attention and residuals), accumulating two
    micro-batches: each (micro-batch, block) forward draws from its own seed, so the layer-major engine,
    and a recompute in its backward, see the masks of the micro-batch-major reference."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models["gpt2"])
    assert config.embd_pdrop == config.attn_pdrop == config.resid_pdrop == 0.1
    recipe, tok, steps = setup(tiny_models["gpt2"], text_data, tmp_path)
    got = streamed(recipe, tok, steps, plan(Tier.PAGEABLE, Tier.PAGEABLE, act, tmp_path))
    want = reference(("gpt2", 1.0), recipe, tok, steps)
    assert_parity(got, want)
    assert got[0] == want[0]  # and bit for bit
    assert all(torch.equal(got[1][name], want[1][name]) for name in want[1])


def test_embeddings_and_head_optimizer_on_ssd(models, text_data, tmp_path):
    """Resident blocks whose optimizer lives off the device: their new weights are uploaded back, and
    the forward waits for that (the worker is slowed down so that a missing wait would show)."""
    recipe, tok, steps = setup(models["qwen2"], text_data, tmp_path)
    p = plan(Tier.PAGEABLE, Tier.SSD, "recompute", tmp_path, resident_optimizer_home=Tier.SSD)
    got = streamed(recipe, tok, steps, p, on_job=lambda e: time.sleep(0.005))
    assert_parity(got, reference(("qwen2", 1.0), recipe, tok, steps))
    assert set(got[2].cpu.states) == {0, 1, 2, 3}  # embed, both layers, head: all on the CPU worker


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_equals_reference(dtype, models, text_data, tmp_path):
    """Compute in bf16/fp16 with fp32 masters and states on SSD; fp16 scales the loss (deferred
    updates: an overflowing step is skipped whole, as the reference skips it)."""
    recipe, tok, steps = setup(models["qwen2"], text_data, tmp_path, dtype=dtype)
    steps = steps[:6]
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = AdamWReference(model, recipe.method, head="causal_lm")
    boost = 2**4 if dtype == "float16" else 1  # fp16: start too high, so that the first steps overflow and are skipped
    ref.scaler.scale *= boost
    want = [ref.step(micro, lr=lr_at(t)) for t, micro in enumerate(steps)]
    ref_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = AdamWStreamed.from_plan(model, plan(Tier.SSD, Tier.SSD, "swap", tmp_path, compute_dtype=dtype, home_dtype=dtype),
                                      recipe.method, head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    trainer.scaler.scale *= boost
    try:
        got = [trainer.step(micro, lr=lr_at(t)) for t, micro in enumerate(steps)]
        trainer.materialize()
    finally:
        trainer.close()
    assert [r.loss for r in got] == pytest.approx([r.loss for r in want], rel=1e-5)
    assert [(r.skipped, r.loss_scale) for r in got] == [(r.skipped, r.loss_scale) for r in want]
    skipped = [r.skipped for r in got]
    assert (any(skipped) and not all(skipped)) if dtype == "float16" else not any(skipped)
    for name, p in model.named_parameters():
        assert p.dtype == DTYPE[dtype]
        torch.testing.assert_close(p.detach().float(), ref_weights[name].float(), rtol=1e-5, atol=1e-5, msg=name)


def test_lazily_loaded_model_streams_from_the_file(models, text_data, tmp_path):
    """Streamed layers never loaded into the model (model.lazy): their homes and fp32 masters are
    filled from the model file, tensor by tensor."""
    recipe, tok, steps = setup(models["qwen2"], text_data, tmp_path)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, streamed_layers={0, 1})
    assert model.fuyou_source is not None and model.model.layers[0].mlp.up_proj.weight.numel() == 0
    trainer = AdamWStreamed.from_plan(model, plan(Tier.SSD, Tier.SSD, "keep", tmp_path), recipe.method, head="causal_lm",
                                      lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [trainer.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
        trainer.materialize()
    finally:
        trainer.close()
    assert_parity((losses, {n: p.detach().clone() for n, p in model.named_parameters()}),
                  reference(("qwen2", 1.0), recipe, tok, steps))


def test_checkpoint_round_trip_into_a_lazily_loaded_model(models, text_data, tmp_path):
    """State after 3 steps (masters and moments on SSD), loaded into a fresh trainer whose streamed
    layers were never loaded: the next steps continue exactly as the uninterrupted reference."""
    recipe, tok, steps = setup(models["qwen2"], text_data, tmp_path)
    want, _ = reference(("qwen2", 1.0), recipe, tok, steps)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    first = AdamWStreamed.from_plan(model, plan(Tier.SSD, Tier.SSD, "recompute", tmp_path / "a"), recipe.method,
                                    head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        losses = [first.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps[:3])]
        tensors = {k: v.clone() for _, shard in first.state_shards() for k, v in shard.items()}
        meta = first.state_meta()
    finally:
        first.close()
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id, streamed_layers={0, 1})
    second = AdamWStreamed.from_plan(model, plan(Tier.SSD, Tier.SSD, "recompute", tmp_path / "b"), recipe.method,
                                     head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    try:
        # Weights only (as before any update: no moments yet), then the full state.
        second.load_state({k: v for k, v in tensors.items() if k.startswith("param.")}, meta)
        second.load_state(tensors, meta)
        losses += [second.step(micro, lr=lr_at(t + 3)).loss for t, micro in enumerate(steps[3:6])]
    finally:
        second.close()
    assert losses == pytest.approx(want[:6], rel=1e-5)


@pytest.mark.parametrize("home", [Tier.PAGEABLE, Tier.SSD])
def test_lora_streams_the_frozen_base_read_only(home, models, text_data, tmp_path):
    recipe, tok, steps = setup(models["llama"], text_data, tmp_path, peft=LORA, lr=5e-2)
    got = streamed(recipe, tok, steps, plan(home, None, "keep", tmp_path))
    assert_parity(got, reference(("llama-lora",), recipe, tok, steps), learned=0.03)
    trainer = got[2]
    assert trainer.store.stats.writebacks == 0 and not trainer.cpu.states  # adapters: device AdamW
    assert all(not p.requires_grad for u in trainer.store.units.values() for _, p in u.params)


def test_cpu_optimizer_overlaps_backward_of_the_previous_block(models, text_data, tmp_path):
    """Overlapped updates: the worker is inside block k's AdamW while the device is inside block k-1's
    backward. Each side waits (inside its interval) for the other to have started, so a design that
    serialized them would time out here rather than pass."""
    recipe, tok, steps = setup(models["llama"], text_data, tmp_path, clip=None)
    started = {("adam", e): threading.Event() for e in range(4)} | {("bwd", e): threading.Event() for e in range(4)}
    met: list[tuple[int, bool]] = []

    def on_job(e):  # worker, inside block e's update (e = 1, 2: the layers; embed and head update on the device)
        started[("adam", e)].set()
        met.append((e, started[("bwd", e - 1)].wait(10)))

    def on_backward(e):  # main thread, inside block e's backward
        started[("bwd", e)].set()
        if e in (0, 1):
            met.append((e + 1, started[("adam", e + 1)].wait(10)))

    got = streamed(recipe, tok, steps[:1], plan(Tier.PAGEABLE, Tier.PAGEABLE, "recompute", tmp_path),
                   on_job=on_job, on_backward=on_backward, optimizer_thread=True)
    trainer = got[2]
    assert sorted(met) == [(1, True), (1, True), (2, True), (2, True)]
    adam = {k: (t0, t1) for what, k, t0, t1 in trainer.cpu.trace if what == "job"}
    bwd = {e: (t0, t1) for what, e, t0, t1 in trainer.timeline if what == "bwd"}
    for k in (1, 2):  # the recorded intervals overlap too
        assert adam[k][0] < bwd[k - 1][1] and bwd[k - 1][0] < adam[k][1]


@pytest.mark.parametrize("clip", [1.0, None], ids=["deferred", "overlapped"])
def test_slow_optimizer_never_lets_a_forward_read_stale_weights(clip, models, text_data, tmp_path):
    """The worker is made slow (15 ms per update): every fetch must still wait for its block's update.
    Dropping that wait (WeightStore.hold) makes the next forward read stale weights and this fails."""
    recipe, tok, steps = setup(models["opt"], text_data, tmp_path, clip=clip)
    got = streamed(recipe, tok, steps[:6], plan(Tier.SSD, Tier.SSD, "swap", tmp_path),
                   on_job=lambda e: time.sleep(0.015), optimizer_thread=True)
    ref_losses, ref_weights = reference(("opt", clip), recipe, tok, steps)
    assert got[0] == pytest.approx(ref_losses[:6], rel=1e-5)


def test_device_budget_is_enforced(models, text_data, tmp_path):
    from fuyoucli.engine.tiers import DeviceBudgetExceeded

    recipe, tok, steps = setup(models["llama"], text_data, tmp_path)
    with pytest.raises(DeviceBudgetExceeded, match="budget"):
        streamed(recipe, tok, steps[:1], plan(Tier.PAGEABLE, Tier.PAGEABLE, "keep", tmp_path,
                                              device_budget_bytes=200_000))


def test_finetune_routes_streamed_adamw_and_matches_in_memory_run(models, text_data, tmp_path):
    """The whole loop (evals, saving) through build_trainer with a streaming adamw plan."""
    from safetensors.torch import load_file

    from fuyoucli.telemetry.jsonl import read_metrics
    from fuyoucli.train.run import finetune

    def recipe(out):
        return validate_recipe({
            "model": {"path": str(models["qwen2"])},
            "method": {"name": "adamw", "lr": 1e-2, "warmup_steps": 2, "schedule": "cosine"},
            "data": {"train": [str(text_data)], "max_length": 24, "eval_fraction": 0.2},
            "training": {"max_steps": 6, "batch_size": 3, "grad_accum": 2, "eval_every": 3, "seed": 3,
                         "output_dir": str(out)},
            "offload": {"mode": "in_memory"},
        })

    finetune(recipe(tmp_path / "mem"))
    finetune(recipe(tmp_path / "ssd"), plan=plan(Tier.SSD, Tier.SSD, "swap", tmp_path))
    mem, ssd = read_metrics(tmp_path / "mem" / "metrics.jsonl"), read_metrics(tmp_path / "ssd" / "metrics.jsonl")
    assert len(mem) == len(ssd)
    for a, b in zip(mem, ssd):  # the fields both runs report (a streamed run adds its lanes' figures)
        exact = {k for k in a if k not in ("step_time_s", "grad_norm", "loss", "perplexity")}
        assert {k: b.get(k) for k in exact} == {k: a[k] for k in exact}
        for k in ("loss", "grad_norm", "perplexity"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5), k
    a, b = load_file(tmp_path / "mem" / "model" / "model.safetensors"), load_file(tmp_path / "ssd" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
