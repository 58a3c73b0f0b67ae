"""Bad paths and damaged files a careless user hands fuyou: each is one line on stderr, exit 2 or 3, and
nothing written (no output folder, no metrics.jsonl). Real files, a real read-only mount where the
machine allows one, the CLI entry point in-process."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fuyoucli.cli.app import main

STREAM_SSD = "offload:\n  mode: stream\n  swap_dir: {swap}\n  weights_home: ssd\nhardware:\n  preset: cpu-laptop-8c-32g\n"


def write_recipe(path: Path, model: Path, data: Path, out: Path, extra: str = "") -> Path:
    path.write_text(f"model:\n  path: {model}\nmethod:\n  name: zo2\ndata:\n  train: {data}\n  max_length: 32\n"
                    f"training:\n  max_steps: 2\n  batch_size: 4\n  output_dir: {out}\n{extra}")
    return path


def one_line(capsys, *args: str, codes=(2,)) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out, err
    assert info.value.code in codes, (info.value.code, err)
    assert len(err.splitlines()) == 1 and err.startswith("fuyou: error:"), err
    return err


def test_swap_dir_that_is_a_file(capsys, tmp_path, tiny_models, text_data):
    swap, out = tmp_path / "swap", tmp_path / "out"
    swap.write_text("not a folder")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out, STREAM_SSD.format(swap=swap))
    err = one_line(capsys, "finetune", str(recipe), "--quiet")
    assert f"offload.swap_dir {swap} is a file" in err
    assert not out.exists()


def test_swap_dir_on_a_filesystem_with_no_storage(capsys, tmp_path, tiny_models, text_data):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc here")
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out,
                          STREAM_SSD.format(swap="/proc/fuyou-swap"))
    err = one_line(capsys, "finetune", str(recipe), "--quiet")
    assert "/proc/fuyou-swap" in err and "0.00 GiB" not in err, err
    assert not out.exists()


def test_output_dir_under_a_file(capsys, tmp_path, tiny_models, text_data):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, blocker / "out")
    err = one_line(capsys, "finetune", str(recipe), "--quiet")
    assert f"lies under {blocker}, which is a file" in err


def test_output_dir_on_a_read_only_filesystem(capsys, tmp_path, tiny_models, text_data):
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, disk / "out")
        err = one_line(capsys, "finetune", str(recipe), "--quiet")
        assert "read-only filesystem" in err
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_truncated_model_safetensors(capsys, tmp_path, tiny_models, text_data):
    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_models["llama"], model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    recipe = write_recipe(tmp_path / "r.yaml", model, text_data, out)
    err = one_line(capsys, "finetune", str(recipe), "--quiet")
    assert f"model file {weights} is truncated" in err
    assert not out.exists()
    weights.write_bytes(b"\x05")
    err = one_line(capsys, "finetune", str(recipe), "--quiet")
    assert "damaged" in err and not out.exists()


def test_report_on_a_file_that_is_not_utf8_or_rows_without_fields(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b'{"kind": "train", "step": 1, "loss": 1.0}\n\xff\xfe\x00garbage\n')
    assert "not UTF-8 text" in one_line(capsys, "report", str(run), "--no-plot")
    rows = [{"kind": "train", "step": 1, "loss": 2.0, "step_time_s": 0.1, "tokens": 8},
            {"kind": "train", "step": 2, "step_time_s": 0.1},
            {"kind": "eval", "step": 2, "loss": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = one_line(capsys, "report", str(run), "--no-plot")
    assert "metrics.jsonl:2: a train row without a number for loss" in err


@pytest.mark.parametrize("mode", ["in_memory", "auto"])
def test_host_memory_limit_is_honoured_on_a_cpu_machine(capsys, tmp_path, tiny_models, text_data, mode):
    """offload.host_memory_limit below what the run needs is refused before anything is written (in_memory
    used to skip the planner and run on regardless)."""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, out,
                          f"offload:\n  mode: {mode}\n  host_memory_limit: 300kB\nhardware:\n  preset: cpu-laptop-8c-32g\n")
    with pytest.raises(SystemExit) as info:
        main(["finetune", str(recipe), "--quiet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err
    assert "does not fit" in err and "offload.host_memory_limit 300,000 B caps it" in err, err
    assert not out.exists()


def test_a_parquet_file_without_the_mapped_fields(capsys, tmp_path, tiny_models):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data, out = tmp_path / "tweets.parquet", tmp_path / "out"
    pq.write_table(pa.Table.from_pylist([{"body": f"tweet {i}", "sentiment": "positive"} for i in range(8)]), data)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], data, out, "")
    recipe.write_text(recipe.read_text().replace("  max_length: 32\n", "  max_length: 32\n  fields: {text: tweet}\n"))
    err = one_line(capsys, "finetune", str(recipe), "--quiet")
    assert f"{data}: no column 'tweet' (data.fields maps text -> tweet)" in err and "its columns: body, sentiment" in err
    assert not out.exists()
