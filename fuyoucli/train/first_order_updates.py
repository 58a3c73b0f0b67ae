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
The worker writes the new weights (compute dtype) to the weights' home: the schedule's next wait
for a streamed block (before its fetch) waits for that write (WeightStore.hold), for a resident block
(before its forward) for the upload of its new weights.
On a CPU device the same jobs run inline, when queued (CpuAdam(thread=False)): the device's cores
are the optimizer's, so there is nothing to overlap and a thread would only compete for them.
"""

from __future__ import annotations

import math
import queue
from concurrent.futures import Future

import torch

from fuyoucli.engine.build import Engine
from fuyoucli.engine.flat import views_of
from fuyoucli.engine.lanes import Mark
from fuyoucli.engine.optimizer import HostGrads, UpdateResult
from fuyoucli.engine.ticket import Ticket
from fuyoucli.errors import FuyouError
from fuyoucli.plan.schedule import Op
from fuyoucli.plan.types import Tier
from fuyoucli.recipe import AdamWMethod
from fuyoucli.engine.compact import compact_adamw
from fuyoucli.train.first_order import BlockAdamW, adam_format, adamw_param_groups, optimizer_step

CLIP_OVERLAP_NOTE = (
    "max_grad_norm (or fp16 loss scaling) defers every CPU AdamW update until the whole backward is "
    "done: the updates overlap the next step's forward instead of this step's backward, the first "
    "block's update is not overlapped, and the step's gradients are held in host memory "
    "(trainable params x compute-dtype bytes)")


class NonFiniteGradients(FuyouError):
    exit_code = 4


def cpu_adamw(method: AdamWMethod, seed: int = 0):
    """The CPU optimizer of one block's masters (engine/optimizer.py: CpuAdam builds one per block):
    torch's fused AdamW for fp32 states and master, else CompactAdamW seeded with the block's key."""
    fmt = adam_format(method)

    def make(tensors: list[torch.Tensor], key: int) -> torch.optim.Optimizer:
        groups = adamw_param_groups(tensors, method.weight_decay)
        if fmt.default:
            return torch.optim.AdamW(groups, lr=method.lr, betas=method.betas, eps=method.eps, fused=True)
        return compact_adamw(groups, fmt=fmt, lr=method.lr, betas=method.betas, eps=method.eps, seed=seed, block=key)
    return make


def deferred_updates(method: AdamWMethod, fp16: bool) -> bool:
    """Whether updates must wait for the whole backward (exact clipping, or an fp16 overflow check)."""
    return method.max_grad_norm is not None or fp16


def _chain(fut: Future) -> Future:
    """Done when the update `fut` is and, if it published a Future (a streamed block's SSD home being
    written: WeightStore.write_home), when that one is."""
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
        elif f.result().published is not None:  # the file write of an SSD home
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
    compute-dtype weights when they differ; compact formats: the reference's BlockAdamW, one
    optimizer per block, `blocks` giving each block's key and parameters)."""

    def __init__(self, blocks: list[tuple[int, list[torch.nn.Parameter]]], method: AdamWMethod, seed: int = 0):
        params = [p for _, ps in blocks for p in ps]
        self.params = params
        self.fmt = adam_format(method)
        self.mixed = any(p.dtype != torch.float32 for p in params) and self.fmt.master == "fp32"
        self.master = [p.detach().float().clone() for p in params] if self.mixed else params
        self.grads: dict[int, torch.Tensor] = {}
        """Compact formats: fp32 gradients by id of the master (a bf16 master's taken up to fp32)."""
        device_type = params[0].device.type if params else "cpu"
        if not params:
            self.optimizer = None
        elif self.fmt.default:
            self.optimizer = torch.optim.AdamW(
                adamw_param_groups(self.master, method.weight_decay), lr=method.lr, betas=method.betas,
                eps=method.eps, fused=device_type in ("cpu", "cuda"))
        else:
            masters = dict(zip(map(id, params), self.master))
            self.optimizer = BlockAdamW([(key, [masters[id(p)] for p in ps]) for key, ps in blocks], method, seed)

    def norms(self, inv_scale: float | None) -> dict[int, torch.Tensor]:
        out = {}
        self.grads = {}
        for p, m in zip(self.params, self.master):
            if self.mixed:
                m.grad = None if p.grad is None else p.grad.float()
            grad = m.grad if m.dtype == torch.float32 else (None if p.grad is None else p.grad.float())
            if grad is None:
                continue
            self.grads[id(m)] = grad
            if inv_scale is not None:
                grad.mul_(inv_scale)
            out[id(p)] = torch.linalg.vector_norm(grad)
        return out

    def step(self, lr: float, coef: float | None) -> None:
        if self.optimizer is None:
            return
        if coef is not None:
            for g in self.grads.values():
                g.mul_(coef)
        optimizer_step(self.optimizer, self.fmt.default, lr, self.grads, self.params, self.master, self.mixed)

    def clear(self) -> None:
        self.grads = {}
        for p in self.params:
            p.grad = None
        if self.mixed:
            for m in self.master:
                m.grad = None


class BlockUpdates:
    """The optimizer side of a streamed first-order step: the engine's CPU optimizer (engine.cpu, its
    states where the plan put them) for blocks optimized on the host, torch's AdamW for the others.
    It performs the optimizer's operations of the schedule (plan/schedule.py): grad_offload, the wait
    on it, grad_norm and update, and the wait for a resident block's new weights."""

    def __init__(self, engine: Engine, method: AdamWMethod, *, deferred: bool, seed: int = 0):
        self.method, self.lanes, self.deferred = method, engine.lanes, deferred
        self.store, self.streamed, self.cpu, self.ops = engine.store, engine.streamed, engine.cpu, engine.ops
        self.trainable = [p for p in engine.model.parameters() if p.requires_grad]
        index = {b.name: b.index for b in engine.order}
        on_host = [blk for blk in engine.trainable if engine.optimizer_homes[blk.name] is not Tier.DEVICE]
        self.host_params = {index[blk.name]: [p for _, p in blk.params] for blk in on_host}
        self.host_shapes = {e: list(self.cpu.states[e].shapes) for e in self.host_params}
        self.numels = {e: sum(s.numel() for s in shapes) for e, shapes in self.host_shapes.items()}
        order = {id(p): n for n, p in enumerate(self.trainable)}
        device_blocks = [(index[blk.name], sorted((p for _, p in blk.params), key=lambda p: order[id(p)]))
                         for blk in engine.trainable if engine.optimizer_homes[blk.name] is Tier.DEVICE]
        if adam_format(method).default:  # one torch AdamW over them all, in the model's order, as before
            device_blocks = [(0, sorted((p for _, ps in device_blocks for p in ps), key=lambda p: order[id(p)]))]
        self.device = DeviceAdamW(device_blocks, method, seed)
        pin = self.lanes.pin if self.lanes.kind == "cuda" else None
        self.grads = GradBuffers(self.numels, engine.compute_dtype, pin, per_block=deferred)
        # Resident blocks updated on the host: their new weights go up from a staging buffer.
        self._staging = {}
        for e in self.host_params:
            if not self.streamed[e]:
                t = torch.empty(self.numels[e], dtype=engine.compute_dtype)
                self._staging[e] = pin(t) if pin is not None else t
        self._ready: dict[int, Future] = {}
        self._last_upload: dict[int, Mark | None] = {}
        self._after: dict[int, Mark] = {}
        """Per block, the compute mark after its backward: its old weights are not read after it."""
        self._host_grads: dict[int, HostGrads] = {}
        self._awaited: set[int] = set()
        self.grad_bytes = 0

    # -- during the backward: the schedule's grad_offload, wait, grad_norm and update ----------------

    def begin(self, lr: float, inv_scale: float | None, backward_order: list[int]) -> None:
        self.lr, self.inv_scale, self.coef = lr, inv_scale, None
        self._jobs: dict[int, Future] = {}
        self._norm_jobs: dict[int, Future] = {}
        # The worker reads SSD-homed states ahead in the order it will update them: as the backward
        # produces gradients (overlapped), or, deferred, in the next forward's order; then the first
        # block's states are read during this backward instead of after it.
        order = [e for e in backward_order if e in self.host_params]
        self.cpu.begin(order[::-1] if self.deferred else order)

    def offload_grads(self, e: int) -> None:
        """Block e's backward is done: its gradients go to host memory now (offload lane)."""
        flat, release = self.grads.acquire(e, self.numels[e])
        done = self.lanes.mark_compute()  # the block's backward (all micro-batches) is complete
        present, keep, mark = [], [], None
        for p, view in zip(self.host_params[e], views_of(flat, self.host_shapes[e])):
            present.append(p.grad is not None)
            if p.grad is not None:
                mark = self.lanes.offload(view, p.grad, after=done)
                keep.append(p.grad)
                p.grad = None
        self.grad_bytes += flat.numel() * flat.element_size()
        self._host_grads[e] = HostGrads(flat, present, mark, keep, release)
        self._after[e] = done
        self.ops.performed(Op("grad_offload", e))

    def await_grads(self, e: int) -> None:
        """The schedule's wait for block e's gradient copy. The job that reads them takes it, on the
        worker (HostGrads.ready), so that the device goes on meanwhile; here it is only allowed."""
        if e not in self._host_grads:
            raise RuntimeError(f"block {e}: a wait for gradients that were never offloaded")
        self._awaited.add(e)
        self.ops.performed(Op("wait", e, on="grad_offload"))

    def _readable(self, e: int, what: str) -> HostGrads:
        if e not in self._awaited:
            raise RuntimeError(f"block {e}: {what} would read gradients whose offload the schedule did not wait on")
        return self._host_grads[e]

    def grad_norms(self, e: int) -> None:
        """Deferred: the norms of block e's gradients, on the worker; the update waits for the global norm."""
        grads = self._readable(e, "grad_norm")
        self._norm_jobs[e] = self.cpu.norms(e, grads, 1.0 if self.inv_scale is None else self.inv_scale)
        self.ops.performed(Op("grad_norm", e))

    def update(self, e: int) -> None:
        """Queue block e's update on the worker (overlapped: at once, with its norms, a non-finite block
        left as it is; deferred: clipped by the global norm). Registered at once, not at the step's end:
        any later use of block e's weights waits for it."""
        grads = self._readable(e, "update")
        self._awaited.discard(e)
        if self.deferred:
            job = self.cpu.update(e, grads, lr=self.lr, publish=self._publisher(e),
                                  inv_scale=1.0 if self.inv_scale is None else self.inv_scale, coef=self.coef)
        else:
            del self._host_grads[e]
            job = self._jobs[e] = self.cpu.update(e, grads, lr=self.lr, publish=self._publisher(e), want_norms=True)
        if self.streamed[e]:
            self.store.hold(e, Ticket(job=_chain(job)))
        else:
            self._ready[e] = job
        self.ops.performed(Op("update", e))

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

    # -- after the backward ---------------------------------------------------------------------------

    def _global_norm(self, norms: dict[int, torch.Tensor]) -> float:
        """The reference's norm: of the per-tensor norms, in the model's parameter order."""
        per = [norms[id(p)].to("cpu") for p in self.trainable if id(p) in norms]
        return float(torch.linalg.vector_norm(torch.stack(per))) if per else 0.0

    def _collect(self, norms: dict, e: int, per_tensor) -> None:
        norms.update({id(p): x for p, x in zip(self.host_params[e], per_tensor) if x is not None})

    def finish(self, scaler) -> tuple[float, bool]:
        """Global norm, overflow check and the device's update; returns (norm, skipped). Deferred, the
        host updates then run as the schedule's first_order_updates (clipped by `self.coef`)."""
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
                return norm, True
            clip = self.method.max_grad_norm
            self.coef = clip / (norm + 1e-6) if clip is not None and norm > clip else None
            self.device.step(self.lr, self.coef)
            return norm, False
        finally:
            self.device.clear()

    def end_step(self) -> None:
        """The step's gradients are the queued updates' now (or, skipped, nobody's): let go of them."""
        for grads in self._host_grads.values():
            grads.done()
        self._host_grads, self._awaited = {}, set()

    # -- before a block computes, and at the end ------------------------------------------------------

    def wait_ready(self, e: int) -> None:
        """The schedule's wait for a resident block updated on the host: the compute lane waits for
        its new weights."""
        self._wait_ready(e)
        self.ops.performed(Op("wait", e, on="update"))

    def _wait_ready(self, e: int) -> None:
        fut = self._ready.pop(e, None)
        if fut is not None:
            res: UpdateResult = fut.result()
            if res.published is not None:  # the upload of the new weights (None: nothing changed)
                self.lanes.compute_wait(res.published)

    def settle(self) -> None:
        """Every queued update done and written home."""
        self.cpu.drain()
        for e in list(self._ready):
            self._wait_ready(e)

    def close(self) -> None:
        self.cpu.close()
