"""Saving what a run produced, atomically: a folder appears whole or not at all.

Last stage of the pipeline. Writes go to a temporary folder beside the target, every file is
fsynced, then one rename publishes it; an older folder of the same name is replaced only after that.
Checkpoints (output_dir/checkpoints/step-NNNNNNNN) hold the trainer's tensors in safetensors shards,
the run's RNG states in run.safetensors, and state.json: step, data position, the trainer's metadata,
the recipe and the plan; manifest.json, written last, holds a sha256 of every other file (state.json
included) and of itself, so that a damaged or edited checkpoint is refused, never loaded.
Imports torch and safetensors; never rich, never the CLI.

Why it is long: writing, validating and reading share the format's manifest and naming; a
split would let a writer and its reader drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fuyoucli.errors import FuyouError, ResourceError
from fuyoucli.folder_lock import LOCK_FILE

FORMAT_VERSION = 2  # 2: manifest.json covers every file; 1 (still read): state.json's own "files" table
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
MANIFEST = "manifest.json"
RUN_TENSORS = "run.safetensors"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(FuyouError):
    """A checkpoint is missing, incomplete, damaged, or belongs to a different run."""

    exit_code = 2


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # Read, not set-and-restore: os.umask() would change it for every thread for a moment.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yields a temporary folder; on success it becomes `target`, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the published folder is an ordinary one
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            lock = target / LOCK_FILE
            if lock.is_file():
                # The folder's lock (fuyou export holds it) moves into the new folder as the same inode, so the
                # path never names an unlocked file that a second process could take.
                os.link(lock, tmp / LOCK_FILE)
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        parent_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(parent_fd)
        finally:
            os.close(parent_fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(exc: BaseException) -> bool:
    import errno

    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)  # safetensors: "I/O error: No space left on device (os error 28)"
    return "No space left on device" in text or "Disk quota exceeded" in text


FINAL_INFO = "fuyou_final.json"


def save_final_model(model, tokenizer, target: Path, *, recipe=None, step: int | None = None) -> Path:
    """A Hugging Face folder `from_pretrained` loads: full weights in safetensors, or the LoRA adapter;
    fuyou_final.json says which step the weights are from (what `fuyou export` reports)."""
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if recipe is not None:
                # As written (unset fields left out), so that it validates again as a recipe (`fuyou export`).
                (tmp / "fuyou_recipe.json").write_text(
                    json.dumps(recipe.model_dump(mode="json", exclude_unset=True), indent=2), encoding="utf-8")
            if step is not None:
                (tmp / FINAL_INFO).write_text(json.dumps({"step": step}), encoding="utf-8")
                crash_point("final_model", step)
    except Exception as e:  # noqa: BLE001
        if _disk_full(e):
            raise ResourceError(f"disk full writing the final model to {target}: free space there (the run's "
                                "checkpoints are intact: finish with --resume)") from e
        raise
    return target


# ---- crash points (tests) ---------------------------------------------------------------------


def crash_point(name: str, step: int) -> None:
    """Test hook: FUYOU_CRASH_AT=NAME:STEP kills this process with SIGKILL at that point, so tests can
    stop a run exactly mid-step or mid-checkpoint-write. Unset (always, outside tests): does nothing."""
    spec = os.environ.get("FUYOU_CRASH_AT")
    if spec and spec == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---- checkpoints --------------------------------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Published checkpoints under `root`, oldest first (temporary folders of unfinished writes are not)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def clean_unfinished(root: Path) -> list[Path]:
    """Remove what interrupted checkpoint writes left (hidden .step-*.tmp-* / .old-* folders). Call it only
    while holding the run's lock (fuyoucli/folder_lock.py): then no live process owns them."""
    return remove_leftovers(root, _NAME.pattern.strip("^$"), pattern=True)


def remove_leftovers(parent: Path, name: str, *, pattern: bool = False) -> list[Path]:
    """Remove the hidden .NAME.tmp-* / .NAME.old-* folders an interrupted atomic_dir(parent / NAME) left (a kill
    during a checkpoint, the final model save or an export). Only under the lock of their folder."""
    leftover = re.compile(rf"\.(?:{name if pattern else re.escape(name)})\.(?:tmp|old)-.+")
    removed = []
    if parent.is_dir():
        for p in parent.iterdir():
            if p.is_dir() and leftover.fullmatch(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _doc_sha256(doc: dict) -> str:
    return hashlib.sha256(json.dumps({k: v for k, v in doc.items() if k != "sha256"}, sort_keys=True)
                          .encode("utf-8")).hexdigest()


def _write_manifest(folder: Path, files: dict) -> None:
    # The manifest's own sha256 (of the rest of it) makes an edit of the manifest itself detectable too.
    doc = {"format": FORMAT_VERSION, "files": files}
    doc["sha256"] = _doc_sha256(doc)
    (folder / MANIFEST).write_text(json.dumps(doc, indent=1), encoding="utf-8")


def _safe_file_name(shard: str) -> str:
    return "weights.safetensors" if shard == "" else f"weights-{re.sub(r'[^A-Za-z0-9_.-]', '_', shard)}.safetensors"


def _save_tensors(tensors: Mapping, path: Path) -> None:
    from safetensors.torch import save_file

    def private(v):
        # safetensors takes contiguous CPU tensors and refuses shared storage (views into one flat
        # buffer): such tensors get their own copy, the others are written as they are.
        v = v.detach()
        whole = v.untyped_storage().nbytes() == v.numel() * v.element_size()
        return v if v.device.type == "cpu" and v.is_contiguous() and whole else v.to("cpu").contiguous().clone()

    save_file({k: private(v) for k, v in tensors.items()}, str(path))


def save_checkpoint(root: Path, step: int, shards: Iterable[tuple[str, Mapping]], run_tensors: Mapping,
                    state: dict, *, keep: int) -> tuple[Path, int]:
    """Write checkpoint `step` atomically; then keep the newest `keep` (and the full checkpoints they build
    on). `shards` yields (shard name, tensors) one at a time so a streamed model is never whole in memory.
    Returns (folder, bytes written). A full disk raises ResourceError naming the last complete checkpoint."""
    target = root / checkpoint_name(step)
    nbytes = 0
    try:
        with atomic_dir(target) as tmp:
            files: dict[str, dict] = {}
            keys: dict[str, str] = {}
            for shard, tensors in shards:
                name = _safe_file_name(shard)
                if name in files:
                    raise ValueError(f"two checkpoint shards map to {name}")
                _save_tensors(tensors, tmp / name)
                for k in tensors:
                    keys[k] = name
                files[name] = {}
            crash_point("checkpoint", step)
            _save_tensors(run_tensors, tmp / RUN_TENSORS)
            files[RUN_TENSORS] = {}
            for name in files:
                files[name] = _file_entry(tmp / name)
                nbytes += files[name]["bytes"]
            doc = {"format": FORMAT_VERSION, "step": step, **state, "keys": keys}
            (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1, allow_nan=True), encoding="utf-8")
            files[STATE_FILE] = _file_entry(tmp / STATE_FILE)
            _write_manifest(tmp, files)
    except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
        if _disk_full(e):
            previous = [p for p in list_checkpoints(root) if p != target]
            last = f"the last complete checkpoint, {previous[-1]}, is intact" if previous else "no earlier checkpoint exists"
            raise ResourceError(f"disk full writing checkpoint {target.name} in {root}: {last}; free space "
                                f"there or lower training.keep_checkpoints") from e
        raise
    prune_checkpoints(root, keep)
    return target, nbytes


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` checkpoints, except the full ones a kept ledger checkpoint needs."""
    found = list_checkpoints(root)
    kept = found[-keep:] if keep > 0 else []
    needed = {p.name for p in kept}
    for p in kept:
        base = _read_state(p, quiet=True).get("ledger_base") if (p / STATE_FILE).is_file() else None
        if base:
            needed.add(base)
    removed = []
    for p in found:
        if p.name not in needed:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _read_state(path: Path, quiet: bool = False) -> dict:
    try:
        doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or "step" not in doc:
            raise ValueError("missing keys")
        return doc
    except (OSError, ValueError) as e:
        if quiet:
            return {}
        raise _damaged(path, f"its {STATE_FILE} cannot be read ({e})") from e


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is damaged: {what}; resume from an older checkpoint")


def _verify_files(path: Path, files: object, *, required: tuple[str, ...]) -> None:
    if not isinstance(files, dict) or any(n not in files for n in required):
        raise _damaged(path, "its checksum table is incomplete")
    for name, info in files.items():
        f = path / name
        if not isinstance(name, str) or "/" in name or not isinstance(info, dict):
            raise _damaged(path, "its checksum table is malformed")
        if not f.is_file():
            raise _damaged(path, f"{name} is missing")
        if f.stat().st_size != info.get("bytes") or _sha256(f) != info.get("sha256"):
            raise _damaged(path, f"{name} does not match its checksum")


def _verify_manifest(path: Path) -> None:
    """Every file against manifest.json, state.json before a byte of it is believed."""
    try:
        doc = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = doc["files"]
        ok = doc.get("sha256") == _doc_sha256(doc) and doc.get("format") == FORMAT_VERSION
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _damaged(path, f"its {MANIFEST} cannot be read ({e})") from e
    if not ok:
        raise _damaged(path, f"its {MANIFEST} does not match its checksum")
    _verify_files(path, files, required=(STATE_FILE, RUN_TENSORS))


def _check_state(path: Path, state: dict) -> None:
    """The fields every reader relies on have their types (a checksummed state.json can still be from a bug)."""
    keys, step = state.get("keys", {}), state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _damaged(path, f"its step {step!r} is not a step number")
    if _NAME.match(path.name) and path.name != checkpoint_name(step):
        raise _damaged(path, f"its step {step} does not match the folder's name")
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise _damaged(path, f"its {STATE_FILE} has a malformed tensor table")
    if not keys and not state.get("ledger_base"):
        raise _damaged(path, "it lists no tensors")
    from safetensors import safe_open

    for name in sorted(set(keys.values())):
        try:
            with safe_open(str(path / name), framework="pt") as f:
                held = set(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
            raise _damaged(path, f"{name} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
        missing = [k for k, v in keys.items() if v == name and k not in held]
        if missing:
            raise _damaged(path, f"{name} lacks {missing[0]}")


class LazyTensors(Mapping):
    """The tensors of a checkpoint, read from their safetensors file only when asked for."""

    def __init__(self, folder: Path, keys: dict[str, str]):
        self.folder, self._keys = folder, keys

    def __getitem__(self, key: str):
        from safetensors import safe_open

        with safe_open(str(self.folder / self._keys[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys


@dataclass
class Checkpoint:
    path: Path
    state: dict
    tensors: Mapping
    """The trainer's tensors (LazyTensors: each read on access)."""
    run_tensors: dict = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_checkpoint(path: str | Path, *, verify: bool = True) -> Checkpoint:
    """Open a checkpoint folder, refusing one that is incomplete, whose files do not match their checksums
    or whose state.json lacks what a reader needs: all of it is checked before anything is loaded."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a complete fuyou checkpoint (no {STATE_FILE}); "
                              f"checkpoints are the step-NNNNNNNN folders under OUTPUT_DIR/{CHECKPOINTS}")
    has_manifest = (path / MANIFEST).is_file()
    if verify and has_manifest:
        _verify_manifest(path)
    state = _read_state(path)
    version = state.get("format")
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {path} has format {version!r}; this fuyou reads formats 1 and {FORMAT_VERSION}")
    if verify:
        if version == 1:
            _verify_files(path, state.get("files"), required=())
        elif not has_manifest:
            raise _damaged(path, f"{MANIFEST} is missing")
        _check_state(path, state)
    from safetensors.torch import load_file

    try:
        run_tensors = load_file(str(path / RUN_TENSORS)) if (path / RUN_TENSORS).is_file() else {}
    except Exception as e:  # noqa: BLE001 - safetensors' own error type
        raise _damaged(path, f"{RUN_TENSORS} cannot be read") from e
    return Checkpoint(path, state, LazyTensors(path, state.get("keys", {})), run_tensors)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# ---- swap folders a killed run left behind ----------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_swap(swap_dir: str | Path | None) -> list[Path]:
    """Remove fuyou-swap-<pid> folders under swap_dir whose process is gone (a SIGKILL leaves them)."""
    removed: list[Path] = []
    if not swap_dir:
        return removed
    base = Path(swap_dir).expanduser()
    if not base.is_dir():
        return removed
    for p in base.iterdir():
        m = re.fullmatch(r"fuyou-swap-(\d+)", p.name)
        if m and p.is_dir() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
