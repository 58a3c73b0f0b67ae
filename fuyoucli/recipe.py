"""Recipe: the whole run as frozen, validated config. The only module that reads YAML.

First stage of the pipeline (recipe -> profile -> plan -> ...). Imports no torch: the planner
reads recipes on machines and in tests where no model is loaded.

Why it is long: one frozen, documented model per recipe section; the field docstrings are the
recipe reference (scripts/recipe_reference.py renders them), clearer beside their validators.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fuyoucli.errors import RecipeError
from fuyoucli.resources import hf_dataset, hf_file, hub_cached, hub_id, hub_offline, resolve_path


class _Config(BaseModel):
    # allow_inf_nan=False: an infinite or NaN number (lr: .inf) is a mistake, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class ModelConfig(_Config):
    path: str
    """A Hugging Face folder (config.json + safetensors), a single .gguf file, `pkg:PACKAGE/FILE` for a file
    shipped inside an installed Python package, or a Hugging Face Hub id `org/name` (not a local path),
    fetched into and read from huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model computes in. bfloat16/float16 keep fp32 master weights for the optimizer."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model folder. Off unless you trust the folder."""
    head: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """causal_lm: next-token loss (classification uses label words, MeZO style).
    sequence_classification: a new classification head over the last token (classification data only)."""
    quantization: Literal["none", "int8", "nf4"] = "none"
    """A LoRA run's frozen base stored quantized (QLoRA-style): the decoder layers' linear weights in 8-bit
    blocks of 32 (int8, llama.cpp's Q8_0 layout: a Q8_0 .gguf stays as it is) or bitsandbytes' 4-bit
    NormalFloat (nf4, needs bitsandbytes), at home, on the wire and on the device; each matrix is
    dequantized into `dtype` only for its product. Needs peft.type: lora."""


Schedule = Literal["constant", "linear", "cosine"]


class _MethodBase(_Config):
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate."""
    schedule: Schedule = "constant"
    """Learning-rate schedule after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to lr."""
    weight_decay: float = Field(0.0, ge=0)
    """Decoupled weight decay (applied as lr * weight_decay * w)."""


class ZO2Method(_MethodBase):
    name: Literal["zo2"]
    """Zeroth-order (MeZO-style) training: two forward passes per direction, no backward."""
    lr: float = Field(1e-6, gt=0)
    """Peak learning rate. MeZO: 1e-6/1e-7 full-parameter, 1e-4/5e-5 with LoRA."""
    eps: float = Field(1e-3, gt=0)
    """Perturbation scale. MeZO: 1e-3 full-parameter, 1e-2 with LoRA."""
    q: int = Field(1, ge=1, le=64)
    """Random directions per step; the update averages their projected gradients."""
    variant: Literal["sgd", "sign", "momentum", "conservative"] = "sgd"
    """sgd: w -= lr*g*z. sign: w -= lr*sign(g*z). momentum: m = beta*m + g*z (fp32, kept beside the weights);
    w -= lr*m. conservative (ZO-Bench's ZO-SGD-Cons): with u = lr*g*z, also evaluate the loss at w, w - u
    and w + u on the step's batches and keep the lowest (ties: w - u, then w): 3 more forward passes
    per step (streamed: a second pass over the layers, read-only)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """beta of the momentum variant (only allowed with variant: momentum)."""

    @model_validator(mode="after")
    def _momentum_only_with_variant(self) -> "ZO2Method":
        if "momentum" in self.model_fields_set and self.variant != "momentum":
            raise ValueError("momentum is only used by variant: momentum; remove it or set variant: momentum")
        return self


class AdamWMethod(_MethodBase):
    name: Literal["adamw"]
    """First-order training with AdamW (fp32 master weights and states)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    eps: float = Field(1e-8, gt=0)
    """Adam's epsilon."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null turns clipping off."""
    states: Literal["fp32", "int8"] = "fp32"
    """AdamW's moments m and v. fp32: torch's AdamW. int8: 8 bits per value in blocks of 256 with an
    fp32 scale per block (block-wise 8-bit states, Dettmers et al.; codes in the float8 e4m3 layout,
    v kept as its square root): 2 bytes per parameter instead of 8, at home and in checkpoints."""
    master: Literal["fp32", "bf16"] = "fp32"
    """The weights the optimizer updates. fp32: an fp32 master copy beside 16-bit weights. bf16 (needs
    model.dtype: bfloat16, full-parameter training): the bfloat16 weight at home is the master, updated
    with stochastic rounding seeded by (training.seed, step, block): no fp32 copy, exact on resume."""

    @model_validator(mode="after")
    def _betas_in_range(self) -> "AdamWMethod":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {list(self.betas)}")
        return self


Method = Annotated[Union[ZO2Method, AdamWMethod], Field(discriminator="name")]


class PeftConfig(_Config):
    type: Literal["none", "lora"] = "none"
    """none: train every parameter. lora: train low-rank adapters (peft) over a frozen base."""
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names to adapt; null takes peft's default for the architecture (e.g. q_proj, v_proj)."""

    @model_validator(mode="after")
    def _lora_fields_need_lora(self) -> "PeftConfig":
        extra = self.model_fields_set - {"type"}
        if self.type == "none" and extra:
            raise ValueError(f"{sorted(extra)} only apply with type: lora")
        return self


Format = Literal["text", "prompt_completion", "alpaca", "chat", "classification"]


class DataConfig(_Config):
    train: list[str] = Field(min_length=1)
    """Training files (.jsonl, .json, .txt, .csv, .parquet, .arrow; `pkg:PACKAGE/FILE` works too), a dataset
    `hf:NAME[:SPLIT]` (a Hub dataset id or a save_to_disk folder, read with the datasets library from its
    cache; split default train), or one file of a Hub dataset repository `hf://datasets/ORG/NAME/PATH`.
    A string is one entry. .parquet/.arrow and hf: need the `data` extra (pyarrow, datasets)."""
    eval: list[str] = []
    """Held-out files; when empty, eval_fraction of the training examples is held out."""
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of training examples held out for evaluation when no eval files are given."""
    format: Format = "text"
    """text: language modelling on `text`. prompt_completion / alpaca / chat: loss on the answer only.
    classification: `text` + `label`, loss on the label word (MeZO style) or a classification head."""
    max_length: int = Field(512, ge=8)
    """Longest sequence in tokens; longer examples are truncated (prompt side first for answers)."""
    packing: bool = False
    """Concatenate examples into full max_length rows (text and prompt_completion formats)."""
    fields: dict[str, str] = {}
    """Rename record fields, e.g. {text: tweet, label: sentiment} for a CSV with those columns."""
    encoding: str = "utf-8"
    """Text encoding of the data files."""
    template: str = "{text} It was"
    """classification: the prompt; `{text}` is replaced by the example's text."""
    label_words: dict[str, str] = {}
    """classification with model.head causal_lm: label -> the word the model should say after the
    template (e.g. {positive: " great"}). Each word must be a single token."""
    labels: list[str] = []
    """classification: the label set, in class-index order; examples with other labels are skipped.
    Default: the keys of label_words. Required with model.head: sequence_classification."""
    max_examples: int | None = Field(None, ge=1)
    """Use at most this many training examples (after the seeded shuffle)."""
    max_eval_examples: int | None = Field(None, ge=1)
    """Evaluate on at most this many held-out examples."""
    split_seed: int | None = None
    """Seed of the example order and the held-out split; default training.seed. Fix it to compare runs
    of several training seeds on the same held-out examples."""
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of the training examples (after the held-out split) set aside as a validation split. When
    > 0 the run trains without them and evaluates on them instead of the held-out set: tune
    hyperparameters here, then report the held-out metric of a run with validation_fraction: 0."""

    @model_validator(mode="before")
    @classmethod
    def _one_file_is_a_list(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("train", "eval"):
                if isinstance(data.get(key), str):
                    data[key] = [data[key]]
        return data

    @model_validator(mode="after")
    def _format_rules(self) -> "DataConfig":
        if self.format == "classification" and not (self.label_words or self.labels):
            raise ValueError("format: classification needs label_words, e.g. {positive: ' great', negative: ' terrible'} "
                             "(or labels, with model.head: sequence_classification)")
        if self.format != "classification" and (self.label_words or self.labels):
            raise ValueError("label_words and labels only apply to format: classification")
        if self.packing and self.format not in ("text", "prompt_completion"):
            raise ValueError(f"packing applies to the text and prompt_completion formats, not {self.format}")
        if "{text}" not in self.template:
            raise ValueError("template must contain {text}")
        return self


class TrainingConfig(_Config):
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run. Exactly one of max_steps and epochs is set."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the training data (fractions allowed)."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (for zo2: per perturbation)."""
    seed: int = 0
    """Seeds the data order, the LoRA/head init and every zeroth-order perturbation."""
    eval_every: int = Field(0, ge=0)
    """Evaluate every N steps (0: only before and after training)."""
    eval_before: bool = True
    """Evaluate the starting model before the first step (false: skip it, e.g. when several seeds of
    one recipe start from the same weights and its figure is known)."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Micro-batch size for evaluation (default: batch_size)."""
    log_every: int = Field(1, ge=1)
    """Print a progress line every N steps (metrics.jsonl always gets every step)."""
    output_dir: str = "runs/fuyou"
    """Where metrics.jsonl and the final model are written."""
    checkpoint_every: int = Field(0, ge=0)
    """Write a checkpoint every N steps (0: off) to output_dir/checkpoints/step-NNNNNNNN. A run continues
    from one exactly with `fuyou finetune RECIPE --resume`."""
    checkpoint_minutes: float = Field(0.0, ge=0)
    """Also write a checkpoint when this many minutes have passed since the last one (0: off)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Keep the newest N checkpoints (and the full checkpoint a kept seed-ledger checkpoint builds on)."""
    checkpoint_on_interrupt: bool = True
    """On Ctrl-C (or SIGTERM) finish the current step, write a checkpoint, then stop; a second Ctrl-C stops at once."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers that get the scalars metrics.jsonl gets (loss, lr, tokens/s, each resource's
    seconds, evaluations) and the plan's prediction, each through its own library: tensorboard (event
    files in output_dir/tensorboard), wandb (wandb.init/log; WANDB_PROJECT, WANDB_MODE as wandb reads
    them), mlflow (mlflow.log_metrics; MLFLOW_TRACKING_URI). Each needs its package (extras of the same
    names); a missing one is refused before the run starts. Single-process runs only."""
    zo_ledger_steps: int = Field(0, ge=0)
    """zo2 only. 0: every checkpoint holds the full trainable weights. N > 0: a checkpoint written less than
    N steps after the last full one holds only the seed ledger since it (step, projected gradients, lr per
    step; kilobytes), which --resume replays exactly on top of that full checkpoint."""

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "TrainingConfig":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps and epochs")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"report_to names a tracker twice: {self.report_to}")
        return self


class HardwareConfig(_Config):
    profile: str | None = None
    """A hardware profile JSON written by `fuyou profile`. Default (neither key set): the saved
    profile of this machine; planning fails, saying so, when there is none."""
    preset: str | None = None
    """A named what-if machine instead of a profile (`fuyou profile --list-presets` lists them),
    e.g. rtx4090-pcie4-1nvme-128g."""

    @model_validator(mode="after")
    def _profile_or_preset(self) -> "HardwareConfig":
        if self.profile is not None and self.preset is not None:
            raise ValueError("set one of hardware.profile and hardware.preset, not both")
        return self


class OffloadConfig(_Config):
    mode: Literal["auto", "in_memory", "stream"] = "auto"
    """auto: the planner decides where weights, optimizer states and activations live (all on the
    device when that fits). in_memory: everything on the compute device (the reference path).
    stream: stream every decoder layer even when it would fit (resident_layers can still keep some)."""
    swap_dir: str | None = None
    """A folder on a fast SSD for weights and optimizer states that do not fit in host RAM. Unset:
    the planner never uses a disk."""
    device_memory_limit: int | None = Field(None, ge=1)
    """Plan for at most this much device memory (bytes, or a string such as "8GiB" or "500MB"):
    a what-if budget, or room left for other work on the device."""
    host_memory_limit: int | None = Field(None, ge=1)
    """Plan for at most this much host RAM (bytes or a string such as "64GB"), pinned included."""
    prefetch_depth: Literal["auto"] | int = Field("auto", union_mode="left_to_right")
    """Blocks fetched ahead of the one computing (0: synchronous). auto: the planner's choice."""
    resident_layers: Literal["auto"] | int = Field("auto", union_mode="left_to_right")
    """Decoder layers kept on the device for the whole run (the last ones); auto: the planner's choice."""
    weights_home: Literal["auto", "pinned", "pageable", "ssd"] = "auto"
    """Where streamed layers' weights live: pinned host RAM, pageable host RAM, or swap_dir.
    auto: the fastest tier with room, layer by layer."""
    optimizer_home: Literal["auto", "device", "host", "ssd"] = "auto"
    """First-order: where fp32 master weights and AdamW states live (device keeps every layer resident)."""
    activations: Literal["auto", "keep", "swap", "recompute", "recompute-swap"] = "auto"
    """First-order: keep each layer's saved activations on the device, swap them to pinned host RAM,
    or keep only the layer's input and recompute in the backward (recompute-swap: that input goes to
    host RAM too, for batches whose layer inputs alone outgrow the device). auto: keep while the
    device has room, swap while that is faster than recomputing, recompute the rest (their inputs
    swapped when the device is still short)."""
    home_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """zo2 (full-parameter): dtype of the weights at home and on the link, in memory and streamed.
    auto: model.dtype (a float16/bfloat16 model keeps 16-bit homes: half the bytes of float32)."""
    home_rounding: Literal["auto", "nearest", "stochastic"] = "auto"
    """zo2 (full-parameter): how an update is stored into a 16-bit home. MeZO-sized updates are far
    below a 16-bit weight's resolution: rounded to nearest most of them vanish; stochastic rounding
    (draws seeded by run seed, step and block: exact on resume) keeps them in expectation. auto:
    stochastic whenever the home is narrower than float32."""

    @field_validator("device_memory_limit", "host_memory_limit", mode="before")
    @classmethod
    def _byte_size(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        import re

        units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "k": 1 << 10, "m": 1 << 20,
                 "g": 1 << 30, "t": 1 << 40}
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in units:
            raise ValueError(f"expected a size such as 8GiB, 500MB or 1.5TB, got {value!r}")
        return int(float(match.group(1)) * units[match.group(2).lower()])

    @field_validator("prefetch_depth", "resident_layers")
    @classmethod
    def _non_negative(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be auto or an integer >= 0")
        return value

    @model_validator(mode="after")
    def _in_memory_takes_no_placement(self) -> "OffloadConfig":
        # The weights' home dtype and rounding are how zo2 updates them, in memory as much as streamed.
        placed = sorted(self.model_fields_set - {"mode", "device_memory_limit", "host_memory_limit", "home_dtype",
                                                 "home_rounding"})
        if self.mode == "in_memory" and placed:
            raise ValueError(f"{placed} place data off the device; they do not apply with mode: in_memory")
        if self.optimizer_home == "device" and self.resident_layers != "auto":
            raise ValueError("optimizer_home: device keeps every layer resident; remove resident_layers")
        if self.weights_home == "ssd" and self.swap_dir is None:
            raise ValueError("weights_home: ssd needs swap_dir (a folder on the SSD)")
        if self.optimizer_home == "ssd" and self.swap_dir is None:
            raise ValueError("optimizer_home: ssd needs swap_dir (a folder on the SSD)")
        return self


class Recipe(_Config):
    name: str = "fuyou-run"
    """A label for logs and the output folder."""
    model: ModelConfig
    method: Method
    peft: PeftConfig = PeftConfig()
    data: DataConfig
    training: TrainingConfig
    offload: OffloadConfig = OffloadConfig()
    hardware: HardwareConfig = HardwareConfig()

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "Recipe":
        if self.model.head == "sequence_classification":
            if self.data.format != "classification":
                raise ValueError("model.head: sequence_classification needs data.format: classification")
            if self.data.label_words:
                raise ValueError("data.label_words is for model.head: causal_lm; with sequence_classification "
                                 "give the label set as data.labels")
        elif self.data.format == "classification" and not self.data.label_words:
            raise ValueError("data.format: classification with model.head: causal_lm needs data.label_words")
        if self.method.name == "adamw" and self.method.master == "bf16":
            if self.model.dtype != "bfloat16":
                raise ValueError(f"method.master: bf16 makes the bfloat16 weight the master; the model computes in "
                                 f"{self.model.dtype} (set model.dtype: bfloat16, or master: fp32)")
            if self.peft.type != "none":
                raise ValueError("method.master: bf16 applies to full-parameter training; LoRA adapters train in "
                                 "fp32 (remove master, or peft)")
        if self.model.quantization != "none" and self.peft.type != "lora":
            raise ValueError(f"model.quantization: {self.model.quantization} stores a frozen base; full-parameter "
                             "training updates every weight (set peft.type: lora, or quantization: none)")
        if self.training.zo_ledger_steps and self.method.name != "zo2":
            raise ValueError("training.zo_ledger_steps applies to method zo2 only (a first-order step is not "
                             "replayable from seeds); remove it")
        return self


# ----------------------------------------------------------------------------------------------
# Loading: YAML with line numbers -> overrides -> validation -> one-line errors


class _Located:
    """Maps a key path in the YAML document to 'file:line' for error messages."""

    def __init__(self, source: str, lines: dict[tuple, int], overrides: dict[tuple, str]):
        self.source, self.lines, self.overrides = source, lines, overrides

    def where(self, path: tuple) -> str:
        for key, flag in self.overrides.items():  # an override below this path caused the error
            if key[: len(path)] == path and path:
                return flag
        for n in range(len(path), -1, -1):
            if path[:n] in self.overrides:
                return self.overrides[path[:n]]
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last one silently, so `lr: 1.0e-3` then `lr: 5.0` would train at 5.0, and a second `training:` block would
    drop every key of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges by design; only literal keys count
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                earlier = first_line.get(key)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if earlier is None:
                first_line[key] = line
            else:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (lines {earlier} and {line}); keep one of them",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _key_lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[path + (key,)] = key_node.start_mark.line + 1
            _key_lines(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _key_lines(item, path + (i,), out)
    return out


def _parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.sub=value, e.g. --set training.max_steps=10")
    key, raw = item.split("=", 1)
    parts = tuple(p for p in key.strip().split("."))
    if not all(parts):
        raise RecipeError(f"--set {item!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _apply_override(doc: dict, parts: tuple[str, ...], value: Any, item: str) -> None:
    node = doc
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {item}: {'.'.join(parts[:-1])} is not a section")
        node = child
    node[parts[-1]] = value


def _model_at(path: tuple, data: dict) -> type[BaseModel] | None:
    """The config class that owns the mapping at `path` (for suggesting the closest key)."""
    cls: Any = Recipe
    node: Any = data
    for part in path:
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        node = node.get(part) if isinstance(node, dict) else None
        if part == "method":
            name = node.get("name") if isinstance(node, dict) else None
            cls = {"zo2": ZO2Method, "adamw": AdamWMethod}.get(name)
        else:
            cls = ann
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _describe(err: dict, data: dict, located: _Located) -> str:
    loc = tuple(err["loc"])
    # The discriminated union puts the tag ('zo2') into the location; the YAML has no such level.
    if len(loc) > 1 and loc[0] == "method" and loc[1] in ("zo2", "adamw"):
        loc = loc[:1] + loc[2:]
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    where = located.where(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(loc[:-1], data)
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"{where}: unknown key '{dotted}'; {hint}"
    if kind == "missing":
        return f"{where}: missing required key '{dotted}'"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        given = data.get("method", {}).get("name") if isinstance(data.get("method"), dict) else None
        got = f" (got {given!r})" if given is not None else ""
        return f"{located.where(loc + ('name',))}: {dotted}.name must be one of: zo2, adamw{got}"
    value = err.get("input")
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if isinstance(value, dict):
        return f"{where}: {dotted}: {msg}"
    return f"{where}: {dotted} = {value!r}: {msg}"


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every failure is a RecipeError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {e.start}); a recipe is YAML text") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: malformed YAML: {problem}") from e
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; see recipes/quickstart.yaml for a complete example")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping of sections (model, method, data, training), not {type(data).__name__}")
    located = _Located(str(path), _key_lines(node), {})
    for item in overrides:
        parts, value = _parse_set(item)
        _apply_override(data, parts, value, item)
        located.overrides[parts] = f"--set {item}"
    return validate_recipe(data, located)


def validate_recipe(data: dict, located: _Located | None = None) -> Recipe:
    located = located or _Located("<recipe>", {}, {})
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = [_describe(err, data, located) for err in e.errors()]
        if len(lines) > 5:
            lines = lines[:5] + [f"... and {len(lines) - 5} more problems"]
        # One line, however many problems: the first names file:line, the others follow it.
        raise RecipeError("; ".join(lines)) from None
    _check_paths(recipe, located)
    return recipe


def _check_local_model(spec: str, located: _Located) -> None:
    model_path = resolve_path(spec, what="model.path", where=located.where(("model", "path")))
    if model_path.is_dir():
        if not (model_path / "config.json").is_file():
            raise RecipeError(
                f"{located.where(('model', 'path'))}: model folder {model_path} has no config.json; "
                "point model.path at a Hugging Face model folder or a .gguf file"
            )
    elif model_path.suffix != ".gguf":
        raise RecipeError(
            f"{located.where(('model', 'path'))}: model.path {model_path} is a file but not a .gguf; "
            "point it at a Hugging Face model folder or a .gguf file"
        )


def _check_paths(recipe: Recipe, located: _Located) -> None:
    """Missing inputs are recipe errors too: found now, not an hour into the run."""
    repo = hub_id(recipe.model.path)
    if repo is not None:
        # A hub id is fetched when the run needs it; offline, a missing one is said now, before anything runs.
        if hub_offline() and not hub_cached(repo):
            raise RecipeError(f"{located.where(('model', 'path'))}: model.path {repo!r} is not in the hub cache "
                              f"(HF_HUB_OFFLINE=1): download it once online (huggingface-cli download {repo}) "
                              "or give a local folder")
    else:
        _check_local_model(recipe.model.path, located)
    for key in ("train", "eval"):
        for i, p in enumerate(getattr(recipe.data, key)):
            _check_data_spec(p, f"data.{key}", located.where(("data", key, i)))


def _check_data_spec(spec: str, what: str, where: str) -> None:
    import importlib.util

    def needs(package: str, for_what: str) -> None:
        if importlib.util.find_spec(package) is None:
            raise RecipeError(f"{where}: {what} {spec!r}: {for_what} needs the {package} package, which is not "
                              "installed: pip install 'fuyoucli[data]'")

    if hf_dataset(spec) is not None:
        needs("datasets", "a Hugging Face dataset")
        return
    found = hf_file(spec, what=what, where=where)
    if found is not None:
        repo_type, repo_id, filename = found
        if hub_offline() and not hub_cached(repo_id, filename, repo_type=repo_type):
            raise RecipeError(f"{where}: {what} {spec!r} is not in the hub cache (HF_HUB_OFFLINE=1): download it "
                              "once online or give a local file")
        path = Path(filename)
    else:
        path = resolve_path(spec, what=what, where=where)
    if path.suffix in (".parquet", ".arrow"):
        needs("pyarrow", f"a {path.suffix} file")


RECIPE_SECTIONS = tuple(Recipe.model_fields)
