"""`fuyou export`: a checkpoint becomes a folder transformers (or peft) loads and generates with, holding
exactly the weights a run stopped at that step would have saved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fuyoucli.cli.app import main
from fuyoucli.recipe import validate_recipe
from fuyoucli.train.run import finetune


def recipe(model, data, out, method, *, steps, peft=None, **training):
    doc = {"model": {"path": str(model)}, "method": method,
           "data": {"train": [str(data)], "max_length": 24, "eval_fraction": 0.1},
           "training": {"max_steps": steps, "batch_size": 8, "seed": 2, "output_dir": str(out), **training}}
    if peft:
        doc["peft"] = peft
    return validate_recipe(doc)


def cli(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out + out.err


def generate(model, tokenizer) -> str:
    ids = tokenizer("the quick brown", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tokenizer.decode(out[0])


def test_full_model_export_loads_generates_and_equals_the_run_stopped_there(capsys, tmp_path, tiny_models, text_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adamw = {"name": "adamw", "lr": 3e-3}
    finetune(recipe(tiny_models["qwen2"], text_data, tmp_path / "run", adamw, steps=3, checkpoint_every=2))
    finetune(recipe(tiny_models["qwen2"], text_data, tmp_path / "two", adamw, steps=2))
    code, text = cli(capsys, "export", str(tmp_path / "run" / "checkpoints" / "step-00000002"), str(tmp_path / "hf"))
    assert code == 0, text
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    generate(model, AutoTokenizer.from_pretrained(tmp_path / "hf"))
    exported, reference = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[k], reference[k]) for k in exported)
    # An occupied folder is refused; --merge needs LoRA.
    code, text = cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert code != 0 and "not empty" in text
    code, text = cli(capsys, "export", str(tmp_path / "run"), str(tmp_path / "m"), "--merge")
    assert code != 0 and "LoRA" in text and "Traceback" not in text


def test_lora_export_from_a_seed_ledger_as_adapter_and_merged(capsys, tmp_path, tiny_models, text_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zo = {"name": "zo2", "lr": 5e-2, "eps": 1e-2}
    lora = {"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    base = tiny_models["llama"]
    # Checkpoints at 2 (full) and 4 (a ledger of steps 3-4 over 2): export must replay it.
    finetune(recipe(base, text_data, tmp_path / "run", zo, steps=5, peft=lora, checkpoint_every=2,
                    zo_ledger_steps=4, keep_checkpoints=3))
    finetune(recipe(base, text_data, tmp_path / "four", zo, steps=4, peft=lora))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000004"
    assert not list(ckpt.glob("weights*"))
    code, text = cli(capsys, "export", str(ckpt), str(tmp_path / "adapter"))
    assert code == 0, text
    exported = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "four" / "model" / "adapter_model.safetensors")
    assert exported.keys() == reference.keys() and all(torch.equal(exported[k], reference[k]) for k in exported)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    text_peft = generate(peft_model, tokenizer)

    code, text = cli(capsys, "export", str(ckpt), str(tmp_path / "merged"), "--merge")
    assert code == 0, text
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not list((tmp_path / "merged").glob("adapter*"))
    assert generate(merged, tokenizer) == text_peft
    ids = tokenizer("a great movie", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**ids).logits, peft_model(**ids).logits, rtol=1e-4, atol=1e-5)
