"""The scheduler profile: filters, a shed decision and weighted scorers, composed.

Work is split by what it depends on:

* ``SchedulerProfile.plan`` (once per routing table x load report x model x priority x pinned
  version, and again when a trusted reading turns stale): runs the filters on each routed
  version's endpoints, decides shed / no capacity, and compiles each survivor into a flat tuple
  ``(address, idle, a1, d1, a2, d2)``: its score with ``n`` requests in flight is
  ``a1/(d1+n) + a2/(d2+n)`` (queue and headroom over the outstanding work, and in-flight);
* ``SchedulerProfile.rank`` (per request): for each candidate one dict lookup for its in-flight
  count ``n`` and ``a1/(d1+n) + a2/(d2+n)`` (``idle`` when nothing is in flight), keeping the
  best few per version. The scan starts at a rotating offset and only a strictly better score
  displaces a kept one, so equal scores take turns instead of always going to the first address.

``Picker`` caches plans for the current (RoutingView, LoadView) pair, keyed by object identity, and
drops the cache when either is replaced; it holds no lock: the worst a race can do is build a plan
twice.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence

from extproc.errors import NO_CAPACITY_RETRY_AFTER_S, SHED_RETRY_AFTER_S, RequestError
from extproc.picker.filters import Candidate, FilterContext, default_filters
from extproc.picker.scorers import InflightScorer, KVCacheScorer, LatencyScorer, QueueScorer, RunningScorer
from extproc.routing_view import LoadView, ModelView, PriorityView, RoutingView, ScoringView, VersionView
from protos.wire import MODEL_NOT_FOUND, SHED_CODE

INF = math.inf
DEFAULT_HOSTS_PER_VERSION = 3

# ----------------------------------------------------------------------------- results


class Pick:
    """Where a request may go.

    ``hosts``: ``ip:port`` ranked best first, the best few of EVERY routed version interleaved by
    rank (Envoy uses the first one that belongs to the cluster its weighted_clusters chose);
    ``header_value`` is them joined for ``dynamic_metadata["envoy.lb"]["x-imesh-endpoint"]``.
    ``primary_by_version``: version name -> its best host. ``primaries``: ``(host, share)`` per
    version, share being the version's fraction of the traffic (for in-flight bookkeeping).
    ``version``/``cluster``: set when the request must go to one version (pinned by the KServe
    path, by the context window, or because the other versions have no routable endpoint): the
    servicer routes it to that cluster. None: Envoy's canary split decides.
    """

    __slots__ = ("model", "hosts", "primary_by_version", "primaries", "version", "cluster")

    def __init__(
        self,
        model: str,
        hosts: tuple[str, ...],
        primary_by_version: dict[str, str],
        primaries: tuple[tuple[str, float], ...],
        version: str | None,
        cluster: str | None,
    ):
        self.model: str = model
        self.hosts: tuple[str, ...] = hosts
        self.primary_by_version: dict[str, str] = primary_by_version
        self.primaries: tuple[tuple[str, float], ...] = primaries
        self.version: str | None = version
        self.cluster: str | None = cluster

    @property
    def primary(self) -> str:
        return self.hosts[0]

    @property
    def header_value(self) -> str:
        return ",".join(self.hosts)

    def __repr__(self) -> str:
        return f"Pick({self.model!r}, hosts={self.hosts}, version={self.version!r})"


class Refusal:
    """A request the mesh answers itself; ``error()`` gives the ``RequestError`` to send."""

    __slots__ = ("reason", "retry_after_s", "_body")
    status = 500
    code = "internal_error"

    def __init__(self, reason: str, retry_after_s: float | None = None):
        self.reason = reason
        self.retry_after_s = retry_after_s
        self._body: bytes | None = None

    def error(self) -> RequestError:
        """A fresh ``RequestError`` (safe to raise); its envelope is rendered once per refusal,
        and a refusal lives as long as its plan, so a shed storm does not re-encode JSON."""
        err = RequestError(self.status, self.code, self.reason, retry_after_s=self.retry_after_s)
        if self._body is None:
            self._body = err.envelope()
        else:
            err._envelope = self._body
        return err

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r})"


class Shed(Refusal):
    """429 with Retry-After: enough candidates are saturated that this priority class waits."""

    __slots__ = ()
    status = 429
    code = SHED_CODE

    def __init__(self, reason: str, retry_after_s: float = SHED_RETRY_AFTER_S):
        super().__init__(reason, retry_after_s)


class NoCapacity(Refusal):
    """503 with Retry-After: no routable endpoint (none, all drained, none in a strict tier)."""

    __slots__ = ()
    status = 503
    code = "no_capacity"

    def __init__(self, reason: str, retry_after_s: float = NO_CAPACITY_RETRY_AFTER_S):
        super().__init__(reason, retry_after_s)


class TooLarge(Refusal):
    """413: the requested tokens exceed the context window of every version that could serve it."""

    __slots__ = ()
    status = 413
    code = "context_length_exceeded"


class NotFound(Refusal):
    """404: no such model, or no such version of it."""

    __slots__ = ()
    status = 404
    code = MODEL_NOT_FOUND


PickResult = Pick | Refusal  # a refusal is a Shed, NoCapacity, TooLarge or NotFound

# ----------------------------------------------------------------------------- plans


class _Group:
    """One version's compiled candidates."""

    __slots__ = ("version", "cluster", "share", "entries", "entries2", "size", "extended")

    def __init__(self, version: VersionView, share: float, entries: tuple):
        self.extended = len(entries[0]) > 6  # more than two in-flight terms
        self.version = version.name
        self.cluster = version.cluster
        self.share = share
        self.entries = entries
        self.entries2 = entries + entries  # a rotation is one slice, no modulo per element
        self.size = len(entries)


class Plan:
    """What a (model, priority, pinned version) resolves to under the current load: either a
    ``refusal`` or the compiled ``groups``. Valid until ``expires_at`` (monotonic)."""

    __slots__ = ("model", "refusal", "groups", "version", "cluster", "pinned", "min_window", "expires_at")

    def __init__(self, model: str, expires_at: float):
        self.model = model
        self.refusal: Refusal | None = None
        self.groups: tuple[_Group, ...] = ()
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
    """Filters (run per version at plan time) and weighted scorers.

    ``filters``: callables ``(FilterContext, list[Candidate]) -> list[Candidate]``, in order; the
    shed decision uses the counts a ``CountSaturation`` among them collected.
    ``scorers``: objects with ``weight`` and ``static``/``inflight`` methods (see ``scorers.py``).
    """

    __slots__ = ("filters", "scorers", "hosts_per_version")

    def __init__(
        self,
        filters: Sequence[Callable],
        scorers: Sequence,
        hosts_per_version: int = DEFAULT_HOSTS_PER_VERSION,
    ):
        if hosts_per_version < 1:
            raise ValueError("hosts_per_version must be at least 1")
        self.filters = tuple(filters)
        self.scorers = tuple(s for s in scorers if s.weight > 0)
        self.hosts_per_version = hosts_per_version

    # -- plan time -------------------------------------------------------------------------

    def plan(
        self,
        routing: RoutingView,
        load: LoadView | None,
        model: ModelView,
        priority: PriorityView,
        version: VersionView | None,
        now: float,
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
            for f in self.filters:
                candidates = f(ctx, candidates)
            filtered.append((v, candidates))

        plan = Plan(model.name, expires)
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
            groups.append(_Group(v, share, self._compile(ctx, candidates)))
            if v.context_window and v.context_window < plan.min_window:
                plan.min_window = v.context_window
        plan.groups = tuple(groups)
        return plan

    def _compile(self, ctx: FilterContext, candidates: list[Candidate]) -> tuple:
        """Each candidate becomes ``(address, idle, a1, d1, a2, d2[, more])``: its score with ``n``
        requests in flight is ``a1/(d1+n) + a2/(d2+n) (+ the same over more)``, and ``idle`` is that
        score at n = 0 (most endpoints have nothing in flight: no division then).

        Static scores are discounted by ``S/(S + waiting + n)`` (S: saturation_queue), the queue
        scorer's own shape: a replica's headroom counts less the more work is outstanding there,
        queued or sent since the reading. Without the discount an idle replica's KV advantage would
        never be used up and it would take every request until the next report. Terms with the
        same denominator are merged, so the default profile needs two: ``S + waiting`` (queue and
        headroom) and ``C`` (in-flight).
        """
        count = len(candidates)
        static = [0.0] * count
        terms: list[dict[float, float]] = [{} for _ in range(count)]  # denominator -> numerator
        for scorer in self.scorers:
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
        scoring = ctx.scoring
        entries = []
        widest = 0
        for i, c in enumerate(candidates):
            t = terms[i]
            if static[i]:
                scale = scoring.saturation_queue
                d = scale + (c.waiting or 0.0)
                t[d] = t.get(d, 0.0) + static[i] * scale
            pairs = [(a, d) for d, a in t.items() if a]
            widest = max(widest, len(pairs))
            entries.append((c.address, pairs))
        padding = [(0.0, 1.0), (0.0, 1.0)]
        out: list[tuple] = []  # (address, idle, a1, d1, a2, d2[, more pairs])
        for address, pairs in entries:
            idle = sum(a / d for a, d in pairs)  # the score with nothing in flight
            (a1, d1), (a2, d2) = (pairs + padding)[:2]
            if widest <= 2:
                out.append((address, idle, a1, d1, a2, d2))
            else:
                # More than two distinct denominators: the rest ride in a tuple that rank()
                # walks (slower; no built-in profile needs it).
                out.append((address, idle, a1, d1, a2, d2, tuple(pairs[2:])))
        return tuple(out)

    # -- request time ----------------------------------------------------------------------

    def rank(self, plan: Plan, inflight: Mapping[str, float], turn: int) -> Pick:
        get = inflight.get
        k = self.hosts_per_version
        groups = plan.groups
        ranked: list[list[str]] = []
        by_version: dict[str, str] = {}
        primaries = []
        for g in groups:
            size = g.size
            off = turn % size
            seq = g.entries2[off : off + size] if off else g.entries
            if g.extended:
                top = _top_extended(seq, get, k)
            elif k == 1 or size == 1:
                best_s = -INF
                best_a = ""
                for addr, idle, a1, d1, a2, d2 in seq:
                    x = get(addr)
                    s = idle if x is None else a1 / (d1 + x) + a2 / (d2 + x)
                    if s > best_s:
                        best_s = s
                        best_a = addr
                top = [best_a]
            else:
                # Top k by insertion into a short descending list; most entries fail the first test.
                scores: list[float] = []
                top = []
                worst = -INF
                for addr, idle, a1, d1, a2, d2 in seq:
                    x = get(addr)
                    s = idle if x is None else a1 / (d1 + x) + a2 / (d2 + x)
                    if s > worst:
                        i = len(scores)
                        while i and s > scores[i - 1]:
                            i -= 1
                        scores.insert(i, s)
                        top.insert(i, addr)
                        if len(top) > k:
                            scores.pop()
                            top.pop()
                        if len(top) == k:
                            worst = scores[-1]
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


def _top_extended(seq, get, k: int) -> list[str]:
    scored = []
    for e in seq:
        x = get(e[0], 0)
        s = e[2] / (e[3] + x) + e[4] / (e[5] + x)
        for a, d in e[6]:
            s += a / (d + x)
        scored.append((s, e[0]))
    # A stable sort keeps the rotation order among equal scores.
    scored.sort(key=lambda t: t[0], reverse=True)
    return [a for _, a in scored[:k]]


def default_profile(
    scoring: ScoringView,
    *,
    running_weight: float = 1.0,
    hosts_per_version: int = DEFAULT_HOSTS_PER_VERSION,
) -> SchedulerProfile:
    """The standard profile: drained -> tiers -> freshness -> shed point -> saturation; scored by
    queue (with in-flight added), KV cache, in-flight and recent latency with the table's weights,
    plus the running batch at ``running_weight``."""
    return SchedulerProfile(
        default_filters(),
        (
            QueueScorer(scoring.queue_weight),
            KVCacheScorer(scoring.kv_cache_weight),
            InflightScorer(scoring.inflight_weight),
            RunningScorer(running_weight),
            LatencyScorer(scoring.latency_weight),
        ),
        hosts_per_version,
    )


# ----------------------------------------------------------------------------- picker


class Picker:
    """Per-process picker: caches plans for the current routing table and load report.

    One per ext_proc process; call ``pick`` per request with the views the servicer currently
    holds (swapped atomically by the sync task): the cache follows them by identity.
    """

    __slots__ = ("_factory", "_routing", "_load", "_profile", "_plans", "_turn")

    def __init__(self, profile_factory: Callable[[ScoringView], SchedulerProfile] = default_profile):
        self._factory = profile_factory
        self._routing: RoutingView | None = None
        self._load: LoadView | None = None
        self._profile: SchedulerProfile | None = None
        self._plans: dict = {}
        # Random start: several ext_proc processes must not all send their first picks alike.
        self._turn = random.randrange(1 << 20)

    @property
    def profile(self) -> SchedulerProfile | None:
        return self._profile

    def invalidate(self) -> None:
        self._plans = {}

    def plan(
        self,
        routing: RoutingView,
        load: LoadView | None,
        model: ModelView,
        priority: PriorityView,
        version: str | None = None,
        now: float | None = None,
    ) -> Plan:
        """The cached plan for (model, priority, version); built when missing or expired."""
        if now is None:
            now = time.monotonic()
        if routing is not self._routing or load is not self._load:
            if routing is not self._routing:
                self._profile = self._factory(routing.scoring)
            self._plans = {}
            self._routing = routing
            self._load = load
        key = (model.name, priority.name, version)
        plan = self._plans.get(key)
        if plan is None or now >= plan.expires_at:
            profile = self._profile
            assert profile is not None  # built above, with the first routing view
            if version is None:
                plan = profile.plan(routing, load, model, priority, None, now)
            else:
                v = model.by_version.get(version)
                if v is None:
                    plan = Plan(model.name, INF)
                    plan.refusal = NotFound(f"the model {model.name!r} has no version {version!r}")
                else:
                    plan = profile.plan(routing, load, model, priority, v, now)
            self._plans[key] = plan
        return plan

    def pick(
        self,
        routing: RoutingView,
        load: LoadView | None,
        model: ModelView | str,
        priority: PriorityView | str | None,
        inflight: Mapping[str, float],
        *,
        version: str | None = None,
        tokens: int = 0,
        now: float | None = None,
    ) -> PickResult:
        """Rank hosts for one request, or say why the mesh answers it itself.

        ``model``: a ModelView or a name (unknown -> NotFound); ``priority``: a PriorityView or a
        class name (None or unknown -> the default class); ``inflight``: address -> requests this
        process sent there since the last load reading (read, never written); ``version``: a
        version pinned by the request; ``tokens``: the requested-token estimate (0 = unknown).
        """
        if isinstance(model, str):
            mv = routing.models.get(model)
            if mv is None:
                return NotFound(f"the model {model!r} does not exist in this mesh")
            model = mv
        if not isinstance(priority, PriorityView):
            priority = routing.priority(priority)
        plan = self.plan(routing, load, model, priority, version, now)
        if plan.refusal is not None:
            return plan.refusal
        if tokens > plan.min_window:
            return self._fit_window(routing, load, model, priority, inflight, plan, tokens, now)
        profile = self._profile
        assert profile is not None  # plan() built it
        self._turn = turn = self._turn + 1
        return profile.rank(plan, inflight, turn)

    def _fit_window(
        self,
        routing: RoutingView,
        load: LoadView | None,
        model: ModelView,
        priority: PriorityView,
        inflight: Mapping[str, float],
        plan: Plan,
        tokens: int,
        now: float | None,
    ) -> PickResult:
        """Some version is too small for the request: pin the heaviest one it fits, if any."""
        if plan.pinned:
            where, window = f"model {model.name!r} version {plan.version!r}", plan.min_window
        else:
            where, window = f"any version of model {model.name!r}", max(v.context_window for v in model.routed)
        too_large = TooLarge(
            f"this request needs about {tokens} tokens (prompt plus max tokens), more than the "
            f"context window of {where} ({int(window)} tokens)"
        )
        if plan.pinned:
            return too_large
        refusal: Refusal = too_large
        for v in model.routed:
            if v.context_window and v.context_window < tokens:
                continue
            other = self.plan(routing, load, model, priority, v.name, now)
            if other.refusal is None:
                profile = self._profile
                assert profile is not None  # plan() built it
                self._turn = turn = self._turn + 1
                return profile.rank(other, inflight, turn)
            if refusal is too_large:
                refusal = other.refusal
        return refusal
