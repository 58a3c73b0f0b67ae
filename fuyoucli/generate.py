"""`fuyou generate`: load what a run produced (its final model, a checkpoint, an exported folder) or any model
fuyou can train (a folder, a .gguf file, `pkg:`, a hub id), and stream a completion to the terminal.

After the checkpoint stage, beside export: a run's final model and checkpoints are rebuilt exactly as
`fuyou export` rebuilds them (fuyoucli.export: the recipe's base model with the trained weights, LoRA as
base + adapter through peft). Generation is transformers' own `generate` with a TextStreamer. The whole
model is loaded on one device: generation that streams layers through the offload engine is not built.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fuyoucli.checkpoint import MANIFEST, STATE_FILE, latest_checkpoint, load_checkpoint
from fuyoucli.errors import InputError, ModelError
from fuyoucli.export import FINAL_RECIPE, checkpoint_model, final_model, resolve_source
from fuyoucli.resources import PKG_PREFIX, hub_id


@dataclass
class Loaded:
    tokenizer: object
    model: object
    what: str
    """Where the weights came from, for the header line."""


def _is_run_output(path: Path) -> bool:
    return ((path / FINAL_RECIPE).is_file() or (path / "model" / FINAL_RECIPE).is_file()
            or (path / STATE_FILE).is_file() or (path / MANIFEST).is_file())


def _from_checkpoint(path: Path) -> Loaded:
    from fuyoucli.distributed.deepspeed_export import is_deepspeed_checkpoint

    if is_deepspeed_checkpoint(path):
        raise InputError(f"{path} is a DeepSpeed checkpoint: export it first (fuyou export {path} OUT), then "
                         "fuyou generate OUT")
    ckpt = load_checkpoint(path)
    recipe, tokenizer, model = checkpoint_model(ckpt)
    return Loaded(tokenizer, model, f"checkpoint {path} (step {ckpt.step}, {_kind(recipe)})")


def _kind(recipe) -> str:
    return "LoRA: base + adapter" if recipe.peft.type == "lora" else "full weights"


def _from_adapter(folder: Path) -> Loaded:
    """A peft adapter folder (an exported LoRA run, or any): its base, then the adapter through peft."""
    from peft import PeftModel

    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.recipe import ModelConfig, PeftConfig

    base = None
    info = folder / "fuyou_export.json"
    if info.is_file():
        doc = json.loads(info.read_text(encoding="utf-8"))
        model_doc = doc.get("recipe", {}).get("model") if isinstance(doc, dict) else None
        if isinstance(model_doc, dict):
            base = ModelConfig.model_validate(model_doc)
    if base is None:
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        if not adapter.get("base_model_name_or_path"):
            raise ModelError(f"{folder / 'adapter_config.json'} names no base model (base_model_name_or_path)")
        base = ModelConfig(path=adapter["base_model_name_or_path"])
    tokenizer = load_tokenizer(base)
    model = load_model(base, PeftConfig(), seed=0, pad_token_id=tokenizer.pad_token_id, device="cpu")
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the adapter in {folder}: {str(e).strip().splitlines()[0]}") from e
    return Loaded(tokenizer, model, f"{folder} (LoRA adapter over {base.path})")


def _from_model(spec: str) -> Loaded:
    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.recipe import ModelConfig, PeftConfig

    cfg = ModelConfig(path=spec)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, PeftConfig(), seed=0, pad_token_id=tokenizer.pad_token_id, device="cpu")
    return Loaded(tokenizer, model, spec)


def load_for_generation(source: str) -> Loaded:
    """The tokenizer and model `source` names, on the CPU: a run folder (its final model; a run that has not
    finished: its newest checkpoint), a final model folder, a checkpoint, an exported folder (full or peft
    adapter), or a model as a recipe's model.path names one."""
    path = Path(source).expanduser()
    if not path.exists() and hub_id(source) is None and not source.startswith(PKG_PREFIX):
        raise InputError(f"{path} not found: give a run folder, a checkpoint, a `fuyou export` folder, a model "
                         "folder or .gguf file, or a Hugging Face Hub id org/name")
    if path.is_dir():
        if _is_run_output(path):
            src = resolve_source(path)
            if not src.final:
                return _from_checkpoint(src.path)
            recipe, tokenizer, model, step = final_model(src.path)
            at = f"step {step}, " if step is not None else ""
            return Loaded(tokenizer, model, f"{src.path} (final model, {at}{_kind(recipe)})")
        newest = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
        if newest is not None:
            print(f"fuyou: {path} holds no final model (the run did not finish): using its newest checkpoint "
                  f"{newest.name}", file=sys.stderr)
            return _from_checkpoint(newest)
        if (path / "adapter_config.json").is_file():
            return _from_adapter(path)
    return _from_model(source)


def prompt_ids(tokenizer, prompt: str, *, chat: bool) -> dict:
    """The prompt as model inputs; with `chat`, one user turn through the tokenizer's chat template and the
    template's generation prompt (the assistant's turn opened)."""
    if not chat:
        return dict(tokenizer(prompt, return_tensors="pt"))
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("--chat needs a tokenizer with a chat template, and this model's has none; drop --chat "
                         "to continue the prompt as plain text")
    return dict(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True))


def generate(loaded: Loaded, prompt: str, *, max_new_tokens: int, chat: bool = False, temperature: float = 0.0,
             seed: int = 0, device: torch.device | str = "cpu", stream=None) -> tuple[int, float]:
    """Stream a completion of `prompt` to `stream` (stdout) as it is generated: greedy at temperature 0, else
    sampled with torch's generator seeded by `seed`. Returns (new tokens, seconds)."""
    from transformers import TextStreamer

    tokenizer, model = loaded.tokenizer, loaded.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "ForSequenceClassification" in type(inner).__name__ or not hasattr(inner, "generate"):
        raise ModelError(f"{loaded.what} is a sequence classifier (model.head: sequence_classification): it "
                         "predicts labels, it does not generate text")
    inputs = {k: v.to(device) for k, v in prompt_ids(tokenizer, prompt, chat=chat).items()}
    model.to(device).eval()
    model.config.use_cache = True  # training loads with the KV cache off; generation wants it
    out = stream or sys.stdout

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    start = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling)
    return int(ids.shape[-1] - inputs["input_ids"].shape[-1]), time.perf_counter() - start

