"""The loss over a micro-batch's logits (train/losses.py): its two ways give the same sums and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fuyoucli.train.losses import loss_from_logits


def _by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The definition, position by position: -log softmax(logits[b, t])[labels[b, t + 1]] over scored positions."""
    total = torch.zeros((), dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                total -= F.log_softmax(logits[b, t].double(), dim=-1)[labels[b, t + 1]]
    return total


@pytest.mark.parametrize("scored", ["all", "most", "few"])
def test_loss_sum_count_and_gradient_match_the_definition(scored):
    """'all' and 'most' take the flattened logits with unscored targets ignored (no copy of them);
    'few' (answer-only, label-word losses) gathers the scored positions' logits first."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    if scored == "most":
        labels[0, 5:] = -100  # padding at the end of one row
    elif scored == "few":
        labels[:, :-1] = -100  # only the last position of each row
    out = loss_from_logits(logits, {"labels": labels}, head="causal_lm")
    want = _by_hand(logits, labels)
    assert out.count == int((labels[:, 1:] != -100).sum())
    assert float(out.loss_sum) == pytest.approx(float(want), rel=1e-6)
    (grad,) = torch.autograd.grad(out.loss_sum, logits)
    (want_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(grad, want_grad.float(), rtol=1e-5, atol=1e-6)
    assert bool((grad[:, -1] == 0).all())  # the last position predicts nothing
