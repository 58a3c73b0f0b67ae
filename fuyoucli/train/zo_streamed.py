"""ZO2: the MeZO step with decoder layers streamed between their home tier and the device.

Trainer stage, a step function over an Engine (engine/build.py: the stores, arena and homes the plan
decided) and the zo2 schedules (plan/schedule.py). Each streamed layer crosses the link once up and
(full-parameter) once down per step. On arrival the device applies the previous step's deferred
update (regenerating its z from the seed), then draws this step's z once per direction and runs the
+eps and -eps passes for every micro-batch while the layer is resident: layer-major order,
2 * q * micro-batches hidden states in flight. Embeddings and head stay resident. With LoRA the
adapters stay resident and are perturbed there; the frozen base streams read-only.

Variants: momentum keeps each streamed layer's fp32 momentum at the layer's home, fetched into the
same slot and written back with the layer; conservative runs a second, read-only pass per step with
three hidden streams per micro-batch (w, w - u, w + u, made from the home copy and z from the seed),
and defers the kept candidate's update (c * lr) like any other.

No allocation in the hot loop: z (fp32), the update direction, the fp32 working copy of a
half-precision home and the compute copy of a streamed layer are allocated once from the device
arena. Tensors go through z, the direction and the working copy in pieces (Plan.z_piece, 16 M
elements), so those buffers are a piece long whatever the largest tensor. The z buffer is the plan's
choice (Plan.z_buffer): 'block', the largest block's, a direction's z drawn once for its +eps and -eps
passes; or 'tensor', one piece's, z drawn piece by piece for each pass that needs it (the block's
generator replayed: the same numbers).

The arithmetic is the in-memory reference's (train/zo.py: draw_z, ZStreams, tensor_direction,
update_home, candidate_weights, home + s*eps*z), so on one device the losses and weights are
bit-identical to it.

Why it is long: four passes (the +-eps passes, the conservative candidates, the flush of the
deferred update, evaluation) share one set of buffers and the pending update; read together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fuyoucli.engine.build import Engine, build
from fuyoucli.engine.executor import StorePair, run_pass
from fuyoucli.engine.flat import views_of
from fuyoucli.plan.schedule import zo_flush, zo_pass
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.losses import loss_from_logits
from fuyoucli.engine.rounding import Rounding
from fuyoucli.train.zo import (CANDIDATES, ZOStepResult, ZStreams, candidate_weights, choose_candidate, draw_z,
                               iter_z_pieces, pieces, update_home)


@dataclass
class _Pending:
    step: int
    grads: list[float]
    lr: float


@dataclass
class _Pass:
    """One layer-major pass: every (variant, micro-batch) stream's hidden state, block after block."""

    step: int
    micro: list[dict]
    variants: list
    hidden: dict = field(default_factory=dict)
    prepared: list = field(default_factory=list)
    losses: dict = field(default_factory=dict)
    charged_bytes: int = 0
    """Hidden states charged to the arena (released when the pass ends)."""


class ZOStreamed:
    def __init__(self, engine: Engine, method: ZO2Method, *, seed: int, head: str,
                 label_token_ids: tuple[int, ...] = (), home_rounding: Rounding = "nearest"):
        self.engine, self.model, self.plan, self.method, self.seed = engine, engine.model, engine.plan, method, seed
        self.home_rounding = home_rounding  # how an update is stored into a 16-bit home (train/rounding.py)
        self.head, self.label_token_ids, self.lanes = head, label_token_ids, engine.lanes
        self.device, self.runner, self.arena = engine.device, engine.runner, engine.arena
        self.store, self.mstore = engine.store, engine.momentum
        self.z_per_tensor, self.piece = self.plan.z_buffer == "tensor", self.plan.z_piece
        self.blocks = engine.trainable  # trainable blocks: the reference's seed indices
        self.block_index = {b.name: i for i, b in enumerate(self.blocks)}
        self.compute_dtype, self.home_dtype = engine.compute_dtype, engine.home_dtype
        self.full = not engine.lora
        self.streamed = engine.streamed
        self.resident = [b for b, blk in enumerate(self.blocks) if blk.name in engine.resident_homes]
        self.home = {b: engine.resident_homes[self.blocks[b].name] for b in self.resident}
        self.res_shapes = {b: [h.shape for h in self.home[b]] for b in self.resident}
        self.mom_res = {b: engine.resident_momentum[self.blocks[b].name] for b in self.resident
                        if self.blocks[b].name in engine.resident_momentum}
        self._allocate_buffers()
        self.pending: _Pending | None = None
        self._zkey: tuple | None = None  # which (block, step, direction) z the z buffer holds
        self._grads: list[float] = []  # the step's projected gradients, for the conservative candidates

    @classmethod
    def from_plan(cls, model, plan: Plan, method: ZO2Method, *, seed: int, head: str, lanes,
                  label_token_ids: tuple[int, ...] = (), home_rounding: Rounding = "nearest") -> ZOStreamed:
        """The engine built from the plan (engine.build), and the trainer over it."""
        engine = build(plan, model, lanes, zo_momentum=method.variant == "momentum")
        try:
            return cls(engine, method, seed=seed, head=head, label_token_ids=label_token_ids,
                       home_rounding=home_rounding)
        except BaseException:
            engine.close()
            raise

    def _allocate_buffers(self) -> None:
        """The step's working buffers, once: z (fp32) for the largest block, or with the plan's z_buffer
        'tensor' for a piece; the update direction (also the perturbation's scaled z) and the fp32 copy
        of a half-precision home for a piece (the largest tensor, if smaller); and the compute-dtype
        copy a streamed layer computes with."""
        units = list(self.store.units.values())
        shapes = [s for b in self.resident for s in self.res_shapes[b]]
        slot = 0
        if self.full and units:
            slot = self.store.slot_numel
            shapes += [s for u in units for s in u.shapes]
        largest_block = max([slot] + [sum(s.numel() for s in self.res_shapes[b]) for b in self.resident])
        self.largest_tensor = max((s.numel() for s in shapes), default=0)
        piece = min(self.largest_tensor, self.piece)
        self.zbuf = self.arena.alloc(piece if self.z_per_tensor else max(largest_block, piece), torch.float32,
                                     "z buffer")
        self.dirbuf = self.arena.alloc(piece, torch.float32, "direction buffer")
        self.home32 = (self.arena.alloc(piece, torch.float32, "fp32 copy of a half-precision home")
                       if self.home_dtype != torch.float32 else None)
        self.work = self.arena.alloc(slot, self.compute_dtype, "perturbed weights") if slot else None

    def close(self) -> None:
        self.engine.close()

    # -- the shared buffers: z, the update direction, the fp32 working copy ----------------------------

    def _z_pieces(self, b: int, step: int, d: int, shapes):
        """z(step, d) of block b, piece by piece in the block's order: (tensor index, start, end, z of
        the piece). z_buffer 'block': views of the z buffer, drawn only if it holds something else (the
        +eps and -eps passes of a direction share one draw). 'tensor': each piece drawn into the front
        of the buffer as it is asked for (lazily: the previous one is dead by then) by the generator of
        (step, d, b) replayed from its start, so each holds the numbers draw_z gives it."""
        if self.z_per_tensor:
            yield from iter_z_pieces(self.seed, step, d, b, shapes, self.device, self.zbuf, self.piece)
            return
        views = views_of(self.zbuf, shapes)
        if self._zkey != (b, step, d):
            draw_z(self.seed, step, d, b, None, self.device, out=views, piece=self.piece)
            self._zkey = (b, step, d)
        for i, view in enumerate(views):
            flat = view.view(-1)
            for a, e in pieces(flat.numel(), self.piece):
                yield i, a, e, flat[a:e]

    def _zstreams(self, step: int, b: int, q: int) -> ZStreams:
        return ZStreams(self.seed, step, b, q, self.device, self.home_rounding, self.piece)

    def _update(self, b: int, home: list[torch.Tensor], pend: _Pending, momentum: list[torch.Tensor] | None) -> bool:
        changed = update_home(home, self._zstreams(pend.step, b, len(pend.grads)), pend.grads, pend.lr, self.method,
                              momentum, acc=self.dirbuf, home32=self.home32, zbuf=self.zbuf)
        self._zkey = None
        return changed

    def _variant_into(self, b: int, step: int, v, params: list[torch.Tensor], home: list[torch.Tensor], shapes) -> None:
        """params := the weights variant v sees: home (None), cast(home + s*eps*z_d) ((d, s)), or a
        conservative candidate cast(home + alpha * direction) (("u", c, alpha)), piece by piece."""
        if v is None:
            for p, h in zip(params, home):
                p.copy_(h)
        elif v[0] == "u":
            candidate_weights(params, home, self._zstreams(step, b, len(self._grads)), self._grads, self.method, v[2],
                              acc=self.dirbuf, home32=self.home32, zbuf=self.zbuf)
            self._zkey = None
        else:
            d, s = v
            for i, a, e, z in self._z_pieces(b, step, d, shapes):
                p, h = params[i].view(-1)[a:e], home[i].view(-1)[a:e]
                t = torch.mul(z, s * self.method.eps, out=self.dirbuf[: e - a])
                h32 = h if h.dtype == torch.float32 else self.home32[: e - a].copy_(h)
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
        candidate cast(home + alpha * direction), or None for the weights themselves. A pending update
        is applied to each streamed layer on arrival and the layer goes home from its slot at once,
        while its passes read it."""
        ps = _Pass(step, micro, variants, prepared=[None] * len(micro), losses={v: [None] * len(micro) for v in variants})
        updating = self.pending is not None
        last = len(self.streamed) - 1

        def compute(e: int, slot: int | None) -> bool:
            if e == 0:
                self._embed_stage(ps)
            elif e == last:
                self._head_stage(ps)
            elif slot is not None and self.full:
                self._streamed_layer(ps, e, slot)
            else:
                if slot is not None:  # LoRA: the frozen base computes straight from its slot
                    for (_, p), view in zip(self.store.units[e].params, self.store.acquire(e, slot)):
                        p.data = view
                self._per_variant(ps, e, lambda v: self._run_layer(ps, e, v))
            return False

        ops = zo_pass(self.streamed, self.plan.prefetch_depth, writable=self.full, writes_home=updating)
        try:
            with torch.no_grad():
                run_pass(ops, self._stores(updating), compute, apply=self._apply_in_slot)
        finally:
            self.arena.release(ps.charged_bytes)
        return ps.losses

    def _stores(self, updating: bool):
        """What a pass fetches: the weights, and with an update to apply, their momentum beside them."""
        return StorePair(self.store, self.mstore) if (self.mstore is not None and updating) else self.store

    def _per_variant(self, ps: _Pass, e: int, fn) -> None:
        for v in ps.variants:
            self._bind_resident(self.engine.order[e].name, ps.step, v)
            fn(v)

    def _run_layer(self, ps: _Pass, e: int, v) -> None:
        layer = self.engine.order[e].layer
        for k in range(len(ps.micro)):
            ps.hidden[(v, k)] = self.runner.run_layer(layer, ps.hidden[(v, k)], ps.prepared[k])

    def _embed_stage(self, ps: _Pass) -> None:
        def embed(v):
            for k, mb in enumerate(ps.micro):
                out = self.runner.capture(mb["input_ids"], mb["attention_mask"])
                ps.prepared[k] = ps.prepared[k] or out
                ps.hidden[(v, k)] = out.hidden
            nbytes = sum(t.numel() * t.element_size() for t in ps.hidden.values())
            if nbytes > ps.charged_bytes:
                self.arena.charge(nbytes - ps.charged_bytes, "hidden states")
                ps.charged_bytes = nbytes
        self._per_variant(ps, 0, embed)

    def _head_stage(self, ps: _Pass) -> None:
        tied = self._tied()

        def head_fn(v):
            if tied:
                self._bind_resident("embed", ps.step, v)
            for k, mb in enumerate(ps.micro):
                logits = self.runner.run_head(ps.hidden[(v, k)], mb["input_ids"], mb["attention_mask"])
                ps.losses[v][k] = loss_from_logits(logits, mb, head=self.head, label_token_ids=self.label_token_ids)
        self._per_variant(ps, len(self.streamed) - 1, head_fn)

    def _streamed_layer(self, ps: _Pass, e: int, slot: int) -> None:
        """A full-parameter layer in its slot (its update, if any, applied there already): each
        variant's weights made in the working copy and run; the slot is only read."""
        views = self.store.acquire(e, slot)
        unit = self.store.units[e]
        work = unit.views(self.work[: unit.numel])
        b = self.block_index[unit.name]
        for v in ps.variants:
            with torch.no_grad():
                self._variant_into(b, ps.step, v, work, views, unit.shapes)
            for (_, p), wv in zip(unit.params, work):
                p.data = wv
            self._run_layer(ps, e, v)

    def _tied(self) -> bool:
        out, inp = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        return out is not None and inp is not None and out.weight is inp.weight

    @torch.no_grad()
    def _apply_in_slot(self, e: int, slot: int) -> bool:
        """The schedule's apply: the pending update to streamed layer e in its slot (and to its
        momentum beside it); returns whether its weights changed."""
        views = self.store.acquire(e, slot)
        momentum = self.mstore.acquire(e, slot) if self.mstore is not None else None
        return self._update(self.block_index[self.store.units[e].name], views, self.pending, momentum)

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
        self.pending = pend if (self.full and any(self.streamed) and not rejected) else None

    def flush(self) -> None:
        """Apply the deferred update to every streamed layer and write it home (before eval or save)."""
        if self.pending is None:
            return
        paired = self.mstore is not None
        run_pass(zo_flush(self.streamed, self.plan.prefetch_depth), self._stores(updating=True), apply=self._apply_in_slot)
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
