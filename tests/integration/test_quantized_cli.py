"""`fuyou finetune` and `fuyou export` with a quantized LoRA base (model.quantization): the run streams
the base from the SSD, a run killed mid-way resumes to the same adapters and losses (the base is
quantized again at load, deterministically), the adapters export as a peft folder and --merge writes an
ordinary full-precision folder; without bitsandbytes, nf4 is one line before anything loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fuyoucli.cli.app import main
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.events import RunStarted
from fuyoucli.telemetry.jsonl import comparable, read_metrics
from fuyoucli.train.run import finetune

pytest.importorskip("bitsandbytes")


def write_recipe(path: Path, model: Path, data: Path, out: Path, swap: Path, fmt: str = "nf4") -> Path:
    path.write_text(
        f"name: qlora-test\nmodel:\n  path: {model}\n  quantization: {fmt}\n"
        "method:\n  name: adamw\n  lr: 3.0e-3\n"
        "peft:\n  type: lora\n  r: 4\n  alpha: 8\n  target_modules: [q_proj, v_proj]\n"
        f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"training:\n  max_steps: 6\n  batch_size: 8\n  seed: 1\n  checkpoint_every: 2\n  output_dir: {out}\n"
        f"offload:\n  mode: stream\n  weights_home: ssd\n  swap_dir: {swap}\n"
        "hardware:\n  preset: cpu-laptop-8c-32g\n")
    return path


def cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def test_a_qlora_run_killed_mid_way_resumes_exactly_and_exports(capsys, tmp_path, tiny_models, text_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_models["llama"]
    ref = write_recipe(tmp_path / "ref.yaml", model, text_data, tmp_path / "ref", tmp_path / "swap-ref")
    run = write_recipe(tmp_path / "run.yaml", model, text_data, tmp_path / "run", tmp_path / "swap-run")
    env = {**os.environ, "FUYOU_CRASH_AT": "step:3"}
    proc = subprocess.run([sys.executable, "-m", "fuyoucli", "finetune", str(run), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    events: list = []

    class Collect:
        handle, close = events.append, lambda self=None: None

    finetune(load_recipe(ref), sinks=[Collect()])
    finetune(load_recipe(run), resume=True)

    rows = list(read_metrics(tmp_path / "ref" / "metrics.jsonl"))
    assert [comparable(r) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [comparable(r) for r in rows]
    a = load_file(tmp_path / "ref" / "model" / "adapter_model.safetensors")
    b = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    started = next(e for e in events if isinstance(e, RunStarted))
    assert started.method == "adamw + lora over a nf4 base"  # the run's header says which base
    train = [r for r in rows if r.get("kind") == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["ssd_read_bytes"] > 0 for r in train)  # the quantized base streamed from the SSD
    assert not any((tmp_path / "swap-run").iterdir())

    code, text = cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "adapter"))
    assert code == 0, text
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys() == a.keys()
    code, text = cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge")
    assert code == 0, text
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())

    from fuyoucli.export import final_model

    _, _, trained, _ = final_model(tmp_path / "run" / "model")  # the run's own model: quantized base + adapters
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    ids = tokenizer("a great movie", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, trained.eval()(**ids).logits, rtol=1e-4, atol=1e-5)


def test_nf4_without_bitsandbytes_is_one_line_before_anything_loads(tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out", tmp_path / "swap")
    # bitsandbytes absent as Python sees it: `import` fails and importlib's find_spec returns None
    code = ("import sys; sys.modules['bitsandbytes'] = None; from fuyoucli.cli.app import main; "
            f"main(['finetune', {str(recipe)!r}, '--quiet'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.quantization: nf4 needs bitsandbytes" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_quantized_base_is_refused_on_the_deepspeed_engine(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "out", tmp_path / "swap",
                          fmt="int8")
    code, text = cli(capsys, "finetune", str(recipe), "--quiet", "--engine", "deepspeed")
    assert code == 2 and "Traceback" not in text, text
    assert "model.quantization: int8 is fuyou's own engine's" in text and len(text.strip().splitlines()) == 1, text
    assert not (tmp_path / "out").exists()
