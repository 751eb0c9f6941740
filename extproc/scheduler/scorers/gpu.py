"""``gpu-util``: spare GPU compute, as the engine or the DCGM exporter reports it.

Off by default (not in the default profile): on LLM engines the queue, batch and KV signals say
more about the next request than utilisation does (a replica decoding a small batch can read
100 %), but for engines that report little else (Triton) or a GPU shared with other work, it is
the signal there is. A spec names it in ``scheduling.scorers``.
"""

from __future__ import annotations

from extproc.scheduler.candidates import TRUSTED, Candidate, FilterContext
from extproc.scheduler.scorers import NEUTRAL


class GpuUtilScorer:
    """``1 - gpu_util`` (a static kind); neutral when no metric reports it (-1) or the reading is
    not trusted."""

    name = "gpu-util"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> list[float]:
        return [_spare(c) for c in candidates]

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None


def _spare(candidate: Candidate) -> float:
    reading = candidate.reading
    if candidate.health != TRUSTED or reading is None or not reading.gpu_util >= 0.0:  # -1 or NaN: unknown
        return NEUTRAL
    return 1.0 - min(1.0, reading.gpu_util)
