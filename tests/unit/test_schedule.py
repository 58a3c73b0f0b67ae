"""The schedule holds every operation that orders memory (plan/schedule.py): the built schedules keep
the rules check_schedule enforces, and a schedule that breaks any rule is rejected."""

from __future__ import annotations

import pytest

from fuyoucli.plan.schedule import (Op, check_schedule, first_order_backward, first_order_forward,
                                    first_order_updates, pass_schedule, zo_flush, zo_pass)

STREAMED = [False, True, True, True, False]  # embed, three streamed layers, head
HOST = [False, True, True, True, False]  # layers updated by the CPU optimizer
HOST_ALL = [True] * 5  # and embed and head too (their optimizer states off the device)


def first_order_step(depth: int, host: list[bool], deferred: bool) -> list[Op]:
    ops = first_order_forward(STREAMED, depth, host)
    ops += first_order_backward(STREAMED, depth, host, deferred=deferred)
    return ops + (first_order_updates(host) if deferred else [])


def without(ops: list[Op], drop: Op, nth: int = 0) -> list[Op]:
    """`ops` less the nth occurrence of `drop` (which must be there)."""
    hits = [i for i, op in enumerate(ops) if op == drop]
    assert len(hits) > nth, drop
    return ops[: hits[nth]] + ops[hits[nth] + 1:]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_built_schedules_pass_over_several_steps(depth):
    slots = depth + 1
    for host in (HOST, HOST_ALL):
        for deferred in (False, True):
            check_schedule(first_order_step(depth, host, deferred) * 3 + first_order_forward(STREAMED, depth, host), slots)
    zo = zo_pass(STREAMED, depth, writable=True, writes_home=False)
    zo_update = zo_pass(STREAMED, depth, writable=True, writes_home=True)
    zo_slots = depth + 1  # blocks go home while they compute: no extra slot
    check_schedule(zo + zo_update * 3 + zo_pass(STREAMED, depth, writable=True, writes_home=False), zo_slots)
    check_schedule(zo_update + zo_flush(STREAMED, depth) + zo, zo_slots)
    check_schedule(zo_pass(STREAMED, depth, writable=False, writes_home=False) * 2, slots)  # LoRA: read-only base


def test_a_zo2_pass_that_sends_blocks_home_writes_each_before_it_computes():
    """A block's deferred update is applied on arrival and it goes home from its slot at once, so its
    copy home runs beside its own compute and the pass rotates through k + 1 slots, as a read-only one."""
    ops = zo_pass([False, True, True, True, False], 1, writable=True, writes_home=True)
    assert ops == [
        Op("wait", 1, on="write_home"), Op("fetch", 1, 0), Op("compute", 0),
        Op("wait", 2, on="write_home"), Op("fetch", 2, 1),
        Op("apply", 1, 0), Op("write_home", 1, 0), Op("compute", 1, 0), Op("evict", 1, 0),
        Op("wait", 3, on="write_home"), Op("fetch", 3, 0),
        Op("apply", 2, 1), Op("write_home", 2, 1), Op("compute", 2, 1), Op("evict", 2, 1),
        Op("apply", 3, 0), Op("write_home", 3, 0), Op("compute", 3, 0), Op("evict", 3, 0),
        Op("compute", 4)]
    check_schedule(ops, 2)
    with pytest.raises(AssertionError, match="out of range"):
        check_schedule(ops, 1)
    flush = zo_flush([False, True, True, False], 0)
    assert flush == [
        Op("wait", 1, on="write_home"), Op("fetch", 1, 0), Op("apply", 1, 0), Op("write_home", 1, 0),
        Op("evict", 1, 0), Op("wait", 2, on="write_home"), Op("fetch", 2, 0), Op("apply", 2, 0),
        Op("write_home", 2, 0), Op("evict", 2, 0), Op("wait", 1, on="write_home"), Op("wait", 2, on="write_home")]


def test_first_order_backward_holds_offload_wait_and_update_in_order():
    ops = first_order_backward([False, True, True, False], 1, [False, True, True, False], deferred=False)
    assert ops == [
        Op("fetch", 2, 0), Op("compute", 3), Op("fetch", 1, 1), Op("compute", 2, 0),
        Op("grad_offload", 2), Op("wait", 2, on="grad_offload"), Op("update", 2), Op("evict", 2, 0),
        Op("compute", 1, 1), Op("grad_offload", 1), Op("wait", 1, on="grad_offload"), Op("update", 1),
        Op("evict", 1, 1), Op("compute", 0)]


def test_overlapped_updates_run_beside_the_backward_of_the_block_before():
    ops = first_order_backward(STREAMED, 1, HOST, deferred=False)
    for b in (2, 3):  # block b's update is queued before block b - 1's backward
        assert ops.index(Op("update", b)) < ops.index(Op("compute", b - 1, (3 - b + 1) % 2))
    deferred = first_order_backward(STREAMED, 1, HOST, deferred=True)
    assert not any(op.kind == "update" for op in deferred)
    assert [op for op in first_order_updates(HOST)] == [Op("update", 1), Op("update", 2), Op("update", 3)]


def test_forward_waits_for_last_steps_updates():
    ops = first_order_forward(STREAMED, 1, HOST_ALL)
    for b in range(5):
        wait = ops.index(Op("wait", b, on="update"))
        use = next(i for i, op in enumerate(ops) if op.block == b and op.kind in ("fetch", "compute"))
        assert wait == use - 1


# ---- each rule, broken -----------------------------------------------------------------------------


def test_slot_rules_are_enforced():
    ops = pass_schedule(STREAMED, 1)
    with pytest.raises(AssertionError, match="still holds"):
        check_schedule([Op("fetch", 1, 0), Op("fetch", 2, 0)], 2)
    with pytest.raises(AssertionError, match="out of range"):
        check_schedule(ops, 1)
    with pytest.raises(AssertionError, match="not in slot"):
        check_schedule([Op("compute", 1, 0)], 2)
    with pytest.raises(AssertionError, match="does not hold"):
        check_schedule([Op("evict", 1, 0)], 2)
    with pytest.raises(AssertionError, match="left on the device"):
        check_schedule(without(ops, Op("evict", 3, 0)), 2)


def test_a_fetch_before_the_last_write_home_is_waited_for_is_rejected():
    first = zo_pass(STREAMED, 1, writable=True, writes_home=True)
    second = zo_pass(STREAMED, 1, writable=True, writes_home=False)
    check_schedule(first + second, 2)
    with pytest.raises(AssertionError, match="block 2 fetched while its write_home may be running"):
        check_schedule(first + without(second, Op("wait", 2, on="write_home")), 2)
    # A LoRA pass (no waits) after a pass that wrote home is rejected too.
    with pytest.raises(AssertionError, match="write_home may be running"):
        check_schedule(first + zo_pass(STREAMED, 1, writable=False, writes_home=False), 2)


def test_write_home_only_from_the_slot_that_computed_the_block():
    with pytest.raises(AssertionError, match="written home but not changed"):
        check_schedule([Op("fetch", 1, 0), Op("write_home", 1, 0), Op("evict", 1, 0)], 2)
    with pytest.raises(AssertionError, match="written home but not changed"):
        check_schedule([Op("fetch", 1, 0), Op("compute", 1, 0), Op("write_home", 1, 1), Op("evict", 1, 0)], 2)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_fetch_or_resident_compute_before_the_update_is_waited_for_is_rejected(deferred):
    step = first_order_step(1, HOST_ALL, deferred)
    forward = first_order_forward(STREAMED, 1, HOST_ALL)
    check_schedule(step + forward, 2)
    with pytest.raises(AssertionError, match="block 2 fetched while its update may be running"):
        check_schedule(step + without(forward, Op("wait", 2, on="update")), 2)
    with pytest.raises(AssertionError, match="resident block 0 computed while its update may be running"):
        check_schedule(step + without(forward, Op("wait", 0, on="update")), 2)
    with pytest.raises(AssertionError, match="resident block 4 computed while its update"):
        check_schedule(step + without(forward, Op("wait", 4, on="update")), 2)


@pytest.mark.parametrize("deferred", [False, True])
def test_the_optimizer_never_reads_gradients_before_their_offload_was_waited_on(deferred):
    read = "grad_norm" if deferred else "update"
    step = first_order_step(1, HOST, deferred)
    with pytest.raises(AssertionError, match=f"{read} of block 2 reads gradients whose offload was not waited on"):
        check_schedule(without(step, Op("wait", 2, on="grad_offload")), 2)
    with pytest.raises(AssertionError, match="reads gradients whose offload was not waited on"):
        check_schedule(without(step, Op("grad_offload", 3)), 2)
    # The wait must come after the offload it waits for, not before it.
    moved = without(step, Op("wait", 1, on="grad_offload"))
    at = moved.index(Op("grad_offload", 1))
    with pytest.raises(AssertionError, match="block 1 reads gradients"):
        check_schedule(moved[:at] + [Op("wait", 1, on="grad_offload")] + moved[at:], 2)


def test_an_update_consumes_its_gradients():
    step = first_order_step(1, HOST, deferred=False)
    with pytest.raises(AssertionError, match="update of block 1 reads gradients"):
        check_schedule(step + [Op("wait", 1, on="update"), Op("update", 1)], 2)


def test_unknown_operations_and_waits_are_rejected():
    with pytest.raises(AssertionError, match="unknown kind"):
        check_schedule([Op("prefetch", 1, 0)], 2)
    with pytest.raises(AssertionError, match="a wait on 'fetch'"):
        check_schedule([Op("wait", 1, on="fetch")], 2)
