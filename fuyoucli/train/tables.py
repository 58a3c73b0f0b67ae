"""Columnar data for train/data.py: .parquet and .arrow files (pyarrow) and Hugging Face datasets
(`hf:NAME[:SPLIT]`, the datasets library), as the same (record, "where") pairs the text readers give.

Part of the data stage; imports pyarrow or datasets only when such a source is read (the `data` extra).
Every failure is one line: a missing package, a dataset not in the cache, a column the recipe maps
that the table lacks (checked on the schema, before any record is read).
"""

from __future__ import annotations

import os
from pathlib import Path

from fuyoucli.errors import DataError, InputError

TABLE_SUFFIXES = (".parquet", ".arrow")
EXTRA = "pip install 'fuyoucli[data]'"


def _import(package: str, what: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise InputError(f"{what} needs the {package.split('.')[0]} package, which is not installed: {EXTRA}") from None


def _check_columns(columns: list[str], needed: dict[str, str], source: str, fmt: str) -> None:
    """`needed`: field the format reads -> column the recipe maps it to (data.fields)."""
    missing = [(name, key) for name, key in needed.items() if key not in columns]
    if missing:
        name, key = missing[0]
        renamed = f" (data.fields maps {name} -> {key})" if key != name else ""
        raise DataError(f"{source}: no column '{key}'{renamed}, which format {fmt} needs; its columns: "
                        f"{', '.join(columns) or 'none'}. Map your column names with data.fields, e.g. "
                        f"fields: {{{name}: {columns[0] if columns else 'COLUMN'}}}")


def _records(table_rows: list[dict], source: str) -> list[tuple[dict, str]]:
    if not table_rows:
        raise DataError(f"{source}: no rows; give a table with at least one record")
    return [(row, f"{source} row {n}") for n, row in enumerate(table_rows, 1)]


def read_table(path: Path, needed: dict[str, str], fmt: str) -> list[tuple[dict, str]]:
    """A .parquet file, or an Arrow IPC .arrow file (file or stream format, as datasets' cache writes)."""
    pa = _import("pyarrow", f"{path}: a {path.suffix} file")
    try:
        if path.suffix == ".parquet":
            pq = _import("pyarrow.parquet", f"{path}: a .parquet file")
            schema = pq.read_schema(path)
            _check_columns(schema.names, needed, str(path), fmt)
            table = pq.read_table(path)
        else:
            ipc = _import("pyarrow.ipc", f"{path}: an .arrow file")
            try:
                table = ipc.open_file(path).read_all()
            except pa.ArrowInvalid:
                with ipc.open_stream(path) as reader:
                    table = reader.read_all()
            _check_columns(table.column_names, needed, str(path), fmt)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable {path.suffix} file ({first})") from None
    return _records(table.to_pylist(), str(path))


def read_hf_dataset(name: str, split: str | None, needed: dict[str, str], fmt: str,
                    what: str) -> list[tuple[dict, str]]:
    """A dataset through the datasets library: a folder written by save_to_disk, or a Hub dataset id
    (from the datasets cache; HF_HUB_OFFLINE=1 never goes online). split default: train."""
    source = f"hf:{name}" + (f":{split}" if split else "")
    datasets = _import("datasets", f"{what} {source!r}: a Hugging Face dataset")
    from datasets.utils.logging import disable_progress_bar, set_verbosity_error

    disable_progress_bar()
    set_verbosity_error()
    split = split or "train"
    try:
        if Path(name).expanduser().is_dir():
            loaded = datasets.load_from_disk(str(Path(name).expanduser()))
        else:
            # HF_DATASETS_CACHE read now, as the hub cache is (datasets reads it once, at import).
            loaded = datasets.load_dataset(_offline_snapshot(name) or name, split=split,
                                           cache_dir=os.environ.get("HF_DATASETS_CACHE") or None)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{what} {source!r}: no split {split!r}; its splits: {', '.join(loaded)}")
            loaded = loaded[split]
    except (DataError, InputError):
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (not found, offline, bad split)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = " (HF_HUB_OFFLINE=1: read from the cache only)" if _offline() else ""
        raise InputError(f"{what} {source!r}: cannot load it with the datasets library{offline}: {first}") from None
    _check_columns(list(loaded.column_names), needed, source, fmt)
    return _records(loaded.to_list(), source)


def _offline_snapshot(name: str) -> str | None:
    """Offline, the dataset repository's files in huggingface_hub's cache (where datasets downloads them):
    datasets itself, offline, finds only a dataset it has already prepared into its own cache."""
    from fuyoucli.resources import HUB_ID, hub_cache_dir

    if not (_offline() and HUB_ID.match(name)):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", cache_dir=hub_cache_dir(), local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the hub cache: datasets' own cache may still hold it
        return None


def _offline() -> bool:
    from fuyoucli.resources import hub_offline

    return hub_offline()
