"""Model inventory for the planner: ordered blocks with parameter counts, FLOPs and activation sizes.

Built from a model's config alone: the model is instantiated on the meta device (no weight file is
read, no memory allocated), LoRA applied there too, and split with model.blocks.param_blocks so the
planner sees exactly the blocks the trainers stream. Returns plan.types data; imports torch lazily.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import warnings
from pathlib import Path

from fuyoucli.errors import ModelError
from fuyoucli.plan.types import BlockSpec, ModelInventory
from fuyoucli.recipe import ModelConfig, PeftConfig
from fuyoucli.resources import resolve_path


def _cache_dir() -> Path:
    if os.environ.get("FUYOU_CACHE_DIR"):
        return Path(os.environ["FUYOU_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fuyou"


def _gguf_key(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _gguf_config_folder(gguf: Path) -> Path:
    """A folder holding only config.json for a .gguf file.

    Parsing a GGUF header takes seconds (its token tables), so the config is cached, keyed like
    model.loading's converted folder; when that folder exists, its config is used as it is.
    """
    key = _gguf_key(gguf)
    converted = _cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (converted / "config.json").is_file():
        return converted
    folder = _cache_dir() / "gguf-config" / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is a model error
        raise ModelError(f"cannot read the config of GGUF file {gguf}: {e}") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    config.to_json_file(tmp / "config.json")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process cached it first
        pass
    return folder if (folder / "config.json").is_file() else tmp


def load_config(cfg: ModelConfig):
    """The transformers config of a recipe's model: a folder's config.json (a folder may hold only
    that file: what-if planning of models with no weights here) or a .gguf file's header."""
    from transformers import AutoConfig

    path = resolve_path(cfg.path, what="model.path")
    folder = _gguf_config_folder(path) if path.suffix == ".gguf" else path
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read the model config in {folder}: {first}") from e


def inventory(cfg: ModelConfig, peft_cfg: PeftConfig, *, num_labels: int | None = None) -> ModelInventory:
    """The recipe's model as ordered blocks, from its config alone (cached per process)."""
    path = resolve_path(cfg.path, what="model.path")
    stamp = path.stat().st_mtime_ns
    return _inventory_cached(cfg.model_dump_json(exclude_unset=True), peft_cfg.model_dump_json(exclude_unset=True),
                             num_labels, str(path), stamp)


@functools.lru_cache(maxsize=32)
def _inventory_cached(cfg_json: str, peft_json: str, num_labels: int | None, path: str, stamp: int) -> ModelInventory:
    cfg = ModelConfig.model_validate_json(cfg_json)
    peft_cfg = PeftConfig.model_validate_json(peft_json)
    return inventory_from_config(load_config(cfg), peft_cfg, head=cfg.head, num_labels=num_labels,
                                 trust_remote_code=cfg.trust_remote_code, source=path)


def inventory_from_config(config, peft_cfg: PeftConfig | None = None, *, head: str = "causal_lm",
                          num_labels: int | None = None, trust_remote_code: bool = False,
                          source: str = "") -> ModelInventory:
    """Instantiate on the meta device, apply LoRA if asked, and measure each block."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fuyoucli.model.blocks import find_layer_list, param_blocks

    config = config.__class__.from_dict(config.to_dict())  # never mutate the caller's config
    config.use_cache = False
    if head == "sequence_classification":
        config.num_labels = num_labels or 2
    auto = AutoModelForSequenceClassification if head == "sequence_classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot build a {config.model_type!r} model from its config for planning: {first}") from e
    if peft_cfg is not None and peft_cfg.type == "lora":
        from fuyoucli.model.loading import apply_lora

        state = torch.random.get_rng_state()
        with warnings.catch_warnings():  # peft calls deprecated transformers helpers; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            model = apply_lora(model, peft_cfg, head=head, seed=0)
        torch.random.set_rng_state(state)  # planning must not move the global RNG

    layer_path, layers = find_layer_list(model)
    blocks = param_blocks(model, trainable_only=False)
    names = [b.name for b in blocks]
    if "embed" not in names:
        raise ModelError(f"cannot plan {type(model).__name__}: no input embeddings found outside {layer_path}")
    if not any(n.startswith("layers.") for n in names):
        raise ModelError(f"cannot plan {type(model).__name__}: its decoder layers ({layer_path}) hold no parameters")

    flops = _matmul_flops_by_block(model, layer_path)
    out_elems = _linear_out_elems_by_block(model, layer_path)
    hidden = int(_cfg(config, "hidden_size", "n_embd", "d_model"))
    vocab = int(_cfg(config, "vocab_size"))
    heads = int(_cfg(config, "num_attention_heads", "n_head"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    attn_per_key = 4 * heads * head_dim
    windows = _windows(config, len(layers))
    specs = []
    for b in blocks:
        is_layer = b.name.startswith("layers.")
        index = int(b.name.split(".")[1]) if is_layer else -1
        if is_layer:
            boundary, internal = hidden, out_elems.get(b.name, 0) + 4 * hidden
        elif b.name == "embed":
            boundary, internal = hidden, hidden
        else:  # logits plus their fp32 copy for the loss (about two more half-precision elements each)
            logits = config.num_labels if head == "sequence_classification" else vocab
            boundary, internal = 0, hidden + 3 * logits
        specs.append(BlockSpec(
            name=b.name,
            params=sum(p.numel() for _, p in b.params),
            trainable_params=sum(p.numel() for _, p in b.params if p.requires_grad),
            max_tensor_params=max(p.numel() for _, p in b.params),
            matmul_flops_per_token=flops.get(b.name, 0),
            attention_flops_per_token_per_key=attn_per_key if is_layer else 0,
            attention_window=windows[index] if is_layer else None,
            boundary_elems_per_token=boundary,
            internal_elems_per_token=internal,
        ))
    if "head" not in names:  # a tied head with no final norm owns no parameters, but still computes
        logits = config.num_labels if head == "sequence_classification" else vocab
        specs.append(BlockSpec("head", 0, 0, 0, flops.get("head", 0), 0, None, 0, hidden + 3 * logits))
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head == "causal_lm"
    return ModelInventory(model_type=config.model_type, hidden_size=hidden, num_layers=len(layers),
                          vocab_size=vocab, tied_embeddings=tied, blocks=tuple(specs), source=source)


_EMBED_HINTS = ("embed", "wte", "wpe", "project_in")


def _block_of(module_name: str, layer_prefix: str) -> str:
    """The block a module computes in, by the rule param_blocks uses for parameters (a tied head's
    weight belongs to 'embed', but its product runs in 'head')."""
    if module_name.startswith(layer_prefix):
        return "layers." + module_name[len(layer_prefix):].split(".", 1)[0]
    return "embed" if any(h in module_name for h in _EMBED_HINTS) else "head"


def _linear_shapes(model, layer_path: str):
    """(block, in_features, out_features) of every matrix product module (nn.Linear, GPT-2's Conv1D)."""
    from torch import nn

    prefix = layer_path + "."
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            yield _block_of(name, prefix), module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            n_in, n_out = module.weight.shape
            yield _block_of(name, prefix), int(n_in), int(n_out)


def _matmul_flops_by_block(model, layer_path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for block, n_in, n_out in _linear_shapes(model, layer_path):
        out[block] = out.get(block, 0) + 2 * n_in * n_out
    return out


def _linear_out_elems_by_block(model, layer_path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for block, _n_in, n_out in _linear_shapes(model, layer_path):
        out[block] = out.get(block, 0) + n_out
    return out


def _cfg(config, *names: str):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise ModelError(f"the {config.model_type!r} config has none of {', '.join(names)}; fuyou cannot size its blocks")


def _windows(config, n_layers: int) -> list[int | None]:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return [None] * n_layers
    kinds = getattr(config, "layer_types", None)
    if kinds and len(kinds) == n_layers:
        return [int(window) if k == "sliding_attention" else None for k in kinds]
    return [int(window)] * n_layers
