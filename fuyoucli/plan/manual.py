"""A plan with the placement given, not searched: every layer homed on one tier, embeddings and head
resident. For tests, benchmarks and explicit overrides; it predicts nothing (times and memory are 0).

Plan stage, pure (no torch).
"""

from __future__ import annotations

from fuyoucli.plan.types import BlockPlan, Plan, StepTimes, Tier, TierBytes


def fixed_plan(n_layers: int, weights_home: Tier, *, method: str = "zo2", prefetch_depth: int = 1,
               swap_dir: str | None = None, compute_dtype: str = "float32", compute_device: str = "cpu",
               device_budget_bytes: int | None = None, home_dtype: str = "float32") -> Plan:
    names = ["embed"] + [f"layers.{i}" for i in range(n_layers)] + ["head"]
    blocks = tuple(
        BlockPlan(name, 0, Tier.DEVICE if name in ("embed", "head") else weights_home, None, None) for name in names
    )
    return Plan(
        method=method, compute_device=compute_device, blocks=blocks, prefetch_depth=prefetch_depth,
        device_buffers=prefetch_depth + 1, home_dtype=home_dtype, wire_dtype=home_dtype, compute_dtype=compute_dtype,
        pinned_pool_bytes=0, swap_dir=swap_dir, device_budget_bytes=device_budget_bytes or 2**62,
        memory=TierBytes(), capacity=TierBytes(), times=StepTimes(), tokens_per_s=0.0, feasible=True,
        notes=("placement given, not planned",),
    )
