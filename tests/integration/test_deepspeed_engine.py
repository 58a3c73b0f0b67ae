"""`fuyou finetune RECIPE --engine deepspeed` end to end on CPU processes (DeepSpeed's CPU accelerator, gloo):
DeepSpeed's own launcher, two ranks, ZeRO-3, the same metrics.jsonl as fuyou's in-memory AdamW run of the
recipe, DeepSpeed checkpoints, and `fuyou export` of one into a Hugging Face folder. Skipped without the
[deepspeed] extra (tests/unit/test_deepspeed_config.py and test_distributed_cli.py cover the rest), and on
a machine with CUDA (DeepSpeed would place the ranks on GPUs).

On a CPU DeepSpeed compiles its shared-memory collective (deepspeed_shm_comm) the first time a process
group starts: about 90 s on 2 cores, once per machine (cached under torch's extensions folder). The test
runs in about 25 s once it is built; until then it is skipped unless FUYOU_TEST_DEEPSPEED=1 asks to build it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
if torch.cuda.is_available():
    pytest.skip("runs DeepSpeed on CPU processes; a CUDA machine would put the ranks on GPUs", allow_module_level=True)


def _shm_op_built() -> bool:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob("**/deepspeed_shm_comm*.so"))


if not _shm_op_built() and os.environ.get("FUYOU_TEST_DEEPSPEED") != "1":
    pytest.skip("DeepSpeed's CPU collective is not compiled yet (about 90 s, once): set FUYOU_TEST_DEEPSPEED=1 "
                "to build it and run this test", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from fuyoucli.cli.app import main  # noqa: E402
from fuyoucli.recipe import load_recipe  # noqa: E402
from fuyoucli.telemetry.jsonl import read_metrics  # noqa: E402
from fuyoucli.train.run import finetune  # noqa: E402

ROOT = Path(__file__).parents[2]


def write_recipe(path: Path, model: Path, data: Path, out: Path) -> Path:
    path.write_text(f"""name: ds-e2e
model: {{path: {model}}}
method: {{name: adamw, lr: 1.0e-3, weight_decay: 0.01, max_grad_norm: 1.0, schedule: linear, warmup_steps: 1}}
data: {{train: {data}, max_length: 24, max_eval_examples: 4}}
training: {{max_steps: 3, batch_size: 2, grad_accum: 2, seed: 1, checkpoint_every: 2, output_dir: {out}}}
offload: {{mode: in_memory}}
""")
    return path


def fuyou(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fuyoucli", *args], env=env, capture_output=True, text=True,
                          timeout=240, cwd=ROOT)


def test_deepspeed_engine_matches_fuyous_adamw_and_exports(tiny_models, text_data, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_models["llama"], text_data, tmp_path / "ds")
    done = fuyou("finetune", str(recipe), "--engine", "deepspeed", "--nproc", "2", "--plain")
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    out = tmp_path / "ds"
    assert (out / "deepspeed" / "ds_config.json").is_file() and (out / "deepspeed" / "ds_config.notes.md").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir() if p.is_dir()} >= {"step-00000002", "step-00000003"}
    assert (out / "checkpoints" / "step-00000003" / "fuyou_deepspeed.json").is_file()

    # The same recipe on fuyou's in-memory AdamW: the same examples per step, the same objective.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune(load_recipe(recipe, [f"training.output_dir={tmp_path / 'ref'}"]), sinks=[])
    finally:
        torch.set_num_threads(threads)
    ref, got = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["kind"] for r in got] == [r["kind"] for r in ref]
    for a, b in zip(ref, got):
        assert b["step"] == a["step"]
        # Not bit for bit: DeepSpeed reduces gradients across ranks and flattens them in its own order.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        if a["kind"] == "train":
            assert b["lr"] == pytest.approx(a["lr"]) and b["target_tokens"] == a["target_tokens"]
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)

    # The final model (consolidated from DeepSpeed's last checkpoint) and `fuyou export` of that checkpoint.
    with pytest.raises(SystemExit) as exported:
        main(["export", str(out), str(tmp_path / "hf")])  # the run's folder: its newest checkpoint
    assert exported.value.code == 0
    w_run, w_exp = load_file(str(out / "model" / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    w_ref = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert w_run.keys() == w_exp.keys() == w_ref.keys()
    for k in w_ref:
        assert torch.equal(w_run[k], w_exp[k])
        assert torch.allclose(w_run[k], w_ref[k], rtol=1e-4, atol=1e-5), k
