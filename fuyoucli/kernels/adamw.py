"""AdamW with compact states: 8-bit block-wise moments and/or a bf16 master updated with stochastic
rounding. The one implementation both the in-memory reference and the streamed engine's CPU worker run.

Kernel level: torch only, no CUDA calls (the same ops run on whatever device the tensors are on);
the hardware profile times it (hardware/probe.py), engine/compact.py seeds its rounding per block.
- 8-bit moments (Dettmers et al., "8-bit Optimizers via Block-wise Quantization"): each tensor's m and
  v are cut into blocks of BLOCK values with one fp32 scale per block (the block's largest magnitude).
  A value is stored as one byte in the float8 e4m3 layout (sign, 4 exponent bits, 3 mantissa bits)
  after dividing by its block's scale: like the paper's dynamic map, the byte spends its bits on the
  exponent, so small values in a block with a large one keep a relative precision of 2^-4 down to
  2^-9 of the block's largest, instead of rounding to 0 as a linear int8 code would. v is stored as
  sqrt(v) (half the dynamic range; the update divides by it anyway), never rounded to 0 where v is
  not 0: a v read back as 0 beside a non-zero m would make a step of m / eps.
  torch converts to and from that layout in one op each, so the whole update is a few elementwise
  passes over cache-sized chunks (CHUNK values), with no per-value table search: on this project's
  2-core CPU that measured about 10x faster than bitsandbytes' CPU 8-bit blockwise update and
  torchao's AdamW8bit there (benchmarks/compact_optimizer.py prints the figures). Where a C compiler
  is, a chunk runs as one compiled pass instead (kernels/adamw_chunk.c through kernels/native.py:
  the same operations, each value read and written once; 2.6x the torch ops for 8-bit moments here).
- bf16 master: the bfloat16 weight is the only copy; each update is computed in fp32 and stored back
  with stochastic rounding (kernels/rounding.py) from a generator the caller seeds per step (the
  engine: by run seed, step and block), so a run and its resume round the same way whatever the
  order blocks are updated in.
The arithmetic is torch's single-tensor AdamW (weight decay, lerp, addcmul, sqrt / bias correction +
eps, addcdiv), so fp32 moments with an fp32 master equal torch.optim.AdamW(foreach=False) exactly on
the torch ops, and to the last place of a sqrt on the compiled chunk (kernels/native.py says why).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from fuyoucli.kernels.native import adamw_chunk


class Rounder(Protocol):
    """Stores a chunk's fp32 result into its bf16 master (stochastic rounding). `seed`, where a rounder
    has one, lets the compiled chunk draw its rounding itself (adamw_chunk.c)."""

    def store(self, dst: torch.Tensor, src32: torch.Tensor) -> torch.Tensor: ...


BLOCK = 256
"""Values per quantization block (one fp32 scale each)."""
CHUNK = 1 << 18
"""Values per pass: temporaries of 1 MiB each stay in cache (a multiple of BLOCK)."""
CODE_DTYPE = torch.float8_e4m3fn
CODE_MAX = 448.0
"""The largest finite e4m3 value: a block's largest magnitude is stored as this."""
CODE_TINY = 2.0 ** -9
"""The smallest positive e4m3 value: where sqrt(v) > 0 it is stored as at least this."""

STATE_FORMATS = ("fp32", "int8")
MASTER_FORMATS = ("fp32", "bf16")


@dataclass(frozen=True)
class AdamFormat:
    """How a run keeps AdamW's state: moments `states` (fp32 | int8) and the master `master` (fp32 | bf16)."""

    states: str = "fp32"
    master: str = "fp32"

    def __post_init__(self) -> None:
        if self.states not in STATE_FORMATS or self.master not in MASTER_FORMATS:
            raise ValueError(f"unknown AdamW state format states={self.states!r} master={self.master!r}")

    @property
    def default(self) -> bool:
        """fp32 moments and master: torch's own (fused) AdamW, as before these formats existed."""
        return self.states == "fp32" and self.master == "fp32"

    @property
    def master_dtype(self) -> torch.dtype:
        return torch.float32 if self.master == "fp32" else torch.bfloat16

    def state_parts(self, numel: int) -> list[tuple[str, torch.dtype, int]]:
        """(key, dtype, numel) of one tensor's moments, as CompactAdamW keeps them (its state keys)."""
        if self.states == "fp32":
            return [("exp_avg", torch.float32, numel), ("exp_avg_sq", torch.float32, numel)]
        blocks = scale_count(numel)
        return [("exp_avg_scale", torch.float32, blocks), ("exp_avg_sq_scale", torch.float32, blocks),
                ("exp_avg", CODE_DTYPE, numel), ("exp_avg_sq", CODE_DTYPE, numel)]

    def moment_bytes(self, numel: int) -> int:
        """Bytes of one tensor's m and v."""
        return sum(n * dtype.itemsize for _, dtype, n in self.state_parts(numel))


def scale_count(numel: int) -> int:
    return -(-numel // BLOCK)


def new_state(p: torch.Tensor, fmt: AdamFormat) -> dict[str, torch.Tensor]:
    """Zero moments for tensor `p` (8-bit codes of 0 with scales of 0 read back as 0)."""
    state = {"step": torch.zeros((), dtype=torch.float32)}
    for key, dtype, n in fmt.state_parts(p.numel()):
        shape = p.shape if n == p.numel() and key in ("exp_avg", "exp_avg_sq") else (n,)
        state[key] = torch.zeros(shape, dtype=dtype, device=p.device)
    return state


class _Work:
    """Per-thread fp32 temporaries of CHUNK values (the CPU worker and the trainer's thread each own theirs)."""

    local = threading.local()

    @classmethod
    def get(cls, device: torch.device) -> list[torch.Tensor]:
        cache = getattr(cls.local, "bufs", None)
        if cache is None:
            cache = cls.local.bufs = {}
        key = str(device)
        if key not in cache:
            cache[key] = [torch.empty(CHUNK, dtype=torch.float32, device=device) for _ in range(4)]
        return cache[key]


class _Pool:
    """Threads that run chunks, each with torch's intra-op parallelism off. The chunks' ops are small
    (CHUNK values): run on torch's own thread team each would be a parallel region of its own, and on
    a busy machine every region waits for a descheduled team member (measured on this project's
    2-core VM beside another process: 0.002 G params/s where one thread alone did 0.2). Threads that
    each own whole chunks release the cores between chunks instead. One pool per thread count."""

    pools: dict[int, ThreadPoolExecutor] = {}
    lock = threading.Lock()

    @classmethod
    def get(cls, threads: int) -> ThreadPoolExecutor:
        with cls.lock:
            if threads not in cls.pools:
                cls.pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fuyou-adamw",
                                                        initializer=torch.set_num_threads, initargs=(1,))
            return cls.pools[threads]


def chunk_count(numel: int) -> int:
    """How many rounding streams (one per CHUNK values) an update of a tensor of `numel` values draws."""
    return -(-numel // CHUNK)


@torch.no_grad()
def adamw_(p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], *, step: int, lr: float,
           beta1: float, beta2: float, eps: float, weight_decay: float,
           rounding: Callable[[int], Rounder] | None) -> None:
    """One AdamW update of tensor `p` (fp32, or bf16 stored back through `rounding(i)`, chunk i's own
    stream) from `grad`, its moments in `state` (new_state's layout), CHUNK values at a time. On the
    CPU the chunks run on torch.get_num_threads() single-threaded workers (_Pool); every chunk's
    result is the same whichever thread runs it (its blocks, scales and rounding stream are its own)."""
    n = p.numel()
    flat_p, flat_g = p.reshape(-1), grad.reshape(-1)
    if not p.is_contiguous() or not all(t.is_contiguous() for t in state.values()):
        # the moments are updated through flat views (and, compiled, raw pointers): a copy would lose them
        raise ValueError("compact AdamW updates contiguous tensors in place")
    if p.dtype != torch.float32 and rounding is None:
        raise ValueError("a bf16 master is stored back with stochastic rounding; none was given")
    args = (flat_p, flat_g, state, step, lr, beta1, beta2, eps, weight_decay, rounding)
    starts = range(0, n, CHUNK)
    threads = torch.get_num_threads()
    if p.device.type != "cpu" or threads == 1 or len(starts) == 1:
        for i, a in enumerate(starts):
            _chunk(i, a, min(a + CHUNK, n), *args)
        return
    jobs = [_Pool.get(threads).submit(_chunk, i, a, min(a + CHUNK, n), *args) for i, a in enumerate(starts)]
    for job in jobs:
        job.result()


@torch.no_grad()  # grad mode is per thread: the pool's are not the caller's
def _chunk(i: int, a: int, b: int, flat_p, flat_g, state, step, lr, beta1, beta2, eps, weight_decay,
           rounding) -> None:
    """Values a..b of one tensor's update (adamw_)."""
    quantized = state["exp_avg"].dtype == CODE_DTYPE
    m_all, v_all = state["exp_avg"].reshape(-1), state["exp_avg_sq"].reshape(-1)
    bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    w_m, w_v, w_t, w_p = _Work.get(flat_p.device)
    k = b - a
    kb = scale_count(k)
    native = adamw_chunk() if flat_p.device.type == "cpu" else None
    if native is not None:  # the same update in one pass (adamw_chunk.c)
        # fp32 weights are updated in place; a bf16 master rounds inside the pass from the chunk's
        # seed, or, with a rounder that has none, the pass updates an fp32 copy the rounder stores
        rounder = rounding(i) if flat_p.dtype != torch.float32 else None
        seed = getattr(rounder, "seed", None)
        p32 = p16 = None
        if rounder is None:
            p32 = flat_p[a:b]
        elif seed is not None and flat_p.dtype == torch.bfloat16:
            p16 = flat_p[a:b]
        else:
            p32 = w_p[:k].copy_(flat_p[a:b])
        g = flat_g[a:b] if flat_g.dtype in (torch.float32, torch.bfloat16) else flat_g[a:b].float()
        s = slice(a // BLOCK, a // BLOCK + kb)
        m_sc, v_sc = (state["exp_avg_scale"][s].data_ptr(), state["exp_avg_sq_scale"][s].data_ptr()) if quantized \
            else (None, None)
        native(None if p32 is None else p32.data_ptr(), None if p16 is None else p16.data_ptr(), seed or 0,
               g.data_ptr(), int(g.dtype == torch.bfloat16),
               None if quantized else m_all[a:b].data_ptr(), None if quantized else v_all[a:b].data_ptr(),
               m_all[a:b].data_ptr() if quantized else None, v_all[a:b].data_ptr() if quantized else None,
               m_sc, v_sc, k, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, bc2_sqrt, eps, -lr / bc1)
        if rounder is not None and p16 is None:
            rounder.store(flat_p[a:b], p32)
        return
    padded = kb * BLOCK
    g = flat_g[a:b] if flat_g.dtype == torch.float32 else flat_g[a:b].float()
    if quantized:
        m, v = w_m[:padded], w_v[:padded]
        _dequantize(m_all[a:b], state["exp_avg_scale"][a // BLOCK: a // BLOCK + kb], m, kb, w_t, signed=True)
        _dequantize(v_all[a:b], state["exp_avg_sq_scale"][a // BLOCK: a // BLOCK + kb], v, kb, w_t, signed=False)
        v.mul_(v)  # stored as sqrt(v)
        m_k, v_k = m[:k], v[:k]
    else:
        m_k, v_k = m_all[a:b], v_all[a:b]
    p32 = flat_p[a:b] if flat_p.dtype == torch.float32 else w_p[:k].copy_(flat_p[a:b])
    # torch's single-tensor AdamW, op for op
    if weight_decay != 0:
        p32.mul_(1 - lr * weight_decay)
    m_k.lerp_(g, 1 - beta1)
    v_k.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if quantized:  # v is stored as its square root: take it once, in place, for both uses
        denom = torch.div(v_k.sqrt_(), bc2_sqrt, out=w_t[:k]).add_(eps)
    else:
        denom = torch.sqrt(v_k, out=w_t[:k]).div_(bc2_sqrt).add_(eps)
    p32.addcdiv_(m_k, denom, value=-lr / bc1)
    if flat_p.dtype != torch.float32:
        rounding(i).store(flat_p[a:b], p32)
    if quantized:
        _quantize(m, m_all[a:b], state["exp_avg_scale"][a // BLOCK: a // BLOCK + kb], kb, w_t, signed=True)
        _quantize(v, v_all[a:b], state["exp_avg_sq_scale"][a // BLOCK: a // BLOCK + kb], kb, w_t, signed=False)


_E4M3_TO_F32 = 2.0 ** 120
"""e4m3's bits (s eeee mmm, exponent bias 7) moved to fp32's positions (s, then eeee mmm at bits 20..27)
read as an fp32 2^-120 times the code's value, normal or subnormal alike: the fast half-to-float trick."""


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, kb: int, work: torch.Tensor, *,
                signed: bool) -> None:
    """out (kb * BLOCK values; past len(codes) zeros) := each code's value times its block's scale,
    exactly as codes.float() * scale (torch's own e4m3 -> fp32 conversion is scalar: ~5x slower)."""
    k = codes.numel()
    bits = out[:k].view(torch.int32)
    bits.copy_(codes.view(torch.int8 if signed else torch.uint8))  # widened (int8: sign-extended)
    if signed:
        sign = torch.bitwise_and(bits, -(1 << 31), out=work[:k].view(torch.int32))
        bits.bitwise_and_(0x7F).bitwise_left_shift_(20).bitwise_or_(sign)
    else:
        bits.bitwise_left_shift_(20)
    out[k:].zero_()
    out[:k].mul_(_E4M3_TO_F32)  # exact: a power of two
    out.view(kb, BLOCK).mul_(scales.view(kb, 1))


def _quantize(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, kb: int, work: torch.Tensor, *,
              signed: bool) -> None:
    """codes, scales := x (kb * BLOCK values, zero past len(codes)) block by block; x is scratch."""
    blocks = x.view(kb, BLOCK)
    top = (torch.abs(blocks, out=work[: kb * BLOCK].view(kb, BLOCK)) if signed else blocks).amax(1)
    scales.copy_(top.div_(CODE_MAX))
    blocks.div_(top.clamp_(min=torch.finfo(torch.float32).tiny).view(kb, 1))
    if signed:
        blocks.clamp_(-CODE_MAX, CODE_MAX)  # a block's largest may land a rounding error above CODE_MAX
    else:
        blocks.clamp_(CODE_TINY, CODE_MAX)  # never 0 where v > 0 (module docstring); where it is 0, m is too
    codes.copy_(x[: codes.numel()])


class CompactAdamW(torch.optim.Optimizer):
    """torch.optim-style AdamW over one block's tensors in an AdamFormat (fp32 or bf16 parameters;
    fp32 gradients on them). `rounding(step, device, stream)` gives a bf16 master's stochastic
    rounding: one stream per CHUNK values, numbered through the block's tensors in order, so that the
    draws do not depend on which thread runs a chunk. The step is the block's own update count (the
    first stepped tensor's), so it survives a resume with the state."""

    def __init__(self, params, *, fmt: AdamFormat, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float = 0.0, rounding: Callable[[int, torch.device, int], Rounder] | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.fmt, self.rounding = fmt, rounding

    @torch.no_grad()
    def step(self, closure=None, grads: dict[int, torch.Tensor | None] | None = None):
        """One update. `grads` (by id of the parameter; a bf16 master's fp32 gradients, which torch
        does not let .grad hold) replaces each p.grad when given."""
        if closure is not None:
            raise ValueError("CompactAdamW takes no closure")
        block_step, streams = None, 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                grad = p.grad if grads is None else grads.get(id(p))
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(new_state(p, self.fmt))
                state["step"] += 1
                step = int(state["step"])
                block_step = step if block_step is None else block_step
                rounding = None
                if p.dtype != torch.float32 and self.rounding is not None:
                    rounding = (lambda i, base=streams, s=block_step, d=p.device: self.rounding(s, d, base + i))
                adamw_(p, grad, state, step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], rounding=rounding)
                streams += chunk_count(p.numel())
        return None
