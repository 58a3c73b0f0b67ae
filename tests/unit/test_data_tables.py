"""Columnar data: .parquet and .arrow files (pyarrow) and `hf:` datasets (the datasets library), built with
those libraries here from rows the test writes, read through the same field mapping as .jsonl files."""

from __future__ import annotations

import importlib.util

import pytest

from tiny import write_jsonl
from fuyoucli.errors import DataError, RecipeError
from fuyoucli.recipe import DataConfig, validate_recipe
from fuyoucli.train.data import build_datasets

ROWS = [{"tweet": f"a great movie number {i}" if i % 2 else f"a terrible film number {i}",
         "sentiment": "positive" if i % 2 else "negative", "id": i} for i in range(12)]
CLASSIFY = dict(format="classification", fields={"text": "tweet", "label": "sentiment"},
                label_words={"positive": " great", "negative": " terrible"}, eval_fraction=0.0)

needs_pyarrow = pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def decoded(tok, ds) -> list[str]:
    return sorted(tok.decode(e.input_ids) for e in ds.train)


@needs_pyarrow
def test_parquet_reads_like_the_same_jsonl(tmp_path, tiny_tokenizer):
    parquet = write_parquet(tmp_path / "t.parquet", ROWS)
    jsonl = write_jsonl(tmp_path / "t.jsonl", ROWS)
    a = build_datasets(DataConfig(train=[str(parquet)], **CLASSIFY), tiny_tokenizer, seed=0)
    b = build_datasets(DataConfig(train=[str(jsonl)], **CLASSIFY), tiny_tokenizer, seed=0)
    assert a.train == b.train and len(a.train) == len(ROWS)
    assert [e.class_label for e in a.train] == [e.class_label for e in b.train]


@needs_pyarrow
@pytest.mark.parametrize("stream", [False, True])
def test_arrow_file_and_stream(tmp_path, tiny_tokenizer, stream):
    import pyarrow as pa

    table = pa.Table.from_pylist([{"text": r["tweet"]} for r in ROWS])
    path = tmp_path / "t.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        writer.write_table(table)
        writer.close()
    ds = build_datasets(DataConfig(train=[str(path)], eval_fraction=0.0), tiny_tokenizer, seed=0)
    assert decoded(tiny_tokenizer, ds) == sorted(r["tweet"] + "</s>" for r in ROWS)


@needs_pyarrow
def test_parquet_without_the_mapped_column_names_its_columns(tmp_path, tiny_tokenizer):
    parquet = write_parquet(tmp_path / "t.parquet", [{"body": r["tweet"], "sentiment": r["sentiment"]} for r in ROWS])
    with pytest.raises(DataError) as info:
        build_datasets(DataConfig(train=[str(parquet)], **CLASSIFY), tiny_tokenizer, seed=0)
    msg = str(info.value)
    assert "no column 'tweet' (data.fields maps text -> tweet)" in msg and "its columns: body, sentiment" in msg
    assert len(msg.splitlines()) == 1


def test_a_damaged_parquet_file_is_one_line(tmp_path, tiny_tokenizer):
    pytest.importorskip("pyarrow")
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable .parquet file"):
        build_datasets(DataConfig(train=[str(path)], eval_fraction=0.0), tiny_tokenizer, seed=0)


def test_hf_specs_parse(tmp_path):
    from fuyoucli.resources import hf_dataset, hf_file

    assert hf_dataset("hf:org/name") == ("org/name", None)
    assert hf_dataset("hf:org/name:validation") == ("org/name", "validation")
    assert hf_dataset("hf:/data/saved:test") == ("/data/saved", "test")
    assert hf_dataset("hf://datasets/org/name/x.parquet") is None and hf_dataset("org/name") is None
    assert hf_file("hf://datasets/org/name/data/train.parquet") == ("dataset", "org/name", "data/train.parquet")
    assert hf_file("data/x.jsonl") is None
    with pytest.raises(Exception, match="expected hf://datasets/ORG/NAME"):
        hf_file("hf://datasets/org")


def test_a_dataset_file_from_the_hub_cache(tmp_path, tiny_tokenizer, monkeypatch):
    """hf://datasets/ORG/NAME/PATH resolves through huggingface_hub's cache (filled here, read offline)."""
    from tiny import fill_hub_cache

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", [{"text": r["tweet"]} for r in ROWS])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill_hub_cache(tmp_path / "hub", "someone/tweets", repo, repo_type="dataset")
    ds = build_datasets(DataConfig(train=["hf://datasets/someone/tweets/data/train.jsonl"], eval_fraction=0.0),
                        tiny_tokenizer, seed=0)
    assert decoded(tiny_tokenizer, ds) == sorted(r["tweet"] + "</s>" for r in ROWS)
    doc = {"model": {"path": "org/model"}, "method": {"name": "zo2"}, "training": {"max_steps": 1},
           "data": {"train": "hf://datasets/someone/missing/train.jsonl"}}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="not in the hub cache"):
        validate_recipe(doc)


def test_hf_dataset_saved_to_disk(tmp_path, tiny_tokenizer):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": f"what is {i} plus {i}?", "answer": f" {2 * i}"} for i in range(8)]
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(folder))
    fields = {"prompt": "question", "completion": "answer"}
    ds = build_datasets(DataConfig(train=[f"hf:{folder}"], eval=[f"hf:{folder}:test"], format="prompt_completion",
                                   fields=fields), tiny_tokenizer, seed=0)
    assert len(ds.train) == 8 and len(ds.eval) == 2
    with pytest.raises(DataError, match="no split 'dev'; its splits: train, test"):
        build_datasets(DataConfig(train=[f"hf:{folder}:dev"], format="prompt_completion", fields=fields),
                       tiny_tokenizer, seed=0)
    with pytest.raises(DataError, match="no column 'completion'"):
        build_datasets(DataConfig(train=[f"hf:{folder}"], format="prompt_completion",
                                  fields={"prompt": "question"}), tiny_tokenizer, seed=0)


def test_hf_dataset_id_from_the_hub_cache_offline(tmp_path, tiny_tokenizer, monkeypatch):
    """`hf:ORG/NAME` offline reads the dataset repository's files from huggingface_hub's cache (filled here)."""
    pytest.importorskip("datasets")
    from tiny import fill_hub_cache

    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_parquet(repo / "data" / "train-00000-of-00001.parquet", ROWS)
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", ROWS[:4])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    fill_hub_cache(tmp_path / "hub", "someone/tweets", repo, repo_type="dataset")
    ds = build_datasets(DataConfig(train=["hf:someone/tweets"], eval=["hf:someone/tweets:test"], **CLASSIFY),
                        tiny_tokenizer, seed=0)
    assert len(ds.train) == len(ROWS) and len(ds.eval) == 4
    from fuyoucli.errors import InputError

    with pytest.raises(InputError, match="'hf:nobody/nothing': cannot load it with the datasets library "
                                         r"\(HF_HUB_OFFLINE=1"):
        build_datasets(DataConfig(train=["hf:nobody/nothing"], eval_fraction=0.0), tiny_tokenizer, seed=0)
