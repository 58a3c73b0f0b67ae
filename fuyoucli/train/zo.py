"""Zeroth-order (MeZO) step, in memory: the reference every streamed ZO2 run must reproduce.

The arithmetic is defined block by block so that a streamed implementation can repeat it exactly:
- z for (step, direction, block) comes from a generator seeded by block_seed(seed, step, d, b) on the
  compute device, drawn parameter by parameter in the block's order, in fp32;
- the weights a forward pass sees are cast(home +/- eps * z), always computed from the unperturbed
  fp32 home copy, so nothing drifts (no in-place perturb/restore round-off, MeZO issue 42);
- the update is home -= lr * (direction term + weight_decay * home), in fp32 (decay on matrices only);
  the home copy is fp32 unless the plan stores it in bfloat16/float16 (then rounded once per update).
Dropout is off (model.eval()): both passes of a direction must compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fuyoucli.model.blocks import ParamBlock, block_generator, block_seed
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.losses import batch_loss


@dataclass
class ZOStepResult:
    loss: float
    """Mean of the +eps and -eps losses over all directions (an estimate of the loss at w)."""
    projected_grads: list[float]
    tokens: int


def draw_z(seed: int, step: int, direction: int, block: int, shapes, device: torch.device, out=None):
    """z for one (step, direction, block), parameter by parameter in the block's order, fp32.

    With `out` (views to fill) the numbers land in preallocated buffers; they are the same numbers.
    """
    gen = block_generator(device, block_seed(seed, step, direction, block))
    if out is None:
        return [torch.randn(shape, generator=gen, device=device, dtype=torch.float32) for shape in shapes]
    for view in out:
        torch.randn(view.shape, generator=gen, device=device, dtype=torch.float32, out=view)
    return out


@torch.no_grad()
def update_home(home: list[torch.Tensor], z_of: "callable", grads: list[float], lr: float, method: ZO2Method,
                momentum: list[torch.Tensor] | None = None) -> None:
    """home -= lr * (sum_d g_d z_d / q [sign / momentum] + weight_decay * home), in place, in fp32.

    `z_of(d)` returns direction d's z for these tensors. A bfloat16/float16 home is updated through
    an fp32 copy and rounded once. Shared by the in-memory reference and the streamed engine, so both
    do the same operations in the same order (bit-identical on one device).
    """
    stored = home
    home = [h if h.dtype == torch.float32 else h.float() for h in stored]
    direction = [torch.zeros_like(h) for h in home]
    for d, g in enumerate(grads):
        for acc, z in zip(direction, z_of(d)):
            acc.add_(z, alpha=g / method.q)
    for i, h in enumerate(home):
        g_est = direction[i]
        if method.variant == "sign":
            g_est = torch.sign(g_est)
        elif method.variant == "momentum":
            momentum[i].mul_(method.momentum).add_(g_est)
            g_est = momentum[i]
        if method.weight_decay and h.ndim >= 2:  # as in AdamW: no decay on biases and norms
            g_est = g_est + method.weight_decay * h
        h.add_(g_est, alpha=-lr)
        if h is not stored[i]:
            stored[i].copy_(h)


class ZOReference:
    """Holds the fp32 home copy (and momentum) of the trainable blocks; the model holds what computes."""

    def __init__(self, model, blocks: list[ParamBlock], method: ZO2Method, *, seed: int, head: str,
                 label_token_ids: tuple[int, ...] = (), home_dtype: torch.dtype = torch.float32):
        self.model, self.blocks, self.method = model, blocks, method
        self.seed, self.head, self.label_token_ids = seed, head, label_token_ids
        # The home copy is what the optimizer updates: fp32 by default (exact small updates), or the
        # plan's home dtype (half the bytes, updates rounded once per step).
        self.home = [[p.detach().to(home_dtype, copy=True) for _, p in b.params] for b in blocks]
        self.momentum = ([[torch.zeros_like(h) for h in hb] for hb in self.home]
                         if method.variant == "momentum" else None)

    def _z(self, step: int, direction: int, b: int):
        return draw_z(self.seed, step, direction, b, [h.shape for h in self.home[b]], self.home[b][0].device)

    @torch.no_grad()
    def _load(self, step: int, direction: int, scale: float) -> None:
        """Model weights := cast(home + scale * z(step, direction)); scale 0 loads home itself."""
        for b, block in enumerate(self.blocks):
            zs = self._z(step, direction, b) if scale else (None for _ in self.home[b])
            for (_, p), h, z in zip(block.params, self.home[b], zs):
                p.copy_(h if z is None else h + scale * z)

    @torch.no_grad()
    def _losses(self, micro_batches: list[dict]) -> tuple[float, int]:
        total, count = 0.0, 0
        for mb in micro_batches:
            out = batch_loss(self.model, mb, head=self.head, label_token_ids=self.label_token_ids)
            total += float(out.loss_sum)
            count += out.count
        return total / max(count, 1), count

    def step(self, step: int, micro_batches: list[dict], lr: float) -> ZOStepResult:
        m = self.method
        self.model.eval()
        grads, losses, tokens = [], [], 0
        for d in range(m.q):
            self._load(step, d, +m.eps)
            loss_plus, tokens = self._losses(micro_batches)
            self._load(step, d, -m.eps)
            loss_minus, _ = self._losses(micro_batches)
            grads.append((loss_plus - loss_minus) / (2 * m.eps))
            losses += [loss_plus, loss_minus]
        self._update(step, grads, lr)
        self._load(step, 0, 0.0)
        return ZOStepResult(sum(losses) / len(losses), grads, tokens)

    def _update(self, step: int, grads: list[float], lr: float) -> None:
        for b in range(len(self.blocks)):
            update_home(self.home[b], lambda d, b=b: self._z(step, d, b), grads, lr, self.method,
                        self.momentum[b] if self.momentum else None)

    # -- checkpoints: the state is the home copy (and momentum); z comes back from the seed ----------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """param.<name>: the home copy (what the optimizer updates); momentum.<name> for variant momentum."""
        out: dict[str, torch.Tensor] = {}
        for b, block in enumerate(self.blocks):
            for i, (name, _) in enumerate(block.params):
                out[f"param.{name}"] = self.home[b][i]
                if self.momentum is not None:
                    out[f"momentum.{name}"] = self.momentum[b][i]
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors) -> None:
        for b, block in enumerate(self.blocks):
            for i, (name, _) in enumerate(block.params):
                self.home[b][i].copy_(tensors[f"param.{name}"])
                if self.momentum is not None:
                    self.momentum[b][i].copy_(tensors[f"momentum.{name}"])
        self._load(0, 0, 0.0)

    def replay(self, step: int, grads: list[float], lr: float) -> None:
        """Apply a recorded step's update (its projected gradients, its lr) exactly as step() did."""
        self._update(step, grads, lr)
        self._load(step, 0, 0.0)
