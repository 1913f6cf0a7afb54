"""Spot first, on-demand when spot has no capacity: a node-type scorer for Ray's autoscaler.

Ray 2.60's default scorer (`resource_demand_scheduler._default_utilization_scorer`) ranks node types by how
well a request fits and, on a tie, by the type's name; it records failed launches (no spot capacity, quota)
but does not use that record, so a spot type whose launches fail would be asked for again and again. This
scorer puts every type whose last launch failed (within Ray's 30-minute availability window) behind every
other type, then ranks as Ray does. With `gpu.1xa10g.spot` and `gpu.1xa10g` alike in resources, the spot type
wins the tie (its name sorts last, and Ray takes the largest score) until a spot launch fails; then the
on-demand type does, until the failure ages out or a spot launch succeeds.

The head's autoscaler loads it by name: `RAY_AUTOSCALER_UTILIZATION_SCORER=trainer.autoscaler_scorer.prefer_available`
in the environment of `ray start --head` (cluster/gpu.yaml). Ray is imported inside the function, so this
module imports nothing heavy.
"""

from __future__ import annotations

from typing import Any


def prefer_available(
    node_resources: dict[str, float],
    resources: list[dict[str, float]],
    node_type: str,
    *,
    node_availability_summary: Any,
) -> tuple[Any, ...] | None:
    from ray.autoscaler._private.resource_demand_scheduler import _resource_based_utilization_scorer

    score = _resource_based_utilization_scorer(
        node_resources, resources, node_availability_summary=node_availability_summary
    )
    if score is None:
        return None
    record = node_availability_summary.node_availabilities.get(node_type) if node_availability_summary else None
    available = record is None or bool(record.is_available)
    return (available, *score)
