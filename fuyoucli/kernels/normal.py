"""Standard normals drawn in order from a seed: zo2's z. Kernel level (torch only, no fuyou imports).

On CUDA, torch's Philox generator: it writes normals at about the device's copy rate. On a CPU,
torch's generator draws one value at a time on one thread (~3-5 ns a value on this project's 2-core VM,
where a streamed zo2 step draws every weight's z twice: most of the step), so a CPU device with a C
compiler draws from a counter-based stream instead: value i of the stream of a seed is a function of
(seed, i) alone (a hash of the counter, then Box-Muller; kernels/adamw_chunk.c says how), ~1.1 ns a
value on one thread there, and the same numbers however the stream is cut into pieces. Without a
compiler (or with FUYOU_NATIVE_KERNELS=0) a CPU draws from torch's generator: other numbers, so what
drew a run's z is named (z_source) and a seed ledger replays only under the same one.
"""

from __future__ import annotations

import torch

from fuyoucli.kernels.native import normal as _native_normal

COUNTER_SOURCE = "counter-normal-1"
_M64 = 0xFFFFFFFFFFFFFFFF


def splitmix64(x: int) -> int:
    """One splitmix64 step of state x (mod 2^64): nearby inputs give unrelated 64-bit outputs. The
    counter stream's key for a seed (its hash takes the key's low half by XOR with the counter: two
    keys equal but in their low bits would draw the same values at neighbouring counters), and
    model/blocks.py's block_seed mixes its four integers with it."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def z_source(device: torch.device | str) -> str:
    """What draws z on `device` here: different names, different numbers for the same seed."""
    device = torch.device(device)
    if device.type == "cpu" and _native_normal() is not None:
        return COUNTER_SOURCE
    return f"torch-{device.type}"


class NormalStream:
    """fp32 standard normals from one seed, in order: each fill takes the stream's next values."""

    def __init__(self, device: torch.device | str, seed: int):
        self.device = torch.device(device)
        self.seed = seed
        self.drawn = 0
        """Values handed out so far (the counter stream's next position)."""
        self._kernel = _native_normal() if self.device.type == "cpu" else None
        self._key = splitmix64(seed)
        self._gen = None
        if self._kernel is None:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(seed)

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """out (fp32, on the stream's device) := the next out.numel() values, in out's element order."""
        if out.dtype != torch.float32:
            raise TypeError(f"normals are drawn in float32, not {out.dtype}")
        if self._kernel is None:
            torch.randn(out.shape, generator=self._gen, device=self.device, dtype=torch.float32, out=out)
        elif out.is_contiguous():
            self._kernel(out.data_ptr(), out.numel(), self._key, self.drawn)
        else:
            out.copy_(self.draw(out.numel()).view(out.shape))
            return out
        self.drawn += out.numel()
        return out

    def draw(self, numel: int) -> torch.Tensor:
        """The next `numel` values, in a new 1-D tensor."""
        return self.fill(torch.empty(numel, dtype=torch.float32, device=self.device))
