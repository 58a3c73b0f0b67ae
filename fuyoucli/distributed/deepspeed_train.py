"""The training script DeepSpeed's launcher runs for `fuyou finetune RECIPE --engine deepspeed`.

Run stage on DeepSpeed: fuyou's recipe loading, data pipeline, model + LoRA loading and schedule;
DeepSpeed's engine (ZeRO-3, offload) for the forward/backward/step with the config `fuyou plan
--export deepspeed` writes. Rank 0 writes metrics.jsonl (fuyou's sinks) and the final model;
checkpoints are DeepSpeed's own (OUTPUT_DIR/checkpoints/step-NNNNNNNN, ZeRO shards) plus
fuyou_deepspeed.json (step, data position, recipe) for --resume and `fuyou export`. Never imports rich.
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


class _EngineEval:
    """run.evaluate's trainer interface over a DeepSpeed engine. Every rank evaluates every batch:
    under ZeRO-3 a forward gathers parameters collectively, so all ranks must run the same forwards."""

    def __init__(self, engine, head: str, label_token_ids: tuple[int, ...]):
        self.engine, self.head, self.label_token_ids = engine, head, label_token_ids

    @torch.no_grad()
    def eval_losses(self, micro: list[dict]):
        from fuyoucli.train.losses import batch_loss

        self.engine.eval()
        try:
            return [batch_loss(self.engine, {k: v.to(self.engine.device) for k, v in mb.items()}, head=self.head,
                               label_token_ids=self.label_token_ids) for mb in micro]
        finally:
            self.engine.train()


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


def run(recipe: Recipe, config: dict, sinks: list, *, overwrite: bool = False, resume: str | bool | None = None,
        recipe_path: str | None = None, gradient_checkpointing: bool = False):
    import deepspeed
    import torch.distributed as dist

    from fuyoucli.checkpoint import checkpoint_name, checkpoint_root, latest_checkpoint, list_checkpoints
    from fuyoucli.distributed.deepspeed_export import export_deepspeed_checkpoint
    from fuyoucli.model.loading import load_model, load_tokenizer
    from fuyoucli.telemetry.events import (CheckpointSaved, RunFinished, RunInterrupted, RunStarted, Sinks,
                                           StepDone)
    from fuyoucli.telemetry.jsonl import JsonlSink
    from fuyoucli.train.data import build_datasets
    from fuyoucli.train.first_order import adamw_param_groups
    from fuyoucli.train.losses import batch_loss, count_targets
    from fuyoucli.train.run import MicroBatches, StopRequests, TrainingDiverged, evaluate, prepare_output_dir, total_steps
    from fuyoucli.train.lr_schedule import lr_at

    if recipe.method.name != "adamw":
        from fuyoucli.distributed.deepspeed_config import ZO_ON_DEEPSPEED

        raise RecipeError(ZO_ON_DEEPSPEED)
    rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    micro_size, accum = check_batch(config, recipe, world)
    t = recipe.training
    out_dir = Path(t.output_dir)
    root = checkpoint_root(out_dir)
    t0 = time.perf_counter()
    ckpt_dir: Path | None = None
    if resume:
        ckpt_dir = latest_checkpoint(root) if resume is True else Path(resume)
        if ckpt_dir is None or not (ckpt_dir / STATE_FILE).is_file():
            raise FuyouError(f"no DeepSpeed checkpoint to resume from under {root}" if ckpt_dir is None else
                             f"{ckpt_dir} is not a checkpoint of a DeepSpeed run (no {STATE_FILE})")
    elif lead:
        if holds_other_run(out_dir) and not overwrite:
            raise FuyouError(f"output directory {out_dir} already holds a run; set training.output_dir elsewhere, "
                             "pass --overwrite to replace it, or --resume to continue it")
        prepare_output_dir(out_dir, overwrite=True)  # checked just above; keeps OUTPUT_DIR/deepspeed
    dist.barrier()

    seed = t.seed
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(recipe.model)
    data = build_datasets(recipe.data, tokenizer, seed=seed, head=recipe.model.head)
    num_labels = len(data.label_names) or None
    # Every rank builds the model on the host; deepspeed.initialize partitions it (ZeRO-3) and places it.
    model = load_model(recipe.model, recipe.peft, seed=seed, pad_token_id=tokenizer.pad_token_id,
                       num_labels=num_labels, device="cpu")
    if gradient_checkpointing:  # the plan recomputes activations in the backward rather than keeping them
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=adamw_param_groups(trainable, recipe.method.weight_decay))
    steps = total_steps(recipe, len(data.train))
    m, head, labels = recipe.method, recipe.model.head, data.label_token_ids
    start, position = 0, (0, 0)
    if ckpt_dir is not None:
        engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)
        saved = json.loads((ckpt_dir / STATE_FILE).read_text(encoding="utf-8"))
        start, position = int(saved["step"]), (saved["data"]["epoch"], saved["data"]["index"])
    all_sinks = Sinks([JsonlSink(out_dir / "metrics.jsonl", keep_through_step=start if ckpt_dir else None),
                       *sinks] if lead else [])

    def save(step: int, reason: str) -> CheckpointSaved:
        began = time.perf_counter()
        tag = checkpoint_name(step)
        engine.save_checkpoint(str(root), tag=tag)
        dist.barrier()  # every rank's shards are written before the checkpoint is described and old ones pruned
        if lead:
            (root / tag / STATE_FILE).write_text(json.dumps({
                "step": step, "total_steps": steps, "data": {"epoch": stream.position[0], "index": stream.position[1]},
                "world_size": world, "deepspeed": deepspeed.__version__,
                "recipe": recipe.model_dump(mode="json", exclude_unset=True)}, indent=1), encoding="utf-8")
            for old in list_checkpoints(root)[:-t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        nbytes = sum(f.stat().st_size for f in (root / tag).rglob("*") if f.is_file()) if lead else 0
        return CheckpointSaved(step=step, path=str(root / tag), nbytes=nbytes, seconds=time.perf_counter() - began,
                               kind="full", reason=reason)

    stream = MicroBatches(data, recipe, torch.device("cpu"), position)
    evaluator = _EngineEval(engine, head, labels)
    try:
        all_sinks.emit(RunStarted(
            name=recipe.name, method="adamw" + (" + lora" if recipe.peft.type == "lora" else ""),
            model=recipe.model.path, device=f"{engine.device} x {world} ranks",
            offload=f"deepspeed {deepspeed.__version__} ZeRO-{config.get('zero_optimization', {}).get('stage', 0)}: "
                    f"micro-batch {micro_size} x {accum} per rank",
            total_steps=steps, trainable_params=n_trainable, total_params=n_total, train_examples=len(data.train),
            eval_examples=len(data.eval), output_dir=str(out_dir), start_step=start))
        first_eval = last_eval = (evaluate(evaluator, data, recipe, engine.device, step=0)
                                  if not start and t.eval_before else None)
        if first_eval:
            all_sinks.emit(first_eval)
        with StopRequests(t.checkpoint_on_interrupt) as stop:
            for step in range(start + 1, steps + 1):
                # The step's examples are the single-GPU run's: every rank draws them, each takes its slice.
                chunks = split_step([next(stream) for _ in range(t.grad_accum)], micro_size)
                targets = sum(count_targets(c, head) for c in chunks)
                lr = lr_at(step, peak_lr=m.lr, total_steps=steps, warmup_steps=m.warmup_steps, schedule=m.schedule)
                for group in engine.optimizer.param_groups:
                    group["lr"] = lr  # fuyou's schedule, step for step (the config's scheduler only guides others)
                began = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
                for c in chunks[rank * accum:(rank + 1) * accum]:
                    out = batch_loss(engine, {k: v.to(engine.device) for k, v in c.items()}, head=head,
                                     label_token_ids=labels)
                    # DeepSpeed divides by the accumulation steps and averages over ranks; this scale makes
                    # the gradient that of the whole step's summed loss over its target tokens, as fuyou's.
                    engine.backward(out.loss_sum * (accum * world / max(targets, 1)))
                    engine.step()
                    loss_sum += out.loss_sum.detach().double()
                dist.all_reduce(loss_sum)
                loss = float(loss_sum) / max(targets, 1)
                elapsed = time.perf_counter() - began
                if loss != loss or loss in (float("inf"), float("-inf")):
                    raise TrainingDiverged(f"the loss became {loss} at step {step}: lower method.lr (now {m.lr:g})")
                norm = engine.get_global_grad_norm()
                extra = {"target_tokens": targets, **({"grad_norm": float(norm)} if norm is not None else {})}
                all_sinks.emit(StepDone(step=step, loss=loss, lr=lr, step_time_s=elapsed, extra=extra, started_s=began,
                                        tokens=int(sum(int(c["attention_mask"].sum()) for c in chunks))))
                if t.eval_every and step % t.eval_every == 0 and step != steps:
                    last_eval = evaluate(evaluator, data, recipe, engine.device, step=step) or last_eval
                    if last_eval and last_eval.step == step:
                        all_sinks.emit(last_eval)
                flag = torch.tensor([float(stop.requested is not None)], device=engine.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                if (t.checkpoint_every and step % t.checkpoint_every == 0 and step != steps) or flag.item():
                    all_sinks.emit(save(step, "interrupt" if flag.item() else "scheduled"))
                if flag.item():
                    all_sinks.emit(RunInterrupted(step=step, checkpoint=str(root / checkpoint_name(step)),
                                                  resume_hint=f"fuyou finetune {recipe_path or 'RECIPE'} "
                                                              "--engine deepspeed --resume"))
                    raise KeyboardInterrupt
        last_eval = evaluate(evaluator, data, recipe, engine.device, step=steps)
        if last_eval:
            all_sinks.emit(last_eval)
        # The final state is DeepSpeed's checkpoint; the Hugging Face folder is consolidated from it on the
        # host (zero_to_fp32), so no rank ever gathers the whole model on its device.
        all_sinks.emit(save(steps, "final"))
        model_dir = out_dir / "model"
        if lead:
            export_deepspeed_checkpoint(root / checkpoint_name(steps), model_dir, overwrite=True)
        dist.barrier()
        finished = RunFinished(steps=steps, wall_time_s=time.perf_counter() - t0, model_dir=str(model_dir),
                               first_eval=first_eval, last_eval=last_eval)
        all_sinks.emit(finished)
        return finished
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
    from fuyoucli.distributed.zo_run import _sinks

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
        run(recipe, config, _sinks(recipe, args.display) if rank == 0 else [], overwrite=args.overwrite,
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
