"""zo2's z buffer as a plan decision: a block's z (drawn once per direction) when that placement fits,
else a tensor's (drawn again for each pass). Integer budgets in, exact plans out."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fuyoucli.plan.cost import estimate
from fuyoucli.plan.search import make_plan
from fuyoucli.model.types import BlockSpec, ModelInventory
from fuyoucli.plan.types import Machine, Options, Placement, Plan, Tier, Workload
from fuyoucli.plan.work import zo_block_s
from fuyoucli.train.plan_inputs import machine_from_profile
from test_search import machine as search_machine

D, P = Tier.DEVICE, Tier.PINNED
ZO = Workload("zo2", False, "float32", batch_size=1, seq_len=8)


def toy(layers: int = 8) -> ModelInventory:
    """Layers of 1000 parameters in tensors of at most 100: a block's z (4000 bytes) is ten tensors'."""
    def spec(name, params, flops, attn=0, boundary=4, inner=16):
        return BlockSpec(name, params, params, 100, flops, attn, None, boundary, inner)

    blocks = ([spec("embed", 500, 0, inner=4)]
              + [spec(f"layers.{i}", 1000, 2000, attn=8) for i in range(layers)]
              + [spec("head", 100, 200, boundary=0, inner=40)])
    return ModelInventory("toy", 4, layers, 25, False, tuple(blocks))


def machine(**kw) -> Machine:
    """test_search's toy machine without a disk (these plans never stream to an SSD)."""
    return search_machine(**{"disk_path": None, "disk_free_bytes": 0, "disk_read_bps": 0.0, "disk_write_bps": 0.0,
                             **kw})


def placement(inv, homes, *, depth=0, z="block") -> Placement:
    n = len(inv.blocks)
    return Placement("float32", tuple(homes), (None,) * n, (None,) * n, depth, 1, z_buffer=z)


# Device bytes of the toy, unpipelined (one 4000-byte layer buffer), k layers resident: embed + head
# (2400) and the model's own fp32 weights beside those homes, which the passes read (the resident
# compute copy, 2400), the buffer (4000), activations ((2*8*4 + 8*16) * 4 = 768), the logits and loss
# (8 tokens x 25 logits x (4 + 4) = 1600) and work buffers: a layer's compute copy (4000), z (block:
# 4000; tensor: 100 * 4 = 400) and one tensor's direction (400); 4000 + 4000 per resident layer (its
# home and its compute copy).
BLOCK_DEPTH0, TENSOR_DEPTH0 = 2400 + 2400 + 4000 + 768 + 1600 + 8400, 2400 + 2400 + 4000 + 768 + 1600 + 4800


def test_work_buffers_hold_a_tensors_z_and_the_engine_draws_it_for_every_pass():
    inv = toy()
    homes = [D, P, P, P, D, D, D, D, D, D]
    block = estimate(inv, ZO, machine(), placement(inv, homes))
    tensor = estimate(inv, ZO, machine(), placement(inv, homes, z="tensor"))
    assert block.memory.device == BLOCK_DEPTH0 + 5 * 4000 + 5 * 4000
    assert tensor.memory.device == TENSOR_DEPTH0 + 5 * 4000 + 5 * 4000 == block.memory.device - (1000 - 100) * 4
    assert dict(tensor.device_parts)["work buffers"] == 4000 + 400 + 400
    # z drawn once more per direction (q = 1), on every trainable parameter the engine perturbs, at
    # 4 bytes written per normal (no elementwise points: memory bound at 1 GB/s)
    assert tensor.times.gpu_s - block.times.gpu_s == pytest.approx(inv.trainable_params * 4 / 1e9)
    assert tensor.times.step_s > block.times.step_s
    # nothing streamed: the in-memory reference, which draws z for every pass either way
    ref_block = estimate(inv, ZO, machine(), placement(inv, [D] * 10))
    ref_tensor = estimate(inv, ZO, machine(), placement(inv, [D] * 10, z="tensor"))
    assert ref_tensor.times == ref_block.times
    assert ref_block.memory.device - ref_tensor.memory.device == (1000 - 100) * 4


def test_zo_block_s_counts_a_draw_per_variant_per_tensor():
    """Only drawing normals costs here: per parameter, the engine draws z once per direction with a
    block's buffer, once per variant (2 per direction) with a tensor's, plus once per direction for the
    update either way; the reference draws per variant anyway."""
    m = machine(compute_device="cpu", pinned_bytes=0, elementwise_points=((1, 1e6, 1e30, 1e30),))
    wl = Workload("zo2", False, "float32", batch_size=1, seq_len=8, q=2)
    layer = toy().blocks[1]
    for streamed in (True, False):
        kw = dict(engine=True, streamed=streamed, tied_embed=False)
        assert zo_block_s(m, wl, layer, "float32", **kw) == pytest.approx(1000 * (2 + 2) / 1e6)
        assert zo_block_s(m, wl, layer, "float32", z_per_tensor=True, **kw) == pytest.approx(1000 * (4 + 2) / 1e6)
    assert zo_block_s(m, wl, layer, "float32", engine=True, streamed=False, tied_embed=True, z_per_tensor=True) == \
        pytest.approx(1000 * (4 + 2 + 4) / 1e6)
    for per in (False, True):
        assert zo_block_s(m, wl, layer, "float32", engine=False, streamed=False, tied_embed=False,
                          z_per_tensor=per) == pytest.approx(1000 * (4 + 2) / 1e6)


def test_a_tensors_z_when_a_blocks_does_not_fit():
    # 66232 bytes of device budget. Unpipelined, z per block fits 5 resident layers (59568; 6 need
    # 67568), z per tensor 6 (63968; 7 need 71968); all resident needs 75568 (block) or 71968 (tensor).
    # Pipelined, two buffers (a resident layer costs 8000 bytes, its home and compute copy, the second
    # buffer 4000): 5 resident with either z. The transfers set the step (5 s per layer each way at the
    # duplex rate): 2 layers streamed unpipelined, z per tensor, is the fastest.
    p = make_plan(toy(), ZO, machine(device_bytes=71992), Options())
    assert p.device_budget_bytes == 66232
    assert p.feasible and p.z_buffer == "tensor"
    assert [b.weights_home for b in p.blocks] == [D, P, P, D, D, D, D, D, D, D]
    assert (p.prefetch_depth, p.device_buffers, p.micro_batch_size) == (0, 1, 1)
    assert p.memory.device == TENSOR_DEPTH0 + 6 * 4000 + 6 * 4000 == 63968
    # the same placement with a block's z is 3600 bytes over
    block = estimate(toy(), ZO, machine(), placement(toy(), [b.weights_home for b in p.blocks]))
    assert block.memory.device == 67568 > p.device_budget_bytes
    assert p.times.step_s == pytest.approx(20, rel=0.02)
    # pipelined (depth forced to 1): 3 layers streamed, where a block's z fits too (and is kept)
    piped = make_plan(toy(), ZO, machine(device_bytes=71992), Options(prefetch_depth=1))
    assert piped.z_buffer == "block" and [b.weights_home for b in piped.blocks] == [D] + [P] * 3 + [D] * 6
    assert piped.memory.device == 2400 + 2400 + 2 * 4000 + 768 + 1600 + 8400 + 5 * 4000 + 5 * 4000 == 63568


def test_a_blocks_z_whenever_it_fits():
    # 67632 bytes: the same placement fits with a block's z, which is never slower: the plan keeps it
    p = make_plan(toy(), ZO, machine(device_bytes=73514), Options())
    assert p.device_budget_bytes == 67632
    assert p.feasible and p.z_buffer == "block"
    assert [b.weights_home for b in p.blocks] == [D, P, P, D, D, D, D, D, D, D]
    assert p.memory.device == BLOCK_DEPTH0 + 6 * 4000 + 6 * 4000 == 67568
    # room for everything: resident, the reference's z per block
    roomy = make_plan(toy(), ZO, machine(), Options())
    assert roomy.z_buffer == "block" and roomy.resident_blocks == tuple(b.name for b in toy().blocks)
    # first-order plans carry the default
    assert make_plan(toy(), dataclasses.replace(ZO, method="adamw", q=1), machine(), Options()).z_buffer == "block"


def test_all_resident_with_a_tensors_z():
    # 72232 bytes: everything resident fits only with a tensor's z (71968: 37568 + the 34400-byte
    # resident compute copy; a block's z needs 75568), and beats any streaming
    p = make_plan(toy(), ZO, machine(device_bytes=78514), Options())
    assert p.device_budget_bytes == 72232
    assert p.feasible and p.z_buffer == "tensor" and p.memory.device == 37568 + (500 + 8 * 1000 + 100) * 4 == 71968
    assert all(b.weights_home is D for b in p.blocks) and p.prefetch_depth == 0


def test_infeasible_plans_report_the_smaller_z():
    p = make_plan(toy(), ZO, machine(device_bytes=10000), Options(), suggest=False)
    assert not p.feasible and p.z_buffer == "tensor"
    assert p.reasons[0].startswith("device memory: needs")


def test_plan_json_round_trip_and_old_plans_load_as_block():
    p = make_plan(toy(), ZO, machine(device_bytes=71992), Options())
    assert p.z_buffer == "tensor"
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    old = p.to_dict()
    del old["z_buffer"]  # a plan saved before the field existed
    assert Plan.from_dict(old) == dataclasses.replace(p, z_buffer="block")


def test_opt175b_pipelines_in_zo2s_memory_with_z_per_piece():
    """ZO2's OPT-175B case (fp16, batch 1, seq 2048, every layer streamed from pinned host RAM). A layer's
    z in fp32 is 7.2 GB; tensors go through z, the direction and the fp16 home's fp32 copy in pieces
    (Plan.z_piece, 16 M elements: 64 MB each), not whole (the 618 M embedding's 2.5 GB each). The
    resident embedding and head keep their fp16 homes and, beside them, the model's own fp16 weights the
    passes read (the resident compute copy, 1.29 GB). On a device offering ZO2's 18.04 GB the pipelined
    schedule fits with z drawn piece by piece (two 3.6 GB layers in flight, one of them going home while
    it computes, and a layer's compute copy); a block's z needs a layer's z less a piece more, which the
    24 GB RTX 4090 preset holds, and there the plan keeps a block's z (one draw for both passes of a
    direction)."""
    from transformers import AutoConfig

    from fuyoucli.hardware.presets import get_preset
    from fuyoucli.model.inventory import inventory_from_config
    from fuyoucli.plan.memory import DEVICE_HEADROOM
    from fuyoucli.plan.types import Z_PIECE

    cfg = AutoConfig.for_model("opt", hidden_size=12288, ffn_dim=49152, num_hidden_layers=96, num_attention_heads=96,
                               max_position_embeddings=2048, word_embed_proj_dim=12288, vocab_size=50272)
    inv = inventory_from_config(cfg)
    layer, embed, head = inv.blocks[1], inv.blocks[0], inv.blocks[-1]
    assert embed.max_tensor_params == 50272 * 12288 > layer.max_tensor_params == 12288 * 49152 > Z_PIECE
    m, _ = machine_from_profile(get_preset("rtx4090-768g-12nvme"))
    wl = Workload("zo2", False, "float16", batch_size=1, seq_len=2048)
    stream = Options(home_dtype="float16", mode="stream")
    zo2 = dataclasses.replace(stream, device_memory_limit_bytes=int(18.04e9 / (1 - DEVICE_HEADROOM)) + 1)
    tight = make_plan(inv, wl, m, zo2, suggest=False)
    copy = (embed.params + head.params) * 2  # the resident compute copy, fp16
    parts = dict(tight.device_parts)
    assert parts["resident compute copy"] == copy
    assert parts["streaming buffers"] == 2 * layer.params * 2
    assert parts["work buffers"] == layer.params * 2 + 3 * Z_PIECE * 4
    assert tight.feasible and (tight.z_buffer, tight.prefetch_depth) == ("tensor", 1)
    assert tight.memory.device <= 18.04e9
    homes = [b.weights_home for b in tight.blocks]
    block = estimate(inv, wl, m, dataclasses.replace(placement(inv, homes, depth=1, z="block"), home_dtype="float16"))
    assert block.memory.device - tight.memory.device == (layer.params - Z_PIECE) * 4
    assert block.memory.device > tight.capacity.device
    # the 24 GB card's capacity after headroom holds the block's z: the plan takes it
    card = make_plan(inv, wl, m, stream, suggest=False)
    assert block.memory.device <= card.capacity.device
    assert card.feasible and (card.z_buffer, card.prefetch_depth) == ("block", 1)
    assert card.memory.device == block.memory.device and card.times.step_s < tight.times.step_s


def test_the_plan_report_and_its_json_say_how_z_is_held():
    from rich.console import Console

    from fuyoucli.cli.plan import render, to_json

    for device_bytes, z, text in ((71992, "tensor", "z drawn per tensor"), (73514, "block", "z drawn per block")):
        p = make_plan(toy(), ZO, machine(device_bytes=device_bytes), Options())
        doc = to_json(p, toy())
        assert doc["z_buffer"] == doc["plan"]["z_buffer"] == z
        console = Console(record=True, width=200)
        render(console, p, toy(), "toy")
        assert text in " ".join(console.export_text().split())
    adamw = make_plan(toy(), dataclasses.replace(ZO, method="adamw", q=1), machine(), Options())
    assert to_json(adamw, toy())["z_buffer"] is None
