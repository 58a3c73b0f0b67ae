"""Saving what a run produced, atomically: a folder appears whole or not at all.

Last stage of the pipeline. Writes go to a temporary folder beside the target, every file is
fsynced, then one rename publishes it; an older folder of the same name is replaced only after that.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yields a temporary folder; on success it becomes `target`, on failure it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
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


def save_final_model(model, tokenizer, target: Path, *, recipe=None) -> Path:
    """A Hugging Face folder `from_pretrained` loads: full weights in safetensors, or the LoRA adapter."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if recipe is not None:
            (tmp / "fuyou_recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2), encoding="utf-8")
    return target
