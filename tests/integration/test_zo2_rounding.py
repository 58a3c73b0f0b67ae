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


# ---- the recipe, the run header, metrics.jsonl, resume ------------------------------------------------

def _cli_recipe(tmp_path, model, data, name, dtype="bfloat16", offload="", steps=3):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel:\n  path: {model}\n  dtype: {dtype}\nmethod:\n  name: zo2\n  lr: 1.0e-4\n  eps: 1.0e-3\n"
        f"data:\n  train: {data}\n  max_length: 24\n  eval_fraction: 0.0\n"
        f"training:\n  max_steps: {steps}\n  batch_size: 4\n  seed: 3\n  checkpoint_every: 2\n"
        f"  output_dir: {tmp_path / name}\n{offload}hardware:\n  preset: cpu-laptop-8c-32g\n")
    return path


def _fuyou(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fuyoucli", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_a_16_bit_model_keeps_16_bit_homes_rounded_stochastically(tiny_models, text_data, tmp_path):
    """home_dtype auto is the model's dtype and rounding auto stochastic, in memory and streamed alike:
    both say so in the run header and metrics.jsonl, and their losses are the same."""
    from fuyoucli.telemetry.jsonl import read_metrics

    mem = _fuyou("finetune", str(_cli_recipe(tmp_path, tiny_models["llama"], text_data, "mem",
                                             offload="offload:\n  mode: in_memory\n")))
    assert mem.returncode == 0, mem.stderr
    assert "home bfloat16, stochastic rounding" in mem.stdout
    streamed = _fuyou("finetune", str(_cli_recipe(tmp_path, tiny_models["llama"], text_data, "streamed",
                                                  offload="offload:\n  mode: stream\n  weights_home: pageable\n")))
    assert streamed.returncode == 0, streamed.stderr
    assert "home bfloat16, stochastic rounding" in streamed.stdout
    rows = {n: [r for r in read_metrics(tmp_path / n / "metrics.jsonl") if r["kind"] == "train"]
            for n in ("mem", "streamed")}
    assert {(r["home_dtype"], r["home_rounding"]) for n in rows for r in rows[n]} == {("bfloat16", "stochastic")}
    assert [r["loss"] for r in rows["streamed"]] == [r["loss"] for r in rows["mem"]]


def test_rounding_settings_that_would_do_nothing_are_refused(tiny_models, text_data, tmp_path):
    fp32 = _fuyou("finetune", str(_cli_recipe(tmp_path, tiny_models["llama"], text_data, "fp32", dtype="float32",
                                              offload="offload:\n  home_rounding: stochastic\n")))
    assert fp32.returncode == 2 and "needs a 16-bit home" in fp32.stderr and "Traceback" not in fp32.stderr


def test_resuming_with_another_rounding_is_refused_and_the_checkpoint_kept(tiny_models, text_data, tmp_path):
    recipe = _cli_recipe(tmp_path, tiny_models["llama"], text_data, "run", steps=3,
                         offload="offload:\n  mode: in_memory\n")
    assert _fuyou("finetune", str(recipe)).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    before = sorted(p.name for p in ckpt.iterdir())
    again = _fuyou("finetune", str(recipe), "--resume", "--set", "offload.home_rounding=nearest")
    assert again.returncode != 0 and "Traceback" not in again.stderr and len(again.stderr.splitlines()) == 1
    assert "offload.home_rounding" in again.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == before


def test_a_checkpoint_written_under_another_home_says_how_to_resume_it():
    """Checkpoints from before 16-bit homes were the default say float32 (or nothing: float32, nearest);
    the recipe may not have changed, so the trainer compares the arithmetic itself."""
    from fuyoucli.checkpoint import CheckpointError
    from fuyoucli.train.trainers import ZOHome

    ZOHome("bfloat16", "stochastic").check({"home_dtype": "bfloat16", "home_rounding": "stochastic"}, 1000, "torch-cpu")
    ZOHome("float32", "nearest").check({}, 1000, "torch-cpu")
    with pytest.raises(CheckpointError, match="set offload.home_dtype: float32 to resume it"):
        ZOHome("bfloat16", "stochastic").check({"home_dtype": "float32"}, 1000, "torch-cpu")
    with pytest.raises(CheckpointError, match="set offload.home_rounding: nearest to resume it"):
        ZOHome("bfloat16", "stochastic").check({"home_dtype": "bfloat16"}, 1000, "torch-cpu")


def test_a_checkpoint_whose_z_was_drawn_otherwise_is_refused_unless_the_numbers_agree():
    """From torch's generator, z's numbers for a tensor longer than a piece depend on the piece size. A
    checkpoint from before pieces (no z_piece: each tensor drawn whole) resumes when no trainable tensor
    is longer than a piece (the same numbers); otherwise, and under another piece size, the trainer
    refuses. The counter stream of a CPU gives the same numbers whatever the pieces: no refusal."""
    from fuyoucli.checkpoint import CheckpointError
    from fuyoucli.kernels.normal import COUNTER_SOURCE
    from fuyoucli.train.trainers import ZOHome

    home = ZOHome("float32", "nearest", z_piece=4096)
    home.check({}, 4096, "torch-cuda")
    home.check({"z_piece": 4096}, 10**9, "torch-cuda")
    with pytest.raises(CheckpointError, match="drawn a tensor at a time"):
        home.check({}, 4097, "torch-cuda")
    with pytest.raises(CheckpointError, match="in pieces of 1024 elements"):
        home.check({"z_piece": 1024}, 10, "torch-cpu")
    home.check({}, 4097, COUNTER_SOURCE)
    home.check({"z_piece": 1024}, 10, COUNTER_SOURCE)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stochastic_16_bit_run_resumes_from_a_seed_ledger_exactly(stream, tiny_models, text_data, tmp_path):
    """The rounding draws come from (seed, step, block): a run resumed from a seed-ledger checkpoint
    (the home replayed from the last full one) ends with the uninterrupted run's losses and weights."""
    from test_resume import STREAM_SSD, assert_same_run, write_recipe

    from fuyoucli.recipe import load_recipe
    from fuyoucli.telemetry.jsonl import read_metrics
    from fuyoucli.train.run import finetune

    def recipe(name, extra=""):
        offload = STREAM_SSD.format(swap=tmp_path / f"swap-{name}") if stream else ""
        path = write_recipe(tmp_path / f"{name}.yaml", tiny_models["opt"], text_data, tmp_path / name, "zo2",
                            extra + offload)
        path.write_text(path.read_text().replace(f"  path: {tiny_models['opt']}\n",
                                                 f"  path: {tiny_models['opt']}\n  dtype: bfloat16\n"))
        return load_recipe(path)

    finetune(recipe("ref"))
    run = recipe("run", "  zo_ledger_steps: 5\n")
    finetune(run)
    assert {r["home_rounding"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"} \
        == {"stochastic"}
    finetune(run, resume=str(tmp_path / "run" / "checkpoints" / "step-00000006"))
    assert_same_run(tmp_path / "ref", tmp_path / "run")
