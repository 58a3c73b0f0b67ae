"""Offloaded first-order (AdamW) training: decoder layers streamed between their home tier and the
device; fp32 master weights and AdamW states on the host or SSD, updated by a CPU worker (Fuyou).

Trainer stage, a step function over an Engine (engine/build.py: stores, arena, the CPU optimizer's
state homes, as the plan decided), the first-order schedules (plan/schedule.py), SavedActivations,
and the optimizer side in first_order_updates.py. One step:
1. Forward, layer-major (every micro-batch goes through a block while it is on the device), with
   the plan's prefetch depth. Per the plan, each layer's saved activations stay on the device
   ('keep': its autograd graph stays; streamed weights in it are re-made from the backward's fetch,
   never saved), go to host memory and come back ahead of its backward ('swap'), or are dropped
   with only the layer's input kept ('recompute': the backward runs the layer again, with the
   same random numbers), on the device or, like swapped ones, in host memory ('recompute-swap').
   The head computes the loss and its backward at once.
2. Backward in reverse block order: fetch, (recompute,) backward for every micro-batch in order, so
   that gradients accumulate as in the in-memory reference; then the block's gradients go to host
   memory at once, and the CPU optimizer takes them (overlapped with the backward of the blocks
   before, or, when clipping, after the global norm: see first_order_updates.py).
Embeddings and head stay on the device. With LoRA the adapters (and their AdamW) stay on the
device and the frozen base streams read-only.
"""

from __future__ import annotations

import time

import torch

from fuyoucli.engine.activations import SavedActivations, Swapped
from fuyoucli.engine.build import CpuOptimizerSpec, Engine, UnsupportedPlan, build
from fuyoucli.kernels.adamw import new_state
from fuyoucli.engine.executor import run_pass
from fuyoucli.engine.flat import views_of
from fuyoucli.model.runner import Prepared
from fuyoucli.plan.schedule import first_order_backward, first_order_forward, first_order_updates
from fuyoucli.plan.types import Plan
from fuyoucli.recipe import AdamWMethod
from fuyoucli.train.dropout import draw_step_seed, forward_seed, seeded
from fuyoucli.train.first_order import STATE_KEYS, DynamicLossScale, FirstOrderStepResult, adam_format
from fuyoucli.train.first_order_updates import BlockUpdates, cpu_adamw, deferred_updates
from fuyoucli.train.losses import count_targets, loss_from_logits


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
    def __init__(self, engine: Engine, method: AdamWMethod, *, head: str, label_token_ids: tuple[int, ...] = (),
                 on_backward=None, seed: int = 0):
        """`on_backward(block)` (inside a block's backward) is a hook for tests that check what overlaps what."""
        self.engine, self.model, self.plan, self.method, self.head = engine, engine.model, engine.plan, method, head
        self.label_token_ids, self.lanes, self.on_backward = label_token_ids, engine.lanes, on_backward
        self.device, self.runner, self.arena, self.store = engine.device, engine.runner, engine.arena, engine.store
        self.names = [b.name for b in engine.order]
        self.compute_dtype, self.lora, self.streamed = engine.compute_dtype, engine.lora, engine.streamed
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = DynamicLossScale(any(p.dtype == torch.float16 for p in trainable))
        self.deferred = deferred_updates(method, self.scaler.enabled)
        planned = {b.name: b.activation for b in self.plan.blocks}
        self.activation = [(planned.get(b.name) or "recompute") if b.layer is not None else "keep" for b in engine.order]
        blocks = {b.name: b for b in engine.trainable}
        self._embed_trains = "embed" in blocks
        self._embed_params = [p for _, p in blocks["embed"].params] if self._embed_trains else []
        self.updates = BlockUpdates(engine, method, deferred=self.deferred, seed=seed)
        self.host_updated = [e in self.updates.host_params for e in range(len(engine.order))]
        streamed_ids = {id(p) for u in self.store.units.values() for _, p in u.params}
        resident_ptrs = {p.untyped_storage().data_ptr() for p in self.model.parameters() if id(p) not in streamed_ids}
        self.acts = SavedActivations(self.lanes, self.device, [s.device for s in self.store.slots], resident_ptrs,
                                     self.arena)
        self.cpu = engine.cpu
        self.timeline: list[tuple[str, int, float, float]] = []
        """('fwd' | 'bwd', block, start, end) of the last step: a block's compute, once its weights were
        on the device."""

    @classmethod
    def from_plan(cls, model, plan: Plan, method: AdamWMethod, *, head: str, lanes,
                  label_token_ids: tuple[int, ...] = (), on_job=None, on_backward=None,
                  optimizer_thread: bool | None = None, seed: int = 0) -> AdamWStreamed:
        """The engine built from the plan (engine.build), and the trainer over it. `on_job(block)` (on
        the CPU worker, inside an update) is a hook for tests. `optimizer_thread`: run the CPU AdamW on
        its worker thread, overlapped with the device's work; default: yes on a GPU, no on a CPU
        device, where it would only compete with the compute for the same cores (inline: the same
        jobs in the same order; engine/optimizer.py). `seed` (training.seed) seeds a bf16 master's
        stochastic rounding."""
        thread = lanes.kind != "cpu" if optimizer_thread is None else optimizer_thread
        spec = CpuOptimizerSpec(cpu_adamw(method, seed), thread, on_job, adam_format(method))
        engine = build(plan, model, lanes, cpu_optimizer=spec)
        try:
            return cls(engine, method, head=head, label_token_ids=label_token_ids, on_backward=on_backward, seed=seed)
        except BaseException:
            engine.close()
            raise

    def close(self) -> None:
        """Stop the worker and remove the SSD files (safe to call twice)."""
        self.engine.close()

    def _bind(self, e: int, slot: int) -> None:
        for (_, p), view in zip(self.store.units[e].params, self.store.acquire(e, slot)):
            p.data = view

    # -- forward ------------------------------------------------------------------------------------------

    def _rng_state(self, k: int, e: int) -> int | None:
        """The seed of micro-batch k's forward through block e: dropout draws the reference's numbers, and a
        recompute the forward's (train/dropout.py). None outside training steps."""
        return None if self._step_seed is None else forward_seed(self._step_seed, k, e)

    def _replay(self, state: int | None):
        return seeded(self.device, state)

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
        self._step_seed = draw_step_seed() if train else None

        def compute(e: int, slot: int | None) -> bool:
            if slot is not None:
                self._bind(e, slot)
            t0 = time.perf_counter()
            if e == 0:
                with torch.set_grad_enabled(train and self._embed_trains):
                    for k, mb in enumerate(micro):
                        with self._replay(self._rng_state(k, e)):
                            prep = self.runner.capture(mb["input_ids"], mb["attention_mask"])
                        if any(t.requires_grad for t in _tensors(prep.layer_args)):
                            raise UnsupportedPlan("this model passes trained tensors to every layer; the streamed "
                                                  "first-order engine cannot split its graph per layer")
                        self._prepared[k], self._h_embed[k] = prep, (prep.hidden if train else None)
                        hidden[k] = prep.hidden.detach()
            elif e == last:
                for k, mb in enumerate(micro):
                    with torch.set_grad_enabled(train), self._replay(self._rng_state(k, e)) as reseed:
                        h = hidden[k].requires_grad_(True) if train else hidden[k]
                        logits = self.runner.run_head(h, mb["input_ids"], mb["attention_mask"], reseed)
                        out = loss_from_logits(logits, mb, head=self.head, label_token_ids=self.label_token_ids)
                        if train:
                            # As the reference: each micro-batch's sum over the step's target count.
                            (out.loss_sum * (scale / max(total, 1))).backward()
                            self._grad_out[k] = h.grad
                            out.loss_sum = out.loss_sum.detach()
                            self._stash_shared(k, n)
                    results[k], hidden[k] = out, None
            else:
                act, layer = self.activation[e], self.engine.order[e].layer
                for k in range(n):
                    if not train:
                        with torch.no_grad():
                            hidden[k] = self.runner.run_layer(layer, hidden[k], self._prepared[k])
                    elif act in ("recompute", "recompute-swap"):
                        rng = self._rng_state(k, e)
                        with torch.no_grad(), self._replay(rng):
                            out = self.runner.run_layer(layer, hidden[k], self._prepared[k])
                        if act == "recompute-swap":
                            self._saved[(e, k)] = (self.acts.stash(e, hidden[k]), None, rng)
                        else:
                            nbytes = hidden[k].numel() * hidden[k].element_size()
                            self.arena.charge(nbytes, f"saved input of {self.names[e]}")
                            self._charged[e] = self._charged.get(e, 0) + nbytes
                            self._saved[(e, k)] = (hidden[k], None, rng)
                        hidden[k] = out
                    else:
                        leaf = hidden[k].detach().requires_grad_(True)
                        with torch.enable_grad(), self.acts.recording(e, swap=act == "swap"), \
                                self._replay(self._rng_state(k, e)):
                            out = self.runner.run_layer(layer, leaf, self._prepared[k])
                        self._saved[(e, k)] = (leaf, out, None)
                        hidden[k] = out.detach()
            self.timeline.append(("fwd", e, t0, time.perf_counter()))
            return False

        run_pass(first_order_forward(self.streamed, self.plan.prefetch_depth, self.host_updated), self.store, compute,
                 self.updates)
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
        ops = first_order_backward(self.streamed, self.plan.prefetch_depth, self.host_updated, deferred=self.deferred)
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
                        leaf = (leaf.device if isinstance(leaf, Swapped) else leaf).detach().requires_grad_(True)
                        with torch.enable_grad(), self._replay(rng):
                            out = self.runner.run_layer(self.engine.order[e].layer, leaf, self._prepared[k])
                    torch.autograd.backward(out, self._grad_out[k])
                    self._grad_out[k] = leaf.grad
                self.acts.release(e)
                self.arena.release(self._charged.pop(e, 0))
            self.timeline.append(("bwd", e, t0, time.perf_counter()))
            return False  # next in the schedule: the block's gradients leave the device, its update

        self.updates.begin(lr, inv_scale, computes)
        run_pass(ops, self.store, compute, self.updates)

    # -- the step, evaluation and the final weights ----------------------------------------------------

    def step(self, micro: list[dict], lr: float) -> FirstOrderStepResult:
        self.model.train()
        self.acts.reset()
        self.timeline.clear()  # it holds the last step (and what evaluation did since)
        total = sum(count_targets(mb, self.head) for mb in micro)
        scale = self.scaler.scale
        outs = self._forward(micro, train=True, scale=scale, total=total)
        loss = sum(float(o.loss_sum) for o in outs) / max(total, 1)
        self._backward(len(micro), lr, 1.0 / scale if self.scaler.enabled else None)
        try:
            norm, skipped = self.updates.finish(self.scaler)
            if self.deferred and not skipped:  # the global norm allowed them: the host updates, clipped
                run_pass(first_order_updates(self.host_updated), self.store, updates=self.updates)
        finally:
            self.updates.end_step()
        return FirstOrderStepResult(loss, norm, total, skipped, self.scaler.scale)

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
        self.updates.settle()
        self.store.settle_all()

    def materialize(self) -> None:
        """Put every streamed layer's current weights back into the model (for saving)."""
        self.settle()
        for e, unit in self.store.units.items():
            flat = self.store.home_weights(e)
            for (_, p), view in zip(unit.params, unit.views(flat)):
                p.data = view.to(dtype=p.dtype)

    # -- checkpoints: fp32 masters, AdamW moments and step counts (host or SSD), the loss scale ---------
    # Tensor names are the in-memory reference's (param./adam.<key>.<qualified name>), so either
    # trainer resumes the other's checkpoint. Streamed weights at home are cast(master): rewritten on load.

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.model.named_parameters()}

    def state_shards(self):
        """(shard, tensors): the device-side AdamW's, then each host-optimized block's, one at a time."""
        self.settle()
        names, u = self._names(), self.updates
        dev, shard = u.device, {}
        for p, m in zip(dev.params, dev.master):
            shard[f"param.{names[id(p)]}"] = m.detach()
            if dev.optimizer is not None:
                for key, value in dev.optimizer.state.get(m, {}).items():
                    shard[f"adam.{key}.{names[id(p)]}"] = value
        yield "device", shard
        for e, params in u.host_params.items():
            parts, steps = u.cpu.state_parts(e)
            out = {}
            for i, (p, shape) in enumerate(zip(params, u.host_shapes[e])):
                name = names[id(p)]
                out[f"param.{name}"] = parts["param"][i].view(shape)
                for key, views in parts.items():
                    if key != "param":
                        out[f"adam.{key}.{name}"] = views[i].view(shape) if views[i].numel() == shape.numel() \
                            else views[i]
                out[f"adam.step.{name}"] = steps[i]
            yield self.names[e], out

    def state_meta(self) -> dict:
        return {"loss_scale": self.scaler.scale, "clean_steps": self.scaler.clean}

    @torch.no_grad()
    def load_state(self, tensors, meta: dict) -> None:
        self.settle()
        names, u = self._names(), self.updates
        dev = u.device
        for p, m in zip(dev.params, dev.master):
            m.copy_(tensors[f"param.{names[id(p)]}"])
            if m is not p:
                p.copy_(m)
        if dev.optimizer is not None:
            order = [m for g in dev.optimizer.param_groups for m in g["params"]] if dev.fmt.default else []
            index = {id(m): i for i, m in enumerate(order)}
            state = {}
            for p, m in zip(dev.params, dev.master):
                keys = [k for k in STATE_KEYS[dev.fmt.states] if f"adam.{k}.{names[id(p)]}" in tensors]
                if keys and not dev.fmt.default:
                    dev.optimizer.load_state(m, {k: tensors[f"adam.{k}.{names[id(p)]}"] for k in keys})
                elif keys:
                    state[index[id(m)]] = {k: tensors[f"adam.{k}.{names[id(p)]}"] for k in keys}
            if dev.fmt.default:
                saved = dev.optimizer.state_dict()
                saved["state"] = state
                dev.optimizer.load_state_dict(saved)
        fmt = adam_format(self.method)
        for e, params in u.host_params.items():
            pnames = [names[id(p)] for p in params]
            # a state the checkpoint lacks starts as the optimizer's zeros (a lazily loaded param is empty)
            blank = [new_state(torch.empty(shape, dtype=fmt.master_dtype), fmt) for shape in u.host_shapes[e]]
            parts = {"param": [tensors[f"param.{n}"].reshape(-1).to(fmt.master_dtype) for n in pnames]}
            for key in STATE_KEYS[fmt.states][1:]:
                parts[key] = [tensors.get(f"adam.{key}.{n}", b[key]).reshape(-1) for n, b in zip(pnames, blank)]
            steps = [tensors[f"adam.step.{n}"] if f"adam.step.{n}" in tensors else torch.zeros(()) for n in pnames]
            u.cpu.load_state_parts(e, parts, steps)
            master = torch.cat(parts["param"])
            if self.streamed[e]:
                self.store.set_home_weights(e, master)
            else:
                for p, view in zip(params, views_of(master, u.host_shapes[e])):
                    p.data.copy_(view)
        self.scaler.scale = float(meta.get("loss_scale", self.scaler.scale))
        self.scaler.clean = int(meta.get("clean_steps", 0))
