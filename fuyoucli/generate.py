"""`fuyou generate`: load what a run produced (its final model, a checkpoint, an exported folder) or any model
fuyou can train (a folder, a .gguf file, `pkg:`, a hub id), and stream a completion to the terminal.

After the checkpoint stage, beside export: a run's final model and checkpoints are rebuilt exactly as
`fuyou export` rebuilds them (fuyoucli.export: the recipe's base model with the trained weights, LoRA as
base + adapter through peft). Generation is transformers' own `generate` with a TextStreamer, or, for a
model larger than the device (`stream=True`), a token at a time through the offload engine the training
runs use (engine.build from a plan): every decoder layer streams from host memory for every new token,
with no KV cache, so each token runs the whole sequence again: slow, but it needs only the device memory
of a layer or two. Greedy decoding gives the same tokens both ways (tests/integration/test_generate.py).
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
    recipe: object = None
    """The run's recipe (a run folder or checkpoint): its model and hardware sections plan a streamed
    generation; None for other sources."""


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
    return Loaded(tokenizer, model, f"checkpoint {path} (step {ckpt.step}, {_kind(recipe)})", recipe)


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
    return Loaded(tokenizer, model, f"{folder} (LoRA adapter over {base.path})", _model_recipe(base))


def _from_model(spec: str) -> Loaded:
    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.recipe import ModelConfig, PeftConfig

    cfg = ModelConfig(path=spec)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, PeftConfig(), seed=0, pad_token_id=tokenizer.pad_token_id, device="cpu")
    return Loaded(tokenizer, model, spec, _model_recipe(cfg))


def _model_recipe(cfg):
    """A stand-in recipe naming only the model (for planning a streamed generation)."""
    from fuyoucli.recipe import Recipe

    return Recipe.model_validate({"model": cfg.model_dump(exclude_unset=True), "method": {"name": "zo2"},
                                  "data": {"train": ["-"]}, "training": {"max_steps": 1}})


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
            return Loaded(tokenizer, model, f"{src.path} (final model, {at}{_kind(recipe)})", recipe)
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
             seed: int = 0, device: torch.device | str = "cpu", stream=None, stream_layers: bool = False,
             note=lambda s: None) -> tuple[int, float]:
    """Stream a completion of `prompt` to `stream` (stdout) as it is generated: greedy at temperature 0, else
    sampled with torch's generator seeded by `seed`. `stream_layers`: through the offload engine (see the
    module's docstring); `note` gets its plan's one-line remarks. Returns (new tokens, seconds)."""
    from transformers import TextStreamer

    tokenizer, model = loaded.tokenizer, loaded.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "ForSequenceClassification" in type(inner).__name__ or not hasattr(inner, "generate"):
        raise ModelError(f"{loaded.what} is a sequence classifier (model.head: sequence_classification): it "
                         "predicts labels, it does not generate text")
    inputs = {k: v.to(device) for k, v in prompt_ids(tokenizer, prompt, chat=chat).items()}
    model.eval()
    if not stream_layers:
        model.to(device)
        model.config.use_cache = True  # training loads with the KV cache off; generation wants it
    out = stream or sys.stdout

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    if stream_layers:
        return _generate_streamed(loaded, inputs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                  device=torch.device(device), streamer=_Streamer(tokenizer, skip_prompt=True,
                                                                                 skip_special_tokens=True),
                                  note=note)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    start = time.perf_counter()
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             streamer=_Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **sampling)
    return int(ids.shape[-1] - inputs["input_ids"].shape[-1]), time.perf_counter() - start



def _planned(loaded: Loaded, length: int, note):
    """The plan of a streamed generation: the source's model (and hardware section) as a zo2 LoRA run of
    batch 1 at the final length, every layer streamed. LoRA, because generation trains nothing: the base
    streams read-only in the model's dtype, as a LoRA run's frozen base does."""
    from fuyoucli.recipe import Recipe
    from fuyoucli.train.planning import plan_for_run

    base = loaded.recipe
    doc = {"name": "generate", "model": base.model.model_dump(exclude_unset=True), "method": {"name": "zo2"},
           "peft": {"type": "lora"}, "data": {"train": ["-"], "max_length": max(8, length)},
           "training": {"max_steps": 1, "batch_size": 1}, "offload": {"mode": "stream"},
           "hardware": base.hardware.model_dump(exclude_unset=True)}
    if base.offload.swap_dir is not None:
        doc["offload"]["swap_dir"] = base.offload.swap_dir
    return plan_for_run(Recipe.model_validate(doc), num_labels=None, note=note)


def _streamed_logits(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One forward pass of the whole sequence, layer by layer as the plan streams them (a zo2 pass that
    writes nothing home); each streamed layer computes straight from its slot, read-only."""
    from fuyoucli.engine.executor import run_pass
    from fuyoucli.plan.schedule import zo_pass

    state: dict = {}
    last = len(engine.streamed) - 1

    def compute(e: int, slot: int | None) -> bool:
        if e == 0:
            state["prepared"] = engine.runner.capture(input_ids, attention_mask)
            state["hidden"] = state["prepared"].hidden
        elif e == last:
            state["logits"] = engine.runner.run_head(state["hidden"], input_ids, attention_mask)
        else:
            if slot is not None:
                for (_, p), view in zip(engine.store.units[e].params, engine.store.acquire(e, slot)):
                    p.data = view
            state["hidden"] = engine.runner.run_layer(engine.order[e].layer, state["hidden"], state["prepared"])
        return False

    with torch.no_grad():
        run_pass(zo_pass(engine.streamed, engine.plan.prefetch_depth, writable=False, writes_home=False),
                 engine.store, compute)
    return state["logits"]


def _generate_streamed(loaded: Loaded, inputs: dict, *, max_new_tokens: int, temperature: float, seed: int,
                       device: torch.device, streamer, note) -> tuple[int, float]:
    from fuyoucli.engine.build import build
    from fuyoucli.engine.lanes import lanes_for

    tokenizer, model = loaded.tokenizer, loaded.model
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu()
    plan = _planned(loaded, ids.shape[-1] + max_new_tokens, note)
    for p in model.parameters():
        p.requires_grad_(False)  # nothing trains: every streamed weight is read-only, in the compute dtype
    engine = build(plan, model, lanes_for(device))
    layers = [b for b in engine.order if b.layer is not None]
    homes = sorted({b.home.value for b in layers if b.streamed})
    note(f"{sum(b.streamed for b in layers)} of {len(layers)} decoder layers stream from {', '.join(homes) or '-'}, "
         f"{plan.prefetch_depth} fetched ahead")
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_token_id
    new = 0
    start = time.perf_counter()
    try:
        streamer.put(ids)
        for _ in range(max_new_tokens):
            logits = _streamed_logits(engine, ids.to(engine.device), mask.to(engine.device))[0, -1].float().cpu()
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
            else:
                token = logits.argmax(dim=-1, keepdim=True)
            ids, mask = torch.cat([ids, token[None]], dim=1), torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            new += 1
            streamer.put(token)
            if eos is not None and int(token) == eos:
                break
    finally:
        streamer.end()
        engine.close()
    return new, time.perf_counter() - start
