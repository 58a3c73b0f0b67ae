"""Preflight: each check that refuses a run before weights load, on a machine described by numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fuyoucli.engine.tiers import SWAP_MARGIN_BYTES, SsdStore
from fuyoucli.errors import ResourceError
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.types import Tier, TierBytes
from fuyoucli.recipe import validate_recipe
from fuyoucli.train import preflight as pf
from fuyoucli.train.preflight import Machine, PreflightError, check_output_dir, preflight

GiB = 1 << 30


def recipe(tmp_path: Path, tiny_models, text_data, method: str = "zo2", **training):
    return validate_recipe({
        "model": {"path": str(tiny_models["llama"])}, "method": {"name": method},
        "data": {"train": [str(text_data)]},
        "training": {"max_steps": 2, "output_dir": str(tmp_path / "out"), **training}})


def machine(*, cuda=False, ram=64 * GiB, memlock=None, free=None, same_disk=True) -> Machine:
    free = free or {}
    return Machine(cuda=cuda, available_ram_bytes=ram, memlock_bytes=memlock,
                   free_bytes=lambda p: free.get(p.name, 1 << 50),
                   device_id=lambda p: 1 if same_disk else hash(p.name))


def plan(tmp_path, *, device="cpu", memory=TierBytes(), pinned_pool=0, home=Tier.PAGEABLE):
    p = fixed_plan(2, home, swap_dir=str(tmp_path / "swap"), compute_device=device)
    return dataclasses.replace(p, memory=memory, pinned_pool_bytes=pinned_pool)


def check(r, p, m, notes=None, **kw):
    preflight(r, p, trainable_params=kw.pop("trainable", 10**6), params=kw.pop("params", 10**6), resuming=False,
              note=(notes.append if notes is not None else lambda s: None), machine=m)


def test_a_plain_run_passes(tmp_path, tiny_models, text_data):
    check(recipe(tmp_path, tiny_models, text_data), None, machine())
    check(recipe(tmp_path, tiny_models, text_data), plan(tmp_path), machine())


def test_cuda_plan_without_cuda(tmp_path, tiny_models, text_data):
    with pytest.raises(PreflightError, match="CUDA GPU .* this machine has none"):
        check(recipe(tmp_path, tiny_models, text_data), plan(tmp_path, device="cuda"), machine(cuda=False))


def test_memlock_below_planned_pinned_bytes(tmp_path, tiny_models, text_data, monkeypatch):
    p = plan(tmp_path, device="cuda", memory=TierBytes(pinned=3 * GiB), pinned_pool=GiB)
    monkeypatch.setattr(pf, "_pins_past_limit", lambda m: False)  # this driver honours RLIMIT_MEMLOCK
    with pytest.raises(PreflightError, match=r"pins 4.00 GiB .* locked-memory limit is 0.01 GiB \(ulimit -l\)"):
        check(recipe(tmp_path, tiny_models, text_data), p, machine(cuda=True, memlock=8 << 20))
    monkeypatch.setattr(pf, "_pins_past_limit", lambda m: True)  # a driver that pins past it: no refusal
    check(recipe(tmp_path, tiny_models, text_data), p, machine(cuda=True, memlock=8 << 20))
    check(recipe(tmp_path, tiny_models, text_data), p, machine(cuda=True, memlock=None))


def test_ram_headroom(tmp_path, tiny_models, text_data):
    p = plan(tmp_path, memory=TierBytes(device=6 * GiB, pageable=4 * GiB))  # a CPU run: device memory is RAM too
    with pytest.raises(PreflightError, match="not enough free RAM: the plan needs 10.00 GiB .* 8.00 GiB is available"):
        check(recipe(tmp_path, tiny_models, text_data), p, machine(ram=8 * GiB))
    check(recipe(tmp_path, tiny_models, text_data), p, machine(ram=16 * GiB))


def test_disk_space_for_swap_and_checkpoints_adds_up_on_one_disk(tmp_path, tiny_models, text_data):
    r = recipe(tmp_path, tiny_models, text_data, method="adamw", checkpoint_every=10, keep_checkpoints=2)
    # 100M trainable fp32 params: a checkpoint is 1.2 GB (master, m, v), three exist while one is written,
    # plus the final model (0.4 GB); the swap files 2 GiB.
    p = plan(tmp_path, memory=TierBytes(ssd=2 * GiB), home=Tier.SSD)
    need = 3 * 12 * 10**8 + 4 * 10**8
    with pytest.raises(PreflightError, match="output_dir .* and swap_dir .* need"):
        check(r, p, machine(free={tmp_path.name: need + 2 * GiB - 1}), trainable=10**8, params=10**8)
    check(r, p, machine(free={tmp_path.name: need + 2 * GiB + SWAP_MARGIN_BYTES}), trainable=10**8, params=10**8)
    # On two disks each needs only its own share.
    with pytest.raises(PreflightError, match="output_dir"):
        check(r, None, machine(free={tmp_path.name: need // 2}, same_disk=False), trainable=10**8, params=10**8)


def test_preflight_keeps_the_swap_stores_margin_free(tmp_path, tiny_models, text_data):
    """A disk with room for the swap files but not the store's margin is refused before the run starts
    (it used to pass preflight with 64 MiB spare and then fail when the store opened), naming the margin;
    with the margin free, the store opens on the same numbers."""
    r = recipe(tmp_path, tiny_models, text_data)
    swap_bytes = 1 << 20
    p = plan(tmp_path, memory=TierBytes(ssd=swap_bytes), home=Tier.SSD)
    files = swap_bytes + 1024  # one trainable parameter: the checkpoints and the model take a few bytes
    with pytest.raises(PreflightError, match=r"swap_dir .* need .* plus 256.00 MiB kept free for the swap store"):
        check(r, p, machine(free={tmp_path.name: files + (64 << 20)}), trainable=1, params=1)
    check(r, p, machine(free={tmp_path.name: files + SWAP_MARGIN_BYTES}), trainable=1, params=1)
    # The store asks for the very same margin: with less free than files + margin it refuses, naming it.
    free = __import__("shutil").disk_usage(tmp_path).free
    with pytest.raises(ResourceError, match="256 MiB margin"):
        SsdStore(tmp_path / "swap", needed_bytes=free - SWAP_MARGIN_BYTES + (64 << 20))


def test_zo2_ledger_and_lora_need_less(tmp_path, tiny_models, text_data):
    full = pf.checkpoint_bytes(recipe(tmp_path, tiny_models, text_data), 10**6, 10**7)
    assert full == (4 * 10**6, 4 * 10**7)
    adamw = pf.checkpoint_bytes(recipe(tmp_path, tiny_models, text_data, method="adamw"), 10**6, 10**7)
    assert adamw == (12 * 10**6, 4 * 10**7)


def test_output_dir_holding_a_run_and_unwritable_swap(tmp_path, tiny_models, text_data):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(PreflightError, match="already holds a run.*--resume"):
        check_output_dir(out, overwrite=False, resuming=False)
    check_output_dir(out, overwrite=True, resuming=False)
    check_output_dir(out, overwrite=False, resuming=True)
    swap = tmp_path / "swap"
    swap.mkdir()
    swap.chmod(0o500)
    try:
        import os

        if os.access(swap, os.W_OK):
            pytest.skip("running as a user that writes anywhere (root)")
        with pytest.raises(PreflightError, match="not writable"):
            check(recipe(tmp_path, tiny_models, text_data), plan(tmp_path, home=Tier.SSD), machine())
    finally:
        swap.chmod(0o700)


def test_swap_dir_without_o_direct_is_a_note(tmp_path, tiny_models, text_data, monkeypatch):
    import fuyoucli.engine.tiers as tiers

    (tmp_path / "swap").mkdir()
    monkeypatch.setattr(tiers, "o_direct_works", lambda d: False)
    notes: list[str] = []
    check(recipe(tmp_path, tiny_models, text_data), plan(tmp_path, home=Tier.SSD), machine(), notes)
    assert any("O_DIRECT" in n for n in notes)
