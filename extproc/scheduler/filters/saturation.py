"""``count-saturation`` (the shed point) and ``drop-saturated``.

A replica is saturated when its queue reaches ``saturation_queue``, its KV cache ``saturation_kv``,
or its queue plus batch its ``max_concurrency`` (``Candidate``). Both filters read that one verdict.
"""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext


class CountSaturation:
    """Not a filter but the shed point: counts the candidates and the saturated ones here, for the
    profile's shed decision (summed over the model's versions). Where it stands in the chain decides
    what is counted: after tier preference in the default profile. Without it nothing is shed."""

    name = "count-saturation"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        ctx.total += len(candidates)
        ctx.saturated += sum(1 for c in candidates if c.saturated)
        return candidates


class DropSaturated:
    """Drop saturated endpoints while an unsaturated one remains; when all are saturated keep them
    all (a class that is not shed is still served, on the least loaded)."""

    name = "drop-saturated"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        kept = [c for c in candidates if not c.saturated]
        return kept if kept else candidates
