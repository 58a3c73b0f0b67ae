"""A plan with the placement given, not searched: every layer homed on one tier, embeddings and head
resident. For tests, benchmarks and explicit overrides; it predicts nothing (times and memory are 0).

Plan stage, pure (no torch).
"""

from __future__ import annotations

from fuyoucli.plan.types import BlockPlan, Plan, StepTimes, Tier, TierBytes


def fixed_plan(n_layers: int, weights_home: Tier, *, method: str = "zo2", prefetch_depth: int = 1,
               swap_dir: str | None = None, compute_dtype: str = "float32", compute_device: str = "cpu",
               device_budget_bytes: int | None = None, home_dtype: str = "float32",
               optimizer_home: Tier | None = None, activation: str | tuple[str, ...] | None = None,
               resident_optimizer_home: Tier = Tier.DEVICE) -> Plan:
    """For method 'adamw': layers keep their optimizer states at `optimizer_home` (default: pageable
    host memory when the layers stream, else the device) and handle saved activations per
    `activation` ('keep', 'swap', 'recompute' or 'recompute-swap'; one for all layers or one per layer; default
    recompute); embeddings and head keep theirs at `resident_optimizer_home`. zo2 plans carry
    neither (None)."""
    names = ["embed"] + [f"layers.{i}" for i in range(n_layers)] + ["head"]
    first_order = method == "adamw"
    acts = (activation,) * n_layers if activation is None or isinstance(activation, str) else tuple(activation)
    if len(acts) != n_layers:
        raise ValueError(f"{len(acts)} activation policies for {n_layers} layers")

    def block(name: str) -> BlockPlan:
        resident = name in ("embed", "head")
        home = Tier.DEVICE if resident else weights_home
        if not first_order:
            return BlockPlan(name, 0, home, None, None)
        if resident:
            return BlockPlan(name, 0, home, resident_optimizer_home, "keep")
        opt = optimizer_home or (Tier.DEVICE if weights_home is Tier.DEVICE else Tier.PAGEABLE)
        return BlockPlan(name, 0, home, opt, acts[int(name.split(".")[1])] or "recompute")

    return Plan(
        method=method, compute_device=compute_device, blocks=tuple(block(n) for n in names),
        prefetch_depth=prefetch_depth, device_buffers=prefetch_depth + 1, home_dtype=home_dtype,
        wire_dtype=home_dtype, compute_dtype=compute_dtype, pinned_pool_bytes=0, swap_dir=swap_dir,
        device_budget_bytes=device_budget_bytes or 2**62, memory=TierBytes(), capacity=TierBytes(),
        times=StepTimes(), tokens_per_s=0.0, feasible=True, notes=("placement given, not planned",),
    )
