"""Shared fixtures: tiny random-init models, a tiny tokenizer and small data files (see tests/tiny.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tiny import ARCHS, CORPUS, make_tokenizer, save_tiny_model, write_jsonl

# The suite never reads or writes the user's cache (saved hardware profile, converted GGUF models):
# a run that plans measures this machine once per session into a private folder.
os.environ.setdefault("FUYOU_CACHE_DIR", tempfile.mkdtemp(prefix="fuyou-test-cache-"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """arch -> folder holding a 2-layer random model and the tiny tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    return write_jsonl(path, [{"text": s} for s in CORPUS])


@pytest.fixture(scope="session")
def sentiment_data(tmp_path_factory) -> Path:
    rows = []
    for i in range(64):
        good = i % 2 == 0
        text = ("a great movie, wonderful story" if good else "a terrible film, boring story") + f" number {i}"
        rows.append({"text": text, "label": "positive" if good else "negative"})
    return write_jsonl(tmp_path_factory.mktemp("data") / "sentiment.jsonl", rows)


@pytest.fixture(params=["sync", "async-sim"])
def lanes_mode(request, monkeypatch) -> str:
    """Run a test with the CPU device's synchronous lanes and again with the simulated asynchronous ones
    (copies finish late on their own threads, destinations poisoned meanwhile; engine/lanes.py), which is
    how a test without a GPU sees a missing wait. Sets FUYOU_LANES, so CLI runs in subprocesses follow."""
    monkeypatch.setenv("FUYOU_LANES", request.param)
    return request.param
