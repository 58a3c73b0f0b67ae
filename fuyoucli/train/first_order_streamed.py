"""Offloaded first-order (AdamW) training: layers streamed between their home tier and the device, fp32
master weights and AdamW states on the host or SSD, updated by a CPU worker (Fuyou's design).

Trainer stage, over the engine (WeightStore + schedule, lanes, CpuAdam, SavedActivations). One step:
1. Forward, layer-major (every micro-batch goes through a block while it is on the device), with
   the plan's prefetch depth. Per the plan, each layer's saved activations are kept on the device
   ('keep': its autograd graph stays; streamed weights in it are re-made from the backward's fetch,
   never saved), swapped to host memory and brought back ahead of its backward ('swap'), or dropped
   with only the layer's input kept ('recompute': the backward runs the layer again, with the same
   random numbers). The head computes the loss and its backward at once.
2. Backward in reverse block order: fetch, (recompute,) backward for every micro-batch in order
   (gradients accumulate as in the in-memory reference), then the block's gradients go to host
   memory at once on the offload lane.
3. The CPU optimizer (engine/optimizer.py), two ways:
   - overlapped (no clipping, no fp16 loss scaling): block k's update is queued as soon as its
     gradients exist, so the worker runs AdamW on block k while the device runs backward on k-1;
   - deferred (method.max_grad_norm set, or fp16): no weight may change before the global norm (or
     the overflow check) is known, so the step's gradients are held in host memory, the worker
     computes their per-tensor norms during the backward, and once the norm is known the updates
     are queued in *forward* order: they overlap the next step's forward instead of this backward
     (block k is updated while the device runs block k-1's forward). What is lost is said in
     CLIP_OVERLAP_NOTE; the clipping is never approximate.
   The worker writes the updated weights (compute dtype) to the weights' home; the block's next
   fetch waits for that (WeightStore.hold), so no forward reads stale weights.
Blocks whose optimizer lives on the device (resident embeddings/head with optimizer_home device,
LoRA adapters: the frozen base streams read-only) use torch's AdamW there, as the reference does.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from contextlib import contextmanager

import torch

from fuyoucli.engine.activations import SavedActivations
from fuyoucli.engine.executor import StreamUnit, WeightStore, run_pass
from fuyoucli.engine.lanes import Mark
from fuyoucli.engine.optimizer import AdamBlock, CpuAdam, HostGrads, UpdateResult, views_of
from fuyoucli.engine.tiers import DeviceArena, SsdStore
from fuyoucli.errors import FuyouError
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.runner import BlockRunner, Prepared
from fuyoucli.plan.schedule import pass_schedule
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import AdamWMethod
from fuyoucli.train.first_order import DynamicLossScale, FirstOrderStepResult, adamw_param_groups
from fuyoucli.train.losses import count_targets, loss_from_logits
from fuyoucli.train.zo_streamed import DTYPES, UnsupportedPlan

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
    """A Future done when `fut` is and, if `fut`'s result carries a Future (an SSD write), when that is."""
    out: Future = Future()

    def inner(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
        else:
            out.set_result(None)

    def outer(f: Future) -> None:
        if f.exception() is not None:
            out.set_exception(f.exception())
            return
        published = f.result().published
        if isinstance(published, Future):
            published.add_done_callback(inner)
        else:
            out.set_result(None)

    fut.add_done_callback(outer)
    return out


class _GradBuffers:
    """Host memory the gradients land in (pinned where the lanes pin), allocated once. Overlapped
    updates reuse a few (one filling, one being read, one queued); deferred updates hold every
    block's gradients until the global norm is known, so each block has its own."""

    def __init__(self, numels: dict[int, int], dtype: torch.dtype, pin, per_block: bool, count: int = 3):
        new = (lambda n: pin(torch.empty(n, dtype=dtype))) if pin else (lambda n: torch.empty(n, dtype=dtype))
        self.per_block = per_block
        self.own = {e: new(n) for e, n in numels.items()} if per_block else {}
        import queue

        self.free: queue.Queue = queue.Queue()
        if not per_block and numels:
            for _ in range(min(count, len(numels))):
                self.free.put(new(max(numels.values())))

    def acquire(self, e: int, numel: int):
        if self.per_block:
            return self.own[e][:numel], None
        buf = self.free.get()  # waits for the worker to finish reading an earlier block's gradients
        return buf[:numel], (lambda: self.free.put(buf))


class _DeviceAdamW:
    """AdamW where the weights are (resident blocks with optimizer_home device, LoRA adapters): the
    in-memory reference's arithmetic, fp32 masters beside compute-dtype weights when they differ."""

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


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for x in obj:
            yield from _tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _tensors(x)


class AdamWStreamed:
    def __init__(self, model, plan: Plan, method: AdamWMethod, *, head: str, lanes,
                 label_token_ids: tuple[int, ...] = (), on_job=None, on_backward=None):
        self.model, self.plan, self.method, self.head = model, plan, method, head
        self.label_token_ids, self.lanes, self.on_backward = label_token_ids, lanes, on_backward
        self.device = lanes.device
        self.runner = BlockRunner(model)
        n_layers = self.runner.n_layers
        self.names = ["embed"] + [f"layers.{i}" for i in range(n_layers)] + ["head"]
        self.compute_dtype = DTYPES[plan.compute_dtype]
        bp = {b.name: b for b in plan.blocks}
        self._check(plan, bp)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.lora = len(self.trainable) < len(list(model.parameters()))
        self.scaler = DynamicLossScale(any(p.dtype == torch.float16 for p in self.trainable))
        self.deferred = deferred_updates(method, self.scaler.enabled)
        homes = {n: bp[n].weights_home if n in bp else Tier.DEVICE for n in self.names}
        self.streamed = [homes[n] is not Tier.DEVICE for n in self.names]
        self.activation = [(bp[n].activation if n in bp and bp[n].activation else "recompute")
                           if n.startswith("layers.") else "keep" for n in self.names]
        self.index = {n: e for e, n in enumerate(self.names)}
        blocks = {b.name: b for b in param_blocks(model)}
        self._embed_trains = "embed" in blocks
        self._embed_params = [p for _, p in blocks["embed"].params] if self._embed_trains else []

        # Where each trainable block's optimizer runs.
        host_opt: dict[int, tuple[list[torch.nn.Parameter], Tier]] = {}
        device_params: list[torch.nn.Parameter] = []
        for name, blk in blocks.items():
            e = self.index[name]
            oh = bp[name].optimizer_home if name in bp else None
            if self.lora:  # adapters (and a new head) stay on the device, with their optimizer
                device_params += [p for _, p in blk.params]
                continue
            if oh is None:
                oh = Tier.PAGEABLE if self.streamed[e] else Tier.DEVICE
            if oh is Tier.DEVICE and self.streamed[e]:
                if lanes.kind != "cpu":
                    raise UnsupportedPlan(f"{name} streams its weights but homes its optimizer on the device: "
                                          "the first-order engine updates streamed blocks on the CPU")
                oh = Tier.PAGEABLE  # a CPU run's device memory is host RAM
            if oh is Tier.DEVICE:
                device_params += [p for _, p in blk.params]
            else:
                host_opt[e] = ([p for _, p in blk.params], oh)
        order = {id(p): n for n, p in enumerate(self.trainable)}
        device_params.sort(key=lambda p: order[id(p)])
        self.host_params = {e: ps for e, (ps, _) in host_opt.items()}
        self.host_shapes = {e: [p.shape for p in ps] for e, ps in self.host_params.items()}
        numels = {e: sum(s.numel() for s in shapes) for e, shapes in self.host_shapes.items()}

        units = []
        for e, name in enumerate(self.names):
            if not self.streamed[e]:
                continue
            layer = self.runner.layers[e - 1]
            params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad != self.lora]
            if any(p.dtype != self.compute_dtype for _, p in params):
                raise UnsupportedPlan(f"the model's weights are not in the plan's compute dtype {plan.compute_dtype}")
            if not self.lora and [id(p) for _, p in params] != [id(p) for p in self.host_params[e]]:
                raise UnsupportedPlan(f"{name}: its parameters are not all trained; stream it only with LoRA")
            units.append(StreamUnit(index=e, name=name, params=params, shapes=[], dtype=self.compute_dtype,
                                    home=homes[name], writable=False))
        ssd_bytes = sum(sum(p.numel() for _, p in u.params) * u.dtype.itemsize for u in units if u.home is Tier.SSD)
        ssd_bytes += sum(3 * 4 * sum(p.numel() for p in ps) for ps, oh in host_opt.values() if oh is Tier.SSD)
        self.ssd = SsdStore(plan.swap_dir, ssd_bytes) if ssd_bytes else None
        self.cpu: CpuAdam | None = None
        try:
            self.arena = DeviceArena(self.device, plan.device_budget_bytes)
            self.cpu = CpuAdam([AdamBlock(e, self.names[e], ps, oh) for e, (ps, oh) in host_opt.items()],
                               self._make_optimizer, lanes=lanes, ssd=self.ssd, on_job=on_job)
            streamed_ids = {id(p) for u in units for _, p in u.params}
            resident_bytes = 0
            for p in model.parameters():
                if id(p) not in streamed_ids:
                    p.data = p.data.to(self.device)
                    resident_bytes += p.numel() * p.element_size()
            for module in model.modules():
                for bname, buf in list(module.named_buffers(recurse=False)):
                    module._buffers[bname] = buf.to(self.device)
            self.arena.charge(resident_bytes, "resident weights")
            self.device_opt = _DeviceAdamW(device_params, method)
            self.store = WeightStore(units, lanes=lanes, arena=self.arena, slots=plan.device_buffers, ssd=self.ssd,
                                     pin=any(u.home is Tier.PINNED for u in units))
            self.grads = _GradBuffers(numels, self.compute_dtype, lanes.pin if lanes.kind == "cuda" else None,
                                      per_block=self.deferred)
            # Resident blocks updated on the host: their new weights go up from a staging buffer.
            self._staging = {e: (lanes.pin(torch.empty(numels[e], dtype=self.compute_dtype)) if lanes.kind == "cuda"
                                 else torch.empty(numels[e], dtype=self.compute_dtype))
                             for e in self.host_params if not self.streamed[e]}
            resident_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters() if id(p) not in streamed_ids}
            self.acts = SavedActivations(lanes, self.device, [s.device for s in self.store.slots], resident_ptrs,
                                         self.arena)
        except BaseException:
            self.close()
            raise
        self._ready: dict[int, Future] = {}
        self._last_upload: dict[int, Mark | None] = {}
        self._after: dict[int, Mark] = {}
        """Per block, the compute mark after its backward (its old weights are no longer read after it)."""
        self.timeline: list[tuple[str, int, float, float]] = []
        """('fwd' | 'bwd', block, start, end): device compute of a block (after its weights were ready)."""
        self.grad_bytes = 0

    @staticmethod
    def _check(plan: Plan, bp: dict) -> None:
        for name in ("embed", "head"):
            if name in bp and bp[name].weights_home is not Tier.DEVICE:
                raise UnsupportedPlan(f"the first-order engine keeps {name} on the device; the plan homes it on "
                                      f"{bp[name].weights_home.value}")
        if plan.home_dtype != plan.compute_dtype:
            raise UnsupportedPlan(f"first-order training stores weights at home in the compute dtype "
                                  f"({plan.compute_dtype}); the plan says home {plan.home_dtype}")

    def _make_optimizer(self, tensors: list[torch.Tensor]) -> torch.optim.Optimizer:
        m = self.method
        return torch.optim.AdamW(adamw_param_groups(tensors, m.weight_decay), lr=m.lr, betas=m.betas, eps=m.eps,
                                 fused=True)

    def close(self) -> None:
        """Stop the worker and remove the SSD files (safe to call twice, and from a failed __init__)."""
        if getattr(self, "cpu", None) is not None:
            self.cpu.close()
        if getattr(self, "ssd", None) is not None:
            self.ssd.close()

    # -- weights on the device --------------------------------------------------------------------------

    def _bind(self, e: int, slot: int) -> None:
        for (_, p), view in zip(self.store.units[e].params, self.store.acquire(e, slot)):
            p.data = view

    def _wait_ready(self, e: int) -> None:
        """A resident block updated on the host: the compute lane waits for its new weights."""
        fut = self._ready.pop(e, None)
        if fut is not None:
            res: UpdateResult = fut.result()
            if isinstance(res.published, Mark):
                self.lanes.compute_wait(res.published)

    def _publisher(self, e: int, after: Mark):
        if self.streamed[e]:
            return lambda master: self.store.write_home(e, master)
        staging, params = self._staging[e], self.host_params[e]

        def upload(master: torch.Tensor) -> Mark | None:
            if self._last_upload.get(e) is not None:
                self.lanes.host_wait(self._last_upload[e])  # the staging buffer's last upload has read it
            staging.copy_(master)
            mark = None
            for p, view in zip(params, views_of(staging, self.host_shapes[e])):
                # `after`: the block's backward is done with the old weights.
                mark = self.lanes.upload(p.data, view, after=after)
            self._last_upload[e] = mark
            return mark
        return upload

    def _register(self, e: int, fut: Future) -> None:
        if self.streamed[e]:
            self.store.hold(e, _chain(fut))
        else:
            self._ready[e] = fut

    # -- forward ------------------------------------------------------------------------------------------

    def _rng_state(self):
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)

    @contextmanager
    def _replay(self, state):
        """Recompute with the random numbers (dropout) the forward drew."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], self.device)
            yield

    def _forward(self, micro: list[dict], *, train: bool, scale: float = 1.0, total: int = 1) -> list:
        n, last = len(micro), len(self.names) - 1
        hidden: list = [None] * n
        results: list = [None] * n
        self._prepared: list[Prepared | None] = [None] * n
        self._h_embed: list = [None] * n
        self._grad_out: list = [None] * n
        self._saved: dict[tuple[int, int], tuple] = {}
        self._charged: dict[int, int] = {}
        self._shared: dict[int, dict] = {}

        def compute(e: int, slot: int | None) -> bool:
            if slot is not None:
                self._bind(e, slot)
            self._wait_ready(e)
            t0 = time.perf_counter()
            if e == 0:
                with torch.set_grad_enabled(train and self._embed_trains):
                    for k, mb in enumerate(micro):
                        prep = self.runner.capture(mb["input_ids"], mb["attention_mask"])
                        if any(t.requires_grad for t in _tensors(prep.layer_args)):
                            raise UnsupportedPlan("this model passes trained tensors to every layer; the streamed "
                                                  "first-order engine cannot split its graph per layer")
                        self._prepared[k], self._h_embed[k] = prep, (prep.hidden if train else None)
                        hidden[k] = prep.hidden.detach()
            elif e == last:
                for k, mb in enumerate(micro):
                    with torch.set_grad_enabled(train):
                        h = hidden[k].requires_grad_(True) if train else hidden[k]
                        logits = self.runner.run_head(h, mb["input_ids"], mb["attention_mask"])
                        out = loss_from_logits(logits, mb, head=self.head, label_token_ids=self.label_token_ids)
                        if train:
                            # As the reference: each micro-batch's sum over the step's target count.
                            (out.loss_sum * (scale / max(total, 1))).backward()
                            self._grad_out[k] = h.grad
                            out.loss_sum = out.loss_sum.detach()
                            self._stash_shared(k, n)
                    results[k], hidden[k] = out, None
            else:
                act = self.activation[e]
                for k in range(n):
                    if not train:
                        with torch.no_grad():
                            hidden[k] = self.runner.run_layer(e - 1, hidden[k], self._prepared[k])
                    elif act == "recompute":
                        rng = self._rng_state()
                        with torch.no_grad():
                            out = self.runner.run_layer(e - 1, hidden[k], self._prepared[k])
                        nbytes = hidden[k].numel() * hidden[k].element_size()
                        self.arena.charge(nbytes, f"saved input of {self.names[e]}")
                        self._charged[e] = self._charged.get(e, 0) + nbytes
                        self._saved[(e, k)] = (hidden[k], None, rng)
                        hidden[k] = out
                    else:
                        leaf = hidden[k].detach().requires_grad_(True)
                        with torch.enable_grad(), self.acts.recording(e, swap=act == "swap"):
                            out = self.runner.run_layer(e - 1, leaf, self._prepared[k])
                        self._saved[(e, k)] = (leaf, out, None)
                        hidden[k] = out.detach()
            self.timeline.append(("fwd", e, t0, time.perf_counter()))
            return False

        run_pass(pass_schedule(self.streamed, self.plan.prefetch_depth), self.store, compute)
        self.acts.end_forward()
        return results

    # A tied weight (embeddings = head) gets two gradients per micro-batch. The reference sums
    # them per micro-batch, then over micro-batches: (h0 + e0) + (h1 + e1). Layer-major order
    # would give ((h0 + h1) + e0) + e1, and Adam turns such round-off into visible differences,
    # so the head's share is set aside per micro-batch and added back in the reference's order.

    def _stash_shared(self, k: int, n: int) -> None:
        if n == 1 or not self._embed_trains:
            return
        for p in self._embed_params:
            if p.grad is not None:
                self._shared.setdefault(k, {})[p] = p.grad
                self.arena.charge(p.grad.numel() * p.grad.element_size(), "tied-weight gradients")
                p.grad = None

    def _unstash_shared(self, k: int) -> dict:
        stash = self._shared.pop(k, {})
        totals = {}
        for p, g in stash.items():
            totals[p] = p.grad
            p.grad = g
            self.arena.release(g.numel() * g.element_size())
        return totals

    @staticmethod
    def _accumulate_shared(totals: dict) -> None:
        for p, total in totals.items():
            if total is not None:
                total += p.grad
                p.grad = total

    # -- backward -----------------------------------------------------------------------------------------

    def _backward(self, n: int, lr: float, inv_scale: float | None) -> None:
        ops = pass_schedule(self.streamed, self.plan.prefetch_depth, reverse=True)
        computes = [op.block for op in ops if op.kind == "compute"]
        following = dict(zip(computes, computes[1:] + [None]))
        last = len(self.names) - 1

        def compute(e: int, slot: int | None) -> bool:
            if slot is not None:
                self._bind(e, slot)
                self.acts.bind(e, slot)
            t0 = time.perf_counter()
            if self.on_backward is not None:
                self.on_backward(e)
            if e == 0:
                if self._embed_trains:
                    for k in range(n):
                        totals = self._unstash_shared(k)
                        torch.autograd.backward(self._h_embed[k], self._grad_out[k])
                        self._accumulate_shared(totals)
                self._h_embed = [None] * n
            elif e != last:  # the head's backward ran with its forward
                self.acts.ready(e)
                if following[e] is not None:
                    self.acts.prefetch(following[e])  # the next block's swapped tensors come back meanwhile
                for k in range(n):
                    leaf, out, rng = self._saved.pop((e, k))
                    if out is None:
                        leaf = leaf.detach().requires_grad_(True)
                        with torch.enable_grad(), self._replay(rng):
                            out = self.runner.run_layer(e - 1, leaf, self._prepared[k])
                    torch.autograd.backward(out, self._grad_out[k])
                    self._grad_out[k] = leaf.grad
                self.acts.release(e)
                self.arena.release(self._charged.pop(e, 0))
            self.timeline.append(("bwd", e, t0, time.perf_counter()))
            self._ship(e, lr, inv_scale)
            return False

        if not self.deferred:
            self.cpu.begin([e for e in computes if e in self.host_params])
        self._jobs: dict[int, Future] = {}
        self._norm_jobs: dict[int, Future] = {}
        self._held: dict[int, HostGrads] = {}
        run_pass(ops, self.store, compute)

    def _ship(self, e: int, lr: float, inv_scale: float | None) -> None:
        """Block e's gradients to host memory, now; then its update (overlapped) or its norms (deferred)."""
        params = self.host_params.get(e)
        if params is None:
            return
        shapes = self.host_shapes[e]
        numel = sum(s.numel() for s in shapes)
        flat, release = self.grads.acquire(e, numel)
        done = self.lanes.mark_compute()  # the block's backward (all micro-batches) is complete
        present, keep, mark = [], [], None
        for p, view in zip(params, views_of(flat, shapes)):
            present.append(p.grad is not None)
            if p.grad is not None:
                mark = self.lanes.offload(view, p.grad, after=done)
                keep.append(p.grad)
                p.grad = None
        self.grad_bytes += numel * flat.element_size()
        grads = HostGrads(flat, present, mark, keep, release)
        if self.deferred:
            self._held[e] = grads
            self._norm_jobs[e] = self.cpu.norms(e, grads, 1.0 if inv_scale is None else inv_scale)
        else:
            self._jobs[e] = self.cpu.update(e, grads, lr=lr, publish=self._publisher(e, done), want_norms=True)
        self._after[e] = done

    # -- the step -----------------------------------------------------------------------------------------

    def _global_norm(self, norms: dict[int, torch.Tensor]) -> float:
        """The reference's norm: of the per-tensor norms, in the model's parameter order."""
        per = [norms[id(p)].to("cpu") for p in self.trainable if id(p) in norms]
        return float(torch.linalg.vector_norm(torch.stack(per))) if per else 0.0

    def step(self, micro: list[dict], lr: float) -> FirstOrderStepResult:
        self.model.train()
        self.acts.reset()
        total = sum(count_targets(mb, self.head) for mb in micro)
        scale = self.scaler.scale
        inv_scale = 1.0 / scale if self.scaler.enabled else None
        outs = self._forward(micro, train=True, scale=scale, total=total)
        loss = sum(float(o.loss_sum) for o in outs) / max(total, 1)
        self._backward(len(micro), lr, inv_scale)
        norms = self.device_opt.norms(inv_scale)
        if not self.deferred:
            for e, fut in self._jobs.items():
                self._register(e, fut)
            results = {e: fut.result() for e, fut in self._jobs.items()}
            for e, res in results.items():
                norms.update({id(p): x for p, x in zip(self.host_params[e], res.norms) if x is not None})
            norm = self._global_norm(norms)
            if not math.isfinite(norm):
                self.device_opt.clear()
                raise NonFiniteGradients(
                    f"the gradients became {norm} at a step whose updates were already overlapped with the backward "
                    "(some blocks changed, the non-finite ones did not); set method.max_grad_norm so that such a "
                    "step is checked before any update and skipped whole, or lower method.lr")
            self.device_opt.step(lr, None)
            self.device_opt.clear()
            return FirstOrderStepResult(loss, norm, total, False, self.scaler.scale)
        for e, fut in self._norm_jobs.items():
            norms.update({id(p): x for p, x in zip(self.host_params[e], fut.result()) if x is not None})
        norm = self._global_norm(norms)
        overflow = not math.isfinite(norm)
        self.scaler.update(overflow)
        if overflow:
            for grads in self._held.values():
                grads.done()
        else:
            clip = self.method.max_grad_norm
            coef = clip / (norm + 1e-6) if clip is not None and norm > clip else None
            self.device_opt.step(lr, coef)
            order = [e for e in range(len(self.names)) if e in self._held]  # the next forward's order
            self.cpu.begin(order)
            for e in order:
                fut = self.cpu.update(e, self._held[e], lr=lr, publish=self._publisher(e, self._after[e]),
                                      inv_scale=1.0 if inv_scale is None else inv_scale, coef=coef)
                self._register(e, fut)
        self._held = {}
        self.device_opt.clear()
        return FirstOrderStepResult(loss, norm, total, overflow, self.scaler.scale)

    # -- evaluation and the final weights -------------------------------------------------------------------

    def losses(self, micro: list[dict]) -> list:
        """Loss of each micro-batch at the current weights (waits for pending updates block by block)."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                return self._forward(micro, train=False)
        finally:
            self.model.train(was)

    def settle(self) -> None:
        """Every queued update done and written home."""
        if self.cpu is not None:
            self.cpu.drain()
        for e in list(self._ready):
            self._wait_ready(e)
        self.store.settle_all()

    def materialize(self) -> None:
        """Put every streamed layer's current weights back into the model (for saving)."""
        self.settle()
        for e, unit in self.store.units.items():
            flat = self.store.home_weights(e)
            for (_, p), view in zip(unit.params, unit.views(flat)):
                p.data = view.to(dtype=p.dtype)
