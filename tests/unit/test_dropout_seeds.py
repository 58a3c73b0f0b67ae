"""Dropout seeded per (step, micro-batch, block): block by block, in any order, equals the model's forward."""

from __future__ import annotations

import torch
from torch import nn

from fuyoucli.model.runner import BlockRunner
from fuyoucli.train.dropout import forward_seed, seeded, seeded_model

CPU = torch.device("cpu")


def test_blockwise_forward_with_dropout_equals_model_forward(tiny_models):
    """gpt2's dropout (0.1) everywhere, and 0.5 after the final norm so that the head draws too (after the
    embedding lookup that run_head repeats). The global RNG is left where it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"]).train()
    model.transformer.ln_f = nn.Sequential(model.transformer.ln_f, nn.Dropout(0.5))
    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 2], [1, 7, 8, 3, 2, 0, 0, 0]])
    mask = (ids != 0).long()
    state = torch.get_rng_state()
    with seeded_model(model, CPU, 7, 1):
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # as batch_loss
    runner = BlockRunner(model)
    with seeded(CPU, forward_seed(7, 1, 0)):
        prepared = runner.capture(ids, mask)
    hidden = prepared.hidden
    for i in reversed(range(runner.n_layers)):  # the draws of a later block do not move an earlier one's
        with seeded(CPU, forward_seed(7, 1, i + 1)):
            runner.run_layer(i, hidden, prepared)
    for i in range(runner.n_layers):
        with seeded(CPU, forward_seed(7, 1, i + 1)):
            hidden = runner.run_layer(i, hidden, prepared)
    with seeded(CPU, forward_seed(7, 1, runner.n_layers + 1)) as reseed:
        got = runner.run_head(hidden, ids, mask, reseed)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded_model(model, CPU, 7, 2):  # another micro-batch's masks
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
