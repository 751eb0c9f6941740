"""``queue``: queue depth, with this process's own requests in flight added."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext


class QueueScorer:
    """``S / (S + waiting + n)`` with S = saturation_queue (an in-flight kind).

    A pick made since the last reading is a request the replica's queue does not show yet, so the
    in-flight count adds to ``waiting``: an idle replica is preferred until the requests sent to it
    make it look as loaded as its peers, and the traffic spreads in proportion to spare capacity.
    """

    name = "queue"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> list[tuple[float, float]]:
        scale = ctx.scoring.saturation_queue
        return [(scale, c.waiting if c.waiting is not None else 0.0) for c in candidates]
