"""``ttft``: the time each candidate would make this request wait for its first token, in seconds.

One unit weighs what the other scorers weigh with hand-tuned weights (queue against speed, prefix
overlap against load)::

    estimate = (queued prefill tokens + this request's uncached prompt tokens) / prefill rate
               + the wait for a batch slot + one decode step

* **prefill rate**: prompt tokens computed per second of prefill, measured per replica from its
  prefill histograms between scrapes (``Reading.prefill_tokens_per_s``);
* **queued prefill tokens**: the requests waiting there times that replica's recent mean prompt
  (``waiting x Reading.prefill_tokens_mean``: no engine exports the tokens it has queued), plus one
  typical request for each request this process sent there since the reading (in flight);
* **this request's uncached tokens**: its prompt (``SchedulingRequest.tokens``) less what the
  replica probably caches of it (``overlap``: the profile's prefix-affinity index, when the profile
  has one; else 0). With
  no request to read, a typical one: the mean prompt of the version's replicas;
* **the wait for a batch slot** (``slot_wait``): when the requests there (waiting + running + in
  flight) fill its slots (``Reading.slots``, vLLM's ``max_num_seqs``), one slot frees every
  ``latency_s / slots`` (``Reading.latency_s``, the recent mean request time): the queue relative to
  what the replica runs at once and how fast, not its absolute length. 0 when the replica does not
  export its slots;
* **one decode step** (``Reading.decode_step_s``, the time per output token): the step that
  prefills the request also decodes the running batch, which a bigger batch makes longer. The
  batch's remaining tokens do not delay the first token (continuous batching admits between
  steps), so it is one step at the current batch, not ``running x step``.

Score: ``fastest estimate / estimate``, 1 for the fastest candidate and falling. A candidate whose
prefill rate is not measured yet (or whose reading is not trusted) scores neutral, 0.5.

Two halves, by what they depend on (docs/scheduler.md):

* ``inflight`` (per plan): the estimate for a typical request, in the in-flight shape: with ``n``
  requests sent since the reading, ``T*/(T + n x)`` (x: one typical request's prefill there) is
  ``scale / (scale + base + n)`` with ``scale = T*/x`` and ``base = (T - T*)/x`` (x also holds the
  request's share of a slot, ``latency_s / slots``);
* ``request`` (per request, when the request says how long its prompt is or what is cached where):
  the change from the typical request's score to this request's, at no requests in flight. Within
  a version a constant changes no ranking, so the changes are shifted to be >= 0 (sparse: the
  lowest gets nothing); the sum ranks as the exact estimate does while nothing is in flight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from extproc.scheduler.candidates import TRUSTED, Candidate, FilterContext
from extproc.scheduler.interfaces import CachedTokens, RequestTerm, SchedulingRequest
from extproc.scheduler.scorers import NEUTRAL

# vLLM computes at least the prompt's last token however much of it is cached.
MIN_UNCACHED_TOKENS = 1.0


class _Estimate(NamedTuple):
    """One measured candidate's estimate, less this request's own prefill."""

    wait_s: float  # the queued prefill ahead of it, the wait for a batch slot, and one decode step
    s_per_token: float  # 1 / prefill rate
    slot_s: float  # what one more request adds to the wait for a slot: latency / slots (0: unknown)


def slot_wait(waiting: float, running: float, slots: float, latency_s: float) -> tuple[float, float]:
    """(seconds until a batch slot frees for one more request, seconds each further request adds).

    A replica finishes about ``slots`` requests per ``latency_s`` with its batch full, so a slot frees
    every ``latency_s / slots``; a request waits for one when the work there (waiting + running)
    already fills the slots. Absolute counts miss this: two queued requests on a replica with two
    slots are a whole request's time, on one with eight a quarter of one. (0, 0) when the replica
    does not say its slots or no latency is measured yet."""
    if slots <= 0.0 or latency_s <= 0.0:
        return 0.0, 0.0
    per_slot_s = latency_s / slots
    return max(0.0, waiting + running + 1.0 - slots) * per_slot_s, per_slot_s


class _Version:
    """The plan-time half of the model for one version's candidates."""

    __slots__ = ("estimates", "typical_tokens", "fastest_s")

    def __init__(self, candidates: Sequence[Candidate]):
        readings = [c.reading if c.health == TRUSTED else None for c in candidates]
        measured = [r for r in readings if r is not None and r.prefill_tokens_per_s > 0.0]
        means = [r.prefill_tokens_mean for r in measured if r.prefill_tokens_mean > 0.0]
        # The request the plan ranks for: the version's mean prompt (a request's size is a property
        # of the request, so the same on every candidate).
        self.typical_tokens = max(MIN_UNCACHED_TOKENS, sum(means) / len(means) if means else 0.0)
        estimates: list[_Estimate | None] = []
        for c, r in zip(candidates, readings, strict=True):
            if r is None or r.prefill_tokens_per_s <= 0.0 or c.waiting is None:
                estimates.append(None)
                continue
            s_per_token = 1.0 / r.prefill_tokens_per_s
            queued = c.waiting * (r.prefill_tokens_mean if r.prefill_tokens_mean > 0.0 else self.typical_tokens)
            slot_s, per_slot_s = slot_wait(c.waiting, max(0.0, r.running), r.slots, r.latency_s)
            wait_s = queued * s_per_token + slot_s + max(0.0, r.decode_step_s)
            estimates.append(_Estimate(wait_s, s_per_token, per_slot_s))
        self.estimates = estimates
        typical = [self.typical_s(e) for e in estimates if e is not None]
        self.fastest_s = min(typical) if typical else 0.0  # 0: nothing measured

    def typical_s(self, e: _Estimate) -> float:
        return e.wait_s + self.typical_tokens * e.s_per_token


class TTFTScorer:
    """``fastest estimate / estimate`` of the time to first token (an in-flight kind and a
    request scorer; see the module docstring)."""

    name = "ttft"

    def __init__(self, weight: float, overlap: CachedTokens | None = None):
        self.weight = weight
        # Prefix overlap (interfaces.CacheAware): the Picker sets it to the profile's prompt
        # scorer's when the profile has one; None counts no overlap.
        self.overlap = overlap

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> list[tuple[float, float]]:
        # Neutral in the in-flight shape: NEUTRAL with nothing in flight, falling as requests are sent.
        scale = ctx.scoring.saturation_queue
        neutral = (scale, scale * (1.0 / NEUTRAL - 1.0))
        version = _Version(candidates)
        fastest = version.fastest_s
        pairs = []
        for e in version.estimates:
            if e is None:
                pairs.append(neutral)
                continue
            # What one more request adds: its prefill, and its share of a batch slot.
            per_request_s = version.typical_tokens * e.s_per_token + e.slot_s
            pairs.append((fastest / per_request_s, (version.typical_s(e) - fastest) / per_request_s))
        return pairs

    def request(self, ctx: FilterContext, candidates: list[Candidate]) -> RequestTerm | None:
        version = _Version(candidates)
        if not version.fastest_s:
            return None  # nothing measured: every candidate is neutral, whatever the request
        # (address, estimate, the plan's score: the typical request's); an unmeasured candidate's
        # score does not change with the request.
        entries = [
            (c.address, e, 0.0 if e is None else version.fastest_s / version.typical_s(e))
            for c, e in zip(candidates, version.estimates, strict=True)
        ]
        addresses = tuple(c.address for c in candidates)
        typical_tokens = version.typical_tokens
        overlap = self.overlap

        def term(request: SchedulingRequest) -> dict[str, float] | None:
            cached = overlap(request, addresses) if overlap is not None and request.prefix_hashes else {}
            if request.tokens <= 0 and not cached:
                return None  # nothing beyond the typical request the plan ranked for
            prompt = request.tokens if request.tokens > 0 else typical_tokens
            times = {
                address: e.wait_s + max(MIN_UNCACHED_TOKENS, prompt - cached.get(address, 0)) * e.s_per_token
                for address, e, _ in entries
                if e is not None
            }
            fastest = min(times.values())
            changes = {
                address: 0.0 if e is None else fastest / times[address] - planned for address, e, planned in entries
            }
            floor = min(changes.values())
            return {address: min(1.0, change - floor) for address, change in changes.items() if change > floor}

        return term
