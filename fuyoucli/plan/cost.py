"""Plan stage, the cost model: what one candidate placement costs, in bytes per tier and seconds.

Pure (no torch, no I/O). The memory model (plan/memory.py: peak bytes per tier, the device's as named
parts) and the time model (plan/step_time.py: busy seconds per resource and the step under the overlap
model), as the Fuyou and ZO2 papers read them, put together for the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from fuyoucli.model.types import ModelInventory
from fuyoucli.plan.memory import memory_estimate
from fuyoucli.plan.step_time import step_times
from fuyoucli.plan.types import Machine, Placement, StepTimes, TierBytes, Workload


@dataclass(frozen=True)
class Estimate:
    memory: TierBytes
    times: StepTimes
    flops_per_step: float
    pinned_pool_bytes: int
    device_buffers: int
    wire_dtype: str
    device_parts: tuple[tuple[str, int], ...]
    """What the device peak is made of (resident weights, buffers, activations, ...), for reasons."""


def estimate(inv: ModelInventory, wl: Workload, machine: Machine, pl: Placement) -> Estimate:
    """Peak bytes per tier and busy seconds per resource of one step under placement `pl`."""
    memory = memory_estimate(inv, wl, machine, pl)
    times, flops = step_times(inv, wl, machine, pl)
    # zo2 sends weights as they are stored at home; first-order and LoRA bases travel in the compute dtype
    wire = pl.home_dtype if (wl.method == "zo2" and not wl.lora) else wl.compute_dtype
    return Estimate(memory=memory.memory, times=times, flops_per_step=flops, pinned_pool_bytes=memory.pinned_pool_bytes,
                    device_buffers=memory.device_buffers, wire_dtype=wire, device_parts=memory.device_parts)
