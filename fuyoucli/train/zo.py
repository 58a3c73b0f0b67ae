"""Zeroth-order (MeZO) step, in memory: the reference every streamed ZO2 run must reproduce.

The arithmetic is defined block by block so that a streamed implementation can repeat it exactly:
- z for (step, direction, block) comes from the normal stream (kernels/normal.py: torch's generator
  on CUDA, a compiled counter-based stream on a CPU) seeded by block_seed(seed, step, d, b) on the
  compute device, drawn parameter by parameter in the block's order, in fp32, each parameter in pieces
  of at most `piece` elements (Plan.z_piece), one draw per piece; the update and the candidates also go
  piece by piece, so no buffer is ever larger than a piece (except a block's z held whole);
- the weights a forward pass sees are cast(home +/- eps * z), always computed from the unperturbed
  fp32 home copy, so nothing drifts (no in-place perturb/restore round-off, MeZO issue 42);
- the update is home -= lr * (direction term + weight_decay * home), in fp32 (decay on matrices only);
  the home copy is fp32 unless the plan stores it in bfloat16/float16 (then rounded once per update,
  to nearest or stochastically with draws seeded by (seed, step, block): train/rounding.py);
  the momentum buffer (variant momentum) is fp32 whatever the home dtype;
- variant conservative (ZO-Bench's ZO-SGD-Cons): with u = lr * (direction + weight_decay * home), the
  step also evaluates the loss at w, w - u and w + u on the same micro-batches and keeps the lowest
  (ties: w - u, then w), i.e. the update is applied with c * lr, c in {+1, 0, -1}. The candidates'
  weights are computed exactly as the update would compute them, so the kept one is what was evaluated.
Dropout is off (model.eval()): both passes of a direction must compute the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fuyoucli.kernels.normal import COUNTER_SOURCE, NormalStream
from fuyoucli.model.blocks import ParamBlock, block_seed
from fuyoucli.plan.types import Z_PIECE
from fuyoucli.recipe import ZO2Method
from fuyoucli.train.losses import batch_loss
from fuyoucli.engine.rounding import HomeRounding, Rounding

CANDIDATES = (1, 0, -1)
"""Conservative variant: the update multipliers c (w - c*u), in the order ties are broken."""


@dataclass
class ZOStepResult:
    loss: float
    """Mean of the +eps and -eps losses over all directions (an estimate of the loss at w)."""
    projected_grads: list[float]
    tokens: int
    applied_lr: float | None = None
    """The lr the update was applied with: c * lr for the conservative variant (0: step rejected,
    negative: reversed); None means the lr given. What a seed ledger must record to replay the step."""
    candidate: int | None = None
    """Conservative variant: the kept candidate's c (+1: w - u, the normal step; 0: w; -1: w + u)."""
    candidate_losses: tuple[float, float, float] | None = None
    """Conservative variant: the losses at w - u, w and w + u."""


def choose_candidate(losses: dict[int, float]) -> int:
    """The multiplier c whose candidate has the lowest loss; ties (and NaN, treated as +inf) keep the
    earlier one in CANDIDATES, so an all-NaN step still takes the normal step (and diverges loudly)."""
    best = CANDIDATES[0]
    key = lambda c: math.inf if math.isnan(losses[c]) else losses[c]  # noqa: E731
    for c in CANDIDATES[1:]:
        if key(c) < key(best):
            best = c
    return best


def ledger_z_problem(state: dict, ours: str) -> str | None:
    """Why a checkpoint's seed ledger (state: its state.json) cannot be replayed where z is drawn by
    `ours` (kernels/normal.py's z_source), or None. A ledger holds projected gradients, not z: its steps
    give its weights only with the z that made them. Checkpoints record what drew it; one from before
    they did drew with torch's generator on its device."""
    theirs = (state.get("trainer") or {}).get("z_source") or f"torch-{state.get('device', 'cpu')}"
    if theirs == ours:
        return None
    hint = ("; FUYOU_NATIVE_KERNELS=0 draws it with torch's CPU generator"
            if theirs == "torch-cpu" and ours == COUNTER_SOURCE else "")
    return (f"its z was drawn by {theirs} and would be drawn here by {ours}, so replaying it would not give "
            f"its weights{hint}")


def pieces(numel: int, piece: int) -> list[tuple[int, int]]:
    """(start, end) of each piece of a flattened tensor of `numel` elements, in order."""
    return [(a, min(a + piece, numel)) for a in range(0, numel, piece)]


def fill_normal(flat: torch.Tensor, stream: NormalStream, piece: int) -> torch.Tensor:
    """flat (1-D, fp32) := the stream's next normals, one draw per piece: z's numbers (module docstring)."""
    for a, e in pieces(flat.numel(), piece):
        stream.fill(flat[a:e])
    return flat


def draw_z(seed: int, step: int, direction: int, block: int, shapes, device: torch.device, out=None,
           piece: int = Z_PIECE):
    """z for one (step, direction, block), parameter by parameter in the block's order, fp32.

    With `out` (contiguous views to fill) the numbers land in preallocated buffers; they are the same
    numbers.
    """
    if out is None:
        out = [torch.empty(shape, dtype=torch.float32, device=device) for shape in shapes]
    gen = NormalStream(device, block_seed(seed, step, direction, block))
    for view in out:
        fill_normal(view.view(-1), gen, piece)
    return out


def iter_z(seed: int, step: int, direction: int, block: int, shapes, device: torch.device, piece: int = Z_PIECE):
    """draw_z's numbers one tensor at a time, drawn as they are asked for, so a block's z is never
    whole in memory."""
    gen = NormalStream(device, block_seed(seed, step, direction, block))
    for shape in shapes:
        yield fill_normal(torch.empty(shape, dtype=torch.float32, device=device).view(-1), gen, piece).view(shape)


def iter_z_pieces(seed: int, step: int, direction: int, block: int, shapes, device: torch.device,
                  buffer: torch.Tensor, piece: int):
    """draw_z's numbers piece by piece, each drawn into the front of `buffer` (fp32, at least a piece)
    as it is asked for (the previous one is dead by then): (tensor index, start, end, z of the piece)."""
    gen = NormalStream(device, block_seed(seed, step, direction, block))
    for i, shape in enumerate(shapes):
        for a, e in pieces(math.prod(shape), piece):
            yield i, a, e, gen.fill(buffer[: e - a])


class ZStreams:
    """z of one (step, block) for every direction, tensor by tensor: direction d's generator draws the
    block's tensors in order, so each tensor's numbers are the ones draw_z makes for it (all at once).
    What lets an update or a candidate work one tensor at a time, in tensor-sized buffers. It also
    hands out the (step, block)'s home rounding (train/rounding.py), one fresh stream per pass."""

    def __init__(self, seed: int, step: int, block: int, q: int, device: torch.device,
                 rounding: Rounding = "nearest", piece: int = Z_PIECE):
        self.device, self.piece = device, piece
        self.gens = [NormalStream(device, block_seed(seed, step, d, block)) for d in range(q)]
        self._rounding = (rounding, seed, step, block)

    def home_rounding(self) -> HomeRounding:
        """How this pass over the block's tensors stores fp32 results into a narrower home."""
        mode, seed, step, block = self._rounding
        return HomeRounding(mode, seed, step, block, self.device)

    def draw(self, d: int, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Direction d's next piece (its callers go piece by piece, tensor by tensor, in order)."""
        if out is None:
            return self.gens[d].draw(numel)
        return self.gens[d].fill(out[:numel])


@torch.no_grad()
def tensor_direction(acc: torch.Tensor, home32: torch.Tensor, z_of: "callable", grads: list[float], method: ZO2Method,
                     momentum: torch.Tensor | None = None, scratch: torch.Tensor | None = None, *,
                     decay: bool) -> torch.Tensor:
    """One piece's update direction: sum_d g_d z_d / q [sign / momentum] + weight_decay * home (`decay`:
    the piece's tensor is a matrix; as in AdamW, no decay on biases and norms).

    `acc` (fp32, the piece's shape) accumulates the sum and ends up holding the direction, except for
    momentum without decay (then it is the momentum buffer itself, updated in place). `z_of(d)` gives
    direction d's z of this tensor (called in order d = 0, 1, ...). `scratch` (fp32; may be z's own
    buffer: z is dead once summed) holds weight_decay * home; without it a new tensor is made. Shared by
    the update and the conservative candidates, so that both (and the streamed engine) do the same
    operations in the same order.
    """
    acc.zero_()
    for d, g in enumerate(grads):
        acc.add_(z_of(d), alpha=g / method.q)
    g_est = acc
    if method.variant == "sign":
        acc.sign_()
    elif method.variant == "momentum":
        momentum.mul_(method.momentum).add_(acc)
        g_est = momentum
    if method.weight_decay and decay:
        if scratch is not None:
            decay = torch.mul(home32, method.weight_decay, out=scratch)
        else:
            decay = home32 * method.weight_decay
        g_est = torch.add(g_est, decay, out=acc)
    return g_est


def _piece_buffers(h: torch.Tensor, n: int, acc, home32, zbuf):
    """A piece's fp32 working copy of home piece `h` (h itself when fp32), its direction accumulator and
    its z: views of the given flat buffers, or new tensors without them."""
    if h.dtype == torch.float32:
        h32 = h
    else:
        h32 = h.float() if home32 is None else home32[:n].copy_(h)
    a = torch.empty_like(h32) if acc is None else acc[:n]
    return h32, a, None if zbuf is None else zbuf[:n]


@torch.no_grad()
def update_home(home: list[torch.Tensor], zs: ZStreams, grads: list[float], lr: float, method: ZO2Method,
                momentum: list[torch.Tensor] | None = None, *, acc: torch.Tensor | None = None,
                home32: torch.Tensor | None = None, zbuf: torch.Tensor | None = None) -> bool:
    """home -= lr * (sum_d g_d z_d / q [sign / momentum] + weight_decay * home), in place, in fp32,
    tensor by tensor, piece by piece (z from `zs`, whose pieces the home tensors are cut into).

    A bfloat16/float16 home is updated through an fp32 copy and rounded once, as `zs` says (nearest or
    stochastic, train/rounding.py). `acc`, `home32`, `zbuf`: flat fp32 buffers at least a piece long
    (or the largest tensor, if smaller), for the direction, the fp32 copy and z; without them new
    tensors are made. Shared by the in-memory reference and the streamed engine, so both do the same
    operations in the same order (bit-identical on one device). A conservative step applied with lr 0
    (rejected) changes nothing and returns False.
    """
    if lr == 0 and method.variant == "conservative":
        return False
    rounding = zs.home_rounding()
    for i, h in enumerate(home):
        flat = h.view(-1)
        mom = momentum[i].view(-1) if momentum is not None else None
        for a, e in pieces(flat.numel(), zs.piece):
            hp = flat[a:e]
            h32, acc_p, z = _piece_buffers(hp, e - a, acc, home32, zbuf)
            g = tensor_direction(acc_p, h32, lambda d: zs.draw(d, e - a, out=z), grads, method,
                                 None if mom is None else mom[a:e], scratch=z, decay=h.ndim >= 2)
            h32.add_(g, alpha=-lr)
            if h32 is not hp:
                rounding.store(hp, h32)
    return True


@torch.no_grad()
def candidate_weights(params: list[torch.Tensor], home: list[torch.Tensor], zs: ZStreams, grads: list[float],
                      method: ZO2Method, alpha: float, *, acc: torch.Tensor | None = None,
                      home32: torch.Tensor | None = None, zbuf: torch.Tensor | None = None) -> None:
    """params := cast(home + alpha * direction), the conservative variant's w -/+ u, piece by piece as
    update_home forms the direction and rounds it (the update's rounding stream: the candidate kept is
    the weights the update stores). Buffers as update_home's; with them, z's buffer also holds the sum
    before a cast into a narrower compute dtype."""
    rounding = zs.home_rounding()
    for p, h in zip(params, home):
        pf, hf = p.view(-1), h.view(-1)
        for a, e in pieces(hf.numel(), zs.piece):
            h32, acc_p, z = _piece_buffers(hf[a:e], e - a, acc, home32, zbuf)
            g = tensor_direction(acc_p, h32, lambda d: zs.draw(d, e - a, out=z), grads, method, scratch=z,
                                 decay=h.ndim >= 2)
            out32 = None if zbuf is None else (pf[a:e] if p.dtype == torch.float32 else z)
            candidate_into(pf[a:e], h32, g, alpha, h.dtype, out32=out32, rounding=rounding)


@torch.no_grad()
def candidate_into(dst: torch.Tensor, home32: torch.Tensor, g_est: torch.Tensor, alpha: float,
                   home_dtype: torch.dtype, out32: torch.Tensor | None = None,
                   rounding: HomeRounding | None = None) -> None:
    """dst := cast(home + alpha * g_est) as update_home with lr = -alpha would store it (rounded to the
    home dtype first when that is not fp32, as `rounding` says: the same pass's stream as the update's,
    so the candidate kept is the weights stored; None: nearest). `out32`: an fp32 buffer for the sum
    (may be dst itself when dst is fp32)."""
    t = torch.add(home32, g_est, alpha=alpha) if out32 is None else torch.add(home32, g_est, alpha=alpha, out=out32)
    if home_dtype != torch.float32:
        if rounding is not None and rounding.mode == "stochastic":
            if dst.dtype == home_dtype:
                rounding.store(dst, t)
                return
            t = rounding.rounded(t, home_dtype)
        elif home_dtype != dst.dtype:
            t = t.to(home_dtype)
    if t is not dst:
        dst.copy_(t)


class ZOReference:
    """Holds the fp32 home copy (and momentum) of the trainable blocks; the model holds what computes."""

    def __init__(self, model, blocks: list[ParamBlock], method: ZO2Method, *, seed: int, head: str,
                 label_token_ids: tuple[int, ...] = (), home_dtype: torch.dtype = torch.float32,
                 z_per_tensor: bool = False, home_rounding: Rounding = "nearest", z_piece: int = Z_PIECE):
        self.model, self.blocks, self.method = model, blocks, method
        self.home_rounding, self.z_piece = home_rounding, z_piece
        self.seed, self.head, self.label_token_ids = seed, head, label_token_ids
        # A plan's z_buffer 'tensor': a block's z is never whole in memory, one tensor's at a time
        # (the same numbers: draw_z draws tensor by tensor from one generator).
        self.z_per_tensor = z_per_tensor
        # The home copy is what the optimizer updates: fp32 by default (exact small updates), or the
        # plan's home dtype (half the bytes, updates rounded once per step, nearest or stochastically).
        self.home = [[p.detach().to(home_dtype, copy=True) for _, p in b.params] for b in blocks]
        self.largest_tensor = max((h.numel() for hb in self.home for h in hb), default=0)
        self.momentum = ([[torch.zeros_like(h, dtype=torch.float32) for h in hb] for hb in self.home]
                         if method.variant == "momentum" else None)

    def _z(self, step: int, direction: int, b: int):
        z = iter_z if self.z_per_tensor else draw_z
        return z(self.seed, step, direction, b, [h.shape for h in self.home[b]], self.home[b][0].device,
                 piece=self.z_piece)

    @torch.no_grad()
    def _load(self, step: int, direction: int, scale: float) -> None:
        """Model weights := cast(home + scale * z(step, direction)); scale 0 loads home itself."""
        for b, block in enumerate(self.blocks):
            zs = self._z(step, direction, b) if scale else (None for _ in self.home[b])
            for (_, p), h, z in zip(block.params, self.home[b], zs):
                p.copy_(h if z is None else h + scale * z)

    @torch.no_grad()
    def _load_candidate(self, step: int, grads: list[float], alpha: float) -> None:
        """Model weights := cast(home + alpha * direction): the conservative variant's w -/+ u."""
        for b, block in enumerate(self.blocks):
            candidate_weights([p for _, p in block.params], self.home[b], self._zstreams(step, b, len(grads)),
                              grads, self.method, alpha)

    def _zstreams(self, step: int, b: int, q: int) -> ZStreams:
        return ZStreams(self.seed, step, b, q, self.home[b][0].device, self.home_rounding, self.z_piece)

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
        applied, kept, candidates = lr, None, None
        if m.variant == "conservative":
            found = {}
            for c in CANDIDATES:
                if c == 0:
                    self._load(step, 0, 0.0)
                else:
                    self._load_candidate(step, grads, -(c * lr))
                found[c] = self._losses(micro_batches)[0]
            kept = choose_candidate(found)
            applied, candidates = kept * lr, (found[1], found[0], found[-1])
        self._update(step, grads, applied)
        self._load(step, 0, 0.0)
        return ZOStepResult(sum(losses) / len(losses), grads, tokens, applied, kept, candidates)

    def _update(self, step: int, grads: list[float], lr: float) -> None:
        for b in range(len(self.blocks)):
            update_home(self.home[b], self._zstreams(step, b, len(grads)), grads, lr,
                        self.method, self.momentum[b] if self.momentum else None)

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
        """Apply a recorded step's update (its projected gradients, the lr it was applied with: c * lr
        for the conservative variant) exactly as step() did."""
        self._update(step, grads, lr)
        self._load(step, 0, 0.0)
