"""Preflight: what a run must pass before any weight loads and before anything is written.

Trainer-side glue between the plan and the run loop: CUDA requested but absent, the memlock limit
against the bytes the plan pins, free RAM against the plan's host memory, free space in swap_dir and
output_dir against the swap files and the checkpoints the run will write, swap_dir writable (and
whether it takes O_DIRECT), output_dir and swap_dir being writable folders, the model's safetensors
files being whole, an output folder holding another run, and nf4's library being installed. A failure is one line (PreflightError,
exit 2); what is only slower becomes a note. Never imports rich.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fuyoucli.errors import FuyouError, ModelError
from fuyoucli.plan.types import DTYPE_BYTES, Plan, Tier
from fuyoucli.recipe import Recipe
from fuyoucli.resources import resolve_model_path

GiB = 1 << 30
RAM_MARGIN = 0.05
"""Share of available RAM left for the allocator, the tokenizer and the Python heap."""
DISK_MARGIN_BYTES = 64 << 20
"""Free space left on the output disk beyond the checkpoints and the model (swap_dir's disk keeps the
swap store's own margin, engine.tiers.SWAP_MARGIN_BYTES)."""


class PreflightError(FuyouError):
    exit_code = 2


@dataclass(frozen=True)
class Machine:
    """What preflight reads about this machine now (tests pass their own)."""

    cuda: bool
    available_ram_bytes: int
    memlock_bytes: int | None
    """Soft RLIMIT_MEMLOCK; None: unlimited or unknown."""
    free_bytes: Callable[[Path], int]
    device_id: Callable[[Path], int]


def this_machine() -> Machine:
    import psutil

    from fuyoucli.engine.lanes import cuda_available

    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        memlock = None if soft == resource.RLIM_INFINITY else int(soft)
    except (ImportError, ValueError, OSError):
        memlock = None
    return Machine(cuda=cuda_available(), available_ram_bytes=int(psutil.virtual_memory().available),
                   memlock_bytes=memlock, free_bytes=lambda p: shutil.disk_usage(p).free,
                   device_id=lambda p: os.stat(p).st_dev)


def _existing(path: Path) -> Path:
    """The nearest folder that exists at or above `path` (where a new folder would be made)."""
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: float) -> str:
    """Bytes in the largest binary unit that keeps them >= 1 (a tiny model's swap files are KiB, not 0.00 GiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _check_writable_folder(path: Path, key: str, use: str) -> None:
    """`path` (which may not exist yet) can become a folder this process writes: no file in the way,
    a writable filesystem with storage behind it (not /proc or /sys)."""
    base = _existing(path)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{key} {path} is a file; point it at a folder")
    if not base.is_dir():
        raise PreflightError(f"{key} {path} lies under {base}, which is a file; point it at a folder")
    try:
        stat = os.statvfs(base)
    except OSError as e:
        raise PreflightError(f"{key} {path}: cannot read {base}: {e.strerror or e}") from None
    if stat.f_flag & os.ST_RDONLY:
        raise PreflightError(f"{key} {path} is on a read-only filesystem ({base}); point it at a folder {use}")
    if stat.f_blocks == 0:
        raise PreflightError(f"{key} {path} is on a virtual filesystem with no storage ({base}, like /proc or "
                             f"/sys); point it at a folder {use}")
    if not os.access(base, os.W_OK):
        raise PreflightError(f"{key} {path} is not writable ({base}); point it at a folder {use}")


def check_output_writable(out_dir: Path) -> None:
    """The output folder can be created and written (nothing is written to decide that)."""
    _check_writable_folder(out_dir, "training.output_dir", "you can write")


def check_output_dir(out_dir: Path, *, overwrite: bool, resuming: bool) -> None:
    """An output folder that holds another run, or that cannot be written, is refused (nothing is written
    to decide that)."""
    check_output_writable(out_dir)
    if resuming or overwrite or not out_dir.exists():
        return
    if any(out_dir.iterdir()):
        raise PreflightError(f"output directory {out_dir} already holds a run; set training.output_dir elsewhere, "
                             "pass --overwrite to replace it, or --resume to continue it")


def checkpoint_bytes(recipe: Recipe, trainable_params: int, params: int) -> tuple[int, int]:
    """(bytes of one full checkpoint, bytes of the final model) from the recipe and the parameter counts."""
    t = recipe.training
    if recipe.method.name == "zo2":
        home = 4 if recipe.offload.home_dtype in ("auto", "float32") else DTYPE_BYTES[recipe.offload.home_dtype]
        per = home + (4 if recipe.method.variant == "momentum" else 0)  # the momentum is fp32
    else:
        per = 4 * 3  # fp32 master + exp_avg + exp_avg_sq
    one = trainable_params * per if (t.checkpoint_every or t.checkpoint_minutes or t.checkpoint_on_interrupt) else 0
    final_params = trainable_params if recipe.peft.type == "lora" else params
    return one, final_params * DTYPE_BYTES[recipe.model.dtype]


def preflight(recipe: Recipe, plan: Plan | None, *, trainable_params: int, params: int, resuming: bool,
              note: Callable[[str], None], machine: Machine | None = None) -> None:
    machine = machine or this_machine()
    out_dir = Path(recipe.training.output_dir)
    if recipe.model.quantization == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise PreflightError("model.quantization: nf4 needs bitsandbytes, which is not installed: pip install "
                             "'fuyoucli[quant]' (or use quantization: int8, which needs nothing more)")
    if plan is not None and plan.compute_device == "cuda" and not machine.cuda:
        raise PreflightError(f"the plan computes on a CUDA GPU ({plan.machine or 'its hardware profile'}) but this "
                             "machine has none available; plan with this machine's profile (`fuyou profile`) "
                             "or set hardware.preset to a CPU machine")

    pinned = (plan.pinned_pool_bytes + plan.memory.pinned) if plan is not None and plan.compute_device == "cuda" else 0
    if pinned and machine.memlock_bytes is not None and pinned > machine.memlock_bytes and not _pins_past_limit(machine):
        raise PreflightError(f"the plan pins {_gib(pinned)} of host memory but the locked-memory limit is "
                             f"{_gib(machine.memlock_bytes)} (ulimit -l); raise it (ulimit -l unlimited, or "
                             "memlock in /etc/security/limits.conf) or lower offload.host_memory_limit")

    if plan is not None:
        host = plan.memory.pinned + plan.memory.pageable + (plan.memory.device if plan.compute_device == "cpu" else 0)
        room = int(machine.available_ram_bytes * (1 - RAM_MARGIN))
        if host > room:
            raise PreflightError(f"not enough free RAM: the plan needs {_gib(host)} of host memory, "
                                 f"{_gib(machine.available_ram_bytes)} is available now; close other programs, "
                                 "set offload.host_memory_limit (the planner then uses swap_dir), or use a smaller model")

    one_ckpt, final = checkpoint_bytes(recipe, trainable_params, params)
    t = recipe.training
    ledger_only = recipe.method.name == "zo2" and t.zo_ledger_steps > 0
    # Checkpoints kept, plus the one being written; a resumed run's are there already.
    ckpt_bytes = one_ckpt * (1 if resuming else (t.keep_checkpoints + (0 if ledger_only else 1)))
    needs: dict[int, list[tuple[str, Path, int]]] = {}
    out_base = _existing(out_dir)
    needs.setdefault(machine.device_id(out_base), []).append(
        ("output_dir", out_base, ckpt_bytes + final))
    if plan is not None and plan.memory.ssd:
        if not plan.swap_dir:
            raise PreflightError("the plan homes data on SSD but sets no swap_dir; set offload.swap_dir")
        _check_writable_folder(Path(plan.swap_dir), "offload.swap_dir", "on an SSD you can write")
        swap_base = _existing(Path(plan.swap_dir))
        needs.setdefault(machine.device_id(swap_base), []).append(("swap_dir", swap_base, plan.memory.ssd))
    from fuyoucli.engine.tiers import SWAP_MARGIN_BYTES

    for entries in needs.values():
        total = sum(n for _, _, n in entries)
        free = machine.free_bytes(entries[0][1])
        # The swap store refuses to open without its margin: the disk it is on must keep that much free.
        swap = any(name == "swap_dir" for name, _, _ in entries)
        margin = SWAP_MARGIN_BYTES if swap else DISK_MARGIN_BYTES
        if total + margin > free:
            what = " and ".join(f"{name} {path} ({_size(n)})" for name, path, n in entries)
            kept = "for the swap store" if swap else "on the disk"
            raise PreflightError(f"not enough free disk space: {what} need {_size(total)} plus {_size(margin)} "
                                 f"kept free {kept}, {_size(free)} is free; free space, point them at a larger "
                                 "disk, or lower training.keep_checkpoints")

    if plan is not None and any(b.weights_home is Tier.SSD or b.optimizer_home is Tier.SSD for b in plan.blocks):
        _check_swap_dir(Path(plan.swap_dir), note)


def _pins_past_limit(machine: Machine) -> bool:
    """Whether this CUDA driver pins more than RLIMIT_MEMLOCK (it usually does: the limit then binds nothing)."""
    from fuyoucli.engine.lanes import pins_bytes

    return pins_bytes(machine.memlock_bytes + (1 << 20))


def _check_swap_dir(swap: Path, note: Callable[[str], None]) -> None:
    from fuyoucli.engine.tiers import o_direct_works

    _check_writable_folder(swap, "offload.swap_dir", "on an SSD you can write")
    if _existing(swap) == swap and not o_direct_works(swap):
        note(f"swap_dir {swap} does not take O_DIRECT (tmpfs or a network filesystem?): SSD I/O goes through the "
             "page cache, slower and using RAM; put swap_dir on a local ext4/xfs SSD")


def check_model_files(model_spec: str) -> None:
    """A safetensors file shorter than its header says (a download or a copy cut short) is refused here, in
    one line, rather than as a SafetensorError after the output folder was made. Reads headers only."""
    folder = resolve_model_path(model_spec)
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                header_bytes = int.from_bytes(f.read(8), "little") if size >= 8 else size
                if header_bytes > size - 8:
                    raise ValueError
                header = json.loads(f.read(header_bytes))
            data_bytes = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                             default=0)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ModelError(f"model file {path} is damaged ({size} bytes, no readable safetensors header); "
                             "download or copy the model again") from None
        if 8 + header_bytes + data_bytes > size:
            raise ModelError(f"model file {path} is truncated: {size} bytes, its header describes "
                             f"{8 + header_bytes + data_bytes}; download or copy the model again")
