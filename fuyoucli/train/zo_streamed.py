"""ZO2: the MeZO step with decoder layers streamed between their home tier and the device.

Trainer stage, over the engine (WeightStore, schedule, lanes). Each streamed layer crosses the link
once up and (full-parameter) once down per step. On arrival the device applies the previous step's
deferred update (regenerating its z from the seed), then draws this step's z once per direction and
runs the +eps and -eps passes for every micro-batch while the layer is resident: layer-major order,
2 * q * micro-batches hidden states in flight. Embeddings and head stay resident. With LoRA the
adapters stay resident and are perturbed there; the frozen base streams read-only.

The arithmetic is the in-memory reference's (train/zo.py: draw_z, update_home, home + s*eps*z), so on
one device the losses and weights are bit-identical to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuyoucli.engine.executor import StreamUnit, WeightStore, run_pass
from fuyoucli.engine.tiers import DeviceArena, SsdStore
from fuyoucli.errors import FuyouError
from fuyoucli.model.blocks import param_blocks
from fuyoucli.model.runner import BlockRunner
from fuyoucli.plan.schedule import pass_schedule
from fuyoucli.plan.types import Plan, Tier
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.losses import loss_from_logits
from fuyoucli.train.zo import ZOStepResult, draw_z, update_home

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedPlan(FuyouError):
    exit_code = 2


@dataclass
class _Pending:
    step: int
    grads: list[float]
    lr: float


class ZOStreamed:
    def __init__(self, model, plan: Plan, method: ZO2Method, *, seed: int, head: str, lanes,
                 label_token_ids: tuple[int, ...] = ()):
        self.model, self.plan, self.method, self.seed = model, plan, method, seed
        self.head, self.label_token_ids, self.lanes = head, label_token_ids, lanes
        self.device = lanes.device
        self.runner = BlockRunner(model)
        self._check(plan, method)
        self.blocks = param_blocks(model)  # trainable blocks: the reference's seed indices
        self.block_index = {b.name: i for i, b in enumerate(self.blocks)}
        self.arena = DeviceArena(self.device, plan.device_budget_bytes)
        homes = {b.name: b.weights_home for b in plan.blocks}
        self.streamed_layers = [i for i in range(self.runner.n_layers) if homes.get(f"layers.{i}", Tier.DEVICE) is not Tier.DEVICE]
        self.compute_dtype = DTYPES[plan.compute_dtype]
        self.home_dtype = DTYPES[plan.home_dtype]
        lora = any(not p.requires_grad for p in model.parameters())
        self.full = not lora

        units = []
        for i in self.streamed_layers:
            prefix = f"{self.runner.layer_path}.{i}."
            layer_params = [(prefix + n, p) for n, p in self.runner.layers[i].named_parameters()]
            params = [(n, p) for n, p in layer_params if p.requires_grad == self.full]
            units.append(StreamUnit(index=i + 1, name=f"layers.{i}", params=params, shapes=[],
                                    dtype=self.home_dtype if self.full else self.compute_dtype,
                                    home=homes[f"layers.{i}"], writable=self.full))
        needed = sum(sum(p.numel() for _, p in u.params) * u.dtype.itemsize for u in units if u.home is Tier.SSD)
        self.ssd = SsdStore(plan.swap_dir, needed) if any(u.home is Tier.SSD for u in units) else None
        try:
            # Resident parts first, from the model's (still complete) weights.
            streamed_names = {f"layers.{i}" for i in self.streamed_layers} if self.full else set()
            self.resident = [b for b in range(len(self.blocks)) if self.blocks[b].name not in streamed_names]
            for i, layer in enumerate(self.runner.layers):
                if i not in self.streamed_layers:
                    layer.to(self.device)
            self._move_rest_to_device()
            self.home = {b: [p.detach().to(self.home_dtype, copy=True) for _, p in self.blocks[b].params]
                         for b in self.resident}
            for b in self.resident:
                for h in self.home[b]:
                    self.arena.charge(h.numel() * h.element_size(), f"home copy of {self.blocks[b].name}")
            source = getattr(model, "fuyou_source", None)
            self.store = WeightStore(units, lanes=lanes, arena=self.arena, slots=plan.device_buffers,
                                     ssd=self.ssd, pin=any(u.home is Tier.PINNED for u in units),
                                     source=source)
            if source is not None:
                source.close()
            if self.full and units:
                n = self.store.slot_numel
                self.work = self.arena.alloc(n, self.compute_dtype, "perturbed weights")
                self.zbuf = self.arena.alloc(n, torch.float32, "z buffer")
        except BaseException:
            self.close()
            raise
        self.pending: _Pending | None = None
        self.streamed = [self._is_streamed_layer_block(b) for b in range(self._n_exec_blocks())]

    @staticmethod
    def _check(plan: Plan, method: ZO2Method) -> None:
        for b in plan.blocks:
            if b.name in ("embed", "head") and b.weights_home is not Tier.DEVICE:
                raise UnsupportedPlan(f"the zo2 engine keeps {b.name} on the device; the plan homes it on {b.weights_home.value}")
        if plan.wire_dtype != plan.home_dtype:
            raise UnsupportedPlan(f"the zo2 engine sends home weights as they are stored (home {plan.home_dtype}, "
                                  f"wire {plan.wire_dtype}); the device applies the update, so both must match")
        if method.variant == "momentum" and any(b.weights_home is not Tier.DEVICE for b in plan.blocks):
            raise UnsupportedPlan("variant: momentum runs in memory only for now (its buffer would stream too); "
                                  "use variant sgd or sign, or offload.mode: in_memory")

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

    # -- weights of resident blocks ------------------------------------------------------------------

    @torch.no_grad()
    def _bind_resident(self, name: str, step: int, z: list[torch.Tensor] | None, scale: float) -> None:
        b = self.block_index.get(name)
        if b is None or b not in self.home:
            return
        for (_, p), h, zz in zip(self.blocks[b].params, self.home[b], z or [None] * len(self.home[b])):
            p.copy_(h if zz is None else h + scale * zz)

    def _z_resident(self, name: str, step: int, d: int) -> list[torch.Tensor] | None:
        b = self.block_index.get(name)
        if b is None or b not in self.home:
            return None
        return draw_z(self.seed, step, d, b, [h.shape for h in self.home[b]], self.device)

    # -- one layer-major pass over all blocks ----------------------------------------------------------

    def _forward(self, step: int, micro: list[dict], variants: list[tuple[int, int] | None]):
        """Run every (variant, micro-batch) stream through the model; returns their BatchLoss lists.
        A variant is (direction, sign) for cast(home + sign*eps*z), or None for the weights themselves."""
        eps = self.method.eps
        names = ["embed"] + [f"layers.{i}" for i in range(self.runner.n_layers)] + ["head"]
        hidden: dict[tuple, torch.Tensor] = {}
        prepared: list = [None] * len(micro)
        losses: dict[tuple, list] = {v: [None] * len(micro) for v in variants}
        tied = self._tied()
        charged = 0

        def per_variant(name: str, fn) -> None:
            cache: dict[int, list | None] = {}
            for v in variants:
                if v is None:
                    self._bind_resident(name, step, None, 0.0)
                else:
                    d, s = v
                    if d not in cache:
                        cache = {d: self._z_resident(name, step, d)}
                    self._bind_resident(name, step, cache[d], s * eps)
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
                    if tied and v is not None:
                        d, s = v
                        self._bind_resident("embed", step, self._z_resident("embed", step, d), s * eps)
                    elif tied:
                        self._bind_resident("embed", step, None, 0.0)
                    for k, mb in enumerate(micro):
                        logits = self.runner.run_head(hidden[(v, k)], mb["input_ids"], mb["attention_mask"])
                        losses[v][k] = loss_from_logits(logits, mb, head=self.head, label_token_ids=self.label_token_ids)
                per_variant("head", head_fn)
                return False
            i = e - 1
            name = names[e]
            layer_params = None
            dirty = False
            if slot is not None:
                views = self.store.acquire(e, slot)
                unit = self.store.units[e]
                if self.full:
                    dirty = self._apply_pending(unit, views)
                    flat = self.store.flat(e, slot)
                    work = self.work[: unit.numel]
                    zflat = self.zbuf[: unit.numel]
                    layer_params = (unit, flat, work, zflat)
                else:
                    for (_, p), view in zip(unit.params, views):
                        p.data = view
            if layer_params is None:
                def run(v):
                    for k, mb in enumerate(micro):
                        hidden[(v, k)] = self.runner.run_layer(i, hidden[(v, k)], prepared[k])
                per_variant(name, run)
            else:
                unit, flat, work, zflat = layer_params
                b = self.block_index[name]
                zviews = unit.views(zflat)
                last_d = None
                for v in variants:
                    with torch.no_grad():
                        if v is None:
                            work.copy_(flat)
                        else:
                            d, s = v
                            if d != last_d:
                                draw_z(self.seed, step, d, b, None, self.device, out=zviews)
                                last_d = d
                            for wv, hv, zv in zip(unit.views(work), unit.views(flat), zviews):
                                wv.copy_(hv + (s * eps) * zv)
                    for (_, p), wv in zip(unit.params, unit.views(work)):
                        p.data = wv
                    for k, mb in enumerate(micro):
                        hidden[(v, k)] = self.runner.run_layer(i, hidden[(v, k)], prepared[k])
            return dirty

        ops = pass_schedule(self.streamed, self.plan.prefetch_depth)
        try:
            with torch.no_grad():
                run_pass(ops, self.store, compute)
        finally:
            self.arena.release(charged)
        return losses

    def _tied(self) -> bool:
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        return out is not None and inp is not None and out.weight is inp.weight

    @torch.no_grad()
    def _apply_pending(self, unit: StreamUnit, views: list[torch.Tensor]) -> bool:
        if self.pending is None:
            return False
        pend = self.pending
        b = self.block_index[unit.name]
        zviews = unit.views(self.zbuf[: unit.numel])
        update_home(views, lambda d: draw_z(self.seed, pend.step, d, b, None, self.device, out=zviews),
                    pend.grads, pend.lr, self.method)
        return True

    # -- the training step, flush and evaluation --------------------------------------------------------

    def step(self, step: int, micro_batches: list[dict], lr: float) -> ZOStepResult:
        m = self.method
        self.model.eval()
        variants = [(d, s) for d in range(m.q) for s in (1, -1)]
        losses = self._forward(step, micro_batches, variants)
        grads, means, tokens = [], [], 0
        for d in range(m.q):
            pair = []
            for s in (1, -1):
                total, count = 0.0, 0
                for out in losses[(d, s)]:
                    total += float(out.loss_sum)
                    count += out.count
                pair.append(total / max(count, 1))
                tokens = count
            grads.append((pair[0] - pair[1]) / (2 * m.eps))
            means += pair
        with torch.no_grad():
            for b in self.resident:
                update_home(self.home[b], lambda d, b=b: draw_z(self.seed, step, d, b, [h.shape for h in self.home[b]], self.device),
                            grads, lr, m)
                self._bind_resident(self.blocks[b].name, step, None, 0.0)
        self.pending = _Pending(step, grads, lr) if (self.full and self.streamed_layers) else None
        return ZOStepResult(sum(means) / len(means), grads, tokens)

    def flush(self) -> None:
        """Apply the deferred update to every streamed layer and write it home (before eval or save)."""
        if self.pending is None:
            return

        def compute(e: int, slot: int | None) -> bool:
            if slot is None:
                return False
            views = self.store.acquire(e, slot)
            return self._apply_pending(self.store.units[e], views)

        run_pass(pass_schedule(self.streamed, self.plan.prefetch_depth), self.store, compute)
        self.pending = None
        self.store.settle_all()

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
        param.<name> for the resident homes, then each streamed layer's home as read from its tier."""
        self.flush()
        names = self._names()
        resident = {f"param.{name}": h for b in self.resident for (name, _), h in zip(self.blocks[b].params, self.home[b])}
        yield "resident", resident
        if self.full:
            for e, unit in self.store.units.items():
                flat = self.store.home_weights(e)
                yield unit.name, {f"param.{names[id(p)]}": v for (_, p), v in zip(unit.params, unit.views(flat))}

    @torch.no_grad()
    def load_state(self, tensors) -> None:
        """Put checkpointed home weights back (resident ones in place, streamed ones to their tier)."""
        names = self._names()
        for b in self.resident:
            for (name, _), h in zip(self.blocks[b].params, self.home[b]):
                h.copy_(tensors[f"param.{name}"])
            self._bind_resident(self.blocks[b].name, 0, None, 0.0)
        if self.full:
            for e, unit in self.store.units.items():
                flat = torch.cat([tensors[f"param.{names[id(p)]}"].reshape(-1).to(self.home_dtype) for _, p in unit.params])
                self.store.set_home_weights(e, flat)
        self.pending = None

    @torch.no_grad()
    def replay(self, step: int, grads: list[float], lr: float) -> None:
        """Apply a recorded step's update exactly as step() does: resident blocks now, streamed layers on
        the next pass (flushed first, so that updates land in order)."""
        self.flush()
        for b in self.resident:
            update_home(self.home[b], lambda d, b=b: draw_z(self.seed, step, d, b, [h.shape for h in self.home[b]], self.device),
                        grads, lr, self.method)
            self._bind_resident(self.blocks[b].name, step, None, 0.0)
        self.pending = _Pending(step, grads, lr) if (self.full and self.streamed_layers) else None
