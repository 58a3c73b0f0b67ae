"""Load a model and tokenizer from a local folder, a .gguf file or a hub id, with LoRA when the recipe asks.

Safetensors only (never pickle); trust_remote_code only when the recipe sets it. A .gguf file is
dequantized once and cached as a plain Hugging Face folder, so later loads take a second.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fuyoucli.errors import ModelError
from fuyoucli.recipe import ModelConfig, PeftConfig
from fuyoucli.resources import cache_dir, cached_folder, gguf_key, reading_gguf, resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # bitsandbytes, imported by peft whenever installed: its Hub-kernel warning (cli/app.py says why),
    # for a program that loads models without fuyou's CLI
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def gguf_to_folder(gguf: Path) -> Path:
    """A Hugging Face folder holding the dequantized GGUF model, converted once and cached.

    The cache key covers the file's name, size and modification time, so a new package version
    (a new file) converts again. The folder appears atomically: a crash mid-conversion leaves none.
    """
    def fill(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        with reading_gguf(gguf):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model that still carries its GGUF quantizer; the weights are already
        # dequantized to fp32, so detaching it is exact.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return cached_folder(_converted(gguf), fill)


def _converted(gguf: Path) -> Path:
    return cache_dir() / "gguf" / f"{gguf.stem}-{gguf_key(gguf)}"


def model_folder(cfg: ModelConfig) -> Path:
    """The folder the model's config and tokenizer (and, unless the base is read quantized from a .gguf
    file, its weights) are read from."""
    path = resolve_model_path(cfg.path)
    if path.suffix != ".gguf":
        return path
    if cfg.quantization != "none":  # the weights are read from the file itself (model.gguf)
        from fuyoucli.model.gguf import header_folder

        return header_folder(path, _converted(path))
    return gguf_to_folder(path)


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
    engine, so a model larger than RAM never has to fit in it. With cfg.quantization (a LoRA base) the
    decoder layers' linear weights are quantized as they are read (_load_quantized).
    """
    _quiet_transformers()
    folder = model_folder(cfg)
    torch.manual_seed(seed)
    if streamed_layers and cfg.head == "causal_lm" and peft_cfg.type == "none":
        from transformers import AutoConfig

        from fuyoucli.model.lazy import TensorSource, lazy_load

        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        loaded = lazy_load(TensorSource(folder), config, dtype=DTYPES[cfg.dtype],
                           trust_remote_code=cfg.trust_remote_code, streamed_layers=streamed_layers)
        if loaded is not None:
            model, source = loaded
            model.config.use_cache = False
            model.fuyou_source = source
            return model
    load = _load_quantized if cfg.quantization != "none" else _from_pretrained
    model = load(cfg, folder, num_labels=num_labels, pad_token_id=pad_token_id)
    model.config.use_cache = False
    if peft_cfg.type == "lora":
        model = apply_lora(model, peft_cfg, head=cfg.head, seed=seed)
    return model.to(device)


def _from_pretrained(cfg: ModelConfig, folder: Path, *, num_labels: int | None, pad_token_id: int):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

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
    return model


def _load_quantized(cfg: ModelConfig, folder: Path, *, num_labels: int | None, pad_token_id: int):
    """The model with its decoder layers' linear weights quantized (model.quantized), on the host.

    A causal LM whose file holds exactly its keys is read lazily: each layer's matrices go from the file
    to their quantized form one at a time, so host memory holds the quantized base (a 70B model in nf4:
    about 36 GB), never the full-precision one. A .gguf file is read as it is (model.gguf: never
    expanded on disk; its Q8_0 matrices kept as they are in int8). Anything else is loaded whole
    first, then quantized."""
    from fuyoucli.kernels.quant import QuantizationUnavailable
    from fuyoucli.model.blocks import find_layer_list
    from fuyoucli.model.quantized import quantize_linears

    dtype = DTYPES[cfg.dtype]
    path = resolve_model_path(cfg.path)
    gguf = path.suffix == ".gguf"
    loaded = None
    if cfg.head == "causal_lm":
        from transformers import AutoConfig

        from fuyoucli.model.gguf import GGUFSource
        from fuyoucli.model.lazy import ALL_LAYERS, TensorSource, lazy_load

        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
        source = GGUFSource(path, config) if gguf else TensorSource(folder)
        loaded = lazy_load(source, config, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                           streamed_layers=ALL_LAYERS)
        if loaded is None:
            source.close()
    try:
        if loaded is not None:
            model, source = loaded
            layer_path, layers = find_layer_list(model)
            stored = getattr(source, "quantized", None)
            count = quantize_linears(layers, cfg.quantization, dtype, lambda name, _m: source.read(name, dtype),
                                     prefix=layer_path + ".",
                                     stored_of=(lambda name: stored(name, cfg.quantization)) if stored else None)
            for name, p in layers.named_parameters():
                if p.numel() == 0:  # the layers' norms and other small tensors, as they are in the file
                    p.data = source.read(f"{layer_path}.{name}", dtype)
            source.close()
        else:
            if gguf:  # a new head: transformers' whole-file load, converted once (gguf_to_folder)
                folder = gguf_to_folder(path)
            model = _from_pretrained(cfg, folder, num_labels=num_labels, pad_token_id=pad_token_id)
            count = quantize_linears(find_layer_list(model)[1], cfg.quantization, dtype)
    except QuantizationUnavailable as e:
        raise ModelError(str(e)) from e
    if count == 0:
        raise ModelError(f"model.quantization: the decoder layers of {type(model).__name__} have no nn.Linear to "
                         "quantize; set quantization: none")
    return model


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
