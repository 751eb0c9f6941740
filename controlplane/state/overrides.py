"""Live overrides: the desired-state changes made through the API on top of the spec.

They are desired state like the spec, so they live with the store that persists both
(`store.py`); the mesh model reads them, never the other way round (spec + overrides ->
mesh model -> Envoy resources).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.canary.state import CanaryState


@dataclass(frozen=True)
class Overrides:
    """Live changes made through the API on top of the spec; persisted with it."""

    weights: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> version -> weight
    drained: frozenset[str] = frozenset()
    # model -> its latest canary (active or finished). Lives here so that a canary step (weights +
    # canary state) is one atomic write, and a reverted change reverts both.
    canaries: dict[str, CanaryState] = field(default_factory=dict)
