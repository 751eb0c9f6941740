"""``running``: the running batch size, relative to the busiest candidate."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.scorers import NEUTRAL


class RunningScorer:
    """``1 - running / (max + S)`` (a static kind).

    A replica decoding a large batch serves each token slower even with an empty queue (vLLM's
    queue stays 0 until the batch is full). S (saturation_queue) keeps small differences small.
    """

    name = "running"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> list[float]:
        known = [c.running for c in candidates if c.running is not None]
        if not known:
            return [NEUTRAL] * len(candidates)
        denom = max(0.0, max(known)) + ctx.scoring.saturation_queue
        return [NEUTRAL if c.running is None else 1.0 - max(0.0, c.running) / denom for c in candidates]

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None
