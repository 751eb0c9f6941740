"""``inflight``: the requests this process has in flight to the endpoint."""

from __future__ import annotations

from extproc.routing_view import ScoringView
from extproc.scheduler.candidates import Candidate, FilterContext


class InflightScorer:
    """``C / (C + n)`` (an in-flight kind; C: ``decay_scale``)."""

    name = "inflight"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> list[tuple[float, float]]:
        scoring = ctx.scoring
        return [(decay_scale(c, scoring), 0.0) for c in candidates]


def decay_scale(candidate: Candidate, scoring: ScoringView) -> float:
    """C, the in-flight count at which the in-flight score has halved: the replica's
    ``max_concurrency`` when known, else ``saturation_queue``."""
    return float(candidate.endpoint.max_concurrency) or scoring.saturation_queue
