"""``latency``: recent mean latency relative to the fastest candidate."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.scorers import NEUTRAL


class LatencyScorer:
    """``fastest / latency`` (a static kind).

    Queue and KV signals miss a replica that is simply slow (older GPU, thermal throttling, a noisy
    neighbour): its queue stays short while every request takes longer. The load monitor derives
    each replica's recent mean latency from its latency histogram; unknown latency scores neutral.
    """

    name = "latency"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> list[float]:
        latencies = [_trusted_latency(c) for c in candidates]
        known = [x for x in latencies if x > 0.0]
        if not known:
            return [NEUTRAL] * len(candidates)
        fastest = min(known)
        return [NEUTRAL if x <= 0.0 else fastest / x for x in latencies]

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None


def _trusted_latency(candidate: Candidate) -> float:
    # An untrusted (stale, unreachable) reading leaves waiting None: its latency is not evidence either.
    if candidate.waiting is None or candidate.reading is None:
        return 0.0
    return candidate.reading.latency_s
