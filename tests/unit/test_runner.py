"""Block-by-block execution through the model's own modules equals the model's forward."""

from __future__ import annotations

import pytest
import torch

from fuyoucli.model.runner import BlockRunner

ARCHS = ("llama", "opt", "gpt2", "qwen2", "falcon", "bloom")


def batch():
    ids = torch.tensor([[1, 5, 9, 14, 22, 31, 40, 2], [1, 7, 8, 3, 2, 0, 0, 0]])
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [5]])).long()
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
def test_blockwise_forward_equals_model_forward(arch, tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = BlockRunner(model).forward(ids, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The swaps are undone: the model still runs normally and holds its own layers.
    assert all(type(layer).__name__.endswith(("Layer", "Block")) for layer in BlockRunner(model).layers)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_blockwise_forward_with_classification_head_and_lora(arch, tiny_models):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models[arch], num_labels=3, pad_token_id=0)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, init_lora_weights=False)).eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = BlockRunner(model).forward(ids, mask)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_gradients_flow_through_blockwise_forward(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"])
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    BlockRunner(model).forward(ids, mask).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
