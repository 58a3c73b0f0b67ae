"""Compact AdamW states (kernels/adamw.py, engine/compact.py): the arithmetic against torch's AdamW, the 8-bit codes'
precision, the bf16 master's stochastic rounding, the compiled chunk (kernels/adamw_chunk.c) against the torch ops,
and the recipe's refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fuyoucli.kernels.adamw import (BLOCK, CHUNK, CODE_DTYPE, CODE_MAX, AdamFormat, CompactAdamW, new_state,
                                     scale_count)
from fuyoucli.engine.compact import compact_adamw
from fuyoucli.engine.optimizer import CpuAdam
from fuyoucli.kernels.native import adamw_chunk
from fuyoucli.errors import FuyouError
from fuyoucli.recipe import load_recipe

SHAPES = [(3,), (BLOCK + 1,), (70, 33), (CHUNK + BLOCK + 5,)]  # tails of a block and of a chunk

NO_NATIVE = "no C compiler here: the torch ops run instead"
needs_native = pytest.mark.skipif(adamw_chunk() is None, reason=NO_NATIVE)


@pytest.fixture(params=["torch", "native"])
def kernel(request, monkeypatch):
    """Each test that takes it runs on the torch ops and on the compiled chunk. torch's own sqrt on
    large tensors is not always correctly rounded (about 0.6% of values one unit off, measured here)
    and the C one is, so only the torch ops can equal torch's AdamW bit for bit (_same)."""
    if request.param == "native" and adamw_chunk() is None:
        pytest.skip(NO_NATIVE)
    monkeypatch.setenv("FUYOU_NATIVE_KERNELS", "1" if request.param == "native" else "0")
    return request.param


def _same(a: torch.Tensor, b: torch.Tensor, kernel: str) -> None:
    if kernel == "torch":
        assert torch.equal(a, b)
    else:  # one unit of the last place in a sqrt moves an update by as little: far below the weights' own
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def _pair(shape, fmt, seed=0):
    torch.manual_seed(seed)
    p0 = torch.randn(shape)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    got = CompactAdamW([b], fmt=fmt, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    return a, b, ref, got


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_states_are_torchs_single_tensor_adamw_exactly(shape, kernel):
    a, b, ref, got = _pair(shape, AdamFormat())
    for step in range(5):
        g = torch.randn(shape) * (1 + step)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        got.step()
    _same(a, b, kernel)
    assert torch.equal(ref.state[a]["exp_avg_sq"], got.state[b]["exp_avg_sq"])


def _dequantized(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n = codes.numel()
    padded = torch.zeros(scale_count(n) * BLOCK)
    padded[:n] = codes.reshape(-1).float()
    return (padded.view(-1, BLOCK) * scales.view(-1, 1)).reshape(-1)[:n]


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_step_is_adamw_on_the_dequantized_moments(shape, kernel):
    """What the 8-bit format changes is only what m and v are read back as: one step from 8-bit
    states equals torch's AdamW (foreach=False) started from their dequantized values, bit for bit
    (the compiled chunk: to its sqrt's rounding)."""
    a, b, ref, got = _pair(shape, AdamFormat("int8"))
    for _ in range(3):  # reach a state with non-trivial codes and scales
        b.grad = torch.randn(shape)
        got.step()
    st = got.state[b]
    a.data.copy_(b.data)
    m = _dequantized(st["exp_avg"], st["exp_avg_scale"]).view(shape)
    v = _dequantized(st["exp_avg_sq"], st["exp_avg_sq_scale"]).view(shape) ** 2
    ref.state[a] = {"step": st["step"].clone(), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    g = torch.randn(shape)
    a.grad, b.grad = g.clone(), g.clone()
    ref.step()
    got.step()
    _same(a, b, kernel)
    # and the new moments are stored to the codes' precision
    m_new = _dequantized(st["exp_avg"], st["exp_avg_scale"]).view(shape)
    top = ref.state[a]["exp_avg"].reshape(-1)
    top = torch.nn.functional.pad(top.abs(), (0, scale_count(top.numel()) * BLOCK - top.numel())).view(-1, BLOCK)
    bound = torch.maximum(ref.state[a]["exp_avg"].abs() * 2 ** -4,
                          top.amax(1).repeat_interleave(BLOCK)[: m_new.numel()].view(shape) / CODE_MAX * 2 ** -9)
    assert bool(((m_new - ref.state[a]["exp_avg"]).abs() <= bound).all())


def test_int8_codes_keep_small_values_and_never_zero_a_nonzero_v():
    fmt = AdamFormat("int8")
    p = torch.nn.Parameter(torch.zeros(BLOCK))
    opt = CompactAdamW([p], fmt=fmt, lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    g = torch.full((BLOCK,), 1e-6)
    g[0] = 1.0  # one large value in the block
    p.grad = g
    opt.step()
    st = opt.state[p]
    m = _dequantized(st["exp_avg"], st["exp_avg_scale"])
    u = _dequantized(st["exp_avg_sq"], st["exp_avg_sq_scale"])
    assert st["exp_avg"].dtype == CODE_DTYPE
    assert bool((u > 0).all())  # sqrt(v) of 1e-6 / 1 relative: stored, not 0 (no step of m / eps)
    assert m[0].item() == pytest.approx(0.1, rel=2 ** -4)
    assert u[0].item() == pytest.approx(math.sqrt(1e-3), rel=2 ** -4)
    # an update from these states stays bounded (Adam's steps are about lr at most)
    before = p.detach().clone()
    opt.step()
    assert float((p.detach() - before).abs().max()) < 1e-2


@needs_native
@pytest.mark.parametrize("fmt", [AdamFormat("int8"), AdamFormat("fp32", "bf16"), AdamFormat("int8", "bf16")],
                         ids=["int8", "bf16-master", "int8-bf16-master"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_is_the_torch_ops(fmt, grad_dtype, monkeypatch):
    """The compiled chunk and the torch ops, five steps from the same start: the same weights (to the
    sqrt's last place; a bf16 master to its rounding, each kernel drawing its own), and the same 8-bit
    codes but where a value sits on a rounding boundary: then they are one code apart, and the scales
    agree to the same last place."""
    runs = {}
    for native in ("1", "0"):
        monkeypatch.setenv("FUYOU_NATIVE_KERNELS", native)
        torch.manual_seed(0)
        shape = (CHUNK + 3 * BLOCK + 7,)
        p = torch.nn.Parameter((torch.randn(shape) * 0.05).to(fmt.master_dtype))
        opt = compact_adamw([p], fmt=fmt, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, seed=1, block=2)
        for step in range(5):
            opt.step(grads={id(p): (torch.randn(shape) * (1 + step)).to(grad_dtype)})
        runs[native] = (p.detach().float(), opt.state[p])
    (p1, st1), (p0, st0) = runs["1"], runs["0"]
    if fmt.master == "bf16":  # each rounds stochastically from its own draws: a few bf16 spacings apart at most
        spacing = 2 ** -7 * p0.abs().clamp(min=1e-3)
        assert bool(((p1 - p0).abs() <= 2 * 5 * spacing).all())  # five steps, each at most a spacing apart
        assert abs(float((p1 - p0).mean())) < 1e-5  # and neither drifts from the other (weights ~0.05)
    else:
        torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-9)
    if fmt.states == "int8":
        for key in ("exp_avg", "exp_avg_sq"):
            c1 = st1[key].view(torch.uint8).int()
            c0 = st0[key].view(torch.uint8).int()
            assert float((c1 != c0).float().mean()) < 1e-3
            assert int((c1 - c0).abs().max()) <= 1
            torch.testing.assert_close(st1[f"{key}_scale"], st0[f"{key}_scale"], rtol=1e-6, atol=0)


def test_bf16_master_keeps_updates_below_its_resolution_in_expectation(kernel):
    """lr 1e-5 steps on weights near 1 (bf16 spacing 2^-7): rounded to nearest none would stay; with
    stochastic rounding the mean displacement matches fp32's (the torch generator's draws and the
    compiled chunk's hash alike), and the same seeds give the same weights."""
    n, steps, lr = 20000, 40, 1e-5
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = compact_adamw([p], fmt=AdamFormat(master="bf16"), lr=lr, betas=(0.9, 0.999), eps=1e-8, seed=3, block=1)
    grads = {}
    for _ in range(steps):
        grads[id(p)] = torch.ones(n)
        opt.step(grads=grads)
    moved = float(1.0 - p.float().mean())
    assert moved == pytest.approx(steps * lr, rel=0.2)
    again = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt2 = compact_adamw([again], fmt=AdamFormat(master="bf16"), lr=lr, betas=(0.9, 0.999), eps=1e-8, seed=3,
                         block=1)
    for _ in range(steps):
        opt2.step(grads={id(again): torch.ones(n)})
    assert torch.equal(p, again)  # seeded by (seed, step, block): the same draws


def test_state_bytes_per_format():
    shapes = [torch.Size([1024, 256])]
    n = 1024 * 256
    assert CpuAdam.state_bytes(shapes) == 12 * n
    assert CpuAdam.state_bytes(shapes, AdamFormat("int8")) == 6 * n + 8 * (n // BLOCK)
    assert CpuAdam.state_bytes(shapes, AdamFormat("int8", "bf16"), keeps_master=False) == 2 * n + 8 * (n // BLOCK)
    assert CpuAdam.state_bytes(shapes, AdamFormat("fp32", "bf16"), keeps_master=False) == 8 * n
    assert new_state(torch.empty(5, 7), AdamFormat("int8"))["exp_avg_scale"].shape == (1,)


def _recipe(tmp_path: Path, model: Path, data: Path, method: str, extra: str = "", dtype: str = "float32"):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model:\n  path: {model}\n  dtype: {dtype}\nmethod:\n  name: adamw\n{method}data:\n"
                    f"  train: {data}\ntraining:\n  max_steps: 2\n{extra}")
    return path


@pytest.mark.parametrize("method,extra,dtype,expected", [
    ("  master: bf16\n", "", "float32", "method.master: bf16 makes the bfloat16 weight the master; the model computes "
                                         "in float32"),
    ("  master: bf16\n", "", "float16", "the model computes in float16"),
    ("  master: bf16\n", "peft:\n  type: lora\n", "bfloat16", "LoRA adapters train in fp32"),
    ("  states: int4\n", "", "float32", "method.states = 'int4': Input should be 'fp32' or 'int8'"),
    ("  master: fp16\n", "", "float32", "Input should be 'fp32' or 'bf16'"),
])
def test_formats_that_make_no_sense_are_one_line(method, extra, dtype, expected, tmp_path, tiny_models, text_data):
    with pytest.raises(FuyouError) as info:
        load_recipe(_recipe(tmp_path, tiny_models["llama"], text_data, method, extra, dtype))
    assert info.value.exit_code == 2
    assert len(str(info.value).splitlines()) == 1, str(info.value)
    assert expected in str(info.value)


def test_zo2_has_no_adamw_states(tmp_path, tiny_models, text_data):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model:\n  path: {tiny_models['llama']}\nmethod:\n  name: zo2\n  states: int8\ndata:\n"
                    f"  train: {text_data}\ntraining:\n  max_steps: 2\n")
    with pytest.raises(FuyouError, match="unknown key 'method.states'"):
        load_recipe(path)


def test_defaults_are_unchanged(tmp_path, tiny_models, text_data):
    r = load_recipe(_recipe(tmp_path, tiny_models["llama"], text_data, ""))
    assert (r.method.states, r.method.master) == ("fp32", "fp32")
    ok = load_recipe(_recipe(tmp_path, tiny_models["llama"], text_data, "  states: int8\n  master: bf16\n",
                             dtype="bfloat16"))
    assert (ok.method.states, ok.method.master) == ("int8", "bf16")
