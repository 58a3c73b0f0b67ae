"""Plan stage, the compute device's work besides matrix products: seconds per block of one step.

Pure arithmetic (no torch). Counts what the trainers do, op by op, and prices it with the profile's
measured rates (Machine.elementwise_points: drawing normals, in-place ops, ops that write a new
tensor; by tensor size). On a GPU all of it is memory bound and small next to the products; on a CPU
drawing z is compute bound (a few ns per number) and, with the forward's norms, activations and
residual adds, takes as long as the products do. The counts, per trainable parameter:

- zo2 streamed engine (train/zo_streamed.py), a streamed layer: the deferred update (update_home into
  the engine's buffers: the direction zeroed, per direction z drawn into the z buffer + one axpy, then
  one axpy into the weights), z drawn once per direction into the buffer (the plan's z_buffer 'block';
  'tensor': once per variant, tensor by tensor, the generator replayed), and per variant (2 per
  direction) the perturbed copy cast(home + s*eps*z) (the scaled z into the direction buffer, the sum
  into the compute copy, or into the buffer and then cast). Nothing is allocated: every buffer is the
  engine's, made once. On a CPU the fetch and the write-back are host memcpys made by the same cores.
- zo2 streamed engine, a resident block (embed, head, resident layers; LoRA adapters): z drawn into
  the z buffer once per direction (z_buffer 'tensor': once per variant), the perturbed copy per
  variant, after the step the update with z drawn anew, and a copy of the updated home into the model.
  A tied embedding is drawn and perturbed again for the head in every variant.
- zo2 in-memory reference (train/zo.py): per variant z drawn anew (a block at once, or with z_buffer
  'tensor' one tensor at a time: the same work) and the perturbed copy for every block (new tensors),
  the update (z drawn a third time per direction), and the copy of home into the model.
- zo2 variant conservative (zo_candidates_s): for w - u and w + u each, the step's direction formed
  again (z drawn again per direction) and the candidate from it; w copied; three more forward passes.
- first-order (train/first_order.py): new fp32 gradients, the global norm (one read), and for a
  half-precision model the fp32 copy of the gradients and the copy of the master weights back.
- a forward, per block: the traced elementwise elements (inventory), the attention products at the
  small-product rate, the head's new logits tensor, and the loss over its scored positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fuyoucli.model.types import DTYPE_BYTES, QUANT_BYTES_PER_PARAM, BlockSpec, ModelInventory
from fuyoucli.plan.types import Z_PIECE, Machine, Workload

# Bytes one element of a probe's add moves (read x, read y, write the result): the unit its rates are in.
_ADD_BYTES = 12


@dataclass(frozen=True)
class Rates:
    """Seconds per unit of elementwise work at one tensor size."""

    randn_s: float
    """Per fp32 normal drawn into an existing tensor."""
    inplace_s: float
    """Per byte read or written by an op on existing tensors."""
    alloc_s: float
    """Extra per byte of a new result tensor (page faults once the allocator stops reusing blocks)."""
    norm_s: float = 0.0
    """Per byte read by a 2-norm (a reduction)."""

    @property
    def fresh_s(self) -> float:
        """Per byte moved by an op that writes a new tensor (an add's mix: a third of its bytes new)."""
        return self.inplace_s + self.alloc_s * 4 / _ADD_BYTES


def rates_at(machine: Machine, numel: int) -> Rates:
    """The profile's elementwise rates for tensors of `numel` elements: linear in log2(size) between
    measured sizes, clamped outside them. Without points: memory bound at device_mem_bps (a normal
    costs its 4 bytes written; new tensors cost nothing extra, as with a caching GPU allocator)."""
    pts = machine.elementwise_points
    if not pts:
        per_byte = 1.0 / (machine.device_mem_bps or 1.0)
        return Rates(randn_s=4 * per_byte, inplace_s=per_byte, alloc_s=0.0, norm_s=per_byte)
    n = max(1, numel)
    if n <= pts[0][0]:
        lo = hi = pts[0]
        t = 0.0
    elif n >= pts[-1][0]:
        lo = hi = pts[-1]
        t = 0.0
    else:
        k = next(i for i in range(1, len(pts)) if n <= pts[i][0])
        lo, hi = pts[k - 1], pts[k]
        t = math.log2(n / lo[0]) / math.log2(hi[0] / lo[0])

    def mix(a: float, b: float) -> float:
        return a + t * (b - a)

    randn_ps, inplace_bps, fresh_bps = mix(lo[1], hi[1]), mix(lo[2], hi[2]), mix(lo[3], hi[3])
    norm_bps = mix(lo[4] if len(lo) > 4 else lo[2], hi[4] if len(hi) > 4 else hi[2])
    inplace_s = 1.0 / inplace_bps
    alloc_s = max(0.0, _ADD_BYTES / fresh_bps - _ADD_BYTES / inplace_bps) / 4  # per new byte
    return Rates(randn_s=1.0 / randn_ps, inplace_s=inplace_s, alloc_s=alloc_s, norm_s=1.0 / norm_bps)


# ---- zo2: z, perturbations, updates ------------------------------------------------------------


def _perturb_s(r: Rates, hb: int, cb: int, fresh: bool) -> float:
    """w.copy_(home + (s*eps) * z) per parameter. `fresh` (the reference): s*eps*z (read 4, write 4
    new), home + that (read hb + 4, write 4 new), the copy into the compute dtype (read 4, write cb).
    The engine writes the same into its buffers: the scaled z (8), a half-precision home widened into
    the fp32 working buffer (hb + 4), the sum straight into fp32 weights (hb + 8, or 12 from the
    widened copy), else into the buffer and then cast (4 + cb)."""
    if fresh:
        return (8 + hb + 8 + 4 + cb) * r.inplace_s + 8 * r.alloc_s
    home = hb + 8 if hb == 4 else hb + 4 + 12
    return (8 + home + (0 if cb == 4 else 4 + cb)) * r.inplace_s


COMPILED_SR_CASTS = 2.4
"""engine/rounding.py's compiled bf16 rounding (a CPU device with a C compiler), in casts of the same
bytes: one pass, a hash per value. Measured on this project's VM, one thread: 0.51 ns a value, against
0.21 for the cast and 2.9 for a normal draw."""


def compiled_rounding(machine: Machine, home_dtype: str) -> bool:
    """Whether a stochastically rounded home is stored by the compiled kernel (kernels/native.py): a
    CPU device's bf16 homes, where this machine builds it (the run happens where it is planned)."""
    if machine.compute_device != "cpu" or home_dtype != "bfloat16":
        return False
    from fuyoucli.kernels.native import sr_bf16  # builds it on first use: only for a CPU device's plan
    return sr_bf16() is not None


def _round_s(r: Rates, hb: int, stochastic: bool, compiled: bool = False) -> float:
    """Storing one fp32 result into a half-precision home (engine/rounding.py): a cast, or stochastic
    rounding: a random draw into a new int32 tensor, added in place to the fp32 working copy's bits,
    the low half masked off in place, then the cast (exact); compiled, one pass (COMPILED_SR_CASTS)."""
    if not stochastic:
        return (4 + hb) * r.inplace_s
    if compiled:
        return COMPILED_SR_CASTS * (4 + hb) * r.inplace_s
    return r.randn_s + 4 * r.alloc_s + 12 * r.inplace_s + 8 * r.inplace_s + (4 + hb) * r.inplace_s


def _update_s(r: Rates, q: int, hb: int, z_new: bool, momentum: bool, fresh: bool,
              stochastic: bool = False, compiled: bool = False) -> float:
    """update_home per parameter: an fp32 working copy of a half-precision home (and the rounding back),
    the direction zeroed, per direction z drawn and added, momentum, the step into the weights.
    `fresh`: the direction and the working copy are new tensors (the reference), else buffers."""
    new = 4 * r.alloc_s if fresh else 0.0
    s = 4 * r.inplace_s + new  # the direction, zeroed
    s += q * (r.randn_s + (4 * r.alloc_s if z_new else 0.0) + 12 * r.inplace_s)
    s += 12 * r.inplace_s  # h.add_(g, alpha=-lr)
    if momentum:
        s += 20 * r.inplace_s  # m.mul_(beta).add_(g)
    if hb != 4:
        s += (hb + 4) * r.inplace_s + new + _round_s(r, hb, stochastic, compiled)
    return s


def zo_block_s(machine: Machine, wl: Workload, spec: BlockSpec, home_dtype: str, *, streamed: bool,
               engine: bool, tied_embed: bool, z_per_tensor: bool = False) -> float:
    """Seconds of a zo2 step's elementwise work on one block's trainable parameters (module docstring).
    `engine`: the streamed engine runs the step (some block streams); else the in-memory reference.
    `z_per_tensor`: the plan's z_buffer 'tensor' (the engine draws z for each variant, not direction)."""
    p = spec.trainable_params
    if p == 0:
        return 0.0
    r = rates_at(machine, min(spec.max_tensor_params, Z_PIECE))  # ops go piece by piece
    q, v = wl.q, 2 * wl.q
    draws = v if z_per_tensor else q  # the engine's draws of the step's z for the passes
    cb = DTYPE_BYTES[wl.compute_dtype]
    hb = cb if wl.lora else DTYPE_BYTES[home_dtype]
    mom, sr = wl.zo_momentum, wl.home_rounding == "stochastic" and not wl.lora
    cc = sr and hb != 4 and compiled_rounding(machine, home_dtype)
    copy_home = (hb + cb) * r.inplace_s
    if not engine:
        z_new = r.randn_s + 4 * r.alloc_s
        per = v * (z_new + _perturb_s(r, hb, cb, True)) + _update_s(r, q, hb, True, mom, True, sr, cc) + copy_home
    elif streamed:
        per = _update_s(r, q, hb, False, mom, False, sr, cc) + draws * r.randn_s + v * _perturb_s(r, hb, cb, False)
    else:
        per = (draws * r.randn_s + v * _perturb_s(r, hb, cb, False) + _update_s(r, q, hb, False, mom, False, sr, cc)
               + copy_home)
        if tied_embed:
            per += v * (r.randn_s + _perturb_s(r, hb, cb, False))
    return p * per


def zo_candidates_s(machine: Machine, wl: Workload, spec: BlockSpec, home_dtype: str, *, engine: bool,
                    tied_embed: bool) -> float:
    """Seconds of the conservative variant's candidates on one block's trainable parameters: for each of
    w - u and w + u the step's direction formed again tensor by tensor (z drawn again per direction;
    the engine in its buffers, the reference in new tensors) and an axpy cast into the compute dtype;
    and w copied. A tied embedding is formed again for the head, per candidate."""
    p = spec.trainable_params
    if p == 0 or not wl.zo_conservative:
        return 0.0
    r = rates_at(machine, min(spec.max_tensor_params, Z_PIECE))
    q, cb = wl.q, DTYPE_BYTES[wl.compute_dtype]
    hb = cb if wl.lora else DTYPE_BYTES[home_dtype]
    half = (hb + 4) * r.inplace_s if hb != 4 else 0.0  # the fp32 working copy of a half home
    # a stochastically rounded home: each candidate is rounded as the update would store it
    if hb != 4 and wl.home_rounding == "stochastic" and not wl.lora:
        half += _round_s(r, hb, True, compiled_rounding(machine, home_dtype)) - (4 + hb) * r.inplace_s
    copy_home = (hb + cb) * r.inplace_s
    if not engine:
        direction = 4 * (r.inplace_s + r.alloc_s) + q * (r.randn_s + 4 * r.alloc_s + 12 * r.inplace_s)
        cand = half + 12 * r.inplace_s + 4 * r.alloc_s + (4 + cb) * r.inplace_s
        return p * (2 * (direction + cand) + copy_home)
    direction = 4 * r.inplace_s + q * (r.randn_s + 12 * r.inplace_s)
    cand = half + 12 * r.inplace_s + (0.0 if cb == 4 else (4 + cb) * r.inplace_s)
    per = 2 * (direction + cand) + copy_home
    if tied_embed:
        per += 2 * (direction + cand) + copy_home
    return p * per


def cpu_copy_s(machine: Machine, nbytes: int) -> float:
    """A host memcpy of nbytes made by the CPU (dram_bps counts bytes read + written)."""
    return 2 * nbytes / (machine.dram_bps or 1.0)


# ---- first-order: gradients ----------------------------------------------------------------------


def grad_s(machine: Machine, wl: Workload, spec: BlockSpec) -> float:
    """Per step: the new gradients (their pages; an embedding's is zero-filled, then its rows
    added), the global norm's read (at the measured 2-norm rate), clipping in place, and with a
    half-precision model the fp32 gradient copy and the master weights copied back."""
    p = spec.trainable_params
    if p == 0:
        return 0.0
    r = rates_at(machine, spec.max_tensor_params)
    cb = DTYPE_BYTES[wl.compute_dtype]
    s = cb * r.alloc_s + 4 * r.inplace_s
    if spec.name == "embed":
        s += cb * r.inplace_s
    if wl.clips_grads:
        s += 4 * r.norm_s + 8 * r.inplace_s  # the norms' read, then the scaling in place
    if cb != 4:
        s += (cb + 4) * r.inplace_s + 4 * r.alloc_s + (4 + cb) * r.inplace_s
    return p * s


# ---- matrix products ----------------------------------------------------------------------------


def _product_curve(machine: Machine, wl: Workload) -> list[tuple[int, float]]:
    """(size, FLOP/s) of the measured square products in the run's dtype, made non-decreasing in size:
    a larger product never runs slower per FLOP (its blocks amortize more), so a point below a smaller
    one's rate is a slow timing window on a shared machine, and the smaller one's rate is kept."""
    curve, best = [], 0.0
    for size, flops in sorted((size, flops) for dtype, size, flops in machine.matmul_points
                              if dtype == wl.compute_dtype):
        best = max(best, flops)
        curve.append((size, best))
    return curve


def small_product_rate(machine: Machine, wl: Workload) -> float:
    """Attention's products are per head (head_dim deep): the smallest measured product's rate."""
    curve = _product_curve(machine, wl)
    return curve[0][1] if curve else machine.flops(wl.compute_dtype)


def compute_rate(machine: Machine, wl: Workload, hidden: int) -> float:
    """FLOP/s of a layer's products: the measured square-product rate at the hidden size (the
    products' depth, which sets how their blocks fit the caches), between measured sizes linear in
    log2(size), clamped at the ends. The probe streams the right operand from memory, as a layer's
    weights are; reading them is the other term of a product's time (product_s)."""
    best = machine.flops(wl.compute_dtype)
    curve = _product_curve(machine, wl)
    if best <= 0 or not curve:
        return best
    if hidden <= curve[0][0]:
        return curve[0][1]
    for (s0, f0), (s1, f1) in zip(curve, curve[1:]):
        if hidden <= s1:
            return f0 + (f1 - f0) * math.log2(hidden / s0) / math.log2(s1 / s0)
    return curve[-1][1]


def product_s(machine: Machine, wl: Workload, spec: BlockSpec, tokens: int, micro_batches: int, rate: float) -> float:
    """One forward's matrix products of a block: their FLOPs at the rate, plus reading the weights
    (matmul_flops_per_token / 2 elements: 2 FLOPs per weight element per token) from memory once per
    micro-batch. With few tokens per micro-batch the second term is what makes small batches slow."""
    weights_bytes = spec.matmul_flops_per_token // 2 * DTYPE_BYTES[wl.compute_dtype]
    return tokens * spec.matmul_flops_per_token / rate + micro_batches * weights_bytes / (machine.device_mem_bps or 1.0)


def dequant_s(machine: Machine, wl: Workload, spec: BlockSpec) -> float:
    """One dequantization of a block's quantized matrices (model.quantized: each forward product, and
    each backward's input gradient, per micro-batch): read the stored bytes, write the weight in the
    compute dtype; int8 makes the fp32 product first (written, read again)."""
    if not wl.lora or wl.quantization == "none" or not spec.quantizable_params:
        return 0.0
    r = rates_at(machine, spec.max_tensor_params)
    cb = DTYPE_BYTES[wl.compute_dtype]
    stored = QUANT_BYTES_PER_PARAM[wl.quantization]
    per = (stored + 8 + cb) * r.inplace_s + (4 + cb) * r.alloc_s if wl.quantization == "int8" \
        else (stored + cb) * r.inplace_s + cb * r.alloc_s
    return spec.quantizable_params * per


# ---- a forward's elementwise work ---------------------------------------------------------------


def logits_per_token(inv: ModelInventory) -> int:
    head = next((b for b in inv.blocks if b.name == "head"), None)
    return head.matmul_flops_per_token // (2 * inv.hidden_size) if head and inv.hidden_size else 0


def forward_extra_s(machine: Machine, wl: Workload, inv: ModelInventory, spec: BlockSpec, tokens: int,
                    micro_tokens: int, attention_rate: float) -> float:
    """Seconds of one forward over `tokens` tokens of this block besides its matrix products and the
    loss (head_loss_s): its elementwise ops (new tensors of about micro_tokens x hidden) and attention."""
    return _elementwise_s(machine, wl, spec, tokens, micro_tokens, inv.hidden_size, attention_rate)


def _elementwise_s(machine: Machine, wl: Workload, spec: BlockSpec, tokens: int, micro_tokens: int, hidden: int,
                   attention_rate: float) -> float:
    cb = DTYPE_BYTES[wl.compute_dtype]
    act = rates_at(machine, micro_tokens * hidden)
    s = spec.elementwise_elems_per_token * tokens * cb * act.fresh_s
    keys = spec.forward_flops_per_token(wl.seq_len) - spec.matmul_flops_per_token
    if keys and attention_rate > 0:
        s += keys * tokens / attention_rate
    return s


def head_loss_s(machine: Machine, wl: Workload, inv: ModelInventory, tokens: int, micro_tokens: int) -> float:
    """The head's new logits tensor and the loss over the scored positions (fp32), in one forward."""
    cb = DTYPE_BYTES[wl.compute_dtype]
    vocab = logits_per_token(inv)
    big = rates_at(machine, micro_tokens * vocab)
    s = tokens * vocab * cb * big.alloc_s
    scored = wl.loss_positions_fraction * tokens
    s += scored * inv.loss_elems_per_position * 4 * big.fresh_s
    if machine.log_softmax_elems_per_s:  # its exp and log per element, beyond the bytes
        s += scored * vocab / machine.log_softmax_elems_per_s
    return s


def loss_backward_s(machine: Machine, wl: Workload, inv: ModelInventory, tokens: int) -> float:
    """First-order: the log-softmax's backward over the scored positions (its exp again)."""
    if not machine.log_softmax_backward_elems_per_s:
        return 0.0
    return wl.loss_positions_fraction * tokens * logits_per_token(inv) / machine.log_softmax_backward_elems_per_s


# ---- calibration against measured layers --------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Measured / priced seconds of a real decoder layer on this device, at a micro-batch's token count:
    what the per-op pricing above misses (dispatch and launch overhead per op, skinny products, caches
    shared between ops, new activations' pages), as one factor per kind of pass. 1.0: not measured."""

    forward: float = 1.0
    """A forward with autograd recording (first-order, and its recompute)."""
    forward_no_grad: float = 1.0
    """An inference forward (zo2)."""
    backward: float = 1.0


def _layer_priced(machine: Machine, wl: Workload, spec: BlockSpec, tokens: int, hidden: int) -> tuple[float, float]:
    """(forward, backward) seconds this module's pricing gives one layer over one micro-batch."""
    fwd = (product_s(machine, wl, spec, tokens, 1, compute_rate(machine, wl, hidden) or 1.0)
           + _elementwise_s(machine, wl, spec, tokens, tokens, hidden, small_product_rate(machine, wl) or 1.0))
    return fwd, 2 * fwd + grad_s(machine, wl, spec)


def calibration(machine: Machine, wl: Workload, micro_tokens: int) -> Calibration:
    """The factors at `micro_tokens` tokens per forward: measured / priced at each measured token count
    (layers timed in the run's compute dtype, else any), linear in log2(tokens) between them, the
    nearest one's outside. Each factor is kept within [1/4, 4]: beyond that the layer measured is not
    the work being priced, and pricing alone is the better guess."""
    timings = [t for t in machine.layer_timings if t.dtype == wl.compute_dtype] or list(machine.layer_timings)
    if not timings:
        return Calibration()
    points = []
    for t in sorted(timings, key=lambda t: t.tokens):
        lw = replace(wl, compute_dtype=t.dtype, seq_len=t.seq_len, lora=False, clips_grads=False)
        fwd, bwd = _layer_priced(machine, lw, t.spec, t.tokens, t.hidden)
        if fwd > 0 and bwd > 0:
            points.append((t.tokens, (t.forward_s / fwd, t.forward_no_grad_s / fwd, t.backward_s / bwd)))
    if not points:
        return Calibration()
    n = max(1, micro_tokens)
    if n <= points[0][0]:
        f = points[0][1]
    elif n >= points[-1][0]:
        f = points[-1][1]
    else:
        k = next(i for i in range(1, len(points)) if n <= points[i][0])
        (t0, a), (t1, b) = points[k - 1], points[k]
        x = math.log2(n / t0) / math.log2(t1 / t0)
        f = tuple(u + x * (v - u) for u, v in zip(a, b))
    return Calibration(*(min(4.0, max(0.25, v)) for v in f))
