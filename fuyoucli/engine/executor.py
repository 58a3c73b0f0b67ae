"""Executor: the walk over a schedule, performing each operation it names.

Engine stage. `run_pass` walks a list from plan/schedule.py: fetch, write_home, evict and the waits
for a home's last write go to the weight store (engine/store.py), the optimizer's operations to the
trainer's updates object, and compute to the trainer's function with the block's device slot.
Nothing is moved or waited for that the schedule does not name. `OpLog` lets tests compare the
schedules handed over with what was performed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Protocol

from fuyoucli.plan.schedule import Op

if TYPE_CHECKING:
    from fuyoucli.engine.store import WeightStore


class OpLog:
    """The schedules handed to the executor (`given`) and the operations performed (`done`, appended by
    the part of the engine that performs each), for tests to compare. Off until start(): a run would
    grow it by every operation."""

    def __init__(self) -> None:
        self.enabled = False
        self.given: list[Op] = []
        self.done: list[Op] = []

    def start(self) -> None:
        self.enabled = True
        self.given.clear()
        self.done.clear()

    def schedule(self, ops: list[Op]) -> None:
        if self.enabled:
            self.given.extend(ops)

    def performed(self, op: Op) -> None:
        if self.enabled:
            self.done.append(op)


class StorePair:
    """Two stores walked as one by run_pass (zo2 momentum: a layer's momentum goes into the same slot
    number as its weights, goes home with them and is waited for with them); the first one logs."""

    def __init__(self, first: WeightStore, second: WeightStore):
        self.first, self.second = first, second
        second.recorder = first.recorder
        self.units, self.recorder, self.ops = first.units, first.recorder, first.ops

    def fetch(self, b: int, slot: int) -> None:
        self.first.fetch(b, slot)
        self.second.fetch(b, slot)

    def write_back(self, b: int, slot: int) -> None:
        self.first.write_back(b, slot)
        self.second.write_back(b, slot)

    def release(self, b: int, slot: int) -> None:
        self.first.release(b, slot)
        self.second.release(b, slot)

    def settle(self, b: int, on: str) -> None:
        self.first.settle(b, on)
        self.second.settle(b, on)


class Updates(Protocol):
    """The optimizer side a first-order schedule drives (train/first_order_updates.py: BlockUpdates)."""

    def offload_grads(self, b: int) -> None: ...
    def await_grads(self, b: int) -> None: ...
    def grad_norms(self, b: int) -> None: ...
    def update(self, b: int) -> None: ...
    def wait_ready(self, b: int) -> None: ...


def run_pass(ops: list[Op], store: WeightStore, compute: Callable[[int, int | None], bool] | None = None,
             updates: Updates | None = None, apply: Callable[[int, int], bool] | None = None) -> None:
    """Walk a schedule. `compute(block, slot)` runs the block and `apply(block, slot)` applies its
    deferred update in its slot (zo2); each returns whether it changed the block's weights (which the
    schedule must then send home before the slot is freed); `updates` performs the optimizer's
    operations. A wait on a write home or an update of a streamed block is the store's; of a resident
    block (its new weights uploaded by the optimizer), the updates'."""
    store.ops.schedule(ops)
    changed: dict[int, bool] = {}
    for op in ops:
        kind, b = op.kind, op.block
        if kind == "fetch":
            store.fetch(b, op.slot)
        elif kind in ("compute", "apply"):
            start = time.perf_counter()
            changed[b] = bool((compute if kind == "compute" else apply)(b, op.slot)) or changed.get(b, False)
            unit = store.units.get(b)
            store.recorder.span("compute", unit.name if unit else f"block {b}", start, time.perf_counter())
            store.ops.performed(op)
        elif kind == "write_home":
            store.write_back(b, op.slot)
            changed[b] = False
        elif kind == "evict":
            if changed.pop(b, False):
                raise RuntimeError(f"block {b} changed on the device and the schedule frees its slot without "
                                   "sending it home")
            store.release(b, op.slot)
        elif kind == "wait" and op.on == "grad_offload":
            updates.await_grads(b)
        elif kind == "wait":
            if b in store.units:
                store.settle(b, op.on)
            else:
                updates.wait_ready(b)
        elif kind == "grad_offload":
            updates.offload_grads(b)
        elif kind == "grad_norm":
            updates.grad_norms(b)
        elif kind == "update":
            updates.update(b)
        else:
            raise ValueError(f"unknown operation {op}")
