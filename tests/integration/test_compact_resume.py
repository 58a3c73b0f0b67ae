"""Compact AdamW states through the whole run: checkpoints keep the 8-bit codes and the bf16 master as
they are (a checkpoint about a third of fp32 states' size here), a run resumed from one ends exactly as
the uninterrupted run, and `fuyou export` still writes a plain Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from fuyoucli.checkpoint import list_checkpoints
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.jsonl import comparable, read_metrics
from fuyoucli.train.run import finetune

STREAM_SSD = ("offload:\n  mode: stream\n  swap_dir: {swap}\n  weights_home: ssd\n  optimizer_home: ssd\n"
              "hardware:\n  preset: cpu-laptop-8c-32g\n")


def write_recipe(path: Path, model: Path, data: Path, out: Path, formats: str, offload: str = "") -> Path:
    path.write_text(
        f"name: compact-resume\nmodel:\n  path: {model}\n  dtype: bfloat16\n"
        f"method:\n  name: adamw\n  lr: 3.0e-3\n{formats}"
        f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"training:\n  max_steps: 6\n  batch_size: 8\n  seed: 1\n  eval_every: 3\n  checkpoint_every: 2\n"
        f"  keep_checkpoints: 3\n  output_dir: {out}\n{offload}")
    return path


def checkpoint_bytes(out: Path, step: int) -> int:
    folder = out / "checkpoints" / f"step-{step:08d}"
    return sum(f.stat().st_size for f in folder.glob("weights*.safetensors"))


def test_compact_run_resumes_exactly_with_a_smaller_checkpoint_and_exports(tmp_path, tiny_models, text_data):
    model = tiny_models["qwen2"]
    compact = "  states: int8\n  master: bf16\n"
    swap = STREAM_SSD.format(swap=tmp_path / "swap")
    ref_out, out, fp32_out = tmp_path / "ref", tmp_path / "run", tmp_path / "fp32"
    finetune(load_recipe(write_recipe(tmp_path / "ref.yaml", model, text_data, ref_out, compact, swap)))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model, text_data, out, compact, swap))
    finetune(recipe)
    finetune(recipe, resume=str(out / "checkpoints" / "step-00000002"))
    rows = [comparable(r) for r in read_metrics(ref_out / "metrics.jsonl")]
    assert [comparable(r) for r in read_metrics(out / "metrics.jsonl")][-len(rows):] == rows
    wa, wb = load_file(ref_out / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    ckpt = list_checkpoints(out / "checkpoints")[-1]
    stored = {}
    for f in ckpt.glob("weights*.safetensors"):
        stored.update(load_file(f))
    assert {v.dtype for k, v in stored.items() if k.startswith("adam.exp_avg.")} == {torch.float8_e4m3fn}
    assert {v.dtype for k, v in stored.items() if k.startswith("param.")} == {torch.bfloat16}

    finetune(load_recipe(write_recipe(tmp_path / "f.yaml", model, text_data, fp32_out, "")))
    assert checkpoint_bytes(out, 2) < 0.4 * checkpoint_bytes(fp32_out, 2)  # 4 + scales vs 12 bytes a parameter

    from fuyoucli.export import export
    from transformers import AutoModelForCausalLM

    dest, _ = export(ckpt, tmp_path / "exported")
    loaded = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.bfloat16)
    for name, p in loaded.named_parameters():
        if f"param.{name}" in stored:
            assert torch.equal(p.detach(), stored[f"param.{name}"].view(p.shape)), name
