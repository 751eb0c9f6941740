"""``kv-cache``: free KV cache (a full cache means preemption and recomputation)."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.scorers import NEUTRAL


class KVCacheScorer:
    """``1 - kv_cache`` (a static kind)."""

    name = "kv-cache"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> list[float]:
        return [NEUTRAL if c.kv_cache is None else 1.0 - min(1.0, max(0.0, c.kv_cache)) for c in candidates]

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None
