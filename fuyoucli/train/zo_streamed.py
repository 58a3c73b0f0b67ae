"""ZO2: the MeZO step with decoder layers streamed between their home tier and the device.

Trainer stage, over the engine (WeightStore, schedule, lanes). Each streamed layer crosses the link
once up and (full-parameter) once down per step. On arrival the device applies the previous step's
deferred update (regenerating its z from the seed), then draws this step's z once per direction and
runs the +eps and -eps passes for every micro-batch while the layer is resident: layer-major order,
2 * q * micro-batches hidden states in flight. Embeddings and head stay resident. With LoRA the
adapters stay resident and are perturbed there; the frozen base streams read-only.

Variant momentum: each streamed layer's fp32 momentum buffer lives at the layer's home (host memory
or an SSD file beside the weights), in a second WeightStore fetched into the same slot number and
written back with the layer whenever an update is applied. Variant conservative: a second streamed
pass per step (read-only) runs three hidden streams per micro-batch, at w, w - u and w + u, each
candidate's weights made from the home copy and z regenerated from the seed; the kept candidate's
update (c * lr) is deferred like any other.

No allocation in the hot loop: buffers allocated once from the device arena and reused by every
block: z (fp32), the update direction and (half-precision homes) the fp32 working copy (the largest
tensor's: updates and candidates go tensor by tensor, z from ZStreams), and the compute copy of a
streamed layer. The model's own forward still makes its activations. The z buffer is the plan's
choice (Plan.z_buffer): 'block', the largest block's, a direction's z drawn once for its +eps and
-eps passes; or 'tensor', the largest tensor's, z drawn tensor by tensor for each pass that needs it
(the block's generator replayed from its start: the same numbers, one more draw per direction, and
a block's worth of fp32 less on the device).

The arithmetic is the in-memory reference's (train/zo.py: draw_z, ZStreams, tensor_direction,
update_home, candidate_into, home + s*eps*z), so on one device the losses and weights are
bit-identical to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fuyoucli.engine.executor import StreamUnit, WeightStore, run_pass
from fuyoucli.engine.flat import views_of
from fuyoucli.engine.tiers import DeviceArena, SsdStore
from fuyoucli.errors import FuyouError
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.runner import BlockRunner
from fuyoucli.plan.schedule import pass_schedule
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.losses import loss_from_logits
from fuyoucli.train.zo import (CANDIDATES, ZOStepResult, ZStreams, candidate_into, choose_candidate, draw_z, iter_z,
                               tensor_direction, update_home)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedPlan(FuyouError):
    exit_code = 2


@dataclass
class _Pending:
    step: int
    grads: list[float]
    lr: float


class _ZeroSource:
    """Where the momentum store's placeholder parameters take their shapes and first values (zeros),
    one tensor at a time, as a lazily loaded model's layers come from their file."""

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes

    def shape(self, name: str) -> torch.Size:
        return self.shapes[name]

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(self.shapes[name], dtype=dtype)


class _WithMomentum:
    """The weights' store and the momentum's, walked as one by run_pass: a layer's momentum goes into
    the same slot number as its weights, and is written back with them when the update changed it."""

    def __init__(self, weights: WeightStore, momentum: WeightStore):
        self.weights, self.momentum = weights, momentum

    @property
    def units(self):
        return self.weights.units

    @property
    def recorder(self):
        return self.weights.recorder

    def fetch(self, b: int, slot: int) -> None:
        self.weights.fetch(b, slot)
        self.momentum.recorder = self.weights.recorder
        self.momentum.fetch(b, slot)

    def release(self, b: int, slot: int, dirty: bool) -> None:
        self.weights.release(b, slot, dirty)
        self.momentum.release(b, slot, dirty)


class ZOStreamed:
    def __init__(self, model, plan: Plan, method: ZO2Method, *, seed: int, head: str, lanes,
                 label_token_ids: tuple[int, ...] = ()):
        self.model, self.plan, self.method, self.seed = model, plan, method, seed
        self.head, self.label_token_ids, self.lanes = head, label_token_ids, lanes
        self.device = lanes.device
        self.runner = BlockRunner(model)
        self._check(plan, method)
        self.z_per_tensor = plan.z_buffer == "tensor"
        self.blocks = param_blocks(model)  # trainable blocks: the reference's seed indices
        self.block_index = {b.name: i for i, b in enumerate(self.blocks)}
        self.arena = DeviceArena(self.device, plan.device_budget_bytes)
        homes = {b.name: b.weights_home for b in plan.blocks}
        self.streamed_layers = [i for i in range(self.runner.n_layers) if homes.get(f"layers.{i}", Tier.DEVICE) is not Tier.DEVICE]
        self.compute_dtype = DTYPES[plan.compute_dtype]
        self.home_dtype = DTYPES[plan.home_dtype]
        lora = any(not p.requires_grad for p in model.parameters())
        self.full = not lora
        self.mstore: WeightStore | None = None
        self.ssd = None
        momentum = method.variant == "momentum"

        units = []
        for i in self.streamed_layers:
            prefix = f"{self.runner.layer_path}.{i}."
            layer_params = [(prefix + n, p) for n, p in self.runner.layers[i].named_parameters()]
            params = [(n, p) for n, p in layer_params if p.requires_grad == self.full]
            units.append(StreamUnit(index=i + 1, name=f"layers.{i}", params=params, shapes=[],
                                    dtype=self.home_dtype if self.full else self.compute_dtype,
                                    home=homes[f"layers.{i}"], writable=self.full))
        per_elem = (self.home_dtype.itemsize + (4 if momentum else 0)) if self.full else self.compute_dtype.itemsize
        needed = sum(sum(p.numel() for _, p in u.params) * per_elem for u in units if u.home is Tier.SSD)
        try:
            self.ssd = SsdStore(plan.swap_dir, needed) if any(u.home is Tier.SSD for u in units) else None
            # Resident parts first, from the model's (still complete) weights.
            streamed_names = {f"layers.{i}" for i in self.streamed_layers} if self.full else set()
            self.resident = [b for b in range(len(self.blocks)) if self.blocks[b].name not in streamed_names]
            for i, layer in enumerate(self.runner.layers):
                if i not in self.streamed_layers:
                    layer.to(self.device)
            self._move_rest_to_device()
            self.home = {b: [p.detach().to(self.home_dtype, copy=True) for _, p in self.blocks[b].params]
                         for b in self.resident}
            self.res_shapes = {b: [h.shape for h in self.home[b]] for b in self.resident}
            for b in self.resident:
                for h in self.home[b]:
                    self.arena.charge(h.numel() * h.element_size(), f"home copy of {self.blocks[b].name}")
            self.mom_res: dict[int, list[torch.Tensor]] = {}
            if momentum:
                for b in self.resident:
                    self.mom_res[b] = [self.arena.alloc(s.numel(), torch.float32, f"momentum of {self.blocks[b].name}")
                                       .zero_().view(s) for s in self.res_shapes[b]]
            source = getattr(model, "fuyou_source", None)
            pin = any(u.home is Tier.PINNED for u in units)
            self.store = WeightStore(units, lanes=lanes, arena=self.arena, slots=plan.device_buffers,
                                     ssd=self.ssd, pin=pin, source=source)
            if source is not None:
                source.close()
            if self.full and units and momentum:
                self.mstore = self._momentum_store(units, pin)
            self._allocate_buffers(units)
        except BaseException:
            self.close()
            raise
        self.pending: _Pending | None = None
        self.streamed = [self._is_streamed_layer_block(b) for b in range(self._n_exec_blocks())]
        self._zkey: tuple | None = None  # which (block, step, direction) z the z buffer holds
        self._grads: list[float] = []  # the step's projected gradients, for the conservative candidates

    def _momentum_store(self, units: list[StreamUnit], pin: bool) -> WeightStore:
        """Each streamed layer's fp32 momentum, at the layer's home tier, zeros to begin with."""
        shapes = {n: s for u in units for (n, _), s in zip(u.params, u.shapes)}
        placeholders = [StreamUnit(index=u.index, name=f"{u.name}.momentum",
                                   params=[(n, nn.Parameter(torch.empty(0), requires_grad=False)) for n, _ in u.params],
                                   shapes=[], dtype=torch.float32, home=u.home, writable=True) for u in units]
        store = WeightStore(placeholders, lanes=self.lanes, arena=self.arena, slots=self.plan.device_buffers,
                            ssd=self.ssd, pin=pin, source=_ZeroSource(shapes), key_prefix="momentum")
        store.stats = self.store.stats  # one count of what crossed the link
        return store

    def _allocate_buffers(self, units: list[StreamUnit]) -> None:
        """The step's working buffers, once: z (fp32) for the largest block, or with the plan's z_buffer
        'tensor' for the largest tensor; the update direction (also the perturbation's scaled z) and the
        fp32 copy of a half-precision home for the largest tensor; and the compute-dtype copy a streamed
        layer computes with."""
        shapes = [s for b in self.resident for s in self.res_shapes[b]]
        slot = 0
        if self.full and units:
            slot = self.store.slot_numel
            shapes += [s for u in units for s in u.shapes]
        largest_block = max([slot] + [sum(s.numel() for s in self.res_shapes[b]) for b in self.resident])
        largest_tensor = max((s.numel() for s in shapes), default=0)
        self.zbuf = self.arena.alloc(largest_tensor if self.z_per_tensor else largest_block, torch.float32,
                                     "z buffer")
        self.dirbuf = self.arena.alloc(largest_tensor, torch.float32, "direction buffer")
        self.home32 = (self.arena.alloc(largest_tensor, torch.float32, "fp32 copy of a half-precision home")
                       if self.home_dtype != torch.float32 else None)
        self.work = self.arena.alloc(slot, self.compute_dtype, "perturbed weights") if slot else None

    @staticmethod
    def _check(plan: Plan, method: ZO2Method) -> None:
        for b in plan.blocks:
            if b.name in ("embed", "head") and b.weights_home is not Tier.DEVICE:
                raise UnsupportedPlan(f"the zo2 engine keeps {b.name} on the device; the plan homes it on {b.weights_home.value}")
        if plan.wire_dtype != plan.home_dtype:
            raise UnsupportedPlan(f"the zo2 engine sends home weights as they are stored (home {plan.home_dtype}, "
                                  f"wire {plan.wire_dtype}); the device applies the update, so both must match")
        if plan.z_buffer not in ("block", "tensor"):
            raise UnsupportedPlan(f"z_buffer {plan.z_buffer!r}: the zo2 engine holds z per 'block' or per 'tensor'")

    def _move_rest_to_device(self) -> None:
        layer_ids = {id(p) for layer in self.runner.layers for p in layer.parameters()}
        for p in self.model.parameters():
            if id(p) not in layer_ids:
                p.data = p.data.to(self.device)
        for module in self.model.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buf.to(self.device)

    # execution blocks: 0 = embed stage, 1..L = layers, L+1 = head stage
    def _n_exec_blocks(self) -> int:
        return self.runner.n_layers + 2

    def _is_streamed_layer_block(self, e: int) -> bool:
        return 1 <= e <= self.runner.n_layers and (e - 1) in self.streamed_layers

    def close(self) -> None:
        if getattr(self, "ssd", None) is not None:
            self.ssd.close()
            self.ssd = None

    # -- the shared buffers: z, the update direction, the fp32 working copy ----------------------------

    def _z(self, b: int, step: int, d: int, shapes):
        """z(step, d) of block b, tensor by tensor in the block's order. z_buffer 'block': views of the z
        buffer, drawn only if it holds something else (the +eps and -eps passes of a direction share one
        draw). 'tensor': each tensor drawn into the front of the buffer as it is asked for (lazily: the
        previous one is dead by then) by the generator of (step, d, b) replayed from its start, so each
        holds the numbers draw_z gives it."""
        if self.z_per_tensor:
            return iter_z(self.seed, step, d, b, shapes, self.device, buffer=self.zbuf)
        views = views_of(self.zbuf, shapes)
        if self._zkey != (b, step, d):
            draw_z(self.seed, step, d, b, None, self.device, out=views)
            self._zkey = (b, step, d)
        return views

    def _widened(self, h: torch.Tensor) -> torch.Tensor:
        """h itself if fp32, else its fp32 copy in the working buffer (a mixed-dtype sum would make that
        copy itself: a new tensor, the same numbers)."""
        return h if h.dtype == torch.float32 else self.home32[: h.numel()].view(h.shape).copy_(h)

    def _update(self, b: int, home: list[torch.Tensor], pend: _Pending, momentum: list[torch.Tensor] | None) -> bool:
        zs = ZStreams(self.seed, pend.step, b, len(pend.grads), self.device)
        changed = update_home(home, zs, pend.grads, pend.lr, self.method, momentum, acc=self.dirbuf, home32=self.home32,
                              zbuf=self.zbuf)
        self._zkey = None
        return changed

    def _variant_into(self, b: int, step: int, v, params: list[torch.Tensor], home: list[torch.Tensor], shapes) -> None:
        """params := the weights variant v sees: home (None), cast(home + s*eps*z_d) ((d, s)), or a
        conservative candidate cast(home + alpha * direction) (("u", c, alpha)), tensor by tensor."""
        if v is None:
            for p, h in zip(params, home):
                p.copy_(h)
        elif v[0] == "u":
            zs = ZStreams(self.seed, step, b, len(self._grads), self.device)
            for p, h in zip(params, home):
                h32 = self._widened(h)
                z = self.zbuf[: h.numel()].view(h.shape)
                g = tensor_direction(self.dirbuf[: h.numel()].view(h.shape), h32, lambda d: zs.draw(d, h.shape, out=z),
                                     self._grads, self.method, scratch=z)
                candidate_into(p, h32, g, v[2], self.home_dtype, out32=p if p.dtype == torch.float32 else z)
            self._zkey = None
        else:
            d, s = v
            zs = self._z(b, step, d, shapes)
            for p, h, z in zip(params, home, zs):
                t = torch.mul(z, s * self.method.eps, out=self.dirbuf[: h.numel()].view(h.shape))
                h32 = self._widened(h)
                if p.dtype == torch.float32:
                    torch.add(h32, t, out=p)
                else:
                    p.copy_(torch.add(h32, t, out=t))

    # -- weights of resident blocks ------------------------------------------------------------------

    @torch.no_grad()
    def _bind_resident(self, name: str, step: int, v) -> None:
        b = self.block_index.get(name)
        if b is None or b not in self.home:
            return
        self._variant_into(b, step, v, [p for _, p in self.blocks[b].params], self.home[b], self.res_shapes[b])

    # -- one layer-major pass over all blocks ----------------------------------------------------------

    def _forward(self, step: int, micro: list[dict], variants: list):
        """Run every (variant, micro-batch) stream through the model; returns their BatchLoss lists.
        A variant is (direction, sign) for cast(home + sign*eps*z), ("u", c, alpha) for a conservative
        candidate cast(home + alpha * direction), or None for the weights themselves."""
        names = ["embed"] + [f"layers.{i}" for i in range(self.runner.n_layers)] + ["head"]
        hidden: dict[tuple, torch.Tensor] = {}
        prepared: list = [None] * len(micro)
        losses: dict = {v: [None] * len(micro) for v in variants}
        tied = self._tied()
        charged = 0
        paired = self.mstore is not None and self.pending is not None

        def per_variant(name: str, fn) -> None:
            for v in variants:
                self._bind_resident(name, step, v)
                fn(v)

        def compute(e: int, slot: int | None) -> bool:
            nonlocal charged
            if e == 0:
                def embed(v):
                    nonlocal charged
                    for k, mb in enumerate(micro):
                        out = self.runner.capture(mb["input_ids"], mb["attention_mask"])
                        prepared[k] = prepared[k] or out
                        hidden[(v, k)] = out.hidden
                    nbytes = sum(t.numel() * t.element_size() for t in hidden.values())
                    if nbytes > charged:
                        self.arena.charge(nbytes - charged, "hidden states")
                        charged = nbytes
                per_variant("embed", embed)
                return False
            if e == len(names) - 1:
                def head_fn(v):
                    if tied:
                        self._bind_resident("embed", step, v)
                    for k, mb in enumerate(micro):
                        logits = self.runner.run_head(hidden[(v, k)], mb["input_ids"], mb["attention_mask"])
                        losses[v][k] = loss_from_logits(logits, mb, head=self.head, label_token_ids=self.label_token_ids)
                per_variant("head", head_fn)
                return False
            i = e - 1
            name = names[e]
            if slot is None or not self.full:
                if slot is not None:  # LoRA: the frozen base computes straight from its slot
                    unit = self.store.units[e]
                    for (_, p), view in zip(unit.params, self.store.acquire(e, slot)):
                        p.data = view

                def run(v):
                    for k, mb in enumerate(micro):
                        hidden[(v, k)] = self.runner.run_layer(i, hidden[(v, k)], prepared[k])
                per_variant(name, run)
                return False
            views = self.store.acquire(e, slot)
            unit = self.store.units[e]
            momentum = self.mstore.acquire(e, slot) if paired else None
            dirty = self._apply_pending(unit, views, momentum)
            work = unit.views(self.work[: unit.numel])
            b = self.block_index[name]
            for v in variants:
                with torch.no_grad():
                    self._variant_into(b, step, v, work, views, unit.shapes)
                for (_, p), wv in zip(unit.params, work):
                    p.data = wv
                for k, mb in enumerate(micro):
                    hidden[(v, k)] = self.runner.run_layer(i, hidden[(v, k)], prepared[k])
            return dirty

        ops = pass_schedule(self.streamed, self.plan.prefetch_depth)
        store = _WithMomentum(self.store, self.mstore) if paired else self.store
        try:
            with torch.no_grad():
                run_pass(ops, store, compute)
        finally:
            self.arena.release(charged)
        return losses

    def _tied(self) -> bool:
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        return out is not None and inp is not None and out.weight is inp.weight

    @torch.no_grad()
    def _apply_pending(self, unit: StreamUnit, views: list[torch.Tensor], momentum: list[torch.Tensor] | None) -> bool:
        if self.pending is None:
            return False
        return self._update(self.block_index[unit.name], views, self.pending, momentum)

    # -- the training step, flush and evaluation --------------------------------------------------------

    @staticmethod
    def _mean(outs) -> tuple[float, int]:
        total, count = 0.0, 0
        for out in outs:
            total += float(out.loss_sum)
            count += out.count
        return total / max(count, 1), count

    def step(self, step: int, micro_batches: list[dict], lr: float) -> ZOStepResult:
        m = self.method
        self.model.eval()
        variants = [(d, s) for d in range(m.q) for s in (1, -1)]
        losses = self._forward(step, micro_batches, variants)
        self.pending = None  # the pass applied it to every streamed layer
        grads, means, tokens = [], [], 0
        for d in range(m.q):
            pair = []
            for s in (1, -1):
                mean, tokens = self._mean(losses[(d, s)])
                pair.append(mean)
            grads.append((pair[0] - pair[1]) / (2 * m.eps))
            means += pair
        applied, kept, candidates = lr, None, None
        if m.variant == "conservative":
            # A second pass, read-only: w, w - u and w + u side by side for every micro-batch.
            self._grads = grads
            alts = {c: ("u", c, -(c * lr)) if c else None for c in CANDIDATES}
            out = self._forward(step, micro_batches, list(alts.values()))
            found = {c: self._mean(out[v])[0] for c, v in alts.items()}
            kept = choose_candidate(found)
            applied, candidates = kept * lr, (found[1], found[0], found[-1])
        self._apply_resident(step, grads, applied)
        return ZOStepResult(sum(means) / len(means), grads, tokens, applied, kept, candidates)

    @torch.no_grad()
    def _apply_resident(self, step: int, grads: list[float], lr: float) -> None:
        """The step's update: resident blocks now, streamed layers deferred to their next fetch."""
        pend = _Pending(step, grads, lr)
        for b in self.resident:
            self._update(b, self.home[b], pend, self.mom_res.get(b))
            self._bind_resident(self.blocks[b].name, step, None)
        rejected = self.method.variant == "conservative" and lr == 0
        self.pending = pend if (self.full and self.streamed_layers and not rejected) else None

    def flush(self) -> None:
        """Apply the deferred update to every streamed layer and write it home (before eval or save)."""
        if self.pending is None:
            return
        paired = self.mstore is not None

        def compute(e: int, slot: int | None) -> bool:
            if slot is None:
                return False
            views = self.store.acquire(e, slot)
            momentum = self.mstore.acquire(e, slot) if paired else None
            return self._apply_pending(self.store.units[e], views, momentum)

        store = _WithMomentum(self.store, self.mstore) if paired else self.store
        run_pass(pass_schedule(self.streamed, self.plan.prefetch_depth), store, compute)
        self.pending = None
        self.store.settle_all()
        if paired:
            self.mstore.settle_all()

    def losses(self, micro: list[dict]) -> list:
        """Loss of each micro-batch at the current weights (flushes first)."""
        self.flush()
        return self._forward(0, micro, [None])[None]

    def materialize(self) -> None:
        """Put every streamed layer's current weights back into the model (for saving)."""
        self.flush()
        for e, unit in self.store.units.items():
            flat = self.store.home_weights(e)
            for (_, p), view in zip(unit.params, unit.views(flat)):
                p.data = view.to(dtype=p.dtype)

    # -- checkpoints: home weights (the deferred update applied first); z comes back from the seed -------

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def state_shards(self):
        """(shard, tensors) one block at a time, so that a model homed on SSD is never whole in memory:
        param.<name> (and momentum.<name>) for the resident homes, then each streamed layer's home as
        read from its tier."""
        self.flush()
        names = self._names()
        resident = {}
        for b in self.resident:
            for i, ((name, _), h) in enumerate(zip(self.blocks[b].params, self.home[b])):
                resident[f"param.{name}"] = h
                if b in self.mom_res:
                    resident[f"momentum.{name}"] = self.mom_res[b][i]
        yield "resident", resident
        if self.full:
            for e, unit in self.store.units.items():
                flat = self.store.home_weights(e)
                shard = {f"param.{names[id(p)]}": v for (_, p), v in zip(unit.params, unit.views(flat))}
                if self.mstore is not None:
                    mom = self.mstore.units[e].views(self.mstore.home_weights(e))
                    shard.update({f"momentum.{names[id(p)]}": v for (_, p), v in zip(unit.params, mom)})
                yield unit.name, shard

    @torch.no_grad()
    def load_state(self, tensors) -> None:
        """Put checkpointed home weights (and momentum) back: resident ones in place, streamed ones to
        their tier."""
        names = self._names()
        for b in self.resident:
            for i, ((name, _), h) in enumerate(zip(self.blocks[b].params, self.home[b])):
                h.copy_(tensors[f"param.{name}"])
                if b in self.mom_res:
                    self.mom_res[b][i].copy_(tensors[f"momentum.{name}"])
            self._bind_resident(self.blocks[b].name, 0, None)
        if self.full:
            for e, unit in self.store.units.items():
                flat = torch.cat([tensors[f"param.{names[id(p)]}"].reshape(-1).to(self.home_dtype) for _, p in unit.params])
                self.store.set_home_weights(e, flat)
                if self.mstore is not None:
                    self.mstore.set_home_weights(e, torch.cat([tensors[f"momentum.{names[id(p)]}"].reshape(-1).float()
                                                               for _, p in unit.params]))
        self.pending = None

    @torch.no_grad()
    def replay(self, step: int, grads: list[float], lr: float) -> None:
        """Apply a recorded step's update (the lr it was applied with: c * lr for the conservative
        variant) exactly as step() does: resident blocks now, streamed layers on the next pass (flushed
        first, so that updates land in order)."""
        self.flush()
        self._apply_resident(step, grads, lr)
