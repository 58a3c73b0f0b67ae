"""The training script DeepSpeed's launcher runs for `fuyou finetune RECIPE --engine deepspeed`.

Run stage on DeepSpeed: fuyou's recipe loading, data pipeline, model + LoRA loading, schedule and run
loop (train/loop.py); DeepSpeed's engine (ZeRO-3, offload) for the forward/backward/step, behind the
loop's trainer interface, with the config `fuyou plan --export deepspeed` writes. Rank 0 writes
metrics.jsonl (fuyou's sinks) and the final model; checkpoints are DeepSpeed's own
(OUTPUT_DIR/checkpoints/step-NNNNNNNN, ZeRO shards) plus fuyou_deepspeed.json (step, data position,
recipe) for --resume and `fuyou export`. Never imports rich.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from fuyoucli.distributed.deepspeed_export import STATE_FILE
from fuyoucli.distributed.launch import holds_other_run
from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.recipe import Recipe


def split_step(micro: list[dict], size: int) -> list[dict]:
    """The recipe's micro-batches (training.batch_size rows each) cut into the config's micro-batches."""
    out = []
    for mb in micro:
        rows = mb["input_ids"].shape[0]
        if rows % size:
            raise FuyouError(f"training.batch_size {rows} is not a multiple of the DeepSpeed config's "
                             f"train_micro_batch_size_per_gpu {size}; export the config again")
        out += [{k: v[i:i + size] for k, v in mb.items()} for i in range(0, rows, size)]
    return out


def check_batch(config: dict, recipe: Recipe, world: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) from the config, checked against the recipe and the world size."""
    micro, accum = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps")
    per_step = recipe.training.batch_size * recipe.training.grad_accum
    if not isinstance(micro, int) or not isinstance(accum, int) or micro * accum * world != per_step:
        raise FuyouError(f"the DeepSpeed config's micro-batch {micro} x accumulation {accum} x {world} ranks is not "
                         f"the recipe's {per_step} examples per step; export it for --world-size {world}")
    return micro, accum


class DeepSpeedRanks:
    """The loop's ranks over DeepSpeed's process group. The stop flag travels as a tensor on the engine's
    device (NCCL reduces no host tensors)."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        self.dist.barrier()


class EngineTrainer:
    """The loop's trainer interface over a DeepSpeed engine. A step runs this rank's share of the step's
    micro-batches (cut to the config's micro-batch) through the engine; an evaluation runs every batch on
    every rank: under ZeRO-3 a forward gathers parameters collectively, so all ranks run the same forwards."""

    def __init__(self, engine, recipe: Recipe, label_token_ids: tuple[int, ...], *, micro_size: int, accum: int,
                 ranks: DeepSpeedRanks):
        self.engine, self.head, self.label_token_ids = engine, recipe.model.head, label_token_ids
        self.micro_size, self.accum, self.ranks = micro_size, accum, ranks

    def step(self, step: int, micro: list[dict], lr: float):
        from fuyoucli.train.losses import batch_loss, count_targets
        from fuyoucli.train.trainers import StepOutcome

        engine, rank, world, accum = self.engine, self.ranks.rank, self.ranks.world, self.accum
        # The step's examples are the single-GPU run's: every rank draws them, each takes its slice.
        chunks = split_step(micro, self.micro_size)
        targets = sum(count_targets(c, self.head) for c in chunks)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr  # fuyou's schedule, step for step (the config's scheduler only guides others)
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        for c in chunks[rank * accum:(rank + 1) * accum]:
            out = batch_loss(engine, {k: v.to(engine.device) for k, v in c.items()}, head=self.head,
                             label_token_ids=self.label_token_ids)
            # DeepSpeed divides by the accumulation steps and averages over ranks; this scale makes
            # the gradient that of the whole step's summed loss over its target tokens, as fuyou's.
            engine.backward(out.loss_sum * (accum * world / max(targets, 1)))
            engine.step()
            loss_sum += out.loss_sum.detach().double()
        self.ranks.dist.all_reduce(loss_sum)
        norm = engine.get_global_grad_norm()
        return StepOutcome(float(loss_sum) / max(targets, 1), targets,
                           extra={"grad_norm": float(norm)} if norm is not None else {})

    @torch.no_grad()
    def eval_losses(self, micro: list[dict]):
        from fuyoucli.train.losses import batch_loss

        self.engine.eval()
        try:
            return [batch_loss(self.engine, {k: v.to(self.engine.device) for k, v in mb.items()}, head=self.head,
                               label_token_ids=self.label_token_ids) for mb in micro]
        finally:
            self.engine.train()


class DeepSpeedCheckpoints:
    """The loop's checkpoint writer: DeepSpeed's own checkpoint (every rank writes its ZeRO shards) plus
    fuyou_deepspeed.json (step, data position, recipe), every training.checkpoint_every steps."""

    supported = True

    def __init__(self, engine, recipe: Recipe, root: Path, *, total_steps: int, ranks: DeepSpeedRanks):
        self.engine, self.recipe, self.root, self.total_steps, self.ranks = engine, recipe, root, total_steps, ranks
        self.last_saved: Path | None = None

    def record(self, step: int, grads, lr: float) -> None:
        pass

    def due(self, step: int) -> bool:
        every = self.recipe.training.checkpoint_every
        return bool(every) and step % every == 0

    def save(self, step: int, *, position: tuple[int, int], first_eval=None, last_eval=None,
             reason: str = "scheduled"):
        import deepspeed

        from fuyoucli.checkpoint import checkpoint_name, list_checkpoints
        from fuyoucli.telemetry.events import CheckpointSaved

        began = time.perf_counter()
        root, tag, lead = self.root, checkpoint_name(step), self.ranks.is_main
        self.engine.save_checkpoint(str(root), tag=tag)
        self.ranks.barrier()  # every rank's shards are written before the checkpoint is described and old ones pruned
        if lead:
            (root / tag / STATE_FILE).write_text(json.dumps({
                "step": step, "total_steps": self.total_steps, "data": {"epoch": position[0], "index": position[1]},
                "world_size": self.ranks.world, "deepspeed": deepspeed.__version__,
                "recipe": self.recipe.model_dump(mode="json", exclude_unset=True)}, indent=1), encoding="utf-8")
            for old in list_checkpoints(root)[:-self.recipe.training.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.ranks.barrier()
        self.last_saved = root / tag
        nbytes = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file()) if lead else 0
        return CheckpointSaved(step=step, path=str(root / tag), nbytes=nbytes, seconds=time.perf_counter() - began,
                               kind="full", reason=reason)


def _open_run(recipe: Recipe, out_dir: Path, root: Path, *, overwrite: bool, resume, lead: bool) -> Path | None:
    """The checkpoint --resume names (checked), or, for a new run, the output folder made ready (rank 0)."""
    from fuyoucli.checkpoint import latest_checkpoint
    from fuyoucli.train.run import prepare_output_dir

    if resume:
        ckpt_dir = latest_checkpoint(root) if resume is True else Path(resume)
        if ckpt_dir is None or not (ckpt_dir / STATE_FILE).is_file():
            raise FuyouError(f"no DeepSpeed checkpoint to resume from under {root}" if ckpt_dir is None else
                             f"{ckpt_dir} is not a checkpoint of a DeepSpeed run (no {STATE_FILE})")
        return ckpt_dir
    if lead:
        if holds_other_run(out_dir) and not overwrite:
            raise FuyouError(f"output directory {out_dir} already holds a run; set training.output_dir elsewhere, "
                             "pass --overwrite to replace it, or --resume to continue it")
        prepare_output_dir(out_dir, overwrite=True)  # checked just above; keeps OUTPUT_DIR/deepspeed
    return None


def _engine(recipe: Recipe, config: dict, model, gradient_checkpointing: bool):
    """deepspeed.initialize over the host-built model (ZeRO-3 partitions and places it); returns the engine
    and the (trainable, total) parameter counts."""
    import deepspeed

    from fuyoucli.train.first_order import adamw_param_groups

    if gradient_checkpointing:  # the plan recomputes activations in the backward rather than keeping them
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    counts = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=adamw_param_groups(trainable, recipe.method.weight_decay))
    return engine, counts


def run(recipe: Recipe, config: dict, sinks: list, *, overwrite: bool = False, resume: str | bool | None = None,
        recipe_path: str | None = None, gradient_checkpointing: bool = False):
    import deepspeed
    import torch.distributed as dist

    from fuyoucli.checkpoint import checkpoint_name, checkpoint_root
    from fuyoucli.distributed.deepspeed_export import export_deepspeed_checkpoint
    from fuyoucli.model.loading import load_model
    from fuyoucli.telemetry.events import RunStarted, Sinks
    from fuyoucli.telemetry.jsonl import JsonlSink
    from fuyoucli.train.loop import Loop, Start, run_loop, total_steps
    from fuyoucli.train.run import load_data

    if recipe.method.name != "adamw":
        from fuyoucli.distributed.deepspeed_config import ZO_ON_DEEPSPEED

        raise RecipeError(ZO_ON_DEEPSPEED)
    lead, world = dist.get_rank() == 0, dist.get_world_size()
    micro_size, accum = check_batch(config, recipe, world)
    out_dir = Path(recipe.training.output_dir)
    root = checkpoint_root(out_dir)
    t0 = time.perf_counter()
    ckpt_dir = _open_run(recipe, out_dir, root, overwrite=overwrite, resume=resume, lead=lead)
    dist.barrier()

    seed = recipe.training.seed
    torch.manual_seed(seed)
    tokenizer, data, num_labels = load_data(recipe, [])
    # Every rank builds the model on the host; deepspeed.initialize partitions it (ZeRO-3) and places it.
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=num_labels, device="cpu")
    engine, (n_trainable, n_total) = _engine(recipe, config, model, gradient_checkpointing)
    steps = total_steps(recipe, len(data.train))
    start = Start()
    if ckpt_dir is not None:
        engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        saved = json.loads((ckpt_dir / STATE_FILE).read_text(encoding="utf-8"))
        start = Start(step=int(saved["step"]), position=(saved["data"]["epoch"], saved["data"]["index"]),
                      resumed=True)
    all_sinks = Sinks([JsonlSink(out_dir / "metrics.jsonl", keep_through_step=start.step if ckpt_dir else None),
                       *sinks] if lead else [])
    ranks = DeepSpeedRanks(engine.device)
    checkpoints = DeepSpeedCheckpoints(engine, recipe, root, total_steps=steps, ranks=ranks)

    def finish(sinks: Sinks, position: tuple[int, int]) -> Path:
        # The final state is DeepSpeed's checkpoint; the Hugging Face folder is consolidated from it on the
        # host (zero_to_fp32), so no rank ever gathers the whole model on its device.
        sinks.emit(checkpoints.save(steps, position=position, reason="final"))
        model_dir = out_dir / "model"
        if lead:
            export_deepspeed_checkpoint(root / checkpoint_name(steps), model_dir, overwrite=True, final_step=steps)
        ranks.barrier()
        return model_dir

    try:
        started = RunStarted(
            name=recipe.name, method="adamw" + (" + lora" if recipe.peft.type == "lora" else ""),
            model=recipe.model.path, device=f"{engine.device} x {world} ranks",
            offload=f"deepspeed {deepspeed.__version__} ZeRO-{config.get('zero_optimization', {}).get('stage', 0)}: "
                    f"micro-batch {micro_size} x {accum} per rank",
            total_steps=steps, trainable_params=n_trainable, total_params=n_total, train_examples=len(data.train),
            eval_examples=len(data.eval), output_dir=str(out_dir), start_step=start.step)
        trainer = EngineTrainer(engine, recipe, data.label_token_ids, micro_size=micro_size, accum=accum, ranks=ranks)
        hint = f"fuyou finetune {recipe_path or 'RECIPE'} --engine deepspeed --resume"
        return run_loop(Loop(recipe, data, trainer, checkpoints, all_sinks, engine.device, steps, started,
                             resume_hint=hint, finish=finish, t0=t0, ranks=ranks), start)
    finally:
        all_sinks.close()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuyoucli.distributed.deepspeed_train",
                                description="One rank of `fuyou finetune RECIPE --engine deepspeed`.")
    p.add_argument("recipe")
    p.add_argument("--deepspeed-config", required=True)
    p.add_argument("--set", action="append", default=[], dest="set_")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--resume", nargs="?", const="newest", default=None)
    p.add_argument("--display", choices=("plain", "quiet", "json"), default="plain")
    p.add_argument("--gradient-checkpointing", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    from fuyoucli.distributed.zo_run import make_sinks

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    who = "" if rank == 0 else f"rank {rank}: "
    try:
        from fuyoucli.recipe import load_recipe

        recipe = load_recipe(args.recipe, args.set_)
        try:
            config = json.loads(Path(args.deepspeed_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FuyouError(f"cannot read the DeepSpeed config {args.deepspeed_config}: {e}") from None
        import deepspeed

        deepspeed.init_distributed()
        resume = None if args.resume is None else (True if args.resume == "newest" else args.resume)
        command = args.recipe + "".join(f" --set {s}" for s in args.set_)
        run(recipe, config, make_sinks(recipe, args.display) if rank == 0 else [], overwrite=args.overwrite,
            resume=resume, recipe_path=command, gradient_checkpointing=args.gradient_checkpointing)
    except KeyboardInterrupt:
        if rank == 0:
            print("fuyou: interrupted", file=sys.stderr)
        return 130
    except FuyouError as e:
        if os.environ.get("FUYOU_DEBUG", "") not in ("", "0"):
            raise
        print(f"fuyou: {who}error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
