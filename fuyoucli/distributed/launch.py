"""Starting the processes of a multi-process run: N local zo2 ranks, or DeepSpeed's own launcher.

Between the CLI and the run stage: builds command lines and environments (pure functions, tested
without starting anything), then starts them and waits. When one rank fails the others are stopped at
once (they would otherwise wait in a collective until its timeout). Imports no torch at import time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.folder_lock import LOCK_FILE, folder_lock


class LaunchError(FuyouError):
    """--nproc / --engine / --hostfile / --trace asked for what the launch cannot do: bad input, like a recipe's."""

    exit_code = 2

DEEPSPEED_ENTRY = "fuyoucli.distributed.deepspeed_train"
ZO_ENTRY = "fuyoucli.distributed.zo_run"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(base: dict[str, str], *, rank: int, world: int, port: int, cores: int | None = None) -> dict[str, str]:
    """torchrun's variables for local rank `rank` of `world` (one node)."""
    env = dict(base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(max(1, (cores or os.cpu_count() or 1) // world))
    return env


def worker_args(recipe: str, sets: list[str], *, overwrite: bool = False, resume: str | bool | None = None,
                display: str = "plain", allow_data_change: bool = False) -> list[str]:
    args = [recipe, *[a for s in sets for a in ("--set", s)], "--display", display]
    if overwrite:
        args.append("--overwrite")
    if resume:
        args += ["--resume"] + ([] if resume is True else [str(resume)])
    if allow_data_change:
        args.append("--allow-data-change")
    return args


def run_local(module: str, args: list[str], nproc: int, *, env: dict[str, str] | None = None) -> int:
    """Start `python -m module args` as ranks 0..nproc-1 on this machine; wait; the first failure's exit code."""
    base = dict(os.environ if env is None else env)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *args],
                              env=rank_env(base, rank=r, world=nproc, port=port))
             for r in range(nproc)]
    return _wait(procs)


def _wait(procs: list[subprocess.Popen]) -> int:
    # A Ctrl-C reaches the ranks too (same process group): they finish the step, checkpoint and exit 130.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = 0
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed and code == 0:
                code = failed[0]
                for p in procs:  # the others would block in their next collective until its timeout
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.05)
        return code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        signal.signal(signal.SIGINT, previous)


def check_data_parallel_recipe(recipe, world: int) -> None:
    """What the data-parallel ZO path cannot run, as one-line errors (checked before spawning ranks)."""
    if recipe.method.name != "zo2":
        raise RecipeError("--nproc with the fuyou engine runs zeroth-order (method zo2) only; first-order "
                          "data-parallel training runs on DeepSpeed: add --engine deepspeed "
                          "(pip install 'fuyoucli[deepspeed]')")
    if recipe.training.grad_accum < world:
        raise RecipeError(f"training.grad_accum {recipe.training.grad_accum} < {world} processes: each rank "
                          f"evaluates whole micro-batches of a step; set grad_accum to a multiple of {world} "
                          "(and divide batch_size to keep the examples per step)")


# ---- DeepSpeed -----------------------------------------------------------------------------------


def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise FuyouError(f"--engine deepspeed needs DeepSpeed, which is not installed: {_hint()}")


def _hint() -> str:
    from fuyoucli.distributed.deepspeed_config import INSTALL_HINT

    return INSTALL_HINT


def deepspeed_launcher() -> str:
    """The `deepspeed` script beside this Python (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).with_name("deepspeed")
    found = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if not found:
        raise FuyouError(f"DeepSpeed is installed but its `deepspeed` launcher is not on PATH; reinstall: {_hint()}")
    return found


def deepspeed_command(launcher: str, *, nproc: int, config: Path, recipe: str, sets: list[str],
                      hostfile: Path | None = None, port: int | None = None, overwrite: bool = False,
                      resume: str | bool | None = None, display: str = "plain",
                      gradient_checkpointing: bool = False) -> list[str]:
    """`deepspeed [--hostfile H] --num_gpus N --module fuyoucli.distributed.deepspeed_train ...`.
    LOCAL_RANK comes from the environment (--no_local_rank), as torchrun passes it."""
    cmd = [launcher]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    cmd += ["--num_gpus", str(nproc)]
    if port is not None:
        cmd += ["--master_port", str(port)]
    cmd += ["--no_local_rank", "--module", DEEPSPEED_ENTRY, "--deepspeed-config", str(config),
            *worker_args(recipe, sets, overwrite=overwrite, resume=resume, display=display)]
    if gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    return cmd


def run_deepspeed(cmd: list[str], *, env: dict[str, str] | None = None) -> int:
    proc = subprocess.Popen(cmd, env=dict(os.environ if env is None else env))
    return _wait([proc])


# ---- what `fuyou finetune --engine deepspeed / --nproc N` does -------------------------------------


def holds_other_run(out_dir: Path) -> bool:
    """A run's folder already in use; OUTPUT_DIR/deepspeed (the config this launch writes) and the
    launcher's lock file do not count."""
    return out_dir.is_dir() and any(p.name not in ("deepspeed", LOCK_FILE) for p in out_dir.iterdir())


def hostfile_hosts(path: Path) -> int:
    """Machines named in a DeepSpeed hostfile (`host slots=N` lines; # comments)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LaunchError(f"cannot read hostfile {path}: {e.strerror or e}") from None
    hosts = [ln.split()[0] for ln in lines if ln.split() and not ln.lstrip().startswith("#")]
    if not hosts:
        raise LaunchError(f"hostfile {path} names no machine (expected lines like `worker-1 slots=8`)")
    return len(hosts)


def write_run_config(recipe, *, world: int):
    """Plan the recipe on this machine and write OUTPUT_DIR/deepspeed/ds_config.json (+ .notes.md).
    Returns (the config's path, the plan or None)."""
    from fuyoucli.distributed.deepspeed_config import deepspeed_config, write_export
    from fuyoucli.model.inventory import inventory
    from fuyoucli.train.planning import plan_for_run

    d = recipe.data
    labels = len(d.labels or d.label_words) or None
    plan = plan_for_run(recipe, num_labels=labels)
    inv = inventory(recipe.model, recipe.peft, num_labels=labels)
    from fuyoucli.engine.lanes import compute_device

    export = deepspeed_config(recipe, plan, _profile_or_none(recipe) if plan is not None else None, world_size=world,
                              max_tensor_params=max((b.max_tensor_params for b in inv.blocks), default=0),
                              compute_device=compute_device().type)
    path, _ = write_export(export, Path(recipe.training.output_dir) / "deepspeed" / "ds_config.json",
                           recipe=recipe, plan=plan, world_size=world)
    return path, plan


def _profile_or_none(recipe):
    from fuyoucli.train.planning import machine_profile

    return machine_profile(recipe, lambda s: None)


def launch(recipe, *, recipe_path: str, sets: list[str], engine: str, nproc: int, hostfile: Path | None,
           overwrite: bool, resume: str | bool | None, display: str, trace: Path | None,
           allow_data_change: bool = False) -> int:
    """Start the run's processes; returns the exit code of the run (0, or the first failing rank's).
    `allow_data_change` is the zo2 ranks' (DeepSpeed's checkpoints record no data files)."""
    if trace is not None:
        raise LaunchError("--trace records one process's lanes: not available with --nproc or --engine deepspeed")
    if engine == "deepspeed":
        from fuyoucli.distributed.deepspeed_config import ZO_ON_DEEPSPEED

        if recipe.method.name != "adamw":
            raise RecipeError(ZO_ON_DEEPSPEED)
        from fuyoucli.train.preflight import check_output_writable

        out_dir = Path(recipe.training.output_dir)
        # The launcher holds the output folder's lock while its ranks run, as a fuyou-engine run does:
        # a second process must not overwrite, resume into or prune a live DeepSpeed run's folder.
        check_output_writable(out_dir)
        with folder_lock(out_dir, what="training.output_dir"):
            require_deepspeed()
            launcher = deepspeed_launcher()
            if not resume and not overwrite and holds_other_run(out_dir):
                raise LaunchError(f"output directory {out_dir} already holds a run; set training.output_dir "
                                  "elsewhere, pass --overwrite to replace it, or --resume to continue it")
            world = nproc * (hostfile_hosts(hostfile) if hostfile is not None else 1)
            config, plan = write_run_config(recipe, world=world)
            # The plan's recomputed activations become the model's gradient checkpointing (DeepSpeed's own
            # activation_checkpointing section only serves models written for deepspeed.checkpointing).
            recompute = plan is not None and any(b.activation in ("recompute", "recompute-swap") for b in plan.blocks)
            cmd = deepspeed_command(launcher, nproc=nproc, config=config, recipe=recipe_path, sets=sets,
                                    hostfile=hostfile, port=None if hostfile else free_port(), overwrite=overwrite,
                                    resume=resume, display=display, gradient_checkpointing=recompute)
            return run_deepspeed(cmd)
    if hostfile is not None:
        raise LaunchError("--hostfile is for --engine deepspeed; the fuyou engine's --nproc ranks run on this "
                         "machine (across machines: torchrun ... -m fuyoucli.distributed.zo_run RECIPE)")
    check_data_parallel_recipe(recipe, nproc)
    return run_local(ZO_ENTRY, worker_args(recipe_path, sets, overwrite=overwrite, resume=resume, display=display,
                                           allow_data_change=allow_data_change), nproc)
