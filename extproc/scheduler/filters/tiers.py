"""``prefer-tiers``: the priority class's preferred pool tiers, in order."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext


class PreferTiers:
    """Keeps the endpoints of the first preferred tier that has a usable endpoint: one as well known
    as the best of the version (same health level) and not saturated. When no preferred tier has
    one, a class with ``strict_tiers`` keeps every endpoint of its preferred tiers anyway (it never
    goes elsewhere; none at all -> no capacity), and any other class falls back to all tiers.
    """

    name = "prefer-tiers"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        tiers = ctx.priority.preferred_tiers
        if not tiers or not candidates:
            return candidates
        best = max(c.health for c in candidates)
        for tier in tiers:
            for c in candidates:
                if c.tier == tier and c.health == best and not c.saturated:
                    return [c for c in candidates if c.tier == tier]
        if ctx.priority.strict_tiers:
            return [c for c in candidates if c.tier in tiers]
        return candidates
