"""``lora-affinity``: send a LoRA adapter's requests where that adapter is active, else where one fits.

vLLM serves an adapter in a batch only while the batch holds fewer than ``max_loras`` distinct
adapters; a request for another one waits for a slot, and an adapter new to a replica is loaded
first (docs/contracts.md has the metric it reports). The load readings say which adapters have
running or waiting requests on each replica (``Reading.adapters``) and how many one batch may hold
(``Reading.max_adapters``).
"""

from __future__ import annotations

from collections.abc import Mapping

from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.interfaces import RequestTerm, SchedulingRequest
from extproc.scheduler.scorers import NEUTRAL

ACTIVE = 1.0  # the adapter is in the replica's batch or queue already: no load, no slot taken
FREE_SLOT = 0.5  # room for one more adapter: served after a load, without waiting for a slot
# A replica whose adapters fill its slots scores 0: the request would wait for a slot.
MAX_MEMO = 256  # adapters whose scores one plan keeps


class LoraAffinityScorer:
    """A request scorer: for a request naming an adapter, ``ACTIVE`` where it is active,
    ``FREE_SLOT`` where ``len(adapters) < max_adapters``, 0 elsewhere (candidates without a trusted
    reading: ``NEUTRAL``). Requests without an adapter get nothing from it, and neither does a plan
    whose replicas report no LoRA information (the scorer abstains: no term at all). As an
    affinity, its term is discounted by the work outstanding at each replica (``discounted``): an
    active adapter wins a replica the requests only while it is not much busier than its peers."""

    name = "lora-affinity"
    discounted = True  # an affinity: the profile discounts the term by the work outstanding

    def __init__(self, weight: float):
        self.weight = weight

    def static(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def inflight(self, ctx: FilterContext, candidates: list[Candidate]) -> None:
        return None

    def request(self, ctx: FilterContext, candidates: list[Candidate]) -> RequestTerm | None:
        active: dict[str, list[str]] = {}  # adapter -> addresses where it is active
        base: dict[str, float] = {}  # the score of every candidate for an adapter active nowhere
        informed = False
        for c in candidates:
            reading = c.reading
            if c.waiting is None or reading is None:  # not trusted: unknown, neither good nor bad
                base[c.address] = NEUTRAL
                continue
            if not reading.max_adapters and not reading.adapters:
                continue  # no LoRA information: this replica scores 0
            informed = True
            for adapter in reading.adapters:
                active.setdefault(adapter, []).append(c.address)
            if len(reading.adapters) < reading.max_adapters:
                base[c.address] = FREE_SLOT
        if not informed:
            return None
        return _Term(active, base)


class _Term:
    """The per-request half: a few lookups, the scores of each adapter built once per plan."""

    __slots__ = ("active", "base", "memo")

    def __init__(self, active: dict[str, list[str]], base: dict[str, float]):
        self.active = active
        self.base = base
        self.memo: dict[str, Mapping[str, float]] = {}

    def __call__(self, request: SchedulingRequest) -> Mapping[str, float] | None:
        adapter = request.adapter
        if adapter is None:
            return None
        scores = self.memo.get(adapter)
        if scores is None:
            where = self.active.get(adapter)
            scores = self.base if where is None else {**self.base, **dict.fromkeys(where, ACTIVE)}
            if len(self.memo) < MAX_MEMO:
                self.memo[adapter] = scores
        return scores
