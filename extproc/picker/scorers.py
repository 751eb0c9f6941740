"""Scorer plugins: each rates the candidates of one version 0..1, higher is better.

A profile sums ``weight * score``. Scores come in two kinds, so that the per-request path does
almost nothing:

* a *static* score depends only on the load readings; it is computed once per plan (load report)
  by ``static(ctx, candidates) -> list[float]``. The profile discounts it by
  ``S / (S + waiting + n)`` (S: saturation_queue): the headroom a reading showed is used up by the
  work outstanding there, queued or sent since the reading;
* an *in-flight* score also depends on ``n``, the requests this ext_proc process sent to the
  endpoint since the last reading (the servicer's in-flight mapping). It always has the shape
  ``scale / (scale + base + n)``: 1 for an idle endpoint, falling smoothly with load, never
  flat. ``inflight(ctx, candidates)`` returns one ``(scale, base)`` pair per candidate, once per
  plan; the profile evaluates the formula per request. That shape is what lets a pick cost a dict
  lookup and two divisions per endpoint.

A scorer returns None from the method of the kind it is not.

Unknown readings (no data, stale) are scored neutrally, never as idle nor as loaded: a version's
candidates all share one health level after ``PreferFresh``, so only the in-flight terms and the
rotation separate them then.
"""

from __future__ import annotations

from extproc.picker.filters import Candidate, FilterContext

NEUTRAL = 0.5


class QueueScorer:
    """Queue depth: ``S / (S + waiting + n)`` with S = saturation_queue.

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


class KVCacheScorer:
    """Free KV cache: ``1 - kv_cache`` (a full cache means preemption and recomputation)."""

    name = "kv-cache"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> list[float]:
        return [NEUTRAL if c.kv_cache is None else 1.0 - min(1.0, max(0.0, c.kv_cache)) for c in candidates]

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None


class LatencyScorer:
    """Recent mean latency relative to the fastest candidate: ``fastest / latency``.

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


def decay_scale(candidate: Candidate, scoring) -> float:
    """C, the in-flight count at which the in-flight score has halved: the replica's
    ``max_concurrency`` when known, else ``saturation_queue``."""
    return float(candidate.endpoint.max_concurrency) or scoring.saturation_queue


class InflightScorer:
    """Requests this process has in flight to the endpoint: ``C / (C + n)`` (C: ``decay_scale``)."""

    name = "inflight"

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> list[tuple[float, float]]:
        scoring = ctx.scoring
        return [(decay_scale(c, scoring), 0.0) for c in candidates]


class RunningScorer:
    """Running batch size, relative to the busiest candidate: ``1 - running / (max + S)``.

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
