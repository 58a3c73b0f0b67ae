"""Schedule: the plan turned into an explicit list of operations for one pass over the blocks.

Plan stage, pure (no torch). The executor walks this list and never computes `i - 2` by hand: the
prefetch depth, which blocks stream and when a slot is reused are all visible here, and tests
compare whole lists with ==.

For streamed blocks with prefetch depth k there are k + 1 device slots: while block i computes,
blocks i+1 .. i+k are in flight. Fetch(i + k) is issued before Compute(i) so that it overlaps it;
its slot is the one Evict(i - 1) released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OpKind = Literal["fetch", "compute", "evict"]


@dataclass(frozen=True)
class Op:
    kind: OpKind
    block: int
    """Index into the plan's blocks (execution order)."""
    slot: int | None = None
    """Device slot of a streamed block (None for resident blocks)."""


def pass_schedule(streamed: list[bool], prefetch_depth: int, *, reverse: bool = False) -> list[Op]:
    """Ops for one pass (forward, or backward with reverse=True) over blocks whose `streamed` flag
    says whether each must be fetched. Resident blocks only compute."""
    order = list(range(len(streamed)))[::-1] if reverse else list(range(len(streamed)))
    queue = [b for b in order if streamed[b]]
    slots = prefetch_depth + 1
    slot_of = {b: n % slots for n, b in enumerate(queue)}
    ops: list[Op] = []
    issued = 0

    def issue_until(count: int) -> None:
        nonlocal issued
        while issued < min(count, len(queue)):
            b = queue[issued]
            ops.append(Op("fetch", b, slot_of[b]))
            issued += 1

    done = 0  # streamed blocks computed so far
    issue_until(prefetch_depth)
    for b in order:
        if streamed[b]:
            issue_until(done + prefetch_depth + 1)  # this block and k ahead of it
            ops.append(Op("compute", b, slot_of[b]))
            ops.append(Op("evict", b, slot_of[b]))
            done += 1
        else:
            ops.append(Op("compute", b))
    return ops


def check_schedule(ops: list[Op], slots: int) -> None:
    """Invariants the executor relies on; raises AssertionError naming the first broken rule."""
    holder: dict[int, int] = {}
    fetched: set[int] = set()
    for n, op in enumerate(ops):
        if op.kind == "fetch":
            assert op.slot is not None and 0 <= op.slot < slots, f"op {n}: slot {op.slot} out of range"
            assert op.slot not in holder, f"op {n}: slot {op.slot} still holds block {holder.get(op.slot)}"
            holder[op.slot] = op.block
            fetched.add(op.block)
        elif op.kind == "compute" and op.slot is not None:
            assert op.block in fetched, f"op {n}: block {op.block} computed before its fetch"
            assert holder.get(op.slot) == op.block, f"op {n}: block {op.block} not in slot {op.slot}"
        elif op.kind == "evict":
            assert holder.get(op.slot) == op.block, f"op {n}: evicting block {op.block} it does not hold"
            del holder[op.slot]
    assert not holder, f"blocks left on the device at the end: {sorted(holder.values())}"
