"""Where and when each trainable block's AdamW runs, for the streamed first-order trainer.

Trainer stage. Blocks with optimizer_home device (resident embeddings/head, LoRA adapters) use
torch's AdamW on the device after the backward, exactly as the in-memory reference does. The other
blocks' gradients go to host memory as soon as the block's backward is done, and the CPU worker
(engine/optimizer.py) updates them, two ways:
- overlapped (no clipping, no fp16 loss scaling): block k's update is queued at once, so the worker
  runs AdamW on block k while the device runs backward on k-1;
- deferred (max_grad_norm set, or fp16): no weight may change before the global norm (or the
  overflow check) is known, so the step's gradients are held in host memory while the worker
  computes their per-tensor norms during the backward; then the updates are queued in *forward*
  order and overlap the next step's forward (block k updated while the device runs block k-1's
  forward). What that costs is CLIP_OVERLAP_NOTE. The clipping is never approximate.
The worker writes the new weights (compute dtype) to the weights' home: a streamed block's next
fetch waits for that write (WeightStore.hold); a resident block's forward waits for its upload.
On a CPU device the same jobs run inline, when queued (CpuAdam(thread=False)): the device's cores
are the optimizer's, so there is nothing to overlap and a thread would only compete for them.
"""

from __future__ import annotations

import math
import queue
from concurrent.futures import Future

import torch

from fuyoucli.engine.lanes import Mark
from fuyoucli.engine.flat import views_of
from fuyoucli.engine.optimizer import AdamBlock, CpuAdam, HostGrads, UpdateResult
from fuyoucli.errors import FuyouError
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import AdamWMethod
from fuyoucli.train.first_order import adamw_param_groups

CLIP_OVERLAP_NOTE = (
    "max_grad_norm (or fp16 loss scaling) defers every CPU AdamW update until the whole backward is "
    "done: the updates overlap the next step's forward instead of this step's backward, the first "
    "block's update is not overlapped, and the step's gradients are held in host memory "
    "(trainable params x compute-dtype bytes)")


class NonFiniteGradients(FuyouError):
    exit_code = 4


def deferred_updates(method: AdamWMethod, fp16: bool) -> bool:
    """Whether updates must wait for the whole backward (exact clipping, or an fp16 overflow check)."""
    return method.max_grad_norm is not None or fp16


def _chain(fut: Future) -> Future:
    """Done when `fut` is and, if its result published a Future (an SSD write), when that one is."""
    out: Future = Future()

    def inner(f: Future) -> None:
        if f.cancelled():
            out.cancel()
        elif f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(None)

    def outer(f: Future) -> None:
        if f.cancelled():
            out.cancel()
        elif f.exception() is not None:
            out.set_exception(f.exception())
        elif isinstance(f.result().published, Future):
            f.result().published.add_done_callback(inner)
        else:
            out.set_result(None)

    fut.add_done_callback(outer)
    return out


class GradBuffers:
    """Host memory the gradients land in (pinned where the lanes pin), allocated once. Overlapped
    updates reuse a few (one filling, one being read, one queued); deferred updates hold every
    block's gradients until the global norm is known, so each block has its own."""

    def __init__(self, numels: dict[int, int], dtype: torch.dtype, pin, per_block: bool, count: int = 3):
        def new(n: int) -> torch.Tensor:
            t = torch.empty(n, dtype=dtype)
            return pin(t) if pin is not None else t

        self.per_block = per_block
        self.own = {e: new(n) for e, n in numels.items()} if per_block else {}
        self.free: queue.Queue = queue.Queue()
        if not per_block and numels:
            for _ in range(min(count, len(numels))):
                self.free.put(new(max(numels.values())))

    def acquire(self, e: int, numel: int):
        if self.per_block:
            return self.own[e][:numel], None
        buf = self.free.get()  # waits for the worker to finish reading an earlier block's gradients
        return buf[:numel], (lambda: self.free.put(buf))


class DeviceAdamW:
    """AdamW where the weights are, with the in-memory reference's arithmetic (fp32 masters beside
    compute-dtype weights when they differ)."""

    def __init__(self, params: list[torch.nn.Parameter], method: AdamWMethod):
        self.params = params
        self.mixed = any(p.dtype != torch.float32 for p in params)
        self.master = [p.detach().float().clone() for p in params] if self.mixed else params
        device_type = params[0].device.type if params else "cpu"
        self.optimizer = torch.optim.AdamW(
            adamw_param_groups(self.master, method.weight_decay), lr=method.lr, betas=method.betas,
            eps=method.eps, fused=device_type in ("cpu", "cuda")) if params else None

    def norms(self, inv_scale: float | None) -> dict[int, torch.Tensor]:
        out = {}
        for p, m in zip(self.params, self.master):
            if self.mixed:
                m.grad = None if p.grad is None else p.grad.float()
            if m.grad is None:
                continue
            if inv_scale is not None:
                m.grad.mul_(inv_scale)
            out[id(p)] = torch.linalg.vector_norm(m.grad)
        return out

    def step(self, lr: float, coef: float | None) -> None:
        if self.optimizer is None:
            return
        if coef is not None:
            for m in self.master:
                if m.grad is not None:
                    m.grad.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.mixed:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)

    def clear(self) -> None:
        for p in self.params:
            p.grad = None
        if self.mixed:
            for m in self.master:
                m.grad = None


class BlockUpdates:
    """The optimizer side of a streamed first-order step. Built while the model still holds every
    weight (the CPU states copy their masters from it); `attach` finishes it once the weights sit
    where they will stay."""

    def __init__(self, trainable: list[torch.nn.Parameter], host: dict[int, tuple[str, list, Tier]],
                 device_params: list[torch.nn.Parameter], streamed: list[bool], method: AdamWMethod, *,
                 lanes, ssd, deferred: bool, shape=None, value=None, on_job=None, thread: bool = True):
        """`host`: block -> (name, params, optimizer home) for the CPU worker. `shape(p)` and `value(p)`
        give a parameter's shape and initial value (default: its own; a lazily loaded model's empty
        streamed parameters read them from the model file)."""
        self.trainable, self.method, self.lanes, self.deferred = trainable, method, lanes, deferred
        self.streamed = streamed
        shape = shape or (lambda p: p.shape)
        value = value or (lambda p: p)
        self.host_params = {e: ps for e, (_, ps, _) in host.items()}
        self.host_shapes = {e: [shape(p) for p in ps] for e, ps in self.host_params.items()}
        self.numels = {e: sum(s.numel() for s in shapes) for e, shapes in self.host_shapes.items()}
        self.cpu = CpuAdam([AdamBlock(e, name, self.host_shapes[e], (lambda ps=ps: [value(p) for p in ps]), home)
                            for e, (name, ps, home) in host.items()],
                           self._make_optimizer, lanes=lanes, ssd=ssd, on_job=on_job, thread=thread)
        self._device_params = device_params
        self._ready: dict[int, Future] = {}
        self._last_upload: dict[int, Mark | None] = {}
        self._after: dict[int, Mark] = {}
        """Per block, the compute mark after its backward: its old weights are not read after it."""
        self.grad_bytes = 0

    def attach(self, store, compute_dtype: torch.dtype) -> None:
        self.store = store
        self.device = DeviceAdamW(self._device_params, self.method)
        pin = self.lanes.pin if self.lanes.kind == "cuda" else None
        self.grads = GradBuffers(self.numels, compute_dtype, pin, per_block=self.deferred)
        # Resident blocks updated on the host: their new weights go up from a staging buffer.
        self._staging = {}
        for e in self.host_params:
            if not self.streamed[e]:
                t = torch.empty(self.numels[e], dtype=compute_dtype)
                self._staging[e] = pin(t) if pin is not None else t

    def _make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        m = self.method
        return torch.optim.AdamW(adamw_param_groups(tensors, m.weight_decay), lr=m.lr, betas=m.betas, eps=m.eps,
                                 fused=True)

    # -- during the backward --------------------------------------------------------------------------

    def begin(self, lr: float, inv_scale: float | None, backward_order: list[int]) -> None:
        self.lr, self.inv_scale = lr, inv_scale
        self._jobs: dict[int, Future] = {}
        self._norm_jobs: dict[int, Future] = {}
        self._held: dict[int, HostGrads] = {}
        # The worker reads SSD-homed states ahead in the order it will update them: as the backward
        # produces gradients (overlapped), or, deferred, in the next forward's order; then the first
        # block's states are read during this backward instead of after it.
        order = [e for e in backward_order if e in self.host_params]
        self.cpu.begin(order[::-1] if self.deferred else order)

    def ship(self, e: int) -> None:
        """Block e's backward is done: its gradients go to host memory now; then its update
        (overlapped) or the norms of its gradients (deferred) are queued on the worker."""
        params = self.host_params.get(e)
        if params is None:
            return
        shapes = self.host_shapes[e]
        flat, release = self.grads.acquire(e, self.numels[e])
        done = self.lanes.mark_compute()  # the block's backward (all micro-batches) is complete
        present, keep, mark = [], [], None
        for p, view in zip(params, views_of(flat, shapes)):
            present.append(p.grad is not None)
            if p.grad is not None:
                mark = self.lanes.offload(view, p.grad, after=done)
                keep.append(p.grad)
                p.grad = None
        self.grad_bytes += flat.numel() * flat.element_size()
        grads = HostGrads(flat, present, mark, keep, release)
        self._after[e] = done
        if self.deferred:
            self._held[e] = grads
            self._norm_jobs[e] = self.cpu.norms(e, grads, 1.0 if self.inv_scale is None else self.inv_scale)
        else:
            self._jobs[e] = self.cpu.update(e, grads, lr=self.lr, publish=self._publisher(e), want_norms=True)
            # At once, not at the step's end: any fetch of block e from now on (a later pass, or this one
            # if it ever fetched a block twice) must find the update of its home and wait for it.
            self._register(e, self._jobs[e])

    def _publisher(self, e: int):
        if self.streamed[e]:
            return lambda master: self.store.write_home(e, master)
        staging, params, after = self._staging[e], self.host_params[e], self._after[e]

        def upload(master: torch.Tensor) -> Mark | None:
            if self._last_upload.get(e) is not None:
                self.lanes.host_wait(self._last_upload[e])  # the staging buffer's last upload has read it
            staging.copy_(master)
            mark = None
            for p, view in zip(params, views_of(staging, self.host_shapes[e])):
                mark = self.lanes.upload(p.data, view, after=after)  # after: the old weights' last use
            self._last_upload[e] = mark
            return mark
        return upload

    def _register(self, e: int, fut: Future) -> None:
        if self.streamed[e]:
            self.store.hold(e, _chain(fut))
        else:
            self._ready[e] = fut

    # -- after the backward ---------------------------------------------------------------------------

    def _global_norm(self, norms: dict[int, torch.Tensor]) -> float:
        """The reference's norm: of the per-tensor norms, in the model's parameter order."""
        per = [norms[id(p)].to("cpu") for p in self.trainable if id(p) in norms]
        return float(torch.linalg.vector_norm(torch.stack(per))) if per else 0.0

    def _collect(self, norms: dict, e: int, per_tensor) -> None:
        norms.update({id(p): x for p, x in zip(self.host_params[e], per_tensor) if x is not None})

    def finish(self, scaler) -> tuple[float, bool]:
        """Global norm, overflow check, clipping and the updates; returns (norm, skipped)."""
        norms = self.device.norms(self.inv_scale)
        try:
            if not self.deferred:
                for e, fut in self._jobs.items():
                    self._collect(norms, e, fut.result().norms)
                norm = self._global_norm(norms)
                if not math.isfinite(norm):
                    raise NonFiniteGradients(
                        f"the gradients became {norm} at a step whose updates were already overlapped with the "
                        "backward (blocks with finite gradients changed, the others did not); set "
                        "method.max_grad_norm so that such a step is checked before any update and skipped "
                        "whole, or lower method.lr")
                self.device.step(self.lr, None)
                return norm, False
            for e, fut in self._norm_jobs.items():
                self._collect(norms, e, fut.result())
            norm = self._global_norm(norms)
            overflow = not math.isfinite(norm)
            scaler.update(overflow)
            if overflow:
                for grads in self._held.values():
                    grads.done()
                return norm, True
            clip = self.method.max_grad_norm
            coef = clip / (norm + 1e-6) if clip is not None and norm > clip else None
            self.device.step(self.lr, coef)
            for e in sorted(self._held):  # the next forward's order, announced by begin()
                self._register(e, self.cpu.update(e, self._held[e], lr=self.lr, publish=self._publisher(e),
                                                  inv_scale=1.0 if self.inv_scale is None else self.inv_scale,
                                                  coef=coef))
            return norm, False
        finally:
            self._held = {}
            self.device.clear()

    # -- before a block computes, and at the end ------------------------------------------------------

    def wait_ready(self, e: int) -> None:
        """A resident block updated on the host: the compute lane waits for its new weights."""
        fut = self._ready.pop(e, None)
        if fut is not None:
            res: UpdateResult = fut.result()
            if isinstance(res.published, Mark):
                self.lanes.compute_wait(res.published)

    def settle(self) -> None:
        """Every queued update done and written home."""
        self.cpu.drain()
        for e in list(self._ready):
            self.wait_ready(e)

    def close(self) -> None:
        self.cpu.close()
