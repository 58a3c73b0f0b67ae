"""Saving what a run produced, atomically: a folder appears whole or not at all.

Last stage of the pipeline. Writes go to a temporary folder beside the target, every file is
fsynced, then one rename publishes it; an older folder of the same name is replaced only after that.
Checkpoints (output_dir/checkpoints/step-NNNNNNNN) hold the trainer's tensors in safetensors shards,
the run's RNG states in run.safetensors, and state.json: step, data position, the trainer's metadata,
the recipe and the plan, and a sha256 per file so that a damaged checkpoint is refused, never loaded.
Imports torch and safetensors; never rich, never the CLI.
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

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
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


def save_final_model(model, tokenizer, target: Path, *, recipe=None) -> Path:
    """A Hugging Face folder `from_pretrained` loads: full weights in safetensors, or the LoRA adapter."""
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if recipe is not None:
                (tmp / "fuyou_recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2),
                                                       encoding="utf-8")
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
    """Remove what interrupted checkpoint writes left (hidden .step-*.tmp-* / .old-* folders)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
                path = tmp / name
                files[name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                nbytes += files[name]["bytes"]
            doc = {"format": FORMAT_VERSION, "step": step, **state, "files": files, "keys": keys}
            (tmp / STATE_FILE).write_text(json.dumps(doc, indent=1, allow_nan=True), encoding="utf-8")
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
        if not isinstance(doc, dict) or "step" not in doc or "files" not in doc:
            raise ValueError("missing keys")
        return doc
    except (OSError, ValueError) as e:
        if quiet:
            return {}
        raise CheckpointError(f"checkpoint {path} is damaged: its {STATE_FILE} cannot be read ({e}); "
                              f"resume from an older checkpoint") from e


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
    """Open a checkpoint folder, refusing one that is incomplete or whose files do not match their checksums."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete fuyou checkpoint (no {STATE_FILE}); "
                              f"checkpoints are the step-NNNNNNNN folders under OUTPUT_DIR/{CHECKPOINTS}")
    state = _read_state(path)
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')!r}; this fuyou reads format {FORMAT_VERSION}")
    if verify:
        for name, info in state["files"].items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing; resume from an older checkpoint")
            if f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
                raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its checksum; "
                                      f"resume from an older checkpoint")
    from safetensors.torch import load_file

    run_tensors = load_file(str(path / RUN_TENSORS)) if (path / RUN_TENSORS).is_file() else {}
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
