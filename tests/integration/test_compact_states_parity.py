"""Compact AdamW states (method.states: int8, method.master: bf16; kernels/adamw.py): the streamed
engine equals the in-memory reference bit for bit (same losses, same weights), with states on the
host or on SSD, updates overlapped or deferred (clipping), the CPU optimizer on its thread or inline,
LoRA adapters, and under the simulated asynchronous lanes too; a checkpoint holds the compact states
as they are and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.kernels.adamw import CODE_DTYPE
from fuyoucli.engine.lanes import lanes_for
from fuyoucli.model.loading import load_model, load_tokenizer
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.data import batches, build_datasets, collate
from fuyoucli.train.first_order import AdamWReference
from fuyoucli.train.first_order_streamed import AdamWStreamed

pytestmark = pytest.mark.usefixtures("lanes_mode")

STEPS = 8
LORA = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def setup(model_dir, data, tmp_path, *, states, master, clip=1.0, dtype="float32", peft=None, lr=1e-2):
    doc = {"model": {"path": str(model_dir), "dtype": dtype},
           "method": {"name": "adamw", "lr": lr, "weight_decay": 0.1, "max_grad_norm": clip, "states": states,
                      "master": master},
           "data": {"train": [str(data)], "max_length": 24, "eval_fraction": 0.0},
           "training": {"max_steps": STEPS, "batch_size": 3, "grad_accum": 2, "seed": 7,
                        "output_dir": str(tmp_path / "out")}}
    if peft:
        doc["peft"] = peft
    recipe = validate_recipe(doc)
    tok = load_tokenizer(recipe.model)
    ds = build_datasets(recipe.data, tok, seed=5)
    it = iter(batches(ds.train, 3, seed=5, epoch=0))
    steps = [[collate(next(it), ds.pad_token_id) for _ in range(2)] for _ in range(STEPS)]
    return recipe, tok, steps


def lr_at(t: int) -> float:
    return 1e-2 * min(1.0, (t + 1) / 3)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_reference(recipe, tok, steps):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = AdamWReference(model, recipe.method, head="causal_lm", seed=recipe.training.seed)
    losses = [ref.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
    return losses, weights(model), ref


def plan(home, opt, tmp_path, dtype="float32", act="recompute", name="swap"):
    return fixed_plan(2, home, method="adamw", optimizer_home=opt, activation=act, swap_dir=str(tmp_path / name),
                      compute_dtype=dtype, home_dtype=dtype, prefetch_depth=1)


def run_streamed(recipe, tok, steps, pl, *, thread):
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = AdamWStreamed.from_plan(model, pl, recipe.method, head="causal_lm", lanes=lanes_for(torch.device("cpu")),
                                      optimizer_thread=thread, seed=recipe.training.seed)
    try:
        losses = [trainer.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps)]
        trainer.materialize()
        return losses, weights(model), trainer
    finally:
        trainer.close()


def assert_identical(got, want):
    assert got[0] == want[0]  # losses, exactly
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert got[1][name].dtype == want[1][name].dtype, name
        assert torch.equal(got[1][name], want[1][name]), name
    assert want[0][-1] < want[0][0] - 0.3  # it learned: a run that never updated would not match


# (arch, model dtype, states, master, weights home, optimizer home, clip, optimizer thread)
CASES = [
    ("llama", "float32", "int8", "fp32", Tier.SSD, Tier.SSD, 1.0, True),
    ("qwen2", "float32", "int8", "fp32", Tier.PAGEABLE, Tier.PAGEABLE, None, False),
    ("llama", "bfloat16", "fp32", "bf16", Tier.SSD, Tier.SSD, 1.0, False),
    ("qwen2", "bfloat16", "int8", "bf16", Tier.PAGEABLE, Tier.PAGEABLE, None, True),
    ("llama", "bfloat16", "int8", "bf16", Tier.SSD, Tier.SSD, None, True),
    ("qwen2", "bfloat16", "int8", "bf16", Tier.PINNED, Tier.SSD, 1.0, False),
    ("qwen2", "bfloat16", "int8", "bf16", Tier.SSD, Tier.PAGEABLE, 1.0, True),  # master read ahead, states in RAM
]


@pytest.mark.parametrize("arch,dtype,states,master,home,opt,clip,thread", CASES,
                         ids=[f"{a}-{d}-{s}-{m}-{h.value}-{o.value}-{'clip' if c else 'noclip'}-{'thread' if t else 'inline'}"
                              for a, d, s, m, h, o, c, t in CASES])
def test_streamed_compact_adamw_equals_reference(arch, dtype, states, master, home, opt, clip, thread, tiny_models,
                                                 text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models[arch], text_data, tmp_path, states=states, master=master, clip=clip,
                               dtype=dtype)
    want = run_reference(recipe, tok, steps)
    got = run_streamed(recipe, tok, steps, plan(home, opt, tmp_path, dtype), thread=thread)
    assert_identical(got, want)
    trainer = got[2]
    if opt is Tier.SSD:
        n = sum(p.numel() for name, p in got[1].items() if ".layers." in name)
        per_param = (4 if master == "fp32" else 0) + (2 if states == "int8" else 8)
        # the optimizer's file I/O: master (when kept) and moments, read and written every step, and
        # no more (8-bit scales and O_DIRECT's alignment add under 5%)
        assert per_param * n * STEPS <= trainer.cpu.ssd_bytes_read <= 1.05 * per_param * n * STEPS + 2 * 4096 * STEPS
    if master == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in got[1].values())
    if master == "bf16" and home is Tier.SSD:  # the streamed layers' masters are read ahead from their files
        assert all(trainer.cpu.states[e].master_file is not None for e in (1, 2))


def test_lora_adapters_with_int8_states_equal_reference(tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, states="int8", master="fp32", peft=LORA,
                               lr=5e-2)
    want = run_reference(recipe, tok, steps)
    got = run_streamed(recipe, tok, steps, plan(Tier.PAGEABLE, None, tmp_path, act="keep"), thread=True)
    assert got[0] == want[0]
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name
    state = want[2].optimizer.state
    assert state and all(s["exp_avg"].dtype == CODE_DTYPE for s in state.values())


@pytest.mark.parametrize("opt", [Tier.SSD, Tier.PAGEABLE])
def test_compact_checkpoint_resumes_exactly_and_is_stored_as_it_is(opt, tiny_models, text_data, tmp_path):
    """3 steps, state out (8-bit codes and their scales, bf16 masters, as kept), into a fresh trainer, 3
    more: the same losses as 6 uninterrupted steps (the rounding draws come from the restored step
    counts). The reference's checkpoint has the same tensors, so either resumes the other's."""
    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path, states="int8", master="bf16",
                               dtype="bfloat16")
    want = run_reference(recipe, tok, steps[:6])
    pl = plan(Tier.SSD, opt, tmp_path, "bfloat16", name="a")
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    first = AdamWStreamed.from_plan(model, pl, recipe.method, head="causal_lm", lanes=lanes_for(torch.device("cpu")),
                                    seed=7)
    try:
        losses = [first.step(micro, lr=lr_at(t)).loss for t, micro in enumerate(steps[:3])]
        tensors = {k: v.clone() for _, shard in first.state_shards() for k, v in shard.items()}
        meta = first.state_meta()
    finally:
        first.close()
    layer = next(k for k in tensors if k.startswith("adam.exp_avg.") and ".layers.0." in k)
    assert tensors[layer].dtype == CODE_DTYPE
    assert tensors[layer.replace("adam.exp_avg.", "param.")].dtype == torch.bfloat16
    ref_model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    ref = AdamWReference(ref_model, recipe.method, head="causal_lm", seed=7)
    for t, micro in enumerate(steps[:3]):
        ref.step(micro, lr=lr_at(t))
    ref_tensors = ref.state_tensors()
    assert {k: (v.dtype, v.numel()) for k, v in ref_tensors.items()} == \
        {k: (v.dtype, v.numel()) for k, v in tensors.items()}
    assert all(torch.equal(ref_tensors[k].reshape(-1), tensors[k].reshape(-1)) for k in tensors)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    second = AdamWStreamed.from_plan(model, plan(Tier.SSD, opt, tmp_path, "bfloat16", name="b"), recipe.method,
                                     head="causal_lm", lanes=lanes_for(torch.device("cpu")), seed=7)
    try:
        second.load_state(tensors, meta)
        losses += [second.step(micro, lr=lr_at(t + 3)).loss for t, micro in enumerate(steps[3:6])]
    finally:
        second.close()
    assert losses == want[0]


def test_a_state_of_another_format_is_refused(tiny_models, text_data, tmp_path):
    recipe, tok, steps = setup(tiny_models["llama"], text_data, tmp_path, states="int8", master="fp32")
    fp32, _, _ = setup(tiny_models["llama"], text_data, tmp_path, states="fp32", master="fp32")
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    trainer = AdamWStreamed.from_plan(model, plan(Tier.PAGEABLE, Tier.PAGEABLE, tmp_path), fp32.method,
                                      head="causal_lm", lanes=lanes_for(torch.device("cpu")))
    ref = AdamWReference(load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id), recipe.method,
                         head="causal_lm")
    ref.step(steps[0], lr=1e-2)
    try:
        with pytest.raises(ValueError, match="exp_avg given as torch.float8_e4m3fn, the state keeps torch.float32"):
            trainer.load_state(ref.state_tensors(), ref.state_meta())
    finally:
        trainer.close()


def test_resident_blocks_updated_on_the_host_keep_their_bf16_master(tiny_models, text_data, tmp_path):
    """Embeddings and head stay on the device but their AdamW runs on the CPU worker, states on SSD: a
    block whose weights do not stream keeps its bf16 master in its optimizer state (its weights' home is
    the device) and uploads the new weights from it."""
    recipe, tok, steps = setup(tiny_models["qwen2"], text_data, tmp_path, states="int8", master="bf16",
                               dtype="bfloat16")
    want = run_reference(recipe, tok, steps)
    pl = fixed_plan(2, Tier.PAGEABLE, method="adamw", optimizer_home=Tier.PAGEABLE, activation="keep",
                    swap_dir=str(tmp_path / "swap"), compute_dtype="bfloat16", home_dtype="bfloat16",
                    resident_optimizer_home=Tier.SSD)
    got = run_streamed(recipe, tok, steps, pl, thread=True)
    assert_identical(got, want)
    trainer = got[2]
    assert trainer.cpu.states[0].home is Tier.SSD and trainer.cpu.states[0].home_master is None
    assert all(trainer.cpu.states[e].home_master is not None for e in (1, 2))  # the streamed layers'
