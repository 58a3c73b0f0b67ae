"""Data: a recipe's files -> tokenized, loss-masked examples -> seeded batches -> padded tensors.

Feeds the trainer step (recipe -> data -> trainer). Depends on the recipe's DataConfig and a Hugging Face
tokenizer only: never on the model, the engine or telemetry. torch is used by `collate` alone.
Every bad record is a DataError naming file:line and how to fix it.

Why it is long: every input format (text, chat, classification, alpaca; .jsonl, .json, .csv, .txt and
pkg: files; parquet, arrow and Hugging Face datasets read in train/tables.py) and its one-line errors, in one place so that they all tokenize and mask alike.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fuyoucli.errors import DataError, InputError
from fuyoucli.recipe import DataConfig
from fuyoucli.resources import hf_dataset, resolve_data_path
from fuyoucli.train.tables import TABLE_SUFFIXES, read_hf_dataset, read_table

IGNORE = -100
"""Label of a position with no loss (prompt tokens, padding); torch's cross_entropy ignore_index."""
CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles a chat record may use (what chat templates render); the loss is on assistant turns."""

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FIELDS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "classification": ("text", "label"),
}
"""Record fields each format reads (alpaca's `input` is optional); data.fields renames them."""

RECORD_SUFFIXES = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """Same length as input_ids; IGNORE where there is no loss. Unshifted: token i's label is input_ids[i]
    (the trainer shifts), so a label at position 0 never counts."""
    class_label: int | None = None
    """Classification: index into Datasets.label_names."""


@dataclass(frozen=True)
class Datasets:
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    label_names: tuple[str, ...]
    """Classification only, else ()."""
    label_token_ids: tuple[int, ...]
    """Classification with an LM head: the token id of each label's word, in label_names order; else ()."""
    pad_token_id: int
    notes: tuple[str, ...] = ()
    """What was skipped, dropped or truncated while building, one line each, for the run to print."""


# ----------------------------------------------------------------------------------------------
# Reading files: records (dict, "file:line") or whole text


def _decode(path: Path, encoding: str) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except LookupError:
        raise DataError(f"data.encoding {encoding!r} is not a known text encoding (e.g. utf-8, latin-1)") from None
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: byte 0x{raw[e.start]:02x} is not valid {encoding}; "
                        "set data.encoding to the file's encoding (e.g. latin-1)") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise DataError(f"{path}:1: the file is empty; give a data file with at least one record")
    return text


def _read_jsonl(path: Path, text: str) -> list[tuple[dict, str]]:
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may sit inside JSON strings.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno}); "
                            "each line of a .jsonl file must be one JSON object") from None
        records.append(_object(obj, f"{path}:{n}"))
    return records


def _read_json_array(path: Path, text: str) -> list[tuple[dict, str]]:
    """A JSON array of objects, each located by the line where it starts."""
    decoder, records = json.JSONDecoder(), []
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    while True:
        pos = skip(pos)
        if pos < len(text) and text[pos] == "]":
            return records
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        records.append(_object(obj, f"{path}:{line}"))
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            where = text.count("\n", 0, pos) + 1
            raise DataError(f"{path}:{where}: malformed JSON (expected ',' or ']' after a record)")


def _object(obj, where: str) -> tuple[dict, str]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with named fields, got {type(obj).__name__}")
    return obj, where


def _read_csv(path: Path, text: str) -> list[tuple[dict, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records, previous = [], 1
    try:
        reader.fieldnames  # noqa: B018 - reads the header row
        previous = reader.line_num
        for row in reader:
            records.append((row, f"{path}:{previous + 1}"))  # where the record starts (quoted fields span lines)
            previous = reader.line_num
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    return records


def _columns(cfg: DataConfig) -> dict[str, str]:
    """The fields a record of this format must have -> the column data.fields maps each to."""
    return {name: cfg.fields.get(name, name) for name in FIELDS[cfg.format] if (cfg.format, name) != ("alpaca", "input")}


def _read(spec: str, key: str, cfg: DataConfig) -> tuple[Path, list[tuple[dict, str]] | str]:
    dataset = hf_dataset(spec)
    if dataset is not None:
        return Path(spec), read_hf_dataset(*dataset, _columns(cfg), cfg.format, what=f"data.{key}")
    path = resolve_data_path(spec, what=f"data.{key}")
    if path.is_dir():
        raise InputError(f"data.{key} {spec!r} is a folder; list the data files themselves")
    if path.suffix in TABLE_SUFFIXES:
        return path, read_table(path, _columns(cfg), cfg.format)
    if path.suffix not in RECORD_SUFFIXES + (".txt",):
        raise DataError(f"{path}: unsupported data file type {path.suffix or '(none)'!r}; "
                        "use .jsonl, .json, .csv, .parquet, .arrow or .txt")
    text = _decode(path, cfg.encoding)
    if path.suffix == ".txt":
        if cfg.format != "text":
            raise DataError(f"{path}: a .txt file is plain text, but format {cfg.format} needs records; "
                            "use .jsonl, .json or .csv, or format: text")
        return path, text
    if path.suffix == ".csv":
        records = _read_csv(path, text)
    elif path.suffix == ".json" and text.lstrip().startswith("["):
        records = _read_json_array(path, text)
    else:  # .jsonl, or a .json file that holds JSON lines
        records = _read_jsonl(path, text)
    if not records:
        raise DataError(f"{path}:1: no records in the file (only a header?); add at least one record")
    return path, records


def _get(record: dict, where: str, name: str, cfg: DataConfig, *, required: bool = True, kinds=(str,)):
    key = cfg.fields.get(name, name)
    value = record.get(key)
    if value is None:
        if not required:
            return None
        renamed = f" (data.fields maps {name} -> {key})" if key != name else ""
        present = ", ".join(str(k) for k, v in record.items() if k is not None and v is not None) or "none"
        raise DataError(f"{where}: no field '{key}'{renamed}; format {cfg.format} needs "
                        f"{', '.join(FIELDS[cfg.format])}; this record has: {present}. "
                        "Map your field names with data.fields, e.g. fields: {text: tweet}")
    if not isinstance(value, kinds) or isinstance(value, bool):
        allowed = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field '{key}' must be {allowed}, got {type(value).__name__}: {value!r:.60}")
    return value


# ----------------------------------------------------------------------------------------------
# Building examples


class _Builder:
    """Tokenizes one recipe's data; counts what it skips or drops into notes."""

    def __init__(self, cfg: DataConfig, tokenizer, head: str):
        self.cfg, self.tok, self.head = cfg, tokenizer, head
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        # What add_special_tokens wraps around a text (BOS for Llama, [CLS] ... [SEP] for BERT, nothing for
        # SmolLM2). Pieces are tokenized bare and wrapped once, so a completion never gets a BOS of its own.
        plain = self._ids(["a"])[0]
        full = list(tokenizer(["a"], add_special_tokens=True, verbose=False)["input_ids"][0])
        at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        self.prefix = full[:at] if at is not None else []
        self.suffix = full[at + len(plain):] if at is not None else []
        self.truncated = 0
        self.skipped_labels: Counter = Counter()
        self.label_names: tuple[str, ...] = ()
        self.label_order: list[str] = []
        self.label_token_ids: tuple[int, ...] = ()
        if cfg.format == "classification":
            self._setup_labels()

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """Batch tokenization without special tokens (verbose=False: long .txt files are cut later)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tok(texts, add_special_tokens=False, return_attention_mask=False,
                                                  verbose=False)["input_ids"]]

    def examples(self, specs: Sequence[str], key: str) -> list[Example]:
        records, texts = [], []
        for spec in specs:
            _, content = _read(spec, key, self.cfg)
            if isinstance(content, str):
                texts.append(content)
            else:
                records.extend(content)
        build = getattr(self, f"_{self.cfg.format}")
        out = build(records)
        for ids in self._ids(texts):  # .txt: tokenized whole, cut into max_length chunks
            ids = self.prefix + ids + self.eos
            n = self.cfg.max_length
            out.extend(Example(tuple(ids[i:i + n]), tuple(ids[i:i + n])) for i in range(0, len(ids), n))
        if self.cfg.format == "classification" and not out:
            seen = ", ".join(f"{k} ({v})" for k, v in self.skipped_labels.most_common(8))
            raise DataError(f"data.{key}: no records have the labels {', '.join(self.label_names)}; labels found: "
                            f"{seen}; check data.label_words, data.labels and data.fields")
        return out

    def _join(self, prompt: list[int], rest: list[int], rest_labels: list[int]) -> Example:
        """prompt (no loss) + rest, cut to max_length: the prompt loses its start first (keeping the leading
        special tokens and at least a quarter of max_length, so the answer keeps some context), then the
        rest loses its end."""
        n = self.cfg.max_length
        over = len(prompt) + len(rest) - n
        if over > 0:
            self.truncated += 1
            keep = len(self.prefix) if prompt[:len(self.prefix)] == self.prefix else 0
            floor = max(keep, min(len(prompt), n // 4))
            cut = min(over, max(0, len(prompt) - floor))
            prompt = prompt[:keep] + prompt[keep + cut:]
        ids = (prompt + rest)[:n]
        labels = ([IGNORE] * len(prompt) + rest_labels)[:n]
        return Example(tuple(ids), tuple(labels))

    def _answers(self, prompts: list[str], answers: list[str]) -> list[Example]:
        joined = self._ids(prompts + answers)
        ps, as_ = joined[:len(prompts)], joined[len(prompts):]
        return [self._join(self.prefix + p, a + self.eos, a + self.eos) for p, a in zip(ps, as_)]

    def _text(self, records) -> list[Example]:
        ids = self._ids([_get(r, w, "text", self.cfg) for r, w in records])
        out = []
        for one in ids:
            one = self.prefix + one + self.eos
            # Packing uses whole documents: cutting them here would throw text away.
            if not self.cfg.packing and len(one) > self.cfg.max_length:
                self.truncated += 1
                one = one[:self.cfg.max_length]
            out.append(Example(tuple(one), tuple(one)))
        return out

    def _prompt_completion(self, records) -> list[Example]:
        return self._answers([_get(r, w, "prompt", self.cfg) for r, w in records],
                             [_get(r, w, "completion", self.cfg) for r, w in records])

    def _alpaca(self, records) -> list[Example]:
        prompts, outputs = [], []
        for r, w in records:
            instruction, extra = _get(r, w, "instruction", self.cfg), _get(r, w, "input", self.cfg, required=False)
            template = ALPACA_PROMPT if extra and extra.strip() else ALPACA_PROMPT_NO_INPUT
            prompts.append(template.format(instruction=instruction, input=extra))
            outputs.append(_get(r, w, "output", self.cfg))
        return self._answers(prompts, outputs)

    def _chat(self, records) -> list[Example]:
        if not getattr(self.tok, "chat_template", None):
            raise DataError("format chat needs a tokenizer with a chat template, and this model's tokenizer has "
                            "none; use a chat/instruct model or format: prompt_completion")
        segments, spans = [], []  # all records' text pieces, tokenized in one batch
        for r, w in records:
            pieces = self._chat_pieces(_get(r, w, "messages", self.cfg, kinds=(list,)), w)
            spans.append((len(segments), len(pieces)))
            segments.extend(pieces)
        ids = self._ids([text for text, _ in segments])
        out = []
        for start, count in spans:
            prompt, rest, labels = [], [], []
            for (_, trained), piece in zip(segments[start:start + count], ids[start:start + count]):
                if not trained and not rest:
                    prompt += piece  # everything before the first answer is the prompt
                else:
                    rest += piece
                    labels += piece if trained else [IGNORE] * len(piece)
            out.append(self._join(prompt, rest, labels))
        return out

    def _chat_pieces(self, messages: list, where: str) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, is_assistant_turn) pieces. Assistant spans are found by
        rendering prefixes: the turn starts after the prefix + generation prompt and ends where the prefix
        that includes it ends, so the span holds the answer and the template's end-of-turn marker."""
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        # Only assistant turns are trained on: a conversation in other role names (wizard/oracle) would
        # otherwise be dropped later as "no loss tokens left after truncation", which misleads.
        unknown = sorted({m["role"] for m in messages} - set(CHAT_ROLES))
        if unknown:
            raise DataError(f"{where}: unknown chat role{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(r) for r in unknown)}; expected {', '.join(CHAT_ROLES)} "
                            "(the loss is on assistant turns)")

        def render(msgs, generation: bool) -> str:
            try:
                return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)
            except Exception as e:  # jinja raises its own errors (e.g. roles must alternate)
                raise DataError(f"{where}: the chat template cannot render this conversation: {e}") from None

        full, pieces, pos = render(messages, False), [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[:i + 1], False)
            start, end = len(before), len(through)
            if not (pos <= start <= end and full.startswith(before) and full.startswith(through)):
                raise DataError(f"{where}: the chat template does not render this conversation's prefixes "
                                f"consistently (at messages[{i}]), so assistant turns cannot be located")
            pieces += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        return pieces + [(full[pos:], False)]

    def _setup_labels(self) -> None:
        cfg = self.cfg
        # Integer labels in the data index label_words' keys (or, with no label_words, data.labels).
        self.label_order = list(cfg.label_words) or list(cfg.labels)
        self.label_names = tuple(cfg.labels or cfg.label_words)
        if self.head != "causal_lm":
            return  # a classification head needs only the label set
        unknown = [lab for lab in self.label_names if lab not in cfg.label_words]
        if unknown:
            raise DataError(f"data.labels has {unknown}, which have no word in data.label_words "
                            f"({list(cfg.label_words)}); add a word for each label or drop it from data.labels")
        # Tokenize the word as it follows the prompt: SentencePiece and byte-level BPE split a word
        # differently at the start of a text and after other words.
        context = cfg.template.split("{text}")[-1] or "."
        base = self._ids([context])[0]
        ids = {}
        for name in self.label_names:
            word = cfg.label_words[name]
            after = self._ids([context + word])[0]
            if after[:len(base)] != base or len(after) != len(base) + 1:
                pieces = self.tok.convert_ids_to_tokens(after[len(base):] if after[:len(base)] == base else after)
                raise DataError(f"data.label_words: {name}: {word!r} is not one token after the prompt "
                                f"{context!r} (it gives {pieces}); pick a single-token word, usually a common "
                                "word with a leading space such as ' great'")
            ids[name] = after[-1]
        clash = [n for n in ids if list(ids.values()).count(ids[n]) > 1]
        if clash:
            raise DataError(f"data.label_words: {clash} share one token; each label needs its own word")
        self.label_token_ids = tuple(ids[n] for n in self.label_names)

    def _classification(self, records) -> list[Example]:
        keys, index = self.label_order, {n: i for i, n in enumerate(self.label_names)}
        prompts, classes = [], []
        for r, w in records:
            raw = _get(r, w, "label", self.cfg, kinds=(str, int))
            # A label is a name; an integer (or a CSV "0") that is no name indexes the label order.
            key = str(raw)
            if key not in keys and key.isdigit() and int(key) < len(keys):
                key = keys[int(key)]
            if key not in index:
                self.skipped_labels[str(raw)] += 1
                continue
            prompts.append(self.cfg.template.replace("{text}", _get(r, w, "text", self.cfg)))
            classes.append(index[key])
        out = []
        for ids, c in zip(self._ids(prompts), classes):
            if self.head == "causal_lm":
                word = self.label_token_ids[c]
                e = self._join(self.prefix + ids, [word], [word])
            else:  # the model's own wrapping ([CLS] ... [SEP]); no loss tokens, the head reads class_label
                e = self._join(self.prefix + ids, self.suffix, [IGNORE] * len(self.suffix))
            out.append(Example(e.input_ids, e.labels, c))
        return out


def _trainable(e: Example) -> bool:
    """True when the shifted loss sees at least one label (position 0 is never predicted)."""
    return e.labels[1:].count(IGNORE) < len(e.labels) - 1


def _pack(examples: list[Example], n: int) -> list[Example]:
    """Concatenates examples with their masks and cuts the stream into rows of n tokens (the last may be
    shorter). Rows cross example boundaries; each token keeps its own label."""
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids.extend(e.input_ids)
        labels.extend(e.labels)
    return [Example(tuple(ids[i:i + n]), tuple(labels[i:i + n])) for i in range(0, len(ids), n)]


def _split(examples: list[Example], fraction: float, by_class: bool) -> tuple[list[Example], list[Example]]:
    """Holds out about `fraction` of the (already shuffled) examples; for classification, per label, so
    every label with two or more examples appears on both sides."""
    if fraction == 0 or len(examples) < 2:
        return examples, []
    groups: dict = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.class_label if by_class else None, []).append(i)
    held = set()
    for idx in groups.values():
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) >= 2 else 0
        held.update(idx[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def build_datasets(cfg: DataConfig, tokenizer, *, seed: int, head: str = "causal_lm") -> Datasets:
    """Train and eval examples for a recipe's data section, in an order fixed by data.split_seed, else `seed`."""
    seed = cfg.split_seed if cfg.split_seed is not None else seed
    if head not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"head must be causal_lm or sequence_classification, got {head!r}")
    if head == "sequence_classification" and cfg.format != "classification":
        raise DataError("model.head: sequence_classification needs data.format: classification")
    unused = sorted(set(cfg.fields) - set(FIELDS[cfg.format]))
    if unused:
        raise DataError(f"data.fields renames {unused}, which format {cfg.format} does not read "
                        f"(its fields: {', '.join(FIELDS[cfg.format])})")
    b = _Builder(cfg, tokenizer, head)
    notes, dropped = [], 0
    causal = head == "causal_lm"

    def prepare(specs: Sequence[str], key: str, rng: random.Random) -> list[Example]:
        nonlocal dropped
        out = b.examples(specs, key)
        if causal:
            kept = [e for e in out if (e.labels.count(IGNORE) < len(e.labels) if cfg.packing else _trainable(e))]
            dropped += len(out) - len(kept)
            out = kept
        rng.shuffle(out)
        return out

    train = prepare(cfg.train, "train", random.Random(f"fuyou-data:{seed}"))
    if cfg.eval:
        evals = prepare(cfg.eval, "eval", random.Random(f"fuyou-eval:{seed}"))
    else:
        train, evals = _split(train, cfg.eval_fraction, by_class=cfg.format == "classification")
    if cfg.validation_fraction:  # evaluate on a slice of the training examples; the held-out set stays unseen
        train, evals = _split(train, cfg.validation_fraction, by_class=cfg.format == "classification")
        if not evals:
            raise DataError(f"data.validation_fraction {cfg.validation_fraction}: too few training examples "
                            f"({len(train)}) to set any aside")
        notes.append(f"evaluating on a validation split of {len(evals)} training examples (the held-out set is "
                     "not used)")
    if cfg.packing:
        train, evals = _pack(train, cfg.max_length), _pack(evals, cfg.max_length)
        before = len(train) + len(evals)
        train, evals = [e for e in train if _trainable(e)], [e for e in evals if _trainable(e)]
        dropped += before - len(train) - len(evals)
    train, evals = train[:cfg.max_examples], evals[:cfg.max_eval_examples]

    if b.skipped_labels:
        seen = ", ".join(f"{k} ({v})" for k, v in b.skipped_labels.most_common(8))
        notes.append(f"skipped {sum(b.skipped_labels.values())} records whose label is not in "
                     f"{', '.join(b.label_names)}: {seen}")
    if b.truncated:
        notes.append(f"truncated {b.truncated} examples to max_length {cfg.max_length}")
    if dropped:
        notes.append(f"dropped {dropped} examples with no loss tokens left after truncation")
    if not train:
        raise DataError(f"data.train {', '.join(cfg.train)}: no training examples left "
                        f"({'; '.join(notes) or 'the files hold no usable records'})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Datasets(train=tuple(train), eval=tuple(evals), label_names=b.label_names,
                    label_token_ids=b.label_token_ids, pad_token_id=pad if pad is not None else 0,
                    notes=tuple(notes))


# ----------------------------------------------------------------------------------------------
# Batches and tensors


def batches(examples: Sequence[Example], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
            drop_last: bool = False) -> Iterator[list[Example]]:
    """Lists of examples in an order fixed by (seed, epoch): no global RNG state is read or changed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(f"fuyou-batches:{seed}:{epoch}").shuffle(order)
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]


def collate(batch: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded long tensors: input_ids, attention_mask, labels (IGNORE on padding), and class_labels
    when every example has one. The mask comes from lengths, not from pad ids: SmolLM2's pad is its eos."""
    if not batch:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if all(e.class_label is not None for e in batch):
        out["class_labels"] = torch.tensor([e.class_label for e in batch], dtype=torch.long)
    return out
