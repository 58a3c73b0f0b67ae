"""Failures a user can act on end a run with one line and an exit code, leave the last complete checkpoint
loadable and remove the swap files: a doomed plan (refused before anything is written), out of memory
mid-run, a disk that fills up while a checkpoint is written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from fuyoucli.checkpoint import load_checkpoint, list_checkpoints
from fuyoucli.cli.app import main
from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.jsonl import comparable, read_metrics
from fuyoucli.train.run import finetune


def write_recipe(path: Path, model: Path, data: Path, out: Path, extra: str = "") -> Path:
    path.write_text(
        f"name: failure-test\nmodel:\n  path: {model}\nmethod:\n  name: zo2\n  lr: 1.0e-2\n  eps: 1.0e-2\n"
        f"data:\n  train: {data}\n  max_length: 32\n  eval_fraction: 0.2\n"
        f"training:\n  max_steps: 6\n  batch_size: 16\n  seed: 1\n  checkpoint_every: 2\n  output_dir: {out}\n{extra}")
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return info.value.code, captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_gpu_plan_on_a_machine_without_one_is_refused_before_anything_is_written(capsys, tmp_path, tiny_models,
                                                                                    text_data):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out,
                          "offload:\n  mode: stream\nhardware:\n  preset: rtx4090-pcie4-1nvme-128g\n")
    code, err = run_cli(capsys, "finetune", str(recipe), "--quiet")
    assert code == 2 and "CUDA GPU" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


STREAM_SSD = "offload:\n  mode: stream\n  swap_dir: {swap}\n  weights_home: ssd\nhardware:\n  preset: cpu-laptop-8c-32g\n"


def test_out_of_memory_mid_run_is_one_line_and_removes_swap_files(capsys, tmp_path, tiny_models, text_data,
                                                                     monkeypatch):
    from fuyoucli.train import trainers

    real_step = trainers.StreamedZO.step

    def step(self, step, micro, lr):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, step, micro, lr)

    monkeypatch.setattr(trainers.StreamedZO, "step", step)
    swap, out = tmp_path / "swap", tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, STREAM_SSD.format(swap=swap))
    code, err = run_cli(capsys, "finetune", str(recipe), "--quiet")
    assert code == 3 and "out of memory" in err and len(err.strip().splitlines()) == 1, err
    assert not any(swap.iterdir())
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1]).step == 2


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, tiny_models, text_data,
                                                                        monkeypatch):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "80m"):
        pytest.skip("needs root to mount a small tmpfs as the output directory")
    try:
        from fuyoucli.telemetry import console
        from fuyoucli.telemetry.events import CheckpointSaved

        out = disk / "out"
        filler = disk / "filler"
        real_handle = console.ConsoleSink.handle

        def handle(self, event):
            real_handle(self, event)
            if isinstance(event, CheckpointSaved) and event.step == 2:  # then something else fills the disk
                with open(filler, "wb") as f:
                    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                    f.write(b"\0" * (free - (96 << 10)))

        monkeypatch.setattr(console.ConsoleSink, "handle", handle)
        # a preset: with no saved profile the run would first say it is measuring the machine
        recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out,
                              "hardware:\n  preset: cpu-laptop-8c-32g\n")
        code, err = run_cli(capsys, "finetune", str(recipe), "--quiet")
        assert code == 3 and len(err.strip().splitlines()) == 1, err
        assert "disk full writing checkpoint step-00000004" in err and "step-00000002, is intact" in err
        found = list_checkpoints(out / "checkpoints")
        assert [p.name for p in found] == ["step-00000002"]
        assert load_checkpoint(found[0]).step == 2  # checksums verified
        assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())

        # With room again, the run continues from it to the same end as one that never stopped.
        filler.unlink()
        monkeypatch.setattr(console.ConsoleSink, "handle", real_handle)
        finetune(load_recipe(recipe), resume=True)
        finetune(load_recipe(recipe, [f"training.output_dir={tmp_path / 'ref'}"]))
        strip = lambda rows: [comparable(r) for r in rows]  # noqa: E731
        assert strip(read_metrics(out / "metrics.jsonl")) == strip(read_metrics(tmp_path / "ref" / "metrics.jsonl"))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
