"""Model inventory for the planner: ordered blocks with parameter counts, FLOPs and activation sizes.

Built from a model's config alone: the model is instantiated on the meta device (no weight file is
read, no memory allocated), LoRA applied there too, and split with model.blocks.param_blocks so the
planner sees exactly the blocks the trainers stream. Returns model.types data; imports torch lazily.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

from fuyoucli.errors import ModelError
from fuyoucli.model.arithmetic import TRACE_BATCH, TRACE_TOKENS, known_inventory
from fuyoucli.model.types import BlockSpec, ModelInventory
from fuyoucli.recipe import ModelConfig, PeftConfig
from fuyoucli.resources import cache_dir, cached_folder, gguf_key, reading_gguf, resolve_model_path


def _gguf_config_folder(gguf: Path) -> Path:
    """A folder holding only config.json for a .gguf file.

    Parsing a GGUF header takes seconds (its token tables), so the config is cached, keyed like
    model.loading's converted folder; when that folder exists, its config is used as it is.
    """
    key = gguf_key(gguf)
    converted = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (converted / "config.json").is_file():
        return converted

    def fill(tmp: Path) -> None:
        from transformers import AutoConfig

        with reading_gguf(gguf, "the config of "):
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.to_json_file(tmp / "config.json")

    return cached_folder(cache_dir() / "gguf-config" / f"{gguf.stem}-{key}", fill)


def load_config(cfg: ModelConfig):
    """The transformers config of a recipe's model: a folder's config.json (a folder may hold only
    that file: what-if planning of models with no weights here), a .gguf file's header, or a hub id's
    config.json (fetched alone)."""
    from transformers import AutoConfig

    path = resolve_model_path(cfg.path, config_only=True)
    folder = _gguf_config_folder(path) if path.suffix == ".gguf" else path
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read the model config in {folder}: {first}") from e


def inventory(cfg: ModelConfig, peft_cfg: PeftConfig, *, num_labels: int | None = None) -> ModelInventory:
    """The recipe's model as ordered blocks, from its config alone (cached per process)."""
    path = resolve_model_path(cfg.path, config_only=True)
    stamp = path.stat().st_mtime_ns
    return _inventory_cached(cfg.model_dump_json(exclude_unset=True), peft_cfg.model_dump_json(exclude_unset=True),
                             num_labels, str(path), stamp)


@functools.lru_cache(maxsize=32)
def _inventory_cached(cfg_json: str, peft_json: str, num_labels: int | None, path: str, stamp: int) -> ModelInventory:
    cfg = ModelConfig.model_validate_json(cfg_json)
    peft_cfg = PeftConfig.model_validate_json(peft_json)
    fast = _known_from_json(Path(path), cfg, peft_cfg)
    if fast is not None:
        return fast
    return inventory_from_config(load_config(cfg), peft_cfg, head=cfg.head, num_labels=num_labels,
                                 trust_remote_code=cfg.trust_remote_code, source=path)


def _known_from_json(path: Path, cfg: ModelConfig, peft_cfg: PeftConfig) -> ModelInventory | None:
    """The config-arithmetic inventory (model.arithmetic) when the folder's config.json (or a GGUF
    file's cached one) describes an architecture it covers: no torch or transformers import."""
    import json

    if path.suffix == ".gguf":
        key = gguf_key(path)
        folders = [cache_dir() / kind / f"{path.stem}-{key}" for kind in ("gguf", "gguf-header", "gguf-config")]
        found = [f / "config.json" for f in folders if (f / "config.json").is_file()]
        if not found:
            return None
        config_file = found[0]
    else:
        config_file = path / "config.json"
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the meta path reports what is wrong with it
    if not isinstance(data, dict):
        return None
    return known_inventory(data, head=cfg.head, lora=peft_cfg.type == "lora",
                           trust_remote_code=cfg.trust_remote_code, source=str(path))


def lora_inventory(cfg: ModelConfig, peft_cfg: PeftConfig, *, num_labels: int | None = None) -> ModelInventory:
    """For the planner's "use LoRA" suggestion: the full model's blocks (from config arithmetic where it
    covers the model) with LoRA's trainable counts, read off a meta-device model with the adapters
    applied but not traced (OPT-175B: about 5 s, where the traced LoRA inventory takes 20)."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fuyoucli.model.blocks import find_layer_list, param_blocks
    from fuyoucli.model.loading import apply_lora

    full = inventory(cfg, PeftConfig(), num_labels=num_labels)
    config = load_config(cfg)
    config = config.__class__.from_dict(config.to_dict())
    if cfg.head == "sequence_classification":
        config.num_labels = num_labels or 2
    auto = AutoModelForSequenceClassification if cfg.head == "sequence_classification" else AutoModelForCausalLM
    state = torch.random.get_rng_state()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = auto.from_config(config, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32)
        model = apply_lora(model, peft_cfg, head=cfg.head, seed=0)
    torch.random.set_rng_state(state)  # planning must not move the global RNG
    trained = {b.name: b.numel for b in param_blocks(model, trainable_only=True)}
    total = {b.name: b.numel for b in param_blocks(model, trainable_only=False)}  # the base and its adapters
    quantizable = _quantizable_by_block(model, find_layer_list(model)[0])
    blocks = tuple(dataclasses.replace(b, params=total.get(b.name, b.params), trainable_params=trained.get(b.name, 0),
                                       quantizable_params=quantizable.get(b.name, 0))
                   for b in full.blocks)
    return dataclasses.replace(full, blocks=blocks)


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
        # fp32 whatever the config's dtype: the counts are per element, and the trace (below) then
        # sees the ops of the model's arithmetic, not casts that depend on the dtype it was saved in
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
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
    quantizable = _quantizable_by_block(model, layer_path)
    traced, loss_total = _trace_elementwise(model, layers)
    elementwise = {k: v // (_TRACE_BATCH * _TRACE_TOKENS) for k, v in traced.items()}
    positions = _TRACE_BATCH if head == "sequence_classification" else _TRACE_BATCH * (_TRACE_TOKENS - 1)
    loss_elems = loss_total // positions
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
            elementwise_elems_per_token=elementwise.get(b.name, 0),
            quantizable_params=quantizable.get(b.name, 0),
        ))
    if "head" not in names:  # a tied head with no final norm owns no parameters, but still computes
        logits = config.num_labels if head == "sequence_classification" else vocab
        specs.append(BlockSpec("head", 0, 0, 0, flops.get("head", 0), 0, None, 0, hidden + 3 * logits,
                               elementwise.get("head", 0)))
    tied = bool(getattr(config, "tie_word_embeddings", False)) and head == "causal_lm"
    return ModelInventory(model_type=config.model_type, hidden_size=hidden, num_layers=len(layers),
                          vocab_size=vocab, tied_embeddings=tied, blocks=tuple(specs), source=source,
                          loss_elems_per_position=loss_elems)


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


def _quantizable_by_block(model, layer_path: str) -> dict[str, int]:
    """Per decoder layer, the weights of its frozen nn.Linear modules: what model.quantized.quantize_linears
    replaces (exactly nn.Linear there too; GPT-2's Conv1D is not quantized). Under LoRA, peft's base
    layers; its adapters train and are not counted."""
    from torch import nn

    prefix = layer_path + "."
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.startswith(prefix) and not module.weight.requires_grad:
            block = _block_of(name, prefix)
            out[block] = out.get(block, 0) + module.weight.numel()
    return out


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


_TRACE_BATCH, _TRACE_TOKENS = TRACE_BATCH, TRACE_TOKENS
# Matrix products are counted as FLOPs (module shapes); attention by its per-key term.
_MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear")
# Ops that move only the elements they produce (a lookup, a gather, the loss's pick of the target).
_GATHER_OPS = ("embedding", "index", "index_select", "gather", "masked_select", "nll_loss", "nll_loss_forward",
               "nll_loss_nd")
# Allocation, metadata and views the schema does not mark as such.
_FREE_OPS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_local_scalar_dense", "scalar_tensor", "zeros", "ones", "arange", "full", "_unsafe_view",
             "_assert_tensor_metadata", "alias")


def _trace_elementwise(model, layers) -> tuple[dict[str, int], int]:
    """({block: elements}, elements of the loss) for a forward of _TRACE_BATCH x _TRACE_TOKENS tokens:
    what every op of an inference forward (dropout off, as ZO runs) other than matrix products and
    attention reads plus writes, by block; and what train.losses' cross-entropy over the scored
    positions' logits (all but the last of each row; a classification head's one per row) moves.

    Counted by running the model's own code once on the meta device under a dispatch mode: each aten
    op that is not a view, a product or attention adds the elements of its tensor inputs and outputs
    (a gather: twice its output). So RMSNorm written in Python (pow, mean, rsqrt, two muls), rotary
    embeddings, repeat_kv's copies and GELU's tanh formula count as what they are, per architecture,
    without a table. A forward that cannot run on meta tensors gives ({}, 0)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    state = {"block": "embed", "in_attention": 0}
    counts: dict[str, int] = {}

    class _Attention(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:  # its cost is the per-key FLOP term
                state["in_attention"] += 1
                try:
                    return func(*args, **(kwargs or {}))
                finally:
                    state["in_attention"] -= 1
            return func(*args, **(kwargs or {}))

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip("_")
            if state["in_attention"] or func.is_view or name in _MATMUL_OPS or name in _FREE_OPS:
                return out
            leaves = torch.utils._pytree.tree_leaves
            outs = sum(t.numel() for t in leaves(out) if isinstance(t, torch.Tensor))
            if name in _GATHER_OPS:
                n = 2 * outs
            else:
                n = outs + sum(t.numel() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor))
            counts[state["block"]] = counts.get(state["block"], 0) + n
            return out

    def enter(i):
        return lambda *_: state.__setitem__("block", f"layers.{i}")

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(lambda *_: state.__setitem__("block", "head")))
    ids = torch.zeros(_TRACE_BATCH, _TRACE_TOKENS, dtype=torch.long, device="meta")
    # Some decoders inspect a 2-D mask's values (packed sequences), which meta tensors cannot give;
    # a ready 4-D causal mask skips that. Mask preparation is per forward, not per layer: negligible.
    causal = torch.ones(_TRACE_BATCH, 1, _TRACE_TOKENS, _TRACE_TOKENS, dtype=torch.bool, device="meta")
    was_training = model.training
    model.eval()
    try:
        for kwargs in ({}, {"attention_mask": causal}):
            counts.clear()
            state["block"] = "embed"
            try:
                with torch.no_grad(), _Attention(), _Count():
                    logits = model(input_ids=ids, use_cache=False, **kwargs).logits
                    per_block = dict(counts)
                    counts.clear()
                    state["block"] = "loss"
                    # train.losses gathers the scored positions' logits (here: all but the last, a
                    # copy), casts them to fp32 and takes the cross-entropy
                    flat = (logits[:, :-1] if logits.ndim == 3 else logits).reshape(-1, logits.shape[-1])
                    F.cross_entropy(flat.float(), ids.reshape(-1)[: flat.shape[0]], reduction="sum")
                return per_block, counts.get("loss", 0)
            except Exception:  # noqa: BLE001 - a forward that needs real values: try the next way
                continue
        return {}, 0
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


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
