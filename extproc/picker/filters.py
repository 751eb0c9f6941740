"""Filter plugins: each narrows the candidate endpoints of one model version.

The shape is the Gateway API Inference Extension scheduler's: small filters, then weighted
scorers, composed by a profile. Filters depend only on the routing table and the load readings,
never on per-request state, so the profile runs them once per (load report, model, priority) and
the per-request path only scores what is left (see ``profile.py``).

A filter is any callable ``(ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]``.
It receives the candidates of ONE model version (Envoy's weighted_clusters chooses the version, so
every version needs its own ranked hosts) and may return the same list or a new one. The rule all
of them keep: load data that is missing or old is never a reason to fail a request; a filter that
would drop everyone for lack of data keeps everyone instead.
"""

from __future__ import annotations

from extproc.routing_view import EndpointView, PriorityView, Reading, ScoringView

# How far a replica's reading can be trusted, best last.
UNREACHABLE = 0  # its last scrape failed
UNKNOWN = 1  # no reading yet, or the reading is stale: neither good nor bad news
TRUSTED = 2  # reachable and fresh


class Candidate:
    """One endpoint with its reading, judged once per plan.

    For an untrusted reading ``waiting``/``running``/``kv_cache`` are None (unknown) and
    ``saturated`` is False: no data is not evidence of overload.
    """

    __slots__ = (
        "endpoint",
        "address",
        "tier",
        "reading",
        "health",
        "saturated",
        "waiting",
        "running",
        "kv_cache",
        "fresh_until",
    )
    waiting: float | None
    running: float | None
    kv_cache: float | None

    def __init__(self, endpoint: EndpointView, reading: Reading | None, scoring: ScoringView, now: float):
        self.endpoint = endpoint
        self.address = endpoint.address
        self.tier = endpoint.tier
        self.reading = reading
        self.fresh_until = float("inf")  # when a trusted reading stops being trusted
        if reading is None:
            health = UNKNOWN
        elif not reading.reachable:
            health = UNREACHABLE
        else:
            fresh_until = reading.scraped_at + scoring.stale_after_s
            if now <= fresh_until:
                health = TRUSTED
                self.fresh_until = fresh_until
            else:
                health = UNKNOWN
        self.health = health
        if health == TRUSTED and reading is not None:  # TRUSTED implies a reading; mypy cannot tell
            # Clamped: a negative or NaN gauge must not yield a zero denominator or a NaN score
            # (max(0.0, nan) is 0.0).
            self.waiting = waiting = max(0.0, reading.waiting)
            self.running = running = max(0.0, reading.running)
            self.kv_cache = kv = min(1.0, max(0.0, reading.kv_cache))
            limit = endpoint.max_concurrency
            self.saturated = (
                waiting >= scoring.saturation_queue
                or kv >= scoring.saturation_kv
                or (limit > 0 and waiting + running >= limit)
            )
        else:
            self.waiting = self.running = self.kv_cache = None
            self.saturated = False

    def __repr__(self) -> str:
        return (
            f"Candidate({self.address}, tier={self.tier!r}, health={self.health}, saturated={self.saturated}, "
            f"waiting={self.waiting}, kv={self.kv_cache})"
        )


class FilterContext:
    """What filters may read; ``total``/``saturated`` are summed by ``CountSaturation``."""

    __slots__ = ("scoring", "priority", "now", "total", "saturated")

    def __init__(self, scoring: ScoringView, priority: PriorityView, now: float):
        self.scoring = scoring
        self.priority = priority
        self.now = now
        self.total = 0
        self.saturated = 0


class DropDrained:
    """A drained endpoint receives no new requests, ever: no fallback keeps it."""

    name = "drop-drained"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        for c in candidates:
            if c.endpoint.drained:
                return [c for c in candidates if not c.endpoint.drained]
        return candidates


class PreferTiers:
    """The priority class's preferred tiers, in order.

    Keeps the endpoints of the first preferred tier that has a usable endpoint: one as well known
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


class PreferFresh:
    """Drop unreachable and stale endpoints when better-known ones exist.

    Levels: trusted (reachable, fresh) > unknown (no reading, or stale) > unreachable. Keeps the
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


class CountSaturation:
    """Not a filter but the shed point: counts the candidates and the saturated ones here, after
    tier preference, for the profile's shed decision (summed over the model's versions)."""

    name = "count-saturation"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        ctx.total += len(candidates)
        ctx.saturated += sum(1 for c in candidates if c.saturated)
        return candidates


class DropSaturated:
    """Drop saturated endpoints (queue >= saturation_queue or KV >= saturation_kv, or at their
    max_concurrency) while an unsaturated one remains; when all are saturated keep them all (a
    class that is not shed is still served, on the least loaded)."""

    name = "drop-saturated"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        kept = [c for c in candidates if not c.saturated]
        return kept if kept else candidates


def default_filters() -> tuple:
    """drained -> tier preference -> freshness -> (shed point) -> saturation."""
    return (DropDrained(), PreferTiers(), PreferFresh(), CountSaturation(), DropSaturated())
