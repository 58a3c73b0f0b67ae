"""Each streamed trainer performs exactly the schedules it hands the executor, op for op, and those
schedules keep every rule check_schedule enforces across a whole run (several steps, evaluation, the
final flush): the update and wait hand-offs are in the schedule, not beside it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fuyoucli.engine.lanes import RecordingLanes, lanes_for
from fuyoucli.model.loading import load_model
from fuyoucli.plan.manual import fixed_plan
from fuyoucli.plan.schedule import check_schedule
from fuyoucli.plan.types import Tier
from fuyoucli.train.first_order_streamed import AdamWStreamed
from fuyoucli.train.zo_streamed import ZOStreamed
from test_first_order_parity import lr_at
from test_first_order_parity import setup as adamw_setup
from test_zo2_parity import ZO
from test_zo2_parity import setup as zo_setup

pytestmark = pytest.mark.usefixtures("lanes_mode")


def assert_performed_as_given(trainer, slots: int) -> Counter:
    log = trainer.engine.ops
    assert log.given, "nothing was scheduled"
    assert log.done == log.given
    check_schedule(log.given, slots)
    return Counter(op.kind for op in log.given)


@pytest.mark.parametrize("variant", ["sgd", "momentum", "conservative"])
@pytest.mark.parametrize("home", [Tier.PAGEABLE, Tier.SSD])
def test_zo2_performs_its_schedule(variant, home, tiny_models, text_data, tmp_path):
    method = {**ZO, "variant": variant, **({"momentum": 0.8} if variant == "momentum" else {})}
    recipe, tok, steps = zo_setup(tiny_models["llama"], text_data, tmp_path, method)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    plan = fixed_plan(2, home, prefetch_depth=1, swap_dir=str(tmp_path / "swap"))
    lanes = RecordingLanes(lanes_for(torch.device("cpu")))
    trainer = ZOStreamed.from_plan(model, plan, recipe.method, seed=5, head="causal_lm", lanes=lanes)
    trainer.engine.ops.start()
    try:
        for t, micro in enumerate(steps[:3]):
            trainer.step(t + 1, micro, lr=recipe.method.lr)
        trainer.losses(steps[0])  # the flush, then an evaluation pass
    finally:
        trainer.close()
    kinds = assert_performed_as_given(trainer, plan.device_buffers)
    assert kinds["write_home"] > 0 and kinds["wait"] >= kinds["fetch"]  # every fetch of a trained layer waits
    if variant != "momentum":  # (momentum crosses beside the weights, counted in the same stats)
        stats = trainer.store.stats
        assert (stats.fetches, stats.writebacks) == (kinds["fetch"], kinds["write_home"])
        if home is Tier.PAGEABLE:  # and nothing crossed the link that the schedule did not name
            copies = Counter(kind for kind, _ in lanes.log)
            assert (copies["upload"], copies["offload"]) == (kinds["fetch"], kinds["write_home"])


@pytest.mark.parametrize("clip", [1.0, None], ids=["deferred", "overlapped"])
@pytest.mark.parametrize("home", [Tier.PAGEABLE, Tier.SSD])
def test_adamw_performs_its_schedule(clip, home, tiny_models, text_data, tmp_path):
    recipe, tok, steps = adamw_setup(tiny_models["llama"], text_data, tmp_path, clip=clip)
    model = load_model(recipe.model, recipe.peft, seed=5, pad_token_id=tok.pad_token_id)
    # embed and head optimized on the CPU too: their forward waits for their uploaded new weights
    plan = fixed_plan(2, home, method="adamw", optimizer_home=home, activation="recompute", prefetch_depth=1,
                      swap_dir=str(tmp_path / "swap"), resident_optimizer_home=Tier.PAGEABLE)
    lanes = RecordingLanes(lanes_for(torch.device("cpu")))
    trainer = AdamWStreamed.from_plan(model, plan, recipe.method, head="causal_lm", lanes=lanes, optimizer_thread=True)
    trainer.engine.ops.start()
    trainer.cpu.take_trace()
    try:
        for t, micro in enumerate(steps[:3]):
            trainer.step(micro, lr=lr_at(t))
        trainer.losses(steps[0])
        jobs = Counter(what for what, *_ in trainer.cpu.take_trace())
    finally:
        trainer.close()
    kinds = assert_performed_as_given(trainer, plan.device_buffers)
    assert kinds["update"] == 3 * 4  # every block, every step
    assert kinds["grad_norm"] == (3 * 4 if clip else 0)
    assert (jobs["job"], jobs["norms"]) == (kinds["update"], kinds["grad_norm"])  # what the worker ran
    assert trainer.store.stats.fetches == kinds["fetch"] == 2 * 2 * 3 + 2
