"""The scheduler's entry point: one ``Picker`` per ext_proc process, ``pick`` per request.

``Picker`` caches plans for the current (RoutingView, LoadView) pair, keyed by object identity,
and drops the cache when either is replaced. Each model is planned by its profile: the model's
own ``scheduling`` in the routing table, else the table's, else the default profile; one
``SchedulerProfile`` is built per distinct profile and kept across tables. It holds no lock: the
worst a race can do is build a plan twice.

It also owns the process's scheduler state that outlives profiles: ``prefix``, the prefix
indexes the prefix-affinity scorers read and the servicer records picks into; a new routing
table drops the replicas it lacks from them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping

from extproc.prefix.index import PrefixIndexes
from extproc.routing_view import LoadView, ModelView, PriorityView, ProfileView, RoutingView, ScoringView
from extproc.scheduler.interfaces import CacheAware, PluginTimer, PromptScorer, SchedulingRequest
from extproc.scheduler.profile import INF, Plan, SchedulerProfile, build_profile, default_profile
from extproc.scheduler.registry import UnknownPlugin
from extproc.scheduler.results import NotFound, PickResult, Refusal, TooLarge

log = logging.getLogger("imesh.extproc")

MAX_CACHED_PROFILES = 64  # distinct spec profiles kept; a spec has a handful

_clock = time.perf_counter_ns


class Picker:
    """Per-process scheduler: picks hosts for a request from the views the servicer holds (swapped
    atomically by the sync task); the plan cache follows them by identity.

    ``profile_factory``: builds the default profile (tables without ``scheduling``) from the table's
    scoring. ``timer``: where plugin and ranking times go (None: not measured).
    """

    __slots__ = (
        "_factory",
        "_routing",
        "_load",
        "_profile",
        "_profiles",
        "_plans",
        "_turn",
        "_timer",
        "_rank_timer",
        "_prompt_scorers",
        "prefix",
    )

    def __init__(
        self,
        profile_factory: Callable[[ScoringView], SchedulerProfile] = default_profile,
        timer: PluginTimer | None = None,
    ):
        self._factory = profile_factory
        self._routing: RoutingView | None = None
        self._load: LoadView | None = None
        self._profile: SchedulerProfile | None = None
        self._profiles: dict[tuple, SchedulerProfile] = {}  # (profile view, scoring key) -> built
        self._plans: dict = {}
        self._prompt_scorers: dict[str, PromptScorer | None] = {}  # model -> its profile's, this table
        self.prefix = PrefixIndexes()
        self._timer = timer
        self._rank_timer = timer.rank_timer() if timer is not None else None
        # Random start: several ext_proc processes must not all send their first picks alike.
        self._turn = random.randrange(1 << 20)

    @property
    def profile(self) -> SchedulerProfile | None:
        """The default profile for the current routing table (None before the first one)."""
        return self._profile

    def invalidate(self) -> None:
        self._plans = {}

    def profile_for(self, routing: RoutingView, model: ModelView) -> SchedulerProfile:
        """The model's profile under this routing table (call after ``plan`` saw the table)."""
        view = model.scheduling if model.scheduling is not None else routing.scheduling
        if view is None:
            assert self._profile is not None  # built with the first routing view
            return self._profile
        key = (view, routing.scoring.key())
        profile = self._profiles.get(key)
        if profile is None:
            if len(self._profiles) >= MAX_CACHED_PROFILES:
                self._profiles.clear()
            profile = self._profiles[key] = self._build(view, routing.scoring)
        return profile

    def prompt_scorer(self, routing: RoutingView, model: str) -> PromptScorer | None:
        """The prompt scorer of the model's profile (prefix affinity), None when it has none or the
        model is unknown: the servicer reads the body and hashes the prompt only for the former.
        One dict lookup per request, cached per routing table."""
        if routing is not self._routing:
            self._see(routing)
        scorers = self._prompt_scorers
        if model in scorers:
            return scorers[model]
        m = routing.models.get(model)
        if m is None:
            return None  # not cached: the names clients send are unbounded
        scorer = scorers[model] = self.profile_for(routing, m).prompt_scorer
        return scorer

    def _see(self, routing: RoutingView) -> None:
        """A new routing table: its default profile, no plans, and the replicas it lacks forgotten."""
        self._profile = self._bind(self._factory(routing.scoring))
        self._plans = {}
        self._prompt_scorers = {}
        self._routing = routing
        self.prefix.retain(routing.endpoints, time.monotonic())

    def _build(self, view: ProfileView, scoring: ScoringView) -> SchedulerProfile:
        try:
            return self._bind(build_profile(view, scoring))
        except (UnknownPlugin, TypeError, ValueError) as error:
            # A control plane newer than this process (a plugin it lacks), or bad parameters: route
            # on the default profile rather than fail every request.
            log.error("scheduling profile %s unusable (%s); using the default profile", view, error)
            return self._bind(self._factory(scoring))

    def _bind(self, profile: SchedulerProfile) -> SchedulerProfile:
        prompt = profile.prompt_scorer
        if prompt is not None:
            prompt.bind(self.prefix)
            for scorer in profile.scorers:
                if isinstance(scorer, CacheAware) and scorer.overlap is None:
                    scorer.overlap = prompt.cached_tokens  # ttft weighs the overlap in seconds
        return profile

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
        if routing is not self._routing:
            self._see(routing)
        if load is not self._load:
            self._plans = {}
            self._load = load
        key = (model.name, priority.name, version)
        plan = self._plans.get(key)
        if plan is None or now >= plan.expires_at:
            profile = self.profile_for(routing, model)
            if version is None:
                plan = profile.plan(routing, load, model, priority, None, now, self._timer)
            else:
                v = model.by_version.get(version)
                if v is None:
                    plan = Plan(model.name, INF)
                    plan.refusal = NotFound(f"the model {model.name!r} has no version {version!r}")
                else:
                    plan = profile.plan(routing, load, model, priority, v, now, self._timer)
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
        request: SchedulingRequest | None = None,
    ) -> PickResult:
        """Rank hosts for one request, or say why the mesh answers it itself.

        ``model``: a ModelView or a name (unknown -> NotFound); ``priority``: a PriorityView or a
        class name (None or unknown -> the default class); ``inflight``: address -> requests this
        process sent there since the last load reading (read, never written); ``version``: a
        version pinned by the request; ``tokens``: the requested-token estimate (0 = unknown);
        ``request``: what request scorers read (None: they abstain).
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
            return self._fit_window(routing, load, model, priority, inflight, plan, tokens, now, request)
        return self._rank(plan, inflight, request)

    def _rank(self, plan: Plan, inflight: Mapping[str, float], request: SchedulingRequest | None) -> PickResult:
        profile = plan.profile
        assert profile is not None  # a plan without a refusal was built by a profile
        self._turn = turn = self._turn + 1
        observe = self._rank_timer
        if observe is None:
            return profile.rank(plan, inflight, turn, request)
        started = _clock()
        result = profile.rank(plan, inflight, turn, request)
        observe((_clock() - started) * 1e-9)
        return result

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
        request: SchedulingRequest | None,
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
                return self._rank(other, inflight, request)
            if refusal is too_large:
                refusal = other.refusal
        return refusal
