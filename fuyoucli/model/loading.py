"""Load a model and tokenizer from a local folder, a .gguf file or a hub id, with LoRA when the recipe asks.

Safetensors only (never pickle); trust_remote_code only when the recipe sets it. A .gguf file is
dequantized once and cached as a plain Hugging Face folder, so later loads take a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fuyoucli.errors import ModelError
from fuyoucli.recipe import ModelConfig, PeftConfig
from fuyoucli.resources import cache_dir, resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def gguf_to_folder(gguf: Path) -> Path:
    """A Hugging Face folder holding the dequantized GGUF model, converted once and cached.

    The cache key covers the file's name, size and modification time, so a new package version
    (a new file) converts again. The folder appears atomically: a crash mid-conversion leaves none.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise ModelError(f"loading {gguf.name} needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is a model error
        raise ModelError(f"cannot read GGUF file {gguf}: {e}") from e
    # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are already
    # dequantized to fp32, so detaching it is exact.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_folder(cfg: ModelConfig) -> Path:
    path = resolve_model_path(cfg.path)
    return gguf_to_folder(path) if path.suffix == ".gguf" else path


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder = model_folder(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot load a tokenizer from {folder}: {e}") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"the tokenizer in {folder} has neither a pad nor an eos token; add one to it")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig,
    peft_cfg: PeftConfig,
    *,
    seed: int,
    pad_token_id: int,
    num_labels: int | None = None,
    device: torch.device | str = "cpu",
    streamed_layers: set[int] | None = None,
):
    """Model in cfg.dtype on `device`, LoRA applied if asked.

    New weights (a classification head, LoRA adapters) are drawn from `seed`, so a run is repeatable.
    With `streamed_layers` (full-parameter causal LM), those layers are not read here: their
    parameters are empty and `model.fuyou_source` gives their shapes and data tensor by tensor to the
    engine, so a model larger than RAM never has to fit in it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet_transformers()
    folder = model_folder(cfg)
    torch.manual_seed(seed)
    if streamed_layers and cfg.head == "causal_lm" and peft_cfg.type == "none":
        from transformers import AutoConfig

        from fuyoucli.model.lazy import lazy_load

        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        loaded = lazy_load(folder, config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code,
                           streamed_layers=streamed_layers)
        if loaded is not None:
            model, source = loaded
            model.config.use_cache = False
            model.fuyou_source = source
            return model
    kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    try:
        if cfg.head == "sequence_classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, pad_token_id=pad_token_id, **kwargs
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the model in {folder}: {first}") from e
    model.config.use_cache = False
    if peft_cfg.type == "lora":
        model = apply_lora(model, peft_cfg, head=cfg.head, seed=seed)
    return model.to(device)


def apply_lora(model, peft_cfg: PeftConfig, *, head: str, seed: int):
    from peft import LoraConfig, TaskType, get_peft_model

    task = TaskType.SEQ_CLS if head == "sequence_classification" else TaskType.CAUSAL_LM
    lora = LoraConfig(
        task_type=task,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=peft_cfg.target_modules,
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise ModelError(f"cannot apply LoRA: {str(e).splitlines()[0]}; set peft.target_modules to modules of this model") from e
