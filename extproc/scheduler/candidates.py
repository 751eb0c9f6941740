"""What the plugins read: one ``Candidate`` per endpoint, judged once per plan, and the plan's context.

The rule every plugin keeps: load data that is missing or old is never a reason to fail a request.
A candidate without a trusted reading has ``waiting``/``running``/``kv_cache`` None (unknown) and is
not ``saturated``: no data is not evidence of overload.
"""

from __future__ import annotations

from extproc.routing_view import EndpointView, PriorityView, Reading, ScoringView

# How far a replica's reading can be trusted, best last.
UNREACHABLE = 0  # its last scrape failed
UNKNOWN = 1  # no reading yet, or the reading is stale: neither good nor bad news
TRUSTED = 2  # reachable and fresh


class Candidate:
    """One endpoint with its reading, judged once per plan."""

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
    """What plugins may read at plan time; ``total``/``saturated`` are summed by ``CountSaturation``."""

    __slots__ = ("scoring", "priority", "now", "total", "saturated")

    def __init__(self, scoring: ScoringView, priority: PriorityView, now: float):
        self.scoring = scoring
        self.priority = priority
        self.now = now
        self.total = 0
        self.saturated = 0
