"""`fuyou generate`: a tiny model's run folder (full fine-tune), a LoRA run's checkpoint and its exported
adapter, a plain model folder; tokens on stdout, exit 0; bad sources are one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuyoucli.cli.app import main


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def write_recipe(path: Path, model: Path, data: Path, out: Path, extra: str = "") -> Path:
    path.write_text(f"model:\n  path: {model}\nmethod:\n  name: adamw\n  lr: 1.0e-3\n"
                    f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.0\n"
                    f"training:\n  max_steps: 2\n  batch_size: 4\n  output_dir: {out}\n"
                    f"hardware:\n  preset: cpu-laptop-8c-32g\n{extra}")
    return path


def generated(capsys, source, *extra) -> tuple[str, str]:
    code, out, err = run(capsys, "generate", str(source), "--prompt", "the quick brown", "--max-new-tokens", "6",
                         *extra)
    assert code == 0, err
    assert "Traceback" not in err
    assert "fuyou: 6 tokens in" in err, err  # a random tiny model never stops early on its eos here
    assert out.strip(), "no tokens printed"
    return out, err


def test_generate_from_a_full_run_and_from_a_lora_checkpoint(capsys, tmp_path, tiny_models, text_data):
    full = tmp_path / "full"
    # A large learning rate, so that two steps change what greedy decoding picks.
    code, _, err = run(capsys, "finetune", str(write_recipe(tmp_path / "f.yaml", tiny_models["llama"], text_data,
                                                            full)), "--quiet", "--set", "method.lr=0.05")
    assert code == 0, err
    out, err = generated(capsys, full)
    assert f"{full / 'model'} (final model, step 2, full weights)" in err
    # Greedy is repeatable, and the run folder, its model folder and an export of it say the same.
    assert generated(capsys, full / "model")[0] == out
    code, _, err = run(capsys, "export", str(full), str(tmp_path / "exported"))
    assert code == 0, err
    assert generated(capsys, tmp_path / "exported")[0] == out
    # The trained weights, not the base model's, are what generates.
    base_out, _ = generated(capsys, tiny_models["llama"])
    assert base_out != out

    lora = tmp_path / "lora"
    recipe = write_recipe(tmp_path / "l.yaml", tiny_models["llama"], text_data, lora,
                          "peft:\n  type: lora\n  r: 4\n")
    code, _, err = run(capsys, "finetune", str(recipe), "--quiet", "--set", "training.checkpoint_every=1",
                       "--set", "training.max_steps=3")
    assert code == 0, err
    step2 = lora / "checkpoints" / "step-00000002"
    out, err = generated(capsys, step2, "--chat")
    assert "(step 2, LoRA: base + adapter)" in err
    _, err = generated(capsys, lora, "--chat")
    assert "(final model, step 3, LoRA: base + adapter)" in err
    code, _, err = run(capsys, "export", str(step2), str(tmp_path / "adapter"))
    assert code == 0, err
    out_adapter, err = generated(capsys, tmp_path / "adapter", "--chat")
    assert "LoRA adapter over" in err and out_adapter == out
    # Sampling is seeded: the same seed gives the same text.
    a, _ = generated(capsys, step2, "--temperature", "1.5", "--seed", "3")
    b, _ = generated(capsys, step2, "--temperature", "1.5", "--seed", "3")
    assert a == b


def test_bad_sources_are_one_line(capsys, tmp_path, tiny_models, tiny_tokenizer):
    code, out, err = run(capsys, "generate", str(tmp_path / "nothing-here"), "--prompt", "x")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{tmp_path / 'nothing-here'} not found: give a run folder" in err, err
    folder = tmp_path / "no-template"
    import shutil

    shutil.copytree(tiny_models["llama"], folder)
    config = folder / "tokenizer_config.json"
    import json

    doc = json.loads(config.read_text())
    doc.pop("chat_template", None)
    config.write_text(json.dumps(doc))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    code, out, err = run(capsys, "generate", str(folder), "--prompt", "x", "--chat")
    assert code == 2 and "--chat needs a tokenizer with a chat template" in err, err
    assert len(err.strip().splitlines()) == 2  # the header line, then the error


def test_streamed_generation_gives_the_in_memory_tokens(capsys, tmp_path, tiny_models, text_data, lanes_mode):
    """--stream runs every decoder layer through the offload engine (no KV cache); greedy decoding gives the
    tokens transformers' generate gives, for a full fine-tune and a LoRA checkpoint, under the synchronous and
    the simulated asynchronous lanes."""
    full, lora = tmp_path / "full", tmp_path / "lora"
    code, _, err = run(capsys, "finetune", str(write_recipe(tmp_path / "f.yaml", tiny_models["qwen2"], text_data,
                                                            full)), "--quiet", "--set", "method.lr=0.05")
    assert code == 0, err
    code, _, err = run(capsys, "finetune", str(write_recipe(tmp_path / "l.yaml", tiny_models["llama"], text_data, lora,
                                                            "peft:\n  type: lora\n  r: 4\n")),
                       "--quiet", "--set", "training.checkpoint_every=1", "--set", "method.lr=0.05")
    assert code == 0, err
    for source in (full, lora / "checkpoints" / "step-00000001"):
        expected, _ = generated(capsys, source)
        out, err = generated(capsys, source, "--stream")
        assert "layers streamed through the offload engine" in err
        assert "2 of 2 decoder layers stream from" in err, err
        assert out == expected
    a, _ = generated(capsys, full, "--stream", "--temperature", "1.5", "--seed", "3")
    b, _ = generated(capsys, full, "--stream", "--temperature", "1.5", "--seed", "3")
    assert a == b
