"""Canary state: what a canary of one model is doing, as persisted with the mesh's overrides.

Kept apart from the controller (``controlplane/canary/controller.py``) because the mesh model and the state
store need the type, and neither should import the controller. Everything here is pure: frozen
dataclasses, the weight arithmetic, and the JSON form the store writes.

Weight semantics (docs/canary.md):
- a canary at P% gives its version P% of the model's traffic; the other versions share the
  rest in proportion to their weights *before the canary started* (the baseline), so a 3-version
  model keeps its A/B ratio among the others while the canary grows;
- weights are written on a fixed scale (``WEIGHT_SCALE``, so 0.01% resolution) that always sums to
  the same total. With Envoy's hash-based weighted-cluster choice (sticky A/B sessions) a fixed
  total means a session already on the canary stays on it as the canary grows;
- rollback restores the baseline exactly (including "no override: the spec's weights").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

WEIGHT_SCALE = 10_000  # weights a canary writes always sum to this: 1 unit = 0.01%
HISTORY_LIMIT = 50  # events kept per canary; older ones are dropped

MANUAL = "manual"  # set by `canary set`; stays until promote or rollback
PROGRESSING = "progressing"  # `canary start`: the controller steps it through the gates
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
ACTIVE_PHASES = frozenset({MANUAL, PROGRESSING})


@dataclass(frozen=True)
class Gates:
    """What a progressive canary must stay inside, per step, to advance."""

    max_error_rate: float = 0.01  # fraction of requests failing (status >= 500 or upstream failure)
    max_p99_s: float = 0.0  # p99 request duration; 0 = no latency gate
    min_samples: int = 20  # canary requests needed before a gate is judged at all


@dataclass(frozen=True)
class CanaryEvent:
    at: float  # unix seconds
    message: str


@dataclass(frozen=True)
class CanaryState:
    """The latest canary of one model (active, or how the last one ended)."""

    model: str
    version: str
    phase: str
    percent: float
    # The model's weight override before the canary (None: there was none, the spec's weights
    # applied) and the effective weights it stood for. Rollback restores the former.
    baseline_override: dict[str, int] | None
    baseline_weights: dict[str, int]
    steps: tuple[float, ...] = ()
    step: int = 0
    interval_s: float = 0.0
    gates: Gates | None = None
    step_started_at: float = 0.0  # unix seconds; informative (the controller times steps monotonically)
    previous_stable: str = ""
    reason: str = ""
    history: tuple[CanaryEvent, ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE_PHASES

    def with_event(self, at: float, message: str, **changes: Any) -> CanaryState:
        history = (self.history + (CanaryEvent(at, message),))[-HISTORY_LIMIT:]
        return replace(self, history=history, **changes)

    # ------------------------------------------------------------ persistence

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "phase": self.phase,
            "percent": self.percent,
            "baseline_override": self.baseline_override,
            "baseline_weights": self.baseline_weights,
            "steps": list(self.steps),
            "step": self.step,
            "interval_s": self.interval_s,
            "gates": None if self.gates is None else vars(self.gates).copy(),
            "step_started_at": self.step_started_at,
            "previous_stable": self.previous_stable,
            "reason": self.reason,
            "history": [[e.at, e.message] for e in self.history],
        }

    @classmethod
    def from_json(cls, doc: dict) -> CanaryState:
        gates = doc.get("gates")
        override = doc.get("baseline_override")
        return cls(
            model=doc["model"],
            version=doc["version"],
            phase=doc["phase"],
            percent=float(doc["percent"]),
            baseline_override=None if override is None else {k: int(v) for k, v in override.items()},
            baseline_weights={k: int(v) for k, v in doc.get("baseline_weights", {}).items()},
            steps=tuple(float(s) for s in doc.get("steps", ())),
            step=int(doc.get("step", 0)),
            interval_s=float(doc.get("interval_s", 0.0)),
            gates=None if gates is None else Gates(**gates),
            step_started_at=float(doc.get("step_started_at", 0.0)),
            previous_stable=doc.get("previous_stable", ""),
            reason=doc.get("reason", ""),
            history=tuple(CanaryEvent(float(at), str(message)) for at, message in doc.get("history", ())),
        )


# ---------------------------------------------------------------- weights


def canary_weights(baseline: dict[str, int], versions: list[str], canary: str, percent: float) -> dict[str, int]:
    """Weights giving ``canary`` ``percent``% and the other versions the rest, in proportion to
    their ``baseline`` weights (equally when none of them had weight). Sums to ``WEIGHT_SCALE``."""
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"percent must be between 0 and 100, got {percent:g}")
    canary_units = round(percent * WEIGHT_SCALE / 100.0)
    others = [v for v in versions if v != canary]
    shares = {v: max(baseline.get(v, 0), 0) for v in others}
    if others and sum(shares.values()) == 0:
        shares = {v: 1 for v in others}
    weights = {v: 0 for v in versions}
    weights[canary] = canary_units if others else WEIGHT_SCALE
    if others:
        weights.update(_apportion(WEIGHT_SCALE - canary_units, shares))
    return weights


def promoted_weights(versions: list[str], canary: str) -> dict[str, int]:
    return {v: WEIGHT_SCALE if v == canary else 0 for v in versions}


def stable_version(baseline: dict[str, int], canary: str) -> str:
    """The version the canary is measured against: the heaviest other version before it started."""
    others = [(w, v) for v, w in baseline.items() if v != canary]
    return max(others, key=lambda item: (item[0], item[1]))[1] if others else ""


def _apportion(total: int, shares: dict[str, int]) -> dict[str, int]:
    """Split ``total`` in proportion to ``shares`` exactly (largest remainder), so the sum never drifts."""
    whole = sum(shares.values())
    exact = {k: total * s / whole for k, s in shares.items()}
    result = {k: int(x) for k, x in exact.items()}
    left = total - sum(result.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - result[k]), k))[:left]:
        result[k] += 1
    return result
