"""``prefer-fresh``: drop unreachable and stale endpoints when better-known ones exist."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext


class PreferFresh:
    """Levels: trusted (reachable, fresh) > unknown (no reading, or stale) > unreachable. Keeps the
    best level present, so a version whose readings are all old is still routed (on in-flight
    counts and rotation), never refused for lack of data.
    """

    name = "prefer-fresh"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return candidates
        best = max(c.health for c in candidates)
        for c in candidates:
            if c.health != best:
                return [c for c in candidates if c.health == best]
        return candidates
