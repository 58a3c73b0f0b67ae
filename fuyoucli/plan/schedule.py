"""Schedule: the plan turned into an explicit list of every operation that orders memory.

Plan stage, pure (no torch). The executor (engine/executor.py) walks these lists and never computes
`i - 2` by hand: the prefetch depth, which blocks stream, when a slot is reused, when updated weights
go home and who waits for what are all visible here, and tests compare whole lists with ==.

For streamed blocks with prefetch depth k there are k + 1 device slots: while block i computes,
blocks i+1 .. i+k are in flight. Fetch(i + k) is issued before Compute(i) so that it overlaps it;
its slot is the one Evict(i - 1) released. A zo2 pass whose blocks go home needs no more: each block
gets its deferred update on arrival (apply) and goes home at once, before its passes read it, so its
write home drains during its own compute and its slot is free when that compute ends.

Operations, each on one block (the plan's blocks in execution order):
- fetch / compute / evict: a streamed block into its slot, computed there, its slot freed;
- apply: a streamed block's deferred update (zo2) applied on the device, in its slot, before it computes;
- write_home: a block's weights changed on the device (zo2) go back to its home from the slot;
- grad_offload: a block's gradients leave the device for host memory (first-order);
- grad_norm / update: the CPU optimizer reads those gradients for their norms, or updates the block
  (and writes its new weights home: a streamed block's home, or a resident block's device copy);
- wait: the block's last `on` operation ('write_home', 'update' or 'grad_offload') is complete before
  anything after it touches what that operation wrote. A wait on 'grad_offload' is taken by the
  optimizer's job that reads the gradients (on its own thread), every other wait before the next op.
`check_schedule` enforces the rules these imply; the streamed trainers run one of the lists built here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

OpKind = Literal["fetch", "apply", "compute", "write_home", "evict", "grad_offload", "grad_norm", "update", "wait"]
WAITABLE = ("write_home", "update", "grad_offload")


@dataclass(frozen=True)
class Op:
    kind: OpKind
    block: int
    """Index into the plan's blocks (execution order)."""
    slot: int | None = None
    """Device slot of a streamed block (None for resident blocks, and for ops that use no slot)."""
    on: OpKind | None = None
    """For a wait: the kind of the block's earlier operation it waits for (one of WAITABLE)."""


def pass_schedule(streamed: list[bool], prefetch_depth: int, *, reverse: bool = False) -> list[Op]:
    """Fetch, compute and evict ops for one pass (forward, or backward with reverse=True) over blocks
    whose `streamed` flag says whether each must be fetched, rotating through k + 1 device slots.
    Resident blocks only compute."""
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


# ---- zo2: the device updates streamed weights, which go home from their slot ---------------------


def zo_pass(streamed: list[bool], prefetch_depth: int, *, writable: bool, writes_home: bool) -> list[Op]:
    """One zo2 pass. `writable`: streamed blocks are trained in full, so each may have been written
    home by an earlier pass, and its fetch first waits for that write (an older home copy would come
    up otherwise). `writes_home`: this pass applies an update on the device (the deferred one): each
    block gets it in its slot and goes home from there before it computes (its passes only read the
    slot), so the copy home overlaps the block's own compute and the pass needs no extra slot."""
    ops: list[Op] = []
    for op in pass_schedule(streamed, prefetch_depth):
        if op.kind == "fetch" and writable:
            ops.append(Op("wait", op.block, on="write_home"))
        if op.kind == "compute" and op.slot is not None and writes_home:
            ops += [Op("apply", op.block, op.slot), Op("write_home", op.block, op.slot)]
        ops.append(op)
    return ops


def zo_flush(streamed: list[bool], prefetch_depth: int) -> list[Op]:
    """The pending update applied to every streamed block and written home, then waited for: after
    it the homes hold the newest weights (evaluation reads them, a checkpoint saves them). Nothing
    computes."""
    ops = [op for op in zo_pass(streamed, prefetch_depth, writable=True, writes_home=True) if op.kind != "compute"]
    return ops + [Op("wait", b, on="write_home") for b, s in enumerate(streamed) if s]


# ---- first-order: gradients go to the CPU optimizer, whose updates go home ------------------------


def first_order_forward(streamed: list[bool], prefetch_depth: int, host_updated: list[bool]) -> list[Op]:
    """The forward (training or evaluation). A block whose optimizer runs on the host may have an
    update in flight from the last step: its fetch (streamed) or compute (resident) waits for it."""
    ops: list[Op] = []
    for op in pass_schedule(streamed, prefetch_depth):
        if host_updated[op.block] and (op.kind == "fetch" or (op.kind == "compute" and op.slot is None)):
            ops.append(Op("wait", op.block, on="update"))
        ops.append(op)
    return ops


def first_order_backward(streamed: list[bool], prefetch_depth: int, host_updated: list[bool], *,
                         deferred: bool) -> list[Op]:
    """The backward, in reverse block order. After each block's backward (and before its slot is
    freed) its gradients go to the host and the optimizer, once their copy is done, updates the block
    at once, overlapped with the backward of the blocks before it, or, `deferred` (clipping, loss
    scaling), only reads them for their norms: the updates then wait for the global norm
    (first_order_updates)."""
    ops: list[Op] = []
    for op in pass_schedule(streamed, prefetch_depth, reverse=True):
        ops.append(op)
        if op.kind == "compute" and host_updated[op.block]:
            b = op.block
            ops += [Op("grad_offload", b), Op("wait", b, on="grad_offload"),
                    Op("grad_norm" if deferred else "update", b)]
    return ops


def first_order_updates(host_updated: list[bool]) -> list[Op]:
    """Deferred updates, once the global norm allowed them: in forward order, the order the next
    forward needs them."""
    return [Op("update", b) for b, h in enumerate(host_updated) if h]


# ---- the rules -----------------------------------------------------------------------------------


def check_schedule(ops: list[Op], slots: int) -> None:
    """Invariants the executor relies on, over one pass or several in a row (a step, a run); raises
    AssertionError naming the first broken rule:
    - a slot holds one block at a time; a block computes (or goes home) only from the slot it was
      fetched into; every slot is free at the end;
    - no fetch of a block (or compute of a resident one) while its last write home or update may be
      running: a wait for it comes first;
    - the optimizer reads a block's gradients (grad_norm, update) only after their offload was waited
      on, and an update consumes them."""
    holder: dict[int, int] = {}
    computed: set[int] = set()
    writing: dict[int, str] = {}  # block -> its write_home or update not waited for yet
    offloaded: set[int] = set()  # gradients on their way to the host
    readable: set[int] = set()  # gradients on the host, their copy waited for
    for n, op in enumerate(ops):
        b = op.block
        if op.kind == "fetch":
            assert op.slot is not None and 0 <= op.slot < slots, f"op {n}: slot {op.slot} out of range"
            assert op.slot not in holder, f"op {n}: slot {op.slot} still holds block {holder.get(op.slot)}"
            assert b not in writing, f"op {n}: block {b} fetched while its {writing.get(b)} may be running"
            holder[op.slot] = b
            computed.discard(b)
        elif op.kind == "apply":
            assert holder.get(op.slot) == b, f"op {n}: block {b} updated but not in slot {op.slot}"
            computed.add(b)
        elif op.kind == "compute":
            if op.slot is None:
                assert b not in writing, f"op {n}: resident block {b} computed while its {writing.get(b)} may be running"
            else:
                assert holder.get(op.slot) == b, f"op {n}: block {b} computed but not in slot {op.slot}"
                computed.add(b)
        elif op.kind == "write_home":
            assert holder.get(op.slot) == b and b in computed, \
                f"op {n}: block {b} written home but not changed (applied or computed) in slot {op.slot}"
            writing[b] = "write_home"
        elif op.kind == "evict":
            assert holder.get(op.slot) == b, f"op {n}: evicting block {b} it does not hold"
            del holder[op.slot]
        elif op.kind == "grad_offload":
            offloaded.add(b)
            readable.discard(b)
        elif op.kind in ("grad_norm", "update"):
            assert b in readable, f"op {n}: {op.kind} of block {b} reads gradients whose offload was not waited on"
            if op.kind == "update":
                readable.discard(b)
                writing[b] = "update"
        elif op.kind == "wait":
            assert op.on in WAITABLE, f"op {n}: a wait on {op.on!r}"
            if op.on == "grad_offload":
                if b in offloaded:
                    offloaded.discard(b)
                    readable.add(b)
            elif writing.get(b) == op.on:
                del writing[b]
        else:
            raise AssertionError(f"op {n}: unknown kind {op.kind!r}")
    assert not holder, f"blocks left on the device at the end: {sorted(holder.values())}"
