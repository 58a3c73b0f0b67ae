"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay to zero. Pure."""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """The learning rate of 1-based `step` (the first optimizer step is step 1)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return peak_lr * (1.0 - progress)
    if schedule == "cosine":
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")
