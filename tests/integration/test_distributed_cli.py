"""`fuyou plan --export deepspeed`, `fuyou finetune --engine deepspeed / --nproc N`: what is written, the
launch command, and every unsupported combination as one line and a non-zero exit (issue 9)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fuyoucli.cli.app import main
from fuyoucli.distributed import launch

ROOT = Path(__file__).parents[2]


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def write_recipe(tmp_path: Path, model: Path, data: Path, method: str = "adamw", extra: str = "",
                 accum: int = 2) -> Path:
    path = tmp_path / f"{method}.yaml"
    path.write_text(f"name: dist\nmodel: {{path: {model}, dtype: bfloat16}}\nmethod: {{name: {method}}}\n"
                    f"data: {{train: {data}, max_length: 64}}\n"
                    f"training: {{max_steps: 3, batch_size: 4, grad_accum: {accum}, output_dir: {tmp_path / 'out'}}}\n"
                    f"{extra}")
    return path


def test_plan_exports_a_deepspeed_config_and_its_notes(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path, tiny_models["llama"], text_data,
                          extra=f"offload: {{mode: stream, swap_dir: {tmp_path}, optimizer_home: ssd}}\n")
    out = tmp_path / "ds" / "ds_config.json"
    code, stdout, err = run(capsys, "plan", str(recipe), "--dry-run", "--json", "--preset",
                            "rtx4090-pcie4-1nvme-128g", "--export", "deepspeed", str(out), "--world-size", "2")
    assert code == 0, err
    json.loads(stdout)  # the plan's JSON document stays alone on stdout
    assert "wrote" in err and out.with_name("ds_config.notes.md").is_file()
    cfg = json.loads(out.read_text())
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and cfg["bf16"]["enabled"] is True
    assert z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "nvme"
    assert z["offload_optimizer"]["nvme_path"] == str(tmp_path)
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] * 2 * \
        cfg["train_micro_batch_size_per_gpu"] == 8


@pytest.mark.parametrize("args,needle", [
    (["--export", "megatron", "x.json"], "the formats are: deepspeed"),
])
def test_plan_export_bad_format(capsys, tmp_path, tiny_models, text_data, args, needle):
    recipe = write_recipe(tmp_path, tiny_models["llama"], text_data)
    code, _, err = run(capsys, "plan", str(recipe), "--dry-run", "--preset", "cpu-laptop-8c-32g", *args)
    assert code == 2 and needle in err


def test_plan_export_of_zo2_says_use_nproc(capsys, tmp_path, tiny_models, text_data):
    recipe = write_recipe(tmp_path, tiny_models["llama"], text_data, method="zo2")
    code, _, err = run(capsys, "plan", str(recipe), "--dry-run", "--preset", "cpu-laptop-8c-32g",
                       "--export", "deepspeed", str(tmp_path / "x.json"))
    assert code == 2 and "--nproc" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("method,args,needle", [
    ("zo2", ["--engine", "deepspeed"], "method zo2 has no DeepSpeed equivalent"),
    ("adamw", ["--nproc", "2"], "--engine deepspeed"),
    ("zo2", ["--nproc", "4"], "training.grad_accum 2 < 4 processes"),
    ("zo2", ["--engine", "torch"], "the engines are fuyou and deepspeed"),
    ("zo2", ["--hostfile", "hosts"], "--hostfile is for --engine deepspeed"),
    ("zo2", ["--nproc", "2", "--trace", "t.json"], "--trace"),
])
def test_unsupported_combinations_are_one_line(capsys, tmp_path, tiny_models, text_data, method, args, needle):
    recipe = write_recipe(tmp_path, tiny_models["llama"], text_data, method=method)
    code, _, err = run(capsys, "finetune", str(recipe), *args)
    assert code == 2 and needle in err, err  # bad input, as a bad recipe value is
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_bad_hostfiles_are_bad_input(tmp_path):
    empty = tmp_path / "hosts"
    empty.write_text("# no machine\n")
    for path, needle in ((tmp_path / "absent", "cannot read hostfile"), (empty, "names no machine")):
        with pytest.raises(launch.LaunchError, match=needle) as info:
            launch.hostfile_hosts(path)
        assert info.value.exit_code == 2


def test_engine_deepspeed_without_deepspeed_says_how_to_install(capsys, tmp_path, tiny_models, text_data,
                                                                monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    recipe = write_recipe(tmp_path, tiny_models["llama"], text_data)
    code, _, err = run(capsys, "finetune", str(recipe), "--engine", "deepspeed")
    assert code == 1 and "pip install 'fuyoucli[deepspeed]'" in err and len(err.strip().splitlines()) == 1


def test_engine_deepspeed_takes_the_output_folders_lock(capsys, tmp_path, tiny_models, text_data):
    """The launcher holds training.output_dir's lock while its ranks run: a second start on a folder a live
    run holds is refused in one line, before anything there is touched, and the lock file alone is not
    'a run already there' to the ranks."""
    from fuyoucli.folder_lock import LOCK_FILE, folder_lock

    recipe = write_recipe(tmp_path, tiny_models["llama"], text_data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("kept\n")
    with folder_lock(out, what="training.output_dir"):
        code, _, err = run(capsys, "finetune", str(recipe), "--engine", "deepspeed", "--overwrite")
        assert code == 1 and "is in use by another fuyou process" in err and len(err.strip().splitlines()) == 1
        assert (out / "metrics.jsonl").read_text() == "kept\n"
        assert not launch.holds_other_run(tmp_path / "empty") and (out / LOCK_FILE).exists()
    only_lock = tmp_path / "only-lock"
    only_lock.mkdir()
    (only_lock / LOCK_FILE).write_text("1\n")
    assert not launch.holds_other_run(only_lock)
    assert launch.holds_other_run(out)


def test_deepspeed_launch_command():
    cmd = launch.deepspeed_command("/venv/bin/deepspeed", nproc=4, config=Path("out/deepspeed/ds_config.json"),
                                   recipe="r.yaml", sets=["training.max_steps=5"], port=29555, resume=True,
                                   display="quiet")
    assert cmd == ["/venv/bin/deepspeed", "--num_gpus", "4", "--master_port", "29555", "--no_local_rank",
                   "--module", "fuyoucli.distributed.deepspeed_train", "--deepspeed-config",
                   "out/deepspeed/ds_config.json", "r.yaml", "--set", "training.max_steps=5", "--display", "quiet",
                   "--resume"]
    multi = launch.deepspeed_command("ds", nproc=8, config=Path("c.json"), recipe="r.yaml", sets=[],
                                     hostfile=Path("hosts"), overwrite=True, gradient_checkpointing=True)
    assert multi[:5] == ["ds", "--hostfile", "hosts", "--num_gpus", "8"] and "--overwrite" in multi
    assert multi[-1] == "--gradient-checkpointing"
    from fuyoucli.distributed.deepspeed_train import _parser

    parsed = _parser().parse_args(multi[multi.index("--deepspeed-config"):])
    assert parsed.recipe == "r.yaml" and parsed.overwrite and parsed.gradient_checkpointing


def test_rank_environment_and_hostfile(tmp_path):
    env = launch.rank_env({"PATH": "/bin"}, rank=1, world=2, port=1234, cores=8)
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")} \
        == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234",
            "OMP_NUM_THREADS": "4"}
    assert launch.rank_env({"OMP_NUM_THREADS": "1"}, rank=0, world=2, port=1)["OMP_NUM_THREADS"] == "1"
    hosts = tmp_path / "hosts"
    hosts.write_text("# two machines\nworker-1 slots=8\nworker-2 slots=8\n")
    assert launch.hostfile_hosts(hosts) == 2
    hosts.write_text("# none\n")
    with pytest.raises(Exception, match="names no machine"):
        launch.hostfile_hosts(hosts)
