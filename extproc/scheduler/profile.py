"""The scheduler profile: filters, a shed decision, weighted scorers and a selector, composed.

Work is split by what it depends on:

* ``SchedulerProfile.plan`` (once per routing table x load report x model x priority x pinned
  version, and again when a trusted reading turns stale): runs the filters on each routed
  version's endpoints, decides shed / no capacity, and compiles each survivor into a flat tuple
  ``(address, idle, a1, d1, a2, d2)``: its score with ``n`` requests in flight is
  ``a1/(d1+n) + a2/(d2+n)`` (queue and headroom over the outstanding work, and in-flight). Request
  scorers leave a per-request term beside them. Each plugin's time here is reported to a timer;
* ``SchedulerProfile.rank`` (per request): rotates each version's entries by the turn, adds the
  request scorers' terms when there are any (an affinity's discounted by the work outstanding, as
  static scores are), and lets the selector keep the best few per version.

Profiles come from the routing table's ``scheduling`` (``build_profile``, plugins by registry name)
or, without one, are today's (``default_profile``, weights from the table's ``scoring``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

from extproc.routing_view import LoadView, ModelView, PriorityView, ProfileView, RoutingView, ScoringView, VersionView
from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.interfaces import (
    Filter,
    PluginTimer,
    PromptScorer,
    RequestScorer,
    RequestTerm,
    SchedulingRequest,
    Scorer,
    Selector,
)
from extproc.scheduler.registry import DEFAULT_FILTERS, make_filter, make_scorer
from extproc.scheduler.results import NoCapacity, Pick, Refusal, Shed
from extproc.scheduler.selection import MaxScore

INF = math.inf
DEFAULT_HOSTS_PER_VERSION = 3
DEFAULT_RUNNING_WEIGHT = 1.0  # the running batch's weight in the default profile (not in `scoring:`)
# LoRA adapter affinity's, likewise: an active adapter against a free slot is worth about one request in
# flight. A request scorer: requests without an adapter, and replicas without LoRA, get nothing from it.
DEFAULT_LORA_AFFINITY_WEIGHT = 2.0

_clock = time.perf_counter_ns


class Group:
    """One version's compiled candidates, and its request scorers' terms with what discounts the
    discounted ones: ``scale`` (S, saturation_queue) and ``backlog`` (address -> S + waiting)."""

    __slots__ = ("version", "cluster", "share", "entries", "entries2", "size", "extended", "terms", "scale", "backlog")

    def __init__(
        self,
        version: VersionView,
        share: float,
        entries: tuple,
        terms: tuple[tuple[float, RequestTerm, bool], ...] = (),
        scale: float = 1.0,
        backlog: Mapping[str, float] | None = None,
    ):
        self.extended = len(entries[0]) > 6  # more than two in-flight terms
        self.version = version.name
        self.cluster = version.cluster
        self.share = share
        self.entries = entries
        self.entries2 = entries + entries  # a rotation is one slice, no modulo per element
        self.size = len(entries)
        self.terms = terms  # (weight, term, discounted) per request scorer that had something to prepare
        self.scale = scale
        self.backlog: Mapping[str, float] = backlog or {}


class Plan:
    """What a (model, priority, pinned version) resolves to under the current load: either a
    ``refusal`` or the compiled ``groups``, ranked by ``profile``. Valid until ``expires_at``
    (monotonic)."""

    __slots__ = (
        "model",
        "profile",
        "refusal",
        "groups",
        "version",
        "cluster",
        "pinned",
        "min_window",
        "expires_at",
    )

    def __init__(self, model: str, expires_at: float, profile: SchedulerProfile | None = None):
        self.model = model
        self.profile = profile  # the profile that built it, which ranks it; None for a refusal made elsewhere
        self.refusal: Refusal | None = None
        self.groups: tuple[Group, ...] = ()
        self.version: str | None = None  # the version the servicer must route to, if one
        self.cluster: str | None = None
        self.pinned = False  # pinned by the request itself (KServe path)
        self.min_window = INF  # smallest known context window among the groups' versions
        self.expires_at = expires_at

    def __repr__(self) -> str:
        if self.refusal is not None:
            return f"Plan({self.model!r}, {self.refusal!r})"
        return f"Plan({self.model!r}, groups={[(g.version, [e[0] for e in g.entries]) for g in self.groups]})"


class SchedulerProfile:
    """Filters (run per version at plan time), weighted scorers and a selector.

    ``filters``: ``interfaces.Filter``s, in order; the shed decision uses the counts a
    ``count-saturation`` among them collected. ``scorers``: ``interfaces.Scorer``s (those with
    weight 0 are left out); a ``RequestScorer`` among them also rates each request, and a
    ``PromptScorer`` (``prompt_scorer``, at most one) needs the request's prompt for that.
    """

    __slots__ = ("filters", "scorers", "hosts_per_version", "selector", "prompt_scorer", "_request_scorers")

    def __init__(
        self,
        filters: Sequence[Filter],
        scorers: Sequence[Scorer],
        hosts_per_version: int = DEFAULT_HOSTS_PER_VERSION,
        selector: Selector | None = None,
    ):
        if hosts_per_version < 1:
            raise ValueError("hosts_per_version must be at least 1")
        self.filters = tuple(filters)
        self.scorers = tuple(s for s in scorers if s.weight > 0)
        self.hosts_per_version = hosts_per_version
        self.selector: Selector = selector if selector is not None else MaxScore()
        self._request_scorers = tuple(s if isinstance(s, RequestScorer) else None for s in self.scorers)
        prompt_scorers = [s for s in self.scorers if isinstance(s, PromptScorer)]
        if len(prompt_scorers) > 1:
            raise ValueError(f"a profile takes one prompt scorer, got {[s.name for s in prompt_scorers]}")
        self.prompt_scorer: PromptScorer | None = prompt_scorers[0] if prompt_scorers else None

    @property
    def needs_prompt(self) -> bool:
        """Whether ranking uses the request's prompt: the servicer reads the body only then."""
        return self.prompt_scorer is not None

    def __repr__(self) -> str:
        scorers = ", ".join(f"{s.name}={s.weight:g}" for s in self.scorers)
        return f"SchedulerProfile(filters={[f.name for f in self.filters]}, scorers=[{scorers}])"

    # -- plan time -------------------------------------------------------------------------

    def plan(
        self,
        routing: RoutingView,
        load: LoadView | None,
        model: ModelView,
        priority: PriorityView,
        version: VersionView | None,
        now: float,
        timer: PluginTimer | None = None,
    ) -> Plan:
        filter_ns = [0] * len(self.filters)
        scorer_ns = [0] * len(self.scorers)
        plan = self._plan(routing, load, model, priority, version, now, filter_ns, scorer_ns)
        if timer is not None:
            for f, ns in zip(self.filters, filter_ns, strict=True):
                timer.plugin_time(f.name, "filter", ns * 1e-9)
            if plan.groups:  # the scorers ran
                for s, ns in zip(self.scorers, scorer_ns, strict=True):
                    timer.plugin_time(s.name, "scorer", ns * 1e-9)
        return plan

    def _plan(
        self,
        routing: RoutingView,
        load: LoadView | None,
        model: ModelView,
        priority: PriorityView,
        version: VersionView | None,
        now: float,
        filter_ns: list[int],
        scorer_ns: list[int],
    ) -> Plan:
        scoring = routing.scoring
        ctx = FilterContext(scoring, priority, now)
        readings = load.readings if load is not None else {}
        scope = (version,) if version is not None else model.routed
        expires = INF
        filtered: list[tuple[VersionView, list[Candidate]]] = []
        for v in scope:
            candidates = [Candidate(e, readings.get(e.address), scoring, now) for e in v.endpoints]
            for c in candidates:
                if c.fresh_until < expires:
                    expires = c.fresh_until
            for i, f in enumerate(self.filters):
                started = _clock()
                candidates = f(ctx, candidates)
                filter_ns[i] += _clock() - started
            filtered.append((v, candidates))

        plan = Plan(model.name, expires, self)
        plan.pinned = version is not None
        routable = [(v, c) for v, c in filtered if c]
        where = f"model {model.name!r}" + (f" version {version.name!r}" if version is not None else "")
        if not routable:
            plan.refusal = NoCapacity(f"no ready replica for {where}; retry later")
            return plan
        threshold = priority.shed_threshold
        if threshold > 0 and ctx.total and ctx.saturated / ctx.total >= threshold:
            plan.refusal = Shed(
                f"{where} is overloaded ({ctx.saturated} of {ctx.total} replicas saturated); "
                f"priority {priority.name!r} requests are shed, retry later"
            )
            return plan
        if version is not None:
            plan.version, plan.cluster = version.name, version.cluster
        elif len(routable) < len(filtered):
            # Some routed version has nowhere to go: Envoy's split would send its share to a
            # cluster with no usable host. Pin the heaviest version that has one.
            v = routable[0][0]
            routable = routable[:1]
            plan.version, plan.cluster = v.name, v.cluster
        total_weight = sum(v.weight for v, _ in routable) or 1
        groups = []
        for v, candidates in routable:
            share = 1.0 if plan.version is not None else v.weight / total_weight
            entries, terms = self._compile(ctx, candidates, scorer_ns)
            scale = routing.scoring.saturation_queue
            discounts = any(discounted for _, _, discounted in terms)
            backlog = {c.address: scale + (c.waiting or 0.0) for c in candidates} if discounts else None
            groups.append(Group(v, share, entries, terms, scale, backlog))
            if v.context_window and v.context_window < plan.min_window:
                plan.min_window = v.context_window
        plan.groups = tuple(groups)
        return plan

    def _compile(
        self, ctx: FilterContext, candidates: list[Candidate], scorer_ns: list[int]
    ) -> tuple[tuple, tuple[tuple[float, RequestTerm, bool], ...]]:
        """Each candidate becomes ``(address, idle, a1, d1, a2, d2[, more])``: its score with ``n``
        requests in flight is ``a1/(d1+n) + a2/(d2+n) (+ the same over more)``, and ``idle`` is that
        score at n = 0 (most endpoints have nothing in flight: no division then).

        Static scores are discounted by ``S/(S + waiting + n)`` (S: saturation_queue), the queue
        scorer's own shape: a replica's headroom counts less the more work is outstanding there,
        queued or sent since the reading. Without the discount an idle replica's KV advantage would
        never be used up and it would take every request until the next report. Terms with the
        same denominator are merged, so the default profile needs two: ``S + waiting`` (queue and
        headroom) and ``C`` (in-flight). Request scorers' terms come back beside the entries; rank
        discounts those of affinity scorers (``discounted``) the same way, for the same reason: a
        replica holding a request's prefix or adapter would otherwise take every such request until
        the next report.
        """
        count = len(candidates)
        static = [0.0] * count
        terms: list[dict[float, float]] = [{} for _ in range(count)]  # denominator -> numerator
        request_terms: list[tuple[float, RequestTerm, bool]] = []
        for j, scorer in enumerate(self.scorers):
            started = _clock()
            w = scorer.weight
            scores = scorer.static(ctx, candidates)
            if scores is not None:
                for i, s in enumerate(scores):
                    static[i] += w * s
            pairs = scorer.inflight(ctx, candidates)
            if pairs is not None:
                for i, (scale, base) in enumerate(pairs):
                    d = scale + base
                    t = terms[i]
                    t[d] = t.get(d, 0.0) + w * scale
            request_scorer = self._request_scorers[j]
            if request_scorer is not None:
                term = request_scorer.request(ctx, candidates)
                if term is not None:
                    request_terms.append((w, term, getattr(request_scorer, "discounted", False)))
            scorer_ns[j] += _clock() - started
        scoring = ctx.scoring
        entries = []
        widest = 0
        for i, c in enumerate(candidates):
            t = terms[i]
            if static[i]:
                scale = scoring.saturation_queue
                d = scale + (c.waiting or 0.0)
                t[d] = t.get(d, 0.0) + static[i] * scale
            merged = [(a, d) for d, a in t.items() if a]
            widest = max(widest, len(merged))
            entries.append((c.address, merged))
        padding = [(0.0, 1.0), (0.0, 1.0)]
        out: list[tuple] = []  # (address, idle, a1, d1, a2, d2[, more pairs])
        for address, merged in entries:
            idle = sum(a / d for a, d in merged)  # the score with nothing in flight
            (a1, d1), (a2, d2) = (merged + padding)[:2]
            if widest <= 2:
                out.append((address, idle, a1, d1, a2, d2))
            else:
                # More than two distinct denominators: the rest ride in a tuple the selector walks
                # (slower; no built-in profile needs it).
                out.append((address, idle, a1, d1, a2, d2, tuple(merged[2:])))
        return tuple(out), tuple(request_terms)

    # -- request time ----------------------------------------------------------------------

    def rank(
        self, plan: Plan, inflight: Mapping[str, float], turn: int, request: SchedulingRequest | None = None
    ) -> Pick:
        select = self.selector.select
        k = self.hosts_per_version
        ranked: list[list[str]] = []
        by_version: dict[str, str] = {}
        primaries = []
        for g in plan.groups:
            size = g.size
            off = turn % size
            seq = g.entries2[off : off + size] if off else g.entries
            bonus = _bonus(g, request, inflight) if g.terms and request is not None else None
            top = select(seq, inflight, k, bonus)
            by_version[g.version] = top[0]
            primaries.append((top[0], g.share))
            ranked.append(top)
        if len(ranked) == 1:
            hosts = tuple(ranked[0])
        else:
            # Interleave by rank: every version's best, then every version's second...
            interleaved = []
            for i in range(k):
                for top in ranked:
                    if i < len(top):
                        interleaved.append(top[i])
            hosts = tuple(interleaved)
        return Pick(plan.model, hosts, by_version, tuple(primaries), plan.version, plan.cluster)


def _bonus(group: Group, request: SchedulingRequest, inflight: Mapping[str, float]) -> dict[str, float] | None:
    """address -> the request scorers' weighted sum for this request, the ``discounted`` ones'
    times ``S / (S + waiting + n)`` as static scores are; None when none rated anyone."""
    bonus: dict[str, float] = {}
    scale, backlog, get = group.scale, group.backlog, inflight.get
    for weight, term, discounted in group.terms:
        scores = term(request)
        if not scores:
            continue
        for address, s in scores.items():
            value = weight * s
            if discounted:
                value *= scale / (backlog.get(address, scale) + get(address, 0.0))
            bonus[address] = bonus.get(address, 0.0) + value
    return bonus or None


# ----------------------------------------------------------------------------- composition


def default_filters() -> tuple[Filter, ...]:
    """drained -> tier preference -> freshness -> (shed point) -> saturation."""
    return tuple(make_filter(name) for name in DEFAULT_FILTERS)


def default_scorers(scoring: ScoringView, running_weight: float = DEFAULT_RUNNING_WEIGHT) -> tuple[Scorer, ...]:
    """Queue (with in-flight added), KV cache, in-flight, running batch and recent latency, with the
    table's ``scoring`` weights (the running batch at ``running_weight``), and LoRA adapter affinity
    (it rates only requests that name an adapter)."""
    weights = {
        "queue": scoring.queue_weight,
        "kv-cache": scoring.kv_cache_weight,
        "inflight": scoring.inflight_weight,
        "running": running_weight,
        "latency": scoring.latency_weight,
        "lora-affinity": DEFAULT_LORA_AFFINITY_WEIGHT,
    }
    return tuple(make_scorer(name, weight) for name, weight in weights.items())


def default_profile(
    scoring: ScoringView,
    *,
    running_weight: float = DEFAULT_RUNNING_WEIGHT,
    hosts_per_version: int = DEFAULT_HOSTS_PER_VERSION,
) -> SchedulerProfile:
    """Today's profile: ``default_filters`` and ``default_scorers``."""
    return SchedulerProfile(default_filters(), default_scorers(scoring, running_weight), hosts_per_version)


def build_profile(view: ProfileView, scoring: ScoringView) -> SchedulerProfile:
    """The profile a routing table's ``scheduling`` names; an empty list stands for the default one
    (``scheduling:`` given without ``scorers`` keeps the ``scoring:`` weights). Raises
    ``registry.UnknownPlugin`` for a name this process lacks, TypeError for parameters a plugin
    does not take."""
    filters = tuple(make_filter(name) for name in view.filters) if view.filters else default_filters()
    if view.scorers:
        scorers = tuple(make_scorer(ref.type, ref.weight, dict(ref.params)) for ref in view.scorers)
    else:
        scorers = default_scorers(scoring)
    return SchedulerProfile(filters, scorers)
