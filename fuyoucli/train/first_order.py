"""First-order (AdamW) step, in memory: the reference the offloaded first-order run must reproduce.

Mixed precision the way the offloaded path does it: the model computes in its dtype; fp32 master
weights and AdamW states (torch's implementation) are updated from fp32 gradients and copied back.
For an fp32 model the master weights are the model's own parameters. fp16 uses dynamic loss scaling.
Weight decay applies to matrices only (not biases or norms). Gradient clipping uses the exact global
norm over all trainable parameters. Compact formats (method.states: int8, method.master: bf16) run
engine/compact.py's compact_adamw (kernels/adamw.py), one per block as the streamed engine does (BlockAdamW): a bf16
master is the model's own bf16 weights, rounded stochastically with draws seeded by (seed, step, block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fuyoucli.engine.compact import compact_adamw
from fuyoucli.kernels.adamw import AdamFormat
from fuyoucli.model.blocks import execution_index, find_layer_list, param_blocks
from fuyoucli.recipe import AdamWMethod
from fuyoucli.train.dropout import draw_step_seed, seeded_model
from fuyoucli.train.losses import batch_loss, count_targets


@dataclass
class FirstOrderStepResult:
    loss: float
    grad_norm: float
    tokens: int
    skipped: bool
    loss_scale: float


class DynamicLossScale:
    """fp16 loss scaling: halve on overflow (and skip the step), double after `interval` clean steps."""

    def __init__(self, enabled: bool, init: float = 2.0**16, interval: int = 1000):
        self.enabled, self.scale, self.interval, self.clean = enabled, init if enabled else 1.0, interval, 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.clean = max(self.scale / 2, 1.0), 0
        else:
            self.clean += 1
            if self.clean % self.interval == 0:
                self.scale *= 2


def adamw_param_groups(params: list[torch.Tensor], weight_decay: float) -> list[dict]:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


STATE_KEYS = {"fp32": ("step", "exp_avg", "exp_avg_sq"),
              "int8": ("step", "exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale")}
"""Each state format's per-parameter checkpoint tensors (adam.<key>.<name>), as the optimizer keeps them."""


def adam_format(method: AdamWMethod) -> AdamFormat:
    return AdamFormat(states=method.states, master=method.master)


class BlockAdamW:
    """Compact formats: one CompactAdamW per block (the streamed engine's CPU worker makes one per
    block too; its key seeds a bf16 master's rounding), over the blocks' masters."""

    def __init__(self, blocks: list[tuple[int, list[torch.Tensor]]], method: AdamWMethod, seed: int):
        fmt = adam_format(method)
        self.optimizers = [compact_adamw(adamw_param_groups(masters, method.weight_decay), fmt=fmt, lr=method.lr,
                                        betas=method.betas, eps=method.eps, seed=seed, block=key)
                           for key, masters in blocks if masters]

    def step(self, lr: float, grads: dict[int, torch.Tensor]) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step(grads=grads)

    @property
    def state(self) -> dict:
        return {p: st for opt in self.optimizers for p, st in opt.state.items()}

    def load_state(self, master: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        for opt in self.optimizers:
            if any(p is master for g in opt.param_groups for p in g["params"]):
                opt.state[master] = {k: v.clone().to(master.device) for k, v in state.items()}


def block_keys(model) -> dict[int, int]:
    """Each trainable parameter's block (execution index), by id."""
    n_layers = len(find_layer_list(model)[1])
    return {id(p): execution_index(b.name, n_layers) for b in param_blocks(model) for _, p in b.params}


@torch.no_grad()
def optimizer_step(optimizer, default: bool, lr: float, grads_by_master: dict, params: list, master: list,
                   mixed: bool) -> None:
    """One AdamW step at lr: torch's (fp32 states, `default`) reads the masters' .grad; a compact one
    the fp32 gradients by id(master). A mixed-precision model's weights then take their masters' values.
    Shared by the in-memory reference and the device-side updates of a streamed run."""
    if default:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    else:
        optimizer.step(lr, grads_by_master)
    if mixed:
        for p, m in zip(params, master):
            p.copy_(m)


class AdamWReference:
    def __init__(self, model, method: AdamWMethod, *, head: str, label_token_ids: tuple[int, ...] = (),
                 host_optimizer: bool = False, seed: int = 0):
        """`host_optimizer`: keep fp32 masters in host memory and update them with the CPU's fused AdamW,
        the gradient norms taken there too: the streamed engine's arithmetic, so that a GPU parity test
        compares like with like (CUDA's fused AdamW rounds differently, and Adam turns round-off in
        near-zero gradients into full-size steps)."""
        self.model, self.method, self.head, self.label_token_ids = model, method, head, label_token_ids
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = next(model.parameters()).device
        host = host_optimizer and self.device.type != "cpu"
        self.fmt = adam_format(method)
        if self.fmt.master == "bf16" and any(p.dtype != torch.bfloat16 for p in self.params):
            raise ValueError("a bf16 master is the model's bfloat16 weights; this model's trained weights "
                             "are not all bf16")
        self.mixed = (host or any(p.dtype != torch.float32 for p in self.params)) and self.fmt.master == "fp32"
        """Masters apart from the weights (fp32 beside 16-bit weights, or in host memory)."""
        self.master = ([p.detach().to("cpu" if host else p.device, torch.float32, copy=True) for p in self.params]
                       if self.mixed else self.params)
        device_type = self.master[0].device.type if self.master else "cpu"
        if self.fmt.default:
            self.optimizer = torch.optim.AdamW(
                adamw_param_groups(self.master, method.weight_decay),
                lr=method.lr, betas=method.betas, eps=method.eps,
                fused=device_type in ("cpu", "cuda"),
            )
        else:
            keys = block_keys(model)
            blocks: dict[int, list[torch.Tensor]] = {}
            for p, m in zip(self.params, self.master):
                blocks.setdefault(keys[id(p)], []).append(m)
            self.optimizer = BlockAdamW(sorted(blocks.items()), method, seed)
        self.scaler = DynamicLossScale(any(p.dtype == torch.float16 for p in self.params))

    def step(self, micro_batches: list[dict], lr: float) -> FirstOrderStepResult:
        self.model.train()
        total_targets = sum(count_targets(mb, self.head) for mb in micro_batches)
        loss_total = 0.0
        for p in self.params:
            p.grad = None
        step_seed = draw_step_seed()  # dropout as the streamed engine draws it, whatever the order
        for k, mb in enumerate(micro_batches):
            with seeded_model(self.model, self.device, step_seed, k):
                out = batch_loss(self.model, mb, head=self.head, label_token_ids=self.label_token_ids)
            # Dividing each micro-batch's sum by the step's total makes accumulation exact:
            # the gradient is that of one big batch, whatever the padding of each part.
            (out.loss_sum * (self.scaler.scale / max(total_targets, 1))).backward()
            loss_total += float(out.loss_sum.detach())
        if self.mixed:
            for p, m in zip(self.params, self.master):
                m.grad = None if p.grad is None else p.grad.to(m.device, torch.float32)
        inv_scale = 1.0 / self.scaler.scale
        # fp32 gradients by master (a bf16 master's are its weights' gradients taken up to fp32)
        by_master = {id(m): (m.grad if m is not p or p.dtype == torch.float32 else
                             None if p.grad is None else p.grad.float()) for p, m in zip(self.params, self.master)}
        grads = [g for g in by_master.values() if g is not None]
        if self.scaler.enabled:
            for g in grads:
                g.mul_(inv_scale)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        overflow = not math.isfinite(norm)
        self.scaler.update(overflow)
        if not overflow:
            if self.method.max_grad_norm is not None and norm > self.method.max_grad_norm:
                coef = self.method.max_grad_norm / (norm + 1e-6)
                for g in grads:
                    g.mul_(coef)
            optimizer_step(self.optimizer, self.fmt.default, lr, by_master, self.params, self.master, self.mixed)
        for p in self.params:
            p.grad = None
        if self.mixed:
            for m in self.master:
                m.grad = None
        return FirstOrderStepResult(loss_total / max(total_targets, 1), norm, total_targets, overflow, self.scaler.scale)

    # -- checkpoints: fp32 master weights, AdamW moments and step counts, the loss scale ----------------

    def _names(self) -> list[str]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [names[id(p)] for p in self.params]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """param.<name>: fp32 master weights (the model's own for fp32); adam.<exp_avg|exp_avg_sq|step>.<name>."""
        out: dict[str, torch.Tensor] = {}
        for name, m in zip(self._names(), self.master):
            out[f"param.{name}"] = m.detach()
            for key, value in self.optimizer.state.get(m, {}).items():
                out[f"adam.{key}.{name}"] = value
        return out

    def state_meta(self) -> dict:
        return {"loss_scale": self.scaler.scale, "clean_steps": self.scaler.clean}

    @torch.no_grad()
    def load_state_tensors(self, tensors, meta: dict) -> None:
        names = self._names()
        for name, p, m in zip(names, self.params, self.master):
            m.copy_(tensors[f"param.{name}"])
            if m is not p:
                p.copy_(m)
        if not self.fmt.default:
            for name, m in zip(names, self.master):
                self.optimizer.load_state(m, {k: tensors[f"adam.{k}.{name}"] for k in STATE_KEYS[self.fmt.states]
                                              if f"adam.{k}.{name}" in tensors})
        else:
            order = [m for g in self.optimizer.param_groups for m in g["params"]]
            index = {id(m): i for i, m in enumerate(order)}
            state = {}
            for name, m in zip(names, self.master):
                keys = [k for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") if f"adam.{k}.{name}" in tensors]
                if keys:
                    state[index[id(m)]] = {k: tensors[f"adam.{k}.{name}"] for k in keys}
            saved = self.optimizer.state_dict()
            saved["state"] = state
            self.optimizer.load_state_dict(saved)
        self.scaler.scale = float(meta.get("loss_scale", self.scaler.scale))
        self.scaler.clean = int(meta.get("clean_steps", 0))
