"""The step functions a run can use, behind one small interface: step, eval_losses, finalize, close.

Trainer stage. Composition, not inheritance: each wraps one step implementation (in-memory ZO,
in-memory AdamW, streamed ZO2, streamed AdamW) and the run loop never asks which it has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fuyoucli.checkpoint import CheckpointError
from fuyoucli.engine.lanes import lanes_for
from fuyoucli.engine.timed_lanes import TimedLanes
from fuyoucli.kernels.normal import COUNTER_SOURCE, z_source
from fuyoucli.model.blocks import param_blocks
from fuyoucli.plan.types import Z_PIECE, Plan
from fuyoucli.recipe import Recipe
from fuyoucli.telemetry.timeline import Span, Timeline, busy_seconds
from fuyoucli.train.data import Datasets
from fuyoucli.train.first_order import AdamWReference
from fuyoucli.train.losses import BatchLoss, batch_loss
from fuyoucli.train.plan_inputs import zo_home
from fuyoucli.train.zo import ZOReference, ZOStepResult


@dataclass
class StepOutcome:
    loss: float
    tokens: int
    skipped: bool = False
    extra: dict[str, float] = field(default_factory=dict)
    projected_grads: tuple[float, ...] = ()
    """zo2: the step's projected gradient per direction (with the lr, all a seed ledger records)."""
    applied_lr: float | None = None
    """zo2: the lr the update was applied with, when it is not the scheduled one (conservative variant:
    c * lr, 0 for a rejected step); what the seed ledger records."""
    spans: tuple[Span, ...] = ()
    """What each lane did during the step (compute, copies, SSD, CPU optimizer, waits), for the trace."""


class _Measure:
    """Per-step figures of a streamed trainer: the engine's timed spans and its byte counters.

    Seconds (in StepOutcome.extra, named like the plan's StepTimes): wait_fetch_s / wait_ssd_s, the compute
    lane blocked on a block's weights (still in the upload, or still being read from SSD); h2d_s, d2h_s,
    ssd_read_s, ssd_write_s, cpu_optimizer_s, each lane's busy time. Bytes: h2d_bytes, d2h_bytes,
    ssd_read_bytes, ssd_write_bytes."""

    def __init__(self, timeline: Timeline, engine):
        self.timeline, self.store, self.ssd, self.cpu = timeline, engine.store, engine.ssd, engine.cpu
        self.store.recorder = timeline
        if self.ssd is not None:
            self.ssd.recorder = timeline

    def _counters(self) -> tuple[int, int, int, int]:
        st = self.store.stats
        return (st.h2d_bytes, st.d2h_bytes, self.ssd.bytes_read if self.ssd else 0,
                self.ssd.bytes_written if self.ssd else 0)

    def begin(self) -> None:
        self.timeline.take()  # what evaluation and flushes did belongs to no step
        self._before = self._counters()
        if self.cpu is not None:
            self.cpu.take_trace()

    def end(self, out: StepOutcome) -> StepOutcome:
        spans = self.timeline.take()
        if self.cpu is not None:
            done = self.cpu.take_trace()  # drained, so that a long run's trace stays bounded
            spans += [Span("cpu_optimizer", f"{what} block {key}", t0, t1) for what, key, t0, t1 in done
                      if what in ("adam", "norms")]
        after = self._counters()
        out.extra.update({
            "wait_fetch_s": sum(s.seconds for s in spans if s.lane == "wait_fetch"),
            "wait_ssd_s": sum(s.seconds for s in spans if s.lane == "wait_ssd"),
            **{f"{name}_s": busy_seconds(spans, lane) for name, lane in (
                ("h2d", "upload"), ("d2h", "offload"), ("ssd_read", "ssd_read"), ("ssd_write", "ssd_write"),
                ("cpu_optimizer", "cpu_optimizer"))},
            **{key: float(b - a) for key, a, b in zip(("h2d_bytes", "d2h_bytes", "ssd_read_bytes", "ssd_write_bytes"),
                                                        self._before, after)},
        })
        out.spans = tuple(spans)
        return out


def _timed_compute(out: StepOutcome, step: int, start: float) -> StepOutcome:
    """An in-memory step is all compute: one span."""
    out.spans = (Span("compute", f"step {step}", start, time.perf_counter()),)
    return out


@dataclass(frozen=True)
class ZOHome:
    """Where a zo2 run's weights are updated: the home copy's dtype and how an update is rounded into
    it. The plan's when there is one, else the recipe's rule (train.plan_inputs.zo_home)."""

    dtype: str
    rounding: str
    z_piece: int = Z_PIECE
    """The pieces z is drawn in (Plan.z_piece): z's numbers for a larger tensor depend on it."""

    @classmethod
    def of(cls, recipe: Recipe, plan: Plan | None) -> "ZOHome":
        if plan is not None:
            return cls(plan.home_dtype, plan.home_rounding, plan.z_piece)
        return cls(*zo_home(recipe))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        rounded = f", {self.rounding} rounding" if self.dtype != "float32" else ""
        return f"home {self.dtype}{rounded}"

    def meta(self) -> dict:
        return {"home_dtype": self.dtype, "home_rounding": self.rounding}

    def checkpoint_meta(self) -> dict:
        return {**self.meta(), "z_piece": self.z_piece}

    def check(self, meta: dict, largest_tensor: int, z_source: str) -> None:
        """A checkpoint resumes bit-exactly (and replays its seed ledger) only under the arithmetic that
        wrote it. One written before z was drawn in pieces (no z_piece) drew each tensor whole: the same
        numbers for every tensor up to a piece long. The pieces matter only to a generator (torch's):
        the counter stream of a CPU (kernels/normal.py) gives the same numbers however it is cut."""
        piece = meta.get("z_piece")
        other_pieces = piece != self.z_piece if piece is not None else largest_tensor > self.z_piece
        if other_pieces and z_source != COUNTER_SOURCE:
            drawn = f"in pieces of {piece} elements" if piece else "a tensor at a time"
            raise CheckpointError(f"the checkpoint's zo2 z was drawn {drawn}, this fuyou draws it in pieces of "
                                  f"{self.z_piece}: resume or export it with the fuyou version that wrote it")
        theirs = ZOHome(meta.get("home_dtype", "float32"), meta.get("home_rounding", "nearest"))
        if theirs.dtype != self.dtype:
            raise CheckpointError(f"the checkpoint's zo2 weights were updated in a {theirs.dtype} home, this run's is "
                                  f"{self.dtype}: set offload.home_dtype: {theirs.dtype} to resume it")
        if theirs.dtype != "float32" and theirs.rounding != self.rounding:
            raise CheckpointError(f"the checkpoint's zo2 updates were rounded {theirs.rounding} into the home, this "
                                  f"run's are {self.rounding}: set offload.home_rounding: {theirs.rounding} to "
                                  "resume it")


def zo_outcome(res: ZOStepResult, home: ZOHome | None = None) -> StepOutcome:
    grads = res.projected_grads
    extra = {"projected_grad": grads[0]} if len(grads) == 1 else {"projected_grad_mean": sum(grads) / len(grads)}
    if home is not None:  # metrics.jsonl says how the weights were updated
        extra.update(home.meta())
    if res.candidate_losses is not None:
        # conservative variant: which candidate was kept (+1: w - u, the normal step; 0: w; -1: w + u)
        extra["zo_candidate"] = float(res.candidate)
        extra.update(zip(("loss_w_minus_u", "loss_w", "loss_w_plus_u"), res.candidate_losses))
    return StepOutcome(res.loss, res.tokens, False, extra, tuple(grads), applied_lr=res.applied_lr)


# Checkpoint state, the same in every adapter: state_dict() -> (tensors, meta) and load_state_dict(tensors,
# meta). Tensor names are trainer-independent where the meaning is: param.<qualified name> is a trainable
# parameter's current value as the optimizer holds it (zo2 home copy, AdamW fp32 master), so an in-memory
# zo2 checkpoint resumes on the streamed engine and export reads any of them. state_shards() yields the
# tensors a block at a time (what the checkpoint writer uses); state_dict() joins them.


def _joined(adapter) -> tuple[dict[str, torch.Tensor], dict]:
    return {k: v for _, shard in adapter.state_shards() for k, v in shard.items()}, adapter.state_meta()


class _InMemoryEval:
    model: torch.nn.Module
    head: str
    label_token_ids: tuple[int, ...]

    @torch.no_grad()
    def eval_losses(self, micro: list[dict]) -> list[BatchLoss]:
        was_training = self.model.training
        self.model.eval()
        try:
            return [batch_loss(self.model, mb, head=self.head, label_token_ids=self.label_token_ids) for mb in micro]
        finally:
            self.model.train(was_training)

    def finalize(self) -> None:
        pass

    def close(self) -> None:
        pass


class InMemoryZO(_InMemoryEval):
    def __init__(self, model, recipe: Recipe, data: Datasets, home: ZOHome, z_per_tensor: bool = False):
        self.model, self.head, self.label_token_ids, self.home = model, recipe.model.head, data.label_token_ids, home
        self.impl = ZOReference(model, param_blocks(model), recipe.method, seed=recipe.training.seed,
                                head=self.head, label_token_ids=data.label_token_ids, home_dtype=home.torch_dtype,
                                z_per_tensor=z_per_tensor, home_rounding=home.rounding, z_piece=home.z_piece)
        self.z_source = z_source(next(model.parameters()).device)
        self.where = f"in_memory ({home.describe()})"

    def step(self, step: int, micro: list[dict], lr: float) -> StepOutcome:
        start = time.perf_counter()
        return _timed_compute(zo_outcome(self.impl.step(step, micro, lr), self.home), step, start)

    def state_shards(self):
        yield "", self.impl.state_tensors()

    def state_meta(self) -> dict:
        return {"trainer": "zo2", **self.home.checkpoint_meta(), "z_source": self.z_source}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return _joined(self)

    def load_state_dict(self, tensors, meta: dict) -> None:
        self.home.check(meta, self.impl.largest_tensor, self.z_source)
        self.impl.load_state_tensors(tensors)

    def replay(self, step: int, grads: list[float], lr: float) -> None:
        """Seed ledger: re-apply a recorded step's update."""
        self.impl.replay(step, grads, lr)


class InMemoryAdamW(_InMemoryEval):
    where = "in_memory"

    def __init__(self, model, recipe: Recipe, data: Datasets):
        self.model, self.head, self.label_token_ids = model, recipe.model.head, data.label_token_ids
        self.impl = AdamWReference(model, recipe.method, head=self.head, label_token_ids=data.label_token_ids,
                                   seed=recipe.training.seed)

    def step(self, step: int, micro: list[dict], lr: float) -> StepOutcome:
        start = time.perf_counter()
        return _timed_compute(_adamw_outcome(self.impl.step(micro, lr), self.impl.scaler.enabled), step, start)

    def state_shards(self):
        yield "", self.impl.state_tensors()

    def state_meta(self) -> dict:
        return {"trainer": "adamw", **self.impl.state_meta()}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return _joined(self)

    def load_state_dict(self, tensors, meta: dict) -> None:
        self.impl.load_state_tensors(tensors, meta)


def _adamw_outcome(res, loss_scaling: bool) -> StepOutcome:
    extra = {"grad_norm": res.grad_norm}
    if loss_scaling:
        extra.update(loss_scale=res.loss_scale, skipped=float(res.skipped))
    return StepOutcome(res.loss, res.tokens, res.skipped, extra)


class StreamedZO:
    def __init__(self, model, recipe: Recipe, data: Datasets, plan: Plan, device: torch.device):
        from fuyoucli.train.zo_streamed import ZOStreamed

        timeline = Timeline()
        self.home = ZOHome.of(recipe, plan)
        self.z_source = z_source(device)
        self.lanes = TimedLanes(lanes_for(device), timeline)
        self.impl = ZOStreamed.from_plan(model, plan, recipe.method, seed=recipe.training.seed, head=recipe.model.head,
                                         lanes=self.lanes, label_token_ids=data.label_token_ids,
                                         home_rounding=self.home.rounding)
        self.measure = _Measure(timeline, self.impl.engine)
        homes = sorted({b.weights_home.value for b in plan.blocks if b.weights_home.value != "device"})
        self.where = (f"zo2 streamed: layers homed on {'/'.join(homes)} ({self.home.describe()}), prefetch depth "
                      f"{plan.prefetch_depth}" + (", z drawn per tensor" if plan.z_buffer == "tensor" else "")
                      + f"; lanes: {self.lanes.name}")

    def step(self, step: int, micro: list[dict], lr: float) -> StepOutcome:
        self.measure.begin()
        return self.measure.end(zo_outcome(self.impl.step(step, micro, lr), self.home))

    def eval_losses(self, micro: list[dict]) -> list[BatchLoss]:
        return self.impl.losses(micro)

    def finalize(self) -> None:
        self.impl.materialize()

    def close(self) -> None:
        self.impl.close()
        self.lanes.close()

    def state_shards(self):
        return self.impl.state_shards()

    def state_meta(self) -> dict:
        return {"trainer": "zo2", **self.home.checkpoint_meta(), "z_source": self.z_source}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return _joined(self)

    def load_state_dict(self, tensors, meta: dict) -> None:
        self.home.check(meta, self.impl.largest_tensor, self.z_source)
        self.impl.load_state(tensors)

    def replay(self, step: int, grads: list[float], lr: float) -> None:
        self.impl.replay(step, grads, lr)


class StreamedAdamW:
    def __init__(self, model, recipe: Recipe, data: Datasets, plan: Plan, device: torch.device):
        from fuyoucli.train.first_order_streamed import AdamWStreamed

        timeline = Timeline()
        self.lanes = TimedLanes(lanes_for(device), timeline)
        self.impl = AdamWStreamed.from_plan(model, plan, recipe.method, head=recipe.model.head, lanes=self.lanes,
                                            label_token_ids=data.label_token_ids, seed=recipe.training.seed)
        self.measure = _Measure(timeline, self.impl.engine)
        homes = sorted({b.weights_home.value for b in plan.blocks if b.weights_home.value != "device"})
        states = sorted({b.optimizer_home.value for b in plan.blocks if b.optimizer_home is not None})
        overlap = ("updates wait for the global norm, then overlap the next forward" if self.impl.deferred
                   else "CPU AdamW overlapped with the backward")
        self.where = (f"adamw streamed: layers homed on {'/'.join(homes)}, optimizer states on {'/'.join(states)}, "
                      f"prefetch depth {plan.prefetch_depth}; {overlap}; lanes: {self.lanes.name}")

    def step(self, step: int, micro: list[dict], lr: float) -> StepOutcome:
        self.measure.begin()
        return self.measure.end(_adamw_outcome(self.impl.step(micro, lr), self.impl.scaler.enabled))

    def eval_losses(self, micro: list[dict]) -> list[BatchLoss]:
        return self.impl.losses(micro)

    def finalize(self) -> None:
        self.impl.materialize()

    def close(self) -> None:
        self.impl.close()
        self.lanes.close()

    def state_shards(self):
        return self.impl.state_shards()

    def state_meta(self) -> dict:
        return {"trainer": "adamw", **self.impl.state_meta()}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        return _joined(self)

    def load_state_dict(self, tensors, meta: dict) -> None:
        self.impl.load_state(tensors, meta)


def streams(plan: Plan | None) -> bool:
    return plan is not None and any(b.weights_home.value != "device" for b in plan.blocks)


def streamed_layers(plan: Plan | None) -> set[int]:
    """Indices of the decoder layers the plan homes off the device (their weights load lazily)."""
    if plan is None:
        return set()
    return {int(b.name.split(".")[1]) for b in plan.blocks
            if b.name.startswith("layers.") and b.weights_home.value != "device"}


def build_trainer(model, recipe: Recipe, data: Datasets, plan: Plan | None, device: torch.device):
    if streams(plan):
        if recipe.method.name == "adamw":
            return StreamedAdamW(model, recipe, data, plan, device)
        return StreamedZO(model, recipe, data, plan, device)
    if recipe.method.name == "zo2":
        per_tensor = plan is not None and plan.z_buffer == "tensor"
        return InMemoryZO(model, recipe, data, ZOHome.of(recipe, plan), z_per_tensor=per_tensor)
    return InMemoryAdamW(model, recipe, data)
