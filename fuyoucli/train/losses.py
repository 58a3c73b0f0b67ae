"""Loss and metrics of one micro-batch, shared by every trainer and by evaluation.

Losses are returned as sums with their token counts so that a step over several micro-batches
weighs every token equally, whatever the padding: the step loss is sum(losses) / sum(tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BatchLoss:
    loss_sum: torch.Tensor
    """Summed cross-entropy (fp32, a 0-d tensor that carries the graph when gradients are on)."""
    count: int
    """Tokens (or examples, for a classification head) the sum is over."""
    correct: int | None = None
    """Classification: examples whose predicted label is right."""


def count_targets(batch: dict[str, torch.Tensor], head: str) -> int:
    if head == "sequence_classification":
        return int(batch["class_labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def batch_loss(model, batch: dict[str, torch.Tensor], *, head: str, label_token_ids: tuple[int, ...] = ()) -> BatchLoss:
    # No KV cache, as the block runner: a cache's concatenated keys change the memory layout attention
    # sees, and with attention dropout on (the math kernel) that changes the rounding.
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return loss_from_logits(out.logits, batch, head=head, label_token_ids=label_token_ids)


def loss_from_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor], *, head: str,
                     label_token_ids: tuple[int, ...] = ()) -> BatchLoss:
    if head == "sequence_classification":
        targets = batch["class_labels"]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        correct = int((logits.argmax(-1) == targets).sum())
        return BatchLoss(loss, int(targets.numel()), correct)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    scored = int(mask.sum())
    if 2 * scored >= mask.numel() and not label_token_ids:
        # Most positions are scored (plain text): the logits as they are, flattened (a view), with the
        # last position's target and the unscored ones ignored. Gathering them would copy all of them.
        vocab = logits.shape[-1]
        targets = F.pad(labels, (0, 1), value=-100).reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), targets, ignore_index=-100, reduction="sum")
        return BatchLoss(loss, scored)
    # Only the labelled positions go through the fp32 softmax: for answer-only or label-word losses
    # that is a small fraction of the [batch, seq, vocab] logits.
    picked = logits[:, :-1][mask].float()
    targets = labels[mask]
    loss = F.cross_entropy(picked, targets, reduction="sum")
    correct = None
    if label_token_ids and "class_labels" in batch:
        # Label-word classification: each row has one labelled position; compare the label words' logits.
        words = torch.tensor(label_token_ids, device=picked.device)
        predicted = picked[:, words].argmax(-1)
        correct = int((predicted == batch["class_labels"].to(predicted.device)).sum())
    return BatchLoss(loss, int(targets.numel()), correct)
