"""Checkpoint folders without a run: atomic writes, checksums, keep-K with ledger bases, cadence, stale swap."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fuyoucli.checkpoint import (CheckpointError, _umask, clean_unfinished, list_checkpoints, load_checkpoint,
                                 remove_stale_swap, save_checkpoint)


def save(root, step, *, keep=10, ledger_base=None):
    shards = [] if ledger_base else [("", {"param.w": torch.full((3,), float(step))})]
    state = {"ledger_base": ledger_base} if ledger_base else {}
    return save_checkpoint(root, step, shards, {"rng.torch": torch.zeros(4, dtype=torch.uint8)}, state, keep=keep)[0]


def test_save_load_verify(tmp_path):
    path = save(tmp_path, 3)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and torch.equal(ckpt.tensors["param.w"], torch.full((3,), 3.0))
    assert "param.w" in ckpt.tensors and len(ckpt.tensors) == 1
    assert path.stat().st_mode & 0o777 == 0o777 & ~_umask()  # an ordinary folder, not mkdtemp's private one
    (path / "weights.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a complete fuyou checkpoint"):
        load_checkpoint(tmp_path)


def test_keep_last_k_keeps_the_bases_of_kept_ledgers(tmp_path):
    save(tmp_path, 2, keep=2)
    save(tmp_path, 4, keep=2, ledger_base="step-00000002")
    save(tmp_path, 6, keep=2, ledger_base="step-00000002")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004", "step-00000006"]
    save(tmp_path, 8, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000006", "step-00000008"]
    save(tmp_path, 10, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000008", "step-00000010"]
    assert json.loads((tmp_path / "step-00000010" / "state.json").read_text())["step"] == 10


def test_unfinished_writes_are_invisible_and_cleaned(tmp_path):
    save(tmp_path, 2)
    (tmp_path / ".step-00000004.tmp-abc").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert [p.name for p in clean_unfinished(tmp_path)] == [".step-00000004.tmp-abc"]


def test_stale_swap_folders_of_dead_processes_are_removed(tmp_path):
    dead = 2**22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    for pid in (dead, os.getpid(), 1):
        (tmp_path / f"fuyou-swap-{pid}").mkdir()
    (tmp_path / "unrelated").mkdir()
    assert [p.name for p in remove_stale_swap(tmp_path)] == [f"fuyou-swap-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"fuyou-swap-{os.getpid()}", "fuyou-swap-1",
                                                                 "unrelated"])


def test_checkpoint_cadence_by_steps_and_minutes(monkeypatch, tmp_path):
    from fuyoucli.recipe import validate_recipe
    from fuyoucli.train import resume

    class Trainer:
        def state_shards(self):
            return iter(())

        def load_state_dict(self, tensors, meta):
            pass

    def checkpointer(**training):
        r = validate_recipe({"model": {"path": str(tmp_path)}, "method": {"name": "adamw"},
                             "data": {"train": [str(tmp_path / "d.txt")]},
                             "training": {"max_steps": 100, "output_dir": str(tmp_path / "out"), **training}})
        return resume.Checkpointer(r, None, Trainer(), total_steps=100, device=torch.device("cpu"))

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "d.txt").write_text("x")
    c = checkpointer(checkpoint_every=5)
    assert [s for s in range(1, 12) if c.due(s)] == [5, 10]
    now = [1000.0]
    monkeypatch.setattr(resume.time, "monotonic", lambda: now[0])
    c = checkpointer(checkpoint_minutes=2.0)
    assert not c.due(1)
    now[0] += 121
    assert c.due(2)
    assert not checkpointer().due(5)
