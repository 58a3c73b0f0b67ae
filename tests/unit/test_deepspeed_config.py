"""The recipe + plan -> DeepSpeed config mapping (issue 9): checked as data without DeepSpeed, and by
DeepSpeed's own config parser (and its optimizer and scheduler constructors) where it is installed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fuyoucli.distributed.deepspeed_config import (
    aio_point, deepspeed_config, leaf_keys, render_notes, sidecar_path, write_export,
)
from fuyoucli.errors import FuyouError, RecipeError
from fuyoucli.hardware.presets import get_preset
from fuyoucli.hardware.profile import Disk, DiskPoint
from fuyoucli.plan.types import BlockPlan, Plan, StepTimes, Tier, TierBytes
from fuyoucli.recipe import validate_recipe

MIB = 1 << 20


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    return model, data


def recipe(files, *, method: dict | None = None, training: dict | None = None, peft: dict | None = None,
           dtype: str = "bfloat16", swap_dir: str | None = "/nvme/swap"):
    model, data = files
    doc = {"name": "ds-test", "model": {"path": str(model), "dtype": dtype},
           "method": {"name": "adamw", "lr": 2e-5, "weight_decay": 0.1, "max_grad_norm": 0.5, **(method or {})},
           "data": {"train": str(data)},
           "training": {"max_steps": 10, "batch_size": 4, "grad_accum": 2, **(training or {})}}
    if peft:
        doc["peft"] = peft
    if swap_dir:
        doc["offload"] = {"swap_dir": swap_dir}
    return validate_recipe(doc)


def block(name: str, weights: Tier, opt: Tier | None, params: int = 1000, trainable: int | None = None) -> BlockPlan:
    trainable = params if trainable is None else trainable
    return BlockPlan(name=name, param_bytes=2 * params, weights_home=weights, optimizer_home=opt,
                     activation="keep", params=params, trainable_params=trainable, optimizer_bytes=16 * trainable)


def plan(blocks, **kw) -> Plan:
    base = dict(method="adamw", compute_device="cuda", blocks=tuple(blocks), prefetch_depth=1, device_buffers=2,
                home_dtype="bfloat16", wire_dtype="bfloat16", compute_dtype="bfloat16", pinned_pool_bytes=0,
                swap_dir="/nvme/swap", device_budget_bytes=0, memory=TierBytes(), capacity=TierBytes(),
                times=StepTimes(), tokens_per_s=0.0, feasible=True, micro_batch_size=2, micro_batches=4,
                machine="test-box")
    base.update(kw)
    return Plan(**base)


STREAMED_TO_SSD = [block("embed", Tier.DEVICE, Tier.DEVICE, 5000), block("layers.0", Tier.PINNED, Tier.SSD),
                   block("layers.1", Tier.SSD, Tier.SSD), block("head", Tier.DEVICE, Tier.PINNED, 5000)]
PROFILE = get_preset("rtx4090-pcie4-1nvme-128g")  # one disk at /nvme: 1 MiB blocks, 4 in flight


def test_streamed_plan_maps_to_zero3_nvme_offload_with_the_profiles_aio(files):
    r = recipe(files)
    ds = deepspeed_config(r, plan(STREAMED_TO_SSD), PROFILE, max_tensor_params=3 * 10**8)
    c, z = ds.config, ds.config["zero_optimization"]
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (8, 2, 4)
    assert c["bf16"] == {"enabled": True} and c["fp16"] == {"enabled": False}
    assert c["gradient_clipping"] == 0.5
    assert c["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                          "weight_decay": 0.1}}
    assert z["stage"] == 3
    # Weights: one layer on the SSD makes the parameter offload NVMe; the pinned one stays in RAM (max_in_cpu).
    assert z["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme/swap", "max_in_cpu": 1000,
                                  "buffer_size": 3 * 10**8, "buffer_count": 5}
    assert z["offload_optimizer"]["device"] == "nvme" and z["offload_optimizer"]["nvme_path"] == "/nvme/swap"
    assert z["offload_optimizer"]["pipeline_read"] and z["offload_optimizer"]["pipeline_write"]
    assert z["sub_group_size"] == 5000  # the largest block whose states are offloaded (the head)
    assert z["stage3_prefetch_bucket_size"] == 1000  # prefetch depth 1 x a streamed layer
    assert z["stage3_max_live_parameters"] == 10000 + 2 * 1000  # resident embed + head, 2 device buffers
    assert c["aio"]["block_size"] == MIB and c["aio"]["queue_depth"] == 4


def test_every_key_has_a_reason_and_the_sidecar_lists_it(files, tmp_path):
    r = recipe(files)
    p = plan(STREAMED_TO_SSD)
    ds = deepspeed_config(r, p, PROFILE)
    assert leaf_keys(ds.config) == {c.key for c in ds.choices}
    assert all(c.why for c in ds.choices)
    config_path, notes_path = write_export(ds, tmp_path / "out" / "ds.json", recipe=r, plan=p, world_size=1)
    assert notes_path == sidecar_path(config_path) == tmp_path / "out" / "ds.notes.md"
    assert json.loads(config_path.read_text()) == ds.config
    text = notes_path.read_text()
    for key in leaf_keys(ds.config):
        assert f"`{key}`" in text, key
    assert "test-box" in text and "What the config does not say" in text


def test_world_size_keeps_the_recipes_examples_per_step(files):
    r = recipe(files)
    one = deepspeed_config(r, plan(STREAMED_TO_SSD), PROFILE).config
    two = deepspeed_config(r, plan(STREAMED_TO_SSD), PROFILE, world_size=2).config
    assert one["train_batch_size"] == two["train_batch_size"] == 8
    assert (one["gradient_accumulation_steps"], two["gradient_accumulation_steps"]) == (4, 2)
    with pytest.raises(FuyouError, match="multiple of 12"):
        deepspeed_config(r, plan(STREAMED_TO_SSD), PROFILE, world_size=6)


def test_in_memory_recipe_has_no_offload_and_uses_the_recipes_batch(files):
    r = recipe(files, dtype="float32", swap_dir=None)
    ds = deepspeed_config(r, None, None)
    z = ds.config["zero_optimization"]
    assert "offload_param" not in z and "offload_optimizer" not in z and "aio" not in ds.config
    assert ds.config["train_micro_batch_size_per_gpu"] == 4 and ds.config["gradient_accumulation_steps"] == 2
    assert ds.config["bf16"]["enabled"] is False and ds.config["fp16"]["enabled"] is False
    assert any("in_memory" in n for n in ds.notes)


def test_cpu_pinned_offload_and_lora_keep_adapters_states_on_device(files):
    r = recipe(files, peft={"type": "lora", "r": 4}, swap_dir=None)
    blocks = [block("embed", Tier.DEVICE, None), block("layers.0", Tier.PAGEABLE, Tier.DEVICE, trainable=10),
              block("head", Tier.DEVICE, None)]
    ds = deepspeed_config(r, plan(blocks, swap_dir=None), PROFILE)
    z = ds.config["zero_optimization"]
    assert z["offload_param"] == {"device": "cpu", "pin_memory": False}  # pageable: pinned RAM would not hold it
    assert "offload_optimizer" not in z and "aio" not in ds.config
    assert any("LoRA" in n for n in ds.notes)


def test_fp16_mirrors_fuyous_loss_scaling_and_cpu_plans_use_torch_adam(files):
    r = recipe(files, dtype="float16", swap_dir=None, method={"max_grad_norm": None})
    ds = deepspeed_config(r, plan([block("embed", Tier.DEVICE, Tier.DEVICE)], compute_device="cpu"), None)
    c = ds.config
    assert c["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                         "hysteresis": 1, "min_loss_scale": 1}
    assert c["gradient_clipping"] == 0.0 and c["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("schedule,warmup,kind", [("constant", 0, None), ("constant", 3, "WarmupLR"),
                                                  ("linear", 2, "WarmupDecayLR"), ("cosine", 0, "WarmupCosineLR")])
def test_schedule_maps_to_the_closest_deepspeed_scheduler(files, schedule, warmup, kind):
    r = recipe(files, method={"schedule": schedule, "warmup_steps": warmup})
    c = deepspeed_config(r, None, None).config
    assert c.get("scheduler", {}).get("type") == kind
    if kind in ("WarmupDecayLR", "WarmupCosineLR"):
        assert c["scheduler"]["params"]["total_num_steps"] == 10
        assert c["scheduler"]["params"]["warmup_num_steps"] == warmup


def test_epochs_leave_a_decaying_schedule_to_fuyou(files):
    r = recipe(files, method={"schedule": "cosine"}, training={"max_steps": None, "epochs": 1})
    ds = deepspeed_config(r, None, None)
    assert "scheduler" not in ds.config and any("scheduler" in n for n in ds.notes)
    assert deepspeed_config(r, None, None, total_steps=7).config["scheduler"]["params"]["total_num_steps"] == 7


def test_zo2_has_no_deepspeed_equivalent(files):
    model, data = files
    r = validate_recipe({"model": {"path": str(model)}, "method": {"name": "zo2"}, "data": {"train": str(data)},
                         "training": {"max_steps": 1}})
    with pytest.raises(RecipeError, match="--nproc"):
        deepspeed_config(r, None, None)


def test_aio_takes_the_measured_point_with_the_best_slower_direction():
    pt = lambda b, t, g: DiskPoint(block_bytes=b, threads=t, gbps=g)  # noqa: E731
    disk = Disk(path="/ssd", filesystem="ext4", device="nvme0n1", free_bytes=10**12, o_direct_supported=True,
                method="o_direct", test_file_bytes=0, first_write_gbps=1.0,
                read=(pt(MIB, 1, 2.0), pt(MIB, 8, 6.0), pt(8 * MIB, 4, 5.0)),
                write=(pt(MIB, 1, 1.5), pt(MIB, 8, 1.0), pt(8 * MIB, 4, 3.0)))
    block_bytes, depth, why = aio_point(disk)
    assert (block_bytes, depth) == (8 * MIB, 4) and "/ssd" in why
    only_reads = replace(disk, write=(pt(2 * MIB, 2, 1.0),))
    assert aio_point(only_reads)[:2] == (MIB, 8)


def test_render_notes_names_the_machine_and_world_size(files):
    r = recipe(files)
    p = plan(STREAMED_TO_SSD)
    text = render_notes(deepspeed_config(r, p, PROFILE, world_size=2), recipe=r, plan=p, world_size=2,
                        config_name="x.json")
    assert "**2** data-parallel ranks" in text and "test-box" in text


# ---- DeepSpeed's own parser (skipped without the [deepspeed] extra) ---------------------------------


def _deepspeed_keys() -> set[str]:
    """Every top-level key name DeepSpeed's config reader knows (the string constants it reads)."""
    import deepspeed.runtime.constants as c
    import deepspeed.runtime.swap_tensor.constants as s
    import deepspeed.runtime.zero.config as z

    return {v for mod in (c, s, z) for v in vars(mod).values() if isinstance(v, str)}


CASES = {
    "nvme": lambda f: (recipe(f), plan(STREAMED_TO_SSD)),
    "in_memory_fp32": lambda f: (recipe(f, dtype="float32", swap_dir=None), None),
    "lora_cpu": lambda f: (recipe(f, peft={"type": "lora"}, swap_dir=None),
                           plan([block("embed", Tier.DEVICE, None), block("layers.0", Tier.PINNED, Tier.DEVICE)],
                                swap_dir=None)),
    "fp16_linear_cpu": lambda f: (recipe(f, dtype="float16", swap_dir=None,
                                         method={"schedule": "linear", "warmup_steps": 2}),
                                  plan([block("embed", Tier.DEVICE, Tier.PAGEABLE)], compute_device="cpu",
                                       swap_dir=None)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deepspeeds_parser_accepts_the_config(files, case):
    pytest.importorskip("deepspeed")
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig

    r, p = CASES[case](files)
    cfg = deepspeed_config(r, p, PROFILE).config
    parsed = DeepSpeedConfig(json.loads(json.dumps(cfg)))  # as read back from the file
    assert parsed.train_batch_size == cfg["train_batch_size"]
    assert parsed.gradient_accumulation_steps == cfg["gradient_accumulation_steps"]
    assert parsed.zero_optimization_stage == 3
    assert parsed.gradient_clipping == cfg["gradient_clipping"]
    assert parsed.bfloat16_config.enabled == cfg["bf16"]["enabled"]
    assert parsed.float16_config.enabled == cfg["fp16"]["enabled"]
    z = cfg["zero_optimization"]
    for section in ("offload_param", "offload_optimizer"):
        got = getattr(parsed.zero_config, section)
        if section in z:
            assert getattr(got.device, "value", got.device) == z[section]["device"]
            if "nvme_path" in z[section]:
                assert str(got.nvme_path) == z[section]["nvme_path"]
        else:
            assert got is None or getattr(got.device, "value", got.device) == "none"
    if "aio" in cfg:
        assert parsed.aio_config["block_size"] == cfg["aio"]["block_size"]
        assert parsed.aio_config["queue_depth"] == cfg["aio"]["queue_depth"]
    unknown = set(cfg) - _deepspeed_keys()
    assert not unknown, f"keys DeepSpeed does not read: {unknown}"
    # What the parser passes on unchecked: the optimizer's and the scheduler's keyword arguments.
    params = dict(cfg["optimizer"]["params"])
    params.pop("torch_adam", None)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **params)
    if "scheduler" in cfg:
        getattr(lr_schedules, cfg["scheduler"]["type"])(opt, **cfg["scheduler"]["params"])


def test_deepspeeds_parser_rejects_an_unknown_zero_key(files):
    """The check above means something: DeepSpeed's ZeRO section forbids keys it does not know."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = deepspeed_config(recipe(files), plan(STREAMED_TO_SSD), PROFILE).config
    cfg["zero_optimization"]["offload_params"] = {"device": "cpu"}
    with pytest.raises(Exception, match="offload_params"):
        DeepSpeedConfig(cfg)


def test_the_mapping_imports_no_torch_and_the_launcher_none_at_import():
    """The mapping is pure like plan/ (tested without torch or DeepSpeed); the launcher imports torch only
    inside the function that plans a DeepSpeed run."""
    import ast

    pkg = Path(__file__).parents[2] / "fuyoucli" / "distributed"

    def imports(path: Path, top_level_only: bool) -> set[str]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        names = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        return names

    assert not imports(pkg / "deepspeed_config.py", top_level_only=False) & {"torch", "deepspeed", "rich"}
    assert not imports(pkg / "launch.py", top_level_only=True) & {"torch", "deepspeed", "rich"}
