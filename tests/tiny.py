"""Tiny random-init Hugging Face models and a tiny tokenizer, built locally for the tests.

Nothing here downloads anything: the tokenizer is trained on a few sentences, the models are random.
Imported by tests/conftest.py (fixtures) and by tests that need the helpers directly.
"""

from __future__ import annotations

import json
from pathlib import Path


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a great movie with a wonderful story and great acting",
    "a terrible film, boring and far too long, terrible acting",
    "what a lovely day to go for a walk in the park",
    "the weather today is grey and the rain does not stop",
    "question: what is two plus two? answer: four",
    "to be or not to be, that is the question",
    "all the world is a stage and all the men and women merely players",
] * 20

ARCHS = ("llama", "opt", "gpt2", "qwen2", "falcon", "bloom")

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS + [" great", " terrible", " good", " bad"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                    tie_word_embeddings=True, **common)
    if arch == "opt":
        return AutoConfig.for_model("opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=256, word_embed_proj_dim=32, **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
    if arch == "falcon":  # layers return tuples; rotary, multi-query, parallel attention
        return AutoConfig.for_model("falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_hidden_size=64, max_position_embeddings=256, **common)
    if arch == "bloom":  # layers return tuples; ALiBi, an embedding layer norm
        return AutoConfig.for_model("bloom", hidden_size=32, n_layer=2, n_head=4, **common)
    raise ValueError(arch)


def save_tiny_model(folder: Path, arch: str, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class EventList:
    """A telemetry sink that keeps every event, for tests that read back what a run emitted."""

    def __init__(self):
        self.events = []

    def handle(self, event):
        self.events.append(event)

    def close(self):
        pass


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, *, repo_type: str = "model",
                   only: tuple[str, ...] | None = None) -> Path:
    """Lay `folder`'s files out in `cache` as huggingface_hub's cache holds a downloaded repo: content-named
    blobs, a snapshot of symlinks to them under a commit hash, and refs/main naming that commit. Nothing
    is downloaded; `only` keeps just those file names (e.g. config.json). Returns the snapshot folder."""
    import hashlib
    import os

    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or (only is not None and str(rel) not in only):
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
