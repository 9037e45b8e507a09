"""Routing decisions as pure functions over instance state (testable without servers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["InstanceView", "pick_instance"]


@dataclass(frozen=True)
class InstanceView:
    """What routing needs to know about an instance."""

    instance_id: str
    free: int
    in_flight: int
    holds_model: bool


def pick_instance(instances: Sequence[InstanceView]) -> str | None:
    """Choose an instance with a free slot, or None to start one or queue.

    Prefers an instance that already holds the model (no decrypt/load), then the
    least loaded one, so load spreads and model switches stay rare.
    """
    candidates = [i for i in instances if i.free > 0]
    if not candidates:
        return None
    best = min(candidates, key=lambda i: (not i.holds_model, i.in_flight, i.instance_id))
    return best.instance_id
