"""The cost model on integer inputs: exact bytes per tier, seconds per resource, the overlap model."""

from __future__ import annotations

import pytest

from fuyoucli.plan.cost import estimate
from fuyoucli.plan.memory import capacities, fits, overflows
from fuyoucli.model.types import BlockSpec, ModelInventory
from fuyoucli.plan.types import Machine, Options, Placement, Tier, TierBytes, Workload

D, P, G, S = Tier.DEVICE, Tier.PINNED, Tier.PAGEABLE, Tier.SSD


def toy(layers: int = 4, layer_params: int = 1000, hidden: int = 4, internal: int = 16, trainable: bool = True) -> ModelInventory:
    def spec(name, params, flops, attn=0, boundary=hidden, inner=internal):
        return BlockSpec(name, params, params if trainable else 0, params // 2, flops, attn, None, boundary, inner)

    blocks = ([spec("embed", 500, 0, inner=hidden)]
              + [spec(f"layers.{i}", layer_params, 2 * layer_params, attn=8) for i in range(layers)]
              + [spec("head", 100, 200, boundary=0, inner=40)])
    return ModelInventory("toy", hidden, layers, 25, False, tuple(blocks))


def machine(**kw) -> Machine:
    base = dict(name="toy", compute_device="cuda", device_bytes=10**6,
                matmul_flops=(("float32", 1_000_000.0), ("bfloat16", 2_000_000.0), ("float16", 2_000_000.0)),
                device_mem_bps=10**9, h2d_bps=1000.0, d2h_bps=1000.0, duplex_h2d_bps=800.0, duplex_d2h_bps=800.0,
                host_ram_bytes=10**6, pinned_bytes=10**6, dram_bps=10**5, cpu_adam_params_per_s=1000.0,
                disk_path="/nvme", disk_free_bytes=10**7, disk_read_bps=500.0, disk_write_bps=250.0)
    base.update(kw)
    return Machine(**base)


def placement(inv, homes, *, home_dtype="float32", depth=1, micro=1, optim=None, act=None) -> Placement:
    n = len(inv.blocks)
    return Placement(home_dtype, tuple(homes), tuple(optim or [None] * n), tuple(act or [None] * n), depth, micro)


ZO = Workload("zo2", False, "float32", batch_size=1, seq_len=8)


def test_attention_term_and_window():
    b = BlockSpec("layers.0", 10, 10, 5, 100, 8, None, 4, 16)
    assert b.forward_flops_per_token(7) == 100 + 8 * 4  # causal: (7 + 1) // 2 keys on average
    w = BlockSpec("layers.0", 10, 10, 5, 100, 8, 2, 4, 16)
    assert w.forward_flops_per_token(1000) == 100 + 8 * 2
    assert b.param_bytes("bfloat16") == 20


def test_zo2_streamed_bytes_and_times():
    inv = toy()
    est = estimate(inv, ZO, machine(), placement(inv, [D, P, P, P, P, D]))
    # resident embed + head (fp32 homes, and beside them the model's own fp32 weights the passes read:
    # the resident compute copy) + 2 buffers (fetching; computing while it goes home) of one 4000-byte layer
    # + work buffers (a layer's compute copy, z of the largest block and the update direction of the
    # largest tensor, both fp32) + 2q hidden streams + one layer's internals + the head's 25 logits per
    # token and their fp32 log-softmax (fp32 logits: no upcast copy)
    acts = (2 * 1 * 8 * 4 + 8 * 16) * 4
    logits = 8 * 25 * 4 + 8 * 25 * 4
    device = 600 * 4 + 600 * 4 + 2 * 4000 + (1000 * 4 + 1000 * 4 + 500 * 4) + acts + logits
    assert est.memory == TierBytes(device=device, pinned=16000, pageable=0, ssd=0)
    assert est.device_buffers == 2 and est.wire_dtype == "float32" and est.pinned_pool_bytes == 0
    t = est.times
    assert t.h2d_s == pytest.approx(16000 / 800) and t.d2h_s == pytest.approx(16000 / 800)  # both ways at once: duplex
    flops = 2 * 8 * (500 * 0 + 4 * (2000 + 8 * 4) + 200)
    assert est.flops_per_step == flops
    # Elementwise work at the memory rate (no measured points; a normal costs its 4 bytes), bytes per
    # parameter: a streamed layer's deferred update (zeroing 4, z 4 + axpy 12, axpy 12), its z (4) and
    # two perturbed copies (20 each: the scaled z into a buffer, the sum into the fp32 weights); a
    # resident block's z (4), two perturbed copies, the update (32) and the copy into the model (8).
    streamed_b, resident_b = 32 + 4 + 2 * 20, 4 + 2 * 20 + 32 + 8
    # Each pass also reads every product's weights once (flops per token / 2 elements): 4 x 4000 + 400 bytes.
    weights_b = 2 * (4 * 4000 + 400)
    assert t.gpu_s == pytest.approx(flops / 1e6 + (4 * 1000 * streamed_b + 600 * resident_b + weights_b) / 1e9)
    # pipelined: the busiest resource, plus the first layer's fetch and the last one's write-back, less
    # what the resident embed (before) and head (after) compute meanwhile
    embed_s, head_s = 500 * resident_b / 1e9, 2 * 8 * 200 / 1e6 + (100 * resident_b + 2 * 400) / 1e9
    assert t.step_s == pytest.approx(20 + (5 - embed_s) + (5 - head_s))
    assert t.bottleneck == "h2d"


def test_zo2_prefetch_depth_zero_is_serial():
    inv = toy()
    est = estimate(inv, ZO, machine(), placement(inv, [D, P, P, P, P, D], depth=0))
    t = est.times
    assert t.step_s == pytest.approx(t.gpu_s + t.h2d_s + t.d2h_s)
    assert est.device_buffers == 1


def test_zo2_ssd_home_reads_and_writes_the_drive_and_stages_in_pinned():
    inv = toy()
    est = estimate(inv, ZO, machine(), placement(inv, [D, S, S, S, S, D]))
    assert est.memory.ssd == 16000
    # a read and a write staging buffer per device slot (engine/store.py)
    assert est.pinned_pool_bytes == 4 * 4000 and est.memory.pinned == 4 * 4000
    assert est.times.ssd_read_s == pytest.approx(16000 / 500) and est.times.ssd_write_s == pytest.approx(16000 / 250)
    assert est.times.bottleneck == "ssd"
    # one drive: its reads and writes add up in the step
    assert est.times.step_s >= 16000 / 500 + 16000 / 250


def test_zo2_half_home_halves_the_traffic():
    inv = toy()
    wl = Workload("zo2", False, "bfloat16", batch_size=1, seq_len=8)
    est = estimate(inv, wl, machine(), placement(inv, [D, P, P, P, P, D], home_dtype="bfloat16"))
    assert est.memory.pinned == 8000 and est.wire_dtype == "bfloat16"
    assert est.times.h2d_s == pytest.approx(8000 / 800)


def test_zo2_lora_base_is_read_only():
    inv = ModelInventory("toy", 4, 2, 25, False, (
        BlockSpec("embed", 500, 0, 250, 0, 0, None, 4, 4),
        BlockSpec("layers.0", 1000, 10, 500, 2000, 8, None, 4, 16),
        BlockSpec("layers.1", 1000, 10, 500, 2000, 8, None, 4, 16),
        BlockSpec("head", 100, 0, 50, 200, 0, None, 0, 40)))
    wl = Workload("zo2", True, "float32", batch_size=1, seq_len=8)
    est = estimate(inv, wl, machine(), placement(inv, [D, P, P, D]))
    assert est.memory.pinned == 2 * 990 * 4
    assert est.times.d2h_s == 0 and est.times.h2d_s == pytest.approx(2 * 3960 / 1000)  # one way only: simplex rate
    assert est.device_buffers == 2  # fetching + computing, nothing written back


def test_first_order_traffic_optimizer_and_activations():
    inv = toy()
    wl = Workload("adamw", False, "float32", batch_size=1, seq_len=8)
    n = len(inv.blocks)
    optim = [G] * n
    act = ["keep"] + ["recompute"] * 4 + ["keep"]
    est = estimate(inv, wl, machine(), placement(inv, [D, P, P, P, P, D], optim=optim, act=act))
    t = est.times
    # weights fetched for forward and again for backward; gradients D2H; resident blocks get updated weights back
    assert t.h2d_s == pytest.approx(4000 / 1000 * 4 + 4000 / 800 * 4 + 600 * 4 / 800)
    assert t.d2h_s == pytest.approx((4 * 4000 + 600 * 4) / 800)
    assert t.cpu_optimizer_s == pytest.approx((4 * 1000 + 600) / 1000)
    # the CPU optimizer keeps an fp32 master, m and v on the host (the weights' home has its own copy)
    assert est.memory.pageable == (4 * 1000 + 600) * 12
    fwd_flops = 8 * (4 * (2000 + 32) + 200)
    assert est.flops_per_step == 3 * fwd_flops + 8 * 4 * (2000 + 32)  # forward, 2x backward, recompute
    swapped = estimate(inv, wl, machine(), placement(inv, [D, P, P, P, P, D], optim=optim,
                                                       act=["keep"] + ["swap"] * 4 + ["keep"]))
    assert swapped.memory.pinned == 16000 + 4 * 8 * 16 * 4 + 2 * 4000
    assert swapped.flops_per_step == 3 * fwd_flops
    # recompute-swap: the 4 layer inputs (8 tokens x 4 elements x 4 bytes) wait in pinned host memory
    # instead of on the device, one trip each way over the link, recomputed as before
    inputs = estimate(inv, wl, machine(), placement(inv, [D, P, P, P, P, D], optim=optim,
                                                      act=["keep"] + ["recompute-swap"] * 4 + ["keep"]))
    assert inputs.memory.pinned == est.memory.pinned + 4 * 128
    assert inputs.memory.device == est.memory.device - 4 * 128
    assert inputs.flops_per_step == est.flops_per_step
    assert inputs.times.d2h_s == pytest.approx(t.d2h_s + 4 * 128 / 800)
    # the forward's fetches now share the link with the swaps (duplex rate), and the inputs come back
    assert inputs.times.h2d_s == pytest.approx(4000 / 800 * 8 + 600 * 4 / 800 + 4 * 128 / 800)


def test_first_order_optimizer_on_ssd():
    inv = toy(layers=2)
    wl = Workload("adamw", False, "bfloat16", batch_size=1, seq_len=8)
    optim = [G, S, S, G]
    est = estimate(inv, wl, machine(), placement(inv, [D, P, P, D], optim=optim, act=["keep"] * 4))
    assert est.memory.ssd == 2 * 1000 * 12  # fp32 master + m + v
    assert est.times.ssd_read_s == pytest.approx(24000 / 500) and est.times.ssd_write_s == pytest.approx(24000 / 250)


def test_cpu_device_streams_from_ssd_without_links():
    inv = toy()
    m = machine(compute_device="cpu", pinned_bytes=0)
    est = estimate(inv, ZO, m, placement(inv, [D, S, S, S, S, D]))
    assert est.times.h2d_s == 0 and est.times.d2h_s == 0 and est.memory.pinned == 0
    assert est.times.ssd_read_s == pytest.approx(16000 / 500)


def test_capacities_and_limits():
    m = machine(device_bytes=1000, host_ram_bytes=2000, pinned_bytes=500)
    assert capacities(m, Options()) == TierBytes(device=920, pinned=500, pageable=1800, ssd=0)
    assert capacities(m, Options(swap_dir="/nvme/x", device_memory_limit_bytes=500)) == \
        TierBytes(device=460, pinned=500, pageable=1800, ssd=9_500_000)
    cap = TierBytes(device=10, pinned=10, pageable=15, ssd=0)
    assert fits(TierBytes(10, 5, 10, 0), cap)
    assert not fits(TierBytes(10, 10, 10, 0), cap)  # pinned + pageable exceed host RAM
    assert overflows(TierBytes(11, 10, 10, 1), cap) == [("device", 11, 10), ("host", 20, 15), ("ssd", 1, 0)]


# ---- what the device really holds: logits and loss, and a CUDA process's own memory ----------------


CUDA_PROCESS = dict(context_bytes=500_000, library_workspace_bytes=70_000, allocator_slack=0.25)


def test_device_peak_counts_the_logits_and_a_cuda_processs_own_memory():
    inv = toy()  # a head of 25 logits per token; 8 tokens per micro-batch
    homes = [D, P, P, P, P, D]
    bare = estimate(inv, ZO, machine(), placement(inv, homes))
    est = estimate(inv, ZO, machine(**CUDA_PROCESS), placement(inv, homes))
    parts = dict(est.device_parts)
    # fp32 logits (8 x 25 x 4) and their fp32 log-softmax; no upcast copy of fp32 logits
    assert parts["logits and loss"] == dict(bare.device_parts)["logits and loss"] == 8 * 25 * 4 + 8 * 25 * 4
    # the head's own internals are that part's now: activations are the hidden streams and a layer's
    assert parts["activations"] == (2 * 8 * 4 + 8 * 16) * 4
    assert parts["CUDA context"] == 500_000 and parts["library workspaces"] == 70_000
    assert parts["allocator slack"] == (768 + 1600) // 4  # a quarter of what every pass makes and frees
    assert est.memory.device == bare.memory.device + 500_000 + 70_000 + 592 == sum(parts.values())
    assert "CUDA context" not in dict(bare.device_parts)  # a Machine given directly holds none unless told


def test_logits_and_loss_by_dtype_method_and_scored_positions():
    from fuyoucli.plan.memory import logits_and_loss_bytes

    inv = toy()
    zo16 = Workload("zo2", False, "bfloat16", batch_size=1, seq_len=8)
    ad32 = Workload("adamw", False, "float32", batch_size=1, seq_len=8)
    # bf16 logits (2 bytes), their fp32 copy and the fp32 log-softmax (4 + 4)
    assert logits_and_loss_bytes(inv, zo16, 8) == 8 * 25 * 2 + 8 * 25 * 8
    # first-order: the backward's saved log-softmax, its incoming and outgoing gradients (fp32)
    assert logits_and_loss_bytes(inv, ad32, 8) == 8 * 25 * 4 + 8 * 25 * 12
    # one position in 8 scored (label words): a gathered copy, its fp32 log-softmax; a backward scatters
    # the gradient back into two logits-sized tensors
    zo_one = Workload("zo2", False, "float32", batch_size=1, seq_len=8, loss_positions_fraction=1 / 8)
    ad_one = Workload("adamw", False, "float32", batch_size=1, seq_len=8, loss_positions_fraction=1 / 8)
    assert logits_and_loss_bytes(inv, zo_one, 8) == 8 * 25 * 4 + 1 * 25 * (4 + 4)
    assert logits_and_loss_bytes(inv, ad_one, 8) == 8 * 25 * 4 + 1 * 25 * 12 + 2 * 8 * 25 * 4
    # sized by the micro-batch: two micro-batches of 8 tokens hold one's at a time
    two = Workload("zo2", False, "float32", batch_size=2, seq_len=8)
    pl = placement(inv, [D] * 6, depth=0, micro=1)
    assert dict(estimate(inv, two, machine(), pl).device_parts)["logits and loss"] == 1600


def test_a_cpu_device_holds_no_cuda_context():
    inv = toy()
    m = machine(compute_device="cpu", pinned_bytes=0, **CUDA_PROCESS)
    parts = dict(estimate(inv, ZO, m, placement(inv, [D] * 6, depth=0)).device_parts)
    assert parts["logits and loss"] == 1600
    assert not {"CUDA context", "library workspaces", "allocator slack"} & set(parts)
    assert capacities(m, Options()).device == int(m.host_ram_bytes * 0.9)


def test_capacity_adds_back_the_context_free_memory_left_out_and_a_limit_caps_the_whole_process():
    m = machine(device_bytes=1000, host_ram_bytes=2000, pinned_bytes=500, context_bytes=250)
    assert capacities(m, Options()).device == int((1000 + 250) * 0.92)
    assert capacities(m, Options(device_memory_limit_bytes=500)).device == int(500 * 0.92)


def test_plan_package_is_pure():
    """STYLE.md principle 1: plan/ imports no torch and nothing from the model stage but its data
    (model.types), nor the engine or train stages; and (issue 18) neither the recipe nor the hardware
    profile, nor anything that reads files: its inputs come in as data."""
    import ast
    from pathlib import Path

    for path in sorted((Path(__file__).parents[2] / "fuyoucli" / "plan").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] != "torch", (path.name, name)
                assert not name.startswith(("fuyoucli.model", "fuyoucli.engine", "fuyoucli.train")) \
                    or name == "fuyoucli.model.types", (path.name, name)
                assert not name.startswith(("fuyoucli.recipe", "fuyoucli.hardware")), (path.name, name)
                assert name.split(".")[0] not in ("os", "pathlib", "io", "shutil", "json"), (path.name, name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", (path.name, "open()")


# ---- elementwise work (plan/work.py) ---------------------------------------------------------------


def test_elementwise_rates_interpolate_in_log_size_and_price_new_tensors():
    from fuyoucli.plan.work import rates_at

    m = machine(elementwise_points=((1000, 1e8, 1e10, 1e10), (4000, 2e8, 1e10, 4e9)))
    small, big, mid = rates_at(m, 10), rates_at(m, 10**6), rates_at(m, 2000)
    assert small.randn_s == pytest.approx(1e-8) and small.alloc_s == 0 and small.inplace_s == pytest.approx(1e-10)
    # a new-tensor add at 4 GB/s vs 10 GB/s in place: the 4 new bytes of each 12 carry the difference
    assert big.alloc_s == pytest.approx((12 / 4e9 - 12 / 1e10) / 4)
    assert mid.randn_s == pytest.approx(1 / 1.5e8)  # halfway in log2(size)
    assert rates_at(machine(), 123).randn_s == pytest.approx(4 / 1e9)  # no points: memory bound


def test_zo2_reference_draws_z_three_times_per_direction_the_engine_twice():
    """Only drawing normals costs here (elementwise ops free): per parameter and direction, the
    reference draws z for +eps, for -eps and for the update; the streamed engine draws it once for
    both passes and once for the deferred update; a tied embedding is drawn again for the head."""
    from fuyoucli.plan.work import zo_block_s

    m = machine(compute_device="cpu", pinned_bytes=0, elementwise_points=((1, 1e6, 1e30, 1e30),))
    wl = Workload("zo2", False, "float32", batch_size=1, seq_len=8, q=2)
    layer = toy().blocks[1]
    kw = dict(streamed=False, tied_embed=False)
    assert zo_block_s(m, wl, layer, "float32", engine=False, **kw) == pytest.approx(1000 * 3 * 2 / 1e6)
    assert zo_block_s(m, wl, layer, "float32", engine=True, **kw) == pytest.approx(1000 * 2 * 2 / 1e6)
    assert zo_block_s(m, wl, layer, "float32", engine=True, streamed=True, tied_embed=False) == \
        pytest.approx(1000 * 2 * 2 / 1e6)
    assert zo_block_s(m, wl, layer, "float32", engine=True, streamed=False, tied_embed=True) == \
        pytest.approx(1000 * (2 * 2 + 2 * 2) / 1e6)  # + once per variant (2 per direction) for the head
    inv = toy()
    ref = estimate(inv, wl, m, placement(inv, [D] * 6, depth=0))
    weights_s = 2 * 2 * (4 * 4000 + 400) / 1e9  # each of the 4 passes reads the products' weights
    assert ref.times.gpu_s == pytest.approx(ref.flops_per_step / 1e6 + weights_s + inv.params * 3 * 2 / 1e6)


def test_cpu_streaming_copies_on_the_same_cores_and_only_the_drive_overlaps():
    inv = toy()
    m = machine(compute_device="cpu", pinned_bytes=0, dram_bps=1e6, disk_read_bps=1e3, disk_write_bps=1e3)
    host = estimate(inv, ZO, m, placement(inv, [D, G, G, G, G, D]))
    ssd = estimate(inv, ZO, m, placement(inv, [D, S, S, S, S, D]))
    copies = 2 * 2 * 16000 / 1e6  # each streamed layer's 4000 bytes copied in and out (read + write)
    assert host.times.gpu_s == pytest.approx(ssd.times.gpu_s)
    resident = estimate(inv, ZO, m, placement(inv, [D] * 6, depth=0)).times.gpu_s
    assert host.times.gpu_s > copies and host.times.dram_s == 0 and host.times.h2d_s == 0
    assert host.times.step_s == pytest.approx(host.times.gpu_s)  # nothing to overlap with
    assert ssd.times.step_s >= ssd.times.ssd_read_s + ssd.times.ssd_write_s >= 32
    assert resident < host.times.gpu_s  # the reference does no copies (but draws z more often)


# ---- zo2 variants: conservative (3 more passes) and momentum (bytes beside the weights) -------------


def test_zo2_conservative_adds_three_passes_and_a_read_only_second_fetch():
    inv = toy()
    homes = [D, P, P, P, P, D]
    base = estimate(inv, ZO, machine(), placement(inv, homes))
    cons_wl = Workload("zo2", False, "float32", batch_size=1, seq_len=8, zo_conservative=True)
    cons = estimate(inv, cons_wl, machine(), placement(inv, homes))
    assert cons.flops_per_step == pytest.approx(base.flops_per_step * (2 + 3) / 2)
    # phase 1 as before (both ways at once: duplex); phase 2 fetches every layer again, one way only
    assert cons.times.h2d_s == pytest.approx(16000 / 800 + 16000 / 1000)
    assert cons.times.d2h_s == pytest.approx(base.times.d2h_s)
    assert cons.memory.device == base.memory.device + (3 - 2) * 8 * 4 * 4  # 3 hidden streams in phase 2
    assert cons.memory.pinned == base.memory.pinned and cons.device_buffers == base.device_buffers
    assert cons.times.step_s > base.times.step_s + 16000 / 1000 * 0.9


def test_zo2_conservative_candidates_draw_z_again_for_each_candidate():
    from fuyoucli.plan.work import zo_candidates_s

    m = machine(compute_device="cpu", pinned_bytes=0, elementwise_points=((1, 1e6, 1e30, 1e30),))
    layer = toy().blocks[1]
    plain = Workload("zo2", False, "float32", batch_size=1, seq_len=8, q=2)
    cons = Workload("zo2", False, "float32", batch_size=1, seq_len=8, q=2, zo_conservative=True)
    assert zo_candidates_s(m, plain, layer, "float32", engine=True, tied_embed=False) == 0
    # per parameter: q = 2 normals for each of the two candidates (updates go tensor by tensor, so the
    # direction is formed again rather than kept for the block)
    assert zo_candidates_s(m, cons, layer, "float32", engine=True, tied_embed=False) == \
        pytest.approx(1000 * 2 * 2 / 1e6)
    assert zo_candidates_s(m, cons, layer, "float32", engine=False, tied_embed=False) == \
        pytest.approx(1000 * 2 * 2 / 1e6)
    assert zo_candidates_s(m, cons, layer, "float32", engine=True, tied_embed=True) == \
        pytest.approx(1000 * 4 * 2 / 1e6)  # the head forms a tied embedding again for each candidate


@pytest.mark.parametrize("home,tier", [(P, "pinned"), (S, "ssd")])
def test_zo2_momentum_lives_beside_the_weights_and_travels_with_them(home, tier):
    inv = toy()
    homes = [D, home, home, home, home, D]
    base = estimate(inv, ZO, machine(), placement(inv, homes))
    mom_wl = Workload("zo2", False, "float32", batch_size=1, seq_len=8, zo_momentum=True)
    mom = estimate(inv, mom_wl, machine(), placement(inv, homes))
    assert getattr(mom.memory, tier) - getattr(base.memory, tier) == 16000  # 4 layers x 1000 x fp32
    if home is S:  # and its own read and write staging buffers per slot in pinned memory
        assert mom.memory.pinned - base.memory.pinned == 4 * 4000
    # streaming buffers hold a layer's weights and momentum; resident blocks keep their momentum too
    assert mom.memory.device - base.memory.device == 2 * 4000 + 600 * 4
    if home is S:
        assert mom.times.ssd_read_s == pytest.approx(2 * base.times.ssd_read_s)
        assert mom.times.ssd_write_s == pytest.approx(2 * base.times.ssd_write_s)
    assert mom.times.h2d_s == pytest.approx(2 * base.times.h2d_s)
    assert mom.times.d2h_s == pytest.approx(2 * base.times.d2h_s)


# ---- calibration against measured layers (plan/work.py) -----------------------------------------------


def _timing(m, tokens, factor, dtype="float32"):
    """A measured layer whose seconds are `factor` x (forward, no-grad forward, backward) what the cost
    model prices for it: what a probe on a device that slow would have recorded."""
    from fuyoucli.plan import work
    from fuyoucli.plan.types import LayerTiming

    spec = toy().blocks[1]
    wl = Workload("adamw", False, dtype, batch_size=1, seq_len=8)
    fwd, bwd = work._layer_priced(m, wl, spec, tokens, 4)
    f = factor if isinstance(factor, tuple) else (factor,) * 3
    return LayerTiming(dtype, tokens, 8, 4, spec, f[0] * fwd, f[1] * fwd, f[2] * bwd)


def test_calibration_is_measured_over_priced_interpolated_in_log_tokens_and_bounded():
    import dataclasses

    from fuyoucli.plan.work import Calibration, calibration

    m = machine()
    wl = Workload("adamw", False, "float32", batch_size=1, seq_len=8)
    assert calibration(m, wl, 100) == Calibration(1.0, 1.0, 1.0)  # nothing measured: no scaling
    m = dataclasses.replace(m, layer_timings=(_timing(m, 64, (2.0, 1.5, 3.0)), _timing(m, 1024, 1.0)))
    assert calibration(m, wl, 64) == pytest.approx(Calibration(2.0, 1.5, 3.0))
    assert calibration(m, wl, 8) == pytest.approx(Calibration(2.0, 1.5, 3.0))  # the nearest outside
    assert calibration(m, wl, 4096) == pytest.approx(Calibration(1.0, 1.0, 1.0))
    half = calibration(m, wl, 256)  # log2(256 / 64) / log2(1024 / 64) = 1/2 of the way
    assert (half.forward, half.forward_no_grad, half.backward) == pytest.approx((1.5, 1.25, 2.0))
    wild = dataclasses.replace(m, layer_timings=(_timing(m, 64, (100.0, 0.001, 1.0)),))
    assert calibration(wild, wl, 64) == pytest.approx(Calibration(4.0, 0.25, 1.0))
    # another dtype's layers are used when the run's was not measured, this one's when it was
    bf = dataclasses.replace(m, layer_timings=(_timing(m, 64, 3.0, "bfloat16"),))
    assert calibration(bf, wl, 64).forward == pytest.approx(3.0)
    both = dataclasses.replace(m, layer_timings=(_timing(m, 64, 3.0, "bfloat16"), _timing(m, 64, 2.0)))
    assert calibration(both, wl, 64).forward == pytest.approx(2.0)


def test_calibration_scales_each_pass_of_a_step_and_not_the_rest():
    """zo2 in memory: every forward pass's products and elementwise work scale by the no-grad factor,
    the z draws and updates do not. adamw in memory: the forward by its factor, the backward (with the
    gradients' own work) by the backward's, the CPU optimizer not at all."""
    import dataclasses

    from fuyoucli.plan import work

    inv = toy()
    base = machine(compute_device="cpu", pinned_bytes=0)
    T = 8
    wl_zo = Workload("zo2", False, "float32", batch_size=1, seq_len=T, q=1)
    raw = sum(work.product_s(base, wl_zo, s, T, 1, work.compute_rate(base, wl_zo, 4))
              + work.forward_extra_s(base, wl_zo, inv, s, T, T, work.small_product_rate(base, wl_zo))
              for s in inv.blocks)
    slow = dataclasses.replace(base, layer_timings=(_timing(base, 8, (1.0, 2.0, 1.0)),))
    pz = placement(inv, [D] * 6, depth=0)
    got = estimate(inv, wl_zo, slow, pz).times.gpu_s - estimate(inv, wl_zo, base, pz).times.gpu_s
    assert got == pytest.approx(2 * raw)  # two passes, each one raw forward slower

    wl = Workload("adamw", False, "float32", batch_size=1, seq_len=T)
    grads = sum(work.grad_s(base, wl, s) for s in inv.blocks)
    pa = placement(inv, [D] * 6, depth=0, optim=[D] * 6, act=["keep"] * 6)
    plain = estimate(inv, wl, base, pa).times
    fwd_slow = estimate(inv, wl, dataclasses.replace(base, layer_timings=(_timing(base, 8, (3.0, 1.0, 1.0)),)), pa).times
    bwd_slow = estimate(inv, wl, dataclasses.replace(base, layer_timings=(_timing(base, 8, (1.0, 1.0, 3.0)),)), pa).times
    assert fwd_slow.gpu_s - plain.gpu_s == pytest.approx(2 * raw)
    assert bwd_slow.gpu_s - plain.gpu_s == pytest.approx(2 * (2 * raw + grads))
    assert fwd_slow.cpu_optimizer_s == bwd_slow.cpu_optimizer_s == plain.cpu_optimizer_s


def test_a_drive_slower_at_reads_and_writes_at_once_prices_the_mix_at_its_measured_rate():
    """zo2 with every layer on SSD, no prefetch (the phase is the sum of its parts): the drive reads each
    layer and writes it back in the same phase. Measured slower mixed than one after the other, the
    step grows by the difference; a mix no slower than that changes nothing."""
    import dataclasses

    inv = toy()
    m = machine()
    pl = placement(inv, [D, S, S, S, S, D], depth=0)
    plain = estimate(inv, ZO, m, pl).times
    read_b, write_b = plain.ssd_read_s * 500, plain.ssd_write_s * 250
    assert read_b == pytest.approx(4 * 4000) and write_b == pytest.approx(4 * 4000)
    slow = estimate(inv, ZO, dataclasses.replace(m, disk_mixed_bps=100.0), pl).times
    assert slow.step_s - plain.step_s == pytest.approx((read_b + write_b) / 100.0 - (read_b / 500 + write_b / 250))
    fast = estimate(inv, ZO, dataclasses.replace(m, disk_mixed_bps=10_000.0), pl).times
    assert fast.step_s == pytest.approx(plain.step_s)
