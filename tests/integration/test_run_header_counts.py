"""The run header counts every parameter of the model, streamed or resident (a streamed run's lazily
loaded layers hold empty parameters, and it used to count only the resident ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from fuyoucli.recipe import load_recipe
from fuyoucli.telemetry.events import RunStarted
from fuyoucli.train.run import finetune
from tiny import EventList


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_streamed_and_in_memory_runs_count_the_same_parameters(tmp_path, tiny_models, text_data, peft):
    model = tiny_models["llama"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(model)
    total = sum(p.numel() for p in reference.parameters())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  path: {model}\nmethod:\n  name: zo2\ndata:\n  train: {text_data}\n"
                      f"  max_length: 32\ntraining:\n  max_steps: 1\n  batch_size: 4\n  eval_before: false\n"
                      f"peft:\n  type: {peft}\nhardware:\n  preset: cpu-laptop-8c-32g\n")
    headers = {}
    for mode, extra in (("in_memory", []), ("stream", [f"offload.swap_dir={tmp_path / 'swap'}",
                                                        "offload.weights_home=ssd"])):
        sink = EventList()
        finetune(load_recipe(recipe, [f"offload.mode={mode}", f"training.output_dir={tmp_path / mode}", *extra]),
                 [sink])
        (headers[mode],) = [e for e in sink.events if isinstance(e, RunStarted)]
    streamed, in_memory = headers["stream"], headers["in_memory"]
    assert streamed.total_params == in_memory.total_params
    assert streamed.trainable_params == in_memory.trainable_params
    if peft == "none":
        assert streamed.total_params == streamed.trainable_params == total
    else:  # the base plus its adapters, of which only the adapters train
        assert 0 < streamed.trainable_params < total < streamed.total_params
