"""Immutable views of the routing table and of the live load, built once per update.

Everything that does not depend on the request is computed here, when a new ``RoutingTable`` or
``LoadReport`` arrives; the per-request path only reads these objects (``__slots__``, tuples,
dicts never mutated after construction), so a view can be swapped in with a single attribute store
and read without locks.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from protos import mesh_pb2
from protos.defaults import (
    DEFAULT_INFLIGHT_WEIGHT,
    DEFAULT_KV_CACHE_WEIGHT,
    DEFAULT_LATENCY_WEIGHT,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE_WEIGHT,
    DEFAULT_SATURATION_KV,
    DEFAULT_SATURATION_QUEUE,
    DEFAULT_STALE_AFTER_S,
)
from protos.wire import model_body, models_list_body


class EndpointView:
    __slots__ = (
        "address",
        "pool",
        "tier",
        "region",
        "zone",
        "cost_per_hour",
        "drained",
        "max_concurrency",
        "kv_events",
        "model",
        "version",
        "cluster",
    )

    def __init__(self, ep: mesh_pb2.Endpoint, model: str, version: str, cluster: str):
        self.address: str = ep.address
        self.pool: str = ep.pool
        self.tier: str = ep.tier
        self.region: str = ep.region
        self.zone: str = ep.zone
        self.cost_per_hour: float = ep.cost_per_hour
        self.drained: bool = ep.drained
        self.max_concurrency: int = ep.max_concurrency
        self.kv_events: str = ep.kv_events  # the replica's KV-event publisher; "" = none
        self.model = model
        self.version = version
        self.cluster = cluster

    def __repr__(self) -> str:
        return f"EndpointView({self.address}, {self.model}/{self.version}, tier={self.tier!r}, drained={self.drained})"


class VersionView:
    __slots__ = ("name", "weight", "cluster", "context_window", "engine", "endpoints")

    def __init__(self, v: mesh_pb2.ModelVersion, model: str):
        self.name: str = v.name
        self.weight: int = v.weight
        self.cluster: str = v.cluster
        self.context_window: int = v.context_window  # 0 = unknown
        self.engine: str = v.engine
        self.endpoints: tuple[EndpointView, ...] = tuple(EndpointView(e, model, v.name, v.cluster) for e in v.endpoints)

    def __repr__(self) -> str:
        return f"VersionView({self.name!r}, weight={self.weight}, endpoints={len(self.endpoints)})"


class ScorerRef(NamedTuple):
    """One scorer of a profile: its registry name, weight and parameters (sorted pairs)."""

    type: str
    weight: float
    params: tuple[tuple[str, str], ...] = ()


class ProfileView(NamedTuple):
    """A scheduling profile as the table names it (extproc/scheduler/registry.py's names); hashable,
    so the picker builds one ``SchedulerProfile`` per distinct profile. An empty list stands for
    the default one."""

    filters: tuple[str, ...]
    scorers: tuple[ScorerRef, ...]

    @classmethod
    def from_proto(cls, p: mesh_pb2.SchedulingProfile) -> ProfileView:
        return cls(
            tuple(p.filters),
            tuple(ScorerRef(s.type, s.weight, tuple(sorted(s.params.items()))) for s in p.scorers),
        )


class AdapterView(NamedTuple):
    """A LoRA adapter clients name as the model: served by ``model``'s replicas, pinned to
    ``version`` when only that version serves it (None: the model's weighted split)."""

    name: str
    model: str
    version: str | None
    openai_body: bytes  # GET /v1/models/{name}


class ModelView:
    """One model. ``versions`` in table order; ``routed`` are those with weight > 0, heaviest first
    (the versions Envoy's weighted_clusters can choose). ``scheduling``: this model's own profile,
    None for the table's. ``adapters``: its LoRA adapters."""

    __slots__ = (
        "name",
        "versions",
        "by_version",
        "routed",
        "openai_body",
        "allow_version_override",
        "scheduling",
        "adapters",
        "tokenizer",
    )

    def __init__(self, m: mesh_pb2.Model):
        self.name: str = m.name
        # The client's version header (RoutingView.version_header) may force a version of this model.
        self.allow_version_override: bool = m.allow_version_override
        self.versions: tuple[VersionView, ...] = tuple(VersionView(v, m.name) for v in m.versions)
        self.by_version: dict[str, VersionView] = {v.name: v for v in self.versions}
        self.routed: tuple[VersionView, ...] = tuple(
            sorted((v for v in self.versions if v.weight > 0), key=lambda v: -v.weight)
        )
        self.openai_body: bytes = model_body(m.name).encode()  # GET /v1/models/{name}
        self.scheduling: ProfileView | None = ProfileView.from_proto(m.scheduling) if m.HasField("scheduling") else None
        self.adapters: tuple[AdapterView, ...] = tuple(
            AdapterView(a.name, m.name, a.version or None, model_body(a.name, m.name).encode()) for a in m.adapters
        )
        self.tokenizer: str = m.tokenizer  # HF tokenizer.json path (precise prefix affinity); "" = none

    def version(self, name: str) -> VersionView | None:
        return self.by_version.get(name)

    def __repr__(self) -> str:
        return f"ModelView({self.name!r}, versions={[v.name for v in self.versions]})"


class PriorityView:
    __slots__ = ("name", "rank", "preferred_tiers", "strict_tiers", "shed_threshold")

    def __init__(
        self,
        name: str,
        rank: int,
        preferred_tiers: tuple[str, ...] = (),
        strict_tiers: bool = False,
        shed_threshold: float = 0.0,
    ):
        self.name = name
        self.rank = rank
        self.preferred_tiers = preferred_tiers
        self.strict_tiers = strict_tiers
        self.shed_threshold = shed_threshold

    @classmethod
    def from_proto(cls, p: mesh_pb2.PriorityClass) -> PriorityView:
        return cls(p.name, p.rank, tuple(p.preferred_tiers), p.strict_tiers, p.shed_threshold)

    def __repr__(self) -> str:
        return (
            f"PriorityView({self.name!r}, rank={self.rank}, tiers={self.preferred_tiers}, shed={self.shed_threshold})"
        )


class ScoringView:
    """How the picker weighs load. The spec's defaults (protos/defaults.py) stand in when a table
    carries no Scoring, or a threshold of 0 (proto3's "unset")."""

    __slots__ = (
        "queue_weight",
        "kv_cache_weight",
        "inflight_weight",
        "saturation_queue",
        "saturation_kv",
        "stale_after_s",
        "latency_weight",
    )

    def __init__(
        self,
        queue_weight: float = DEFAULT_QUEUE_WEIGHT,
        kv_cache_weight: float = DEFAULT_KV_CACHE_WEIGHT,
        inflight_weight: float = DEFAULT_INFLIGHT_WEIGHT,
        saturation_queue: float = DEFAULT_SATURATION_QUEUE,
        saturation_kv: float = DEFAULT_SATURATION_KV,
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        latency_weight: float = DEFAULT_LATENCY_WEIGHT,
    ):
        self.queue_weight = queue_weight
        self.kv_cache_weight = kv_cache_weight
        self.inflight_weight = inflight_weight
        # 0 is proto3's "unset": a threshold of 0 would call every replica saturated or stale.
        self.saturation_queue = saturation_queue if saturation_queue > 0 else DEFAULT_SATURATION_QUEUE
        self.saturation_kv = saturation_kv if saturation_kv > 0 else DEFAULT_SATURATION_KV
        self.stale_after_s = stale_after_s if stale_after_s > 0 else DEFAULT_STALE_AFTER_S
        self.latency_weight = latency_weight

    @classmethod
    def from_proto(cls, s: mesh_pb2.Scoring) -> ScoringView:
        return cls(
            s.queue_weight,
            s.kv_cache_weight,
            s.inflight_weight,
            s.saturation_queue,
            s.saturation_kv,
            s.stale_after_s,
            s.latency_weight,
        )

    def key(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        return "ScoringView(" + ", ".join(f"{n}={getattr(self, n)}" for n in self.__slots__) + ")"


class RoutingView:
    """The routing table, as the per-request path reads it."""

    __slots__ = (
        "version",
        "models",
        "priorities",
        "priority_order",
        "default_priority",
        "scoring",
        "max_body_bytes",
        "endpoints",
        "models_list_body",
        "version_header",
        "scheduling",
        "adapters",
        "kv_events",
    )

    def __init__(
        self,
        version: int,
        models: dict[str, ModelView],
        priorities: dict[str, PriorityView],
        default_priority: PriorityView,
        scoring: ScoringView,
        max_body_bytes: int,
        version_header: str = "",
        scheduling: ProfileView | None = None,
    ):
        self.version = version
        self.scheduling = scheduling  # the table's profile for every model without its own; None = default
        self.version_header = version_header  # "" = no client header forces a version
        self.models = models
        self.priorities = priorities
        self.priority_order: tuple[PriorityView, ...] = tuple(sorted(priorities.values(), key=lambda p: p.rank))
        self.default_priority = default_priority
        self.scoring = scoring
        self.max_body_bytes = max_body_bytes  # 0 = no limit known
        # address -> endpoint: which model/version/pool a picked host belongs to.
        self.endpoints: dict[str, EndpointView] = {
            e.address: e for m in models.values() for v in m.versions for e in v.endpoints
        }
        # address -> ZMQ endpoint of its KV events, for the replicas that publish them.
        self.kv_events: dict[str, str] = {a: e.kv_events for a, e in self.endpoints.items() if e.kv_events}
        # adapter name -> the adapter (the spec keeps adapter and model names apart).
        self.adapters: dict[str, AdapterView] = {a.name: a for m in models.values() for a in m.adapters}
        self.models_list_body: bytes = models_list_body(
            models, ((a.name, a.model) for a in self.adapters.values())
        ).encode()

    @classmethod
    def from_proto(cls, table: mesh_pb2.RoutingTable) -> RoutingView:
        models = {m.name: ModelView(m) for m in table.models}
        priorities = {p.name: PriorityView.from_proto(p) for p in table.priorities}
        name = table.default_priority or DEFAULT_PRIORITY
        default = priorities.get(name)
        if default is None:
            # A table without that class (or without classes): a neutral class that never sheds.
            default = PriorityView(name, max((p.rank for p in priorities.values()), default=-1) + 1)
            priorities[name] = default
        scoring = ScoringView.from_proto(table.scoring) if table.HasField("scoring") else ScoringView()
        scheduling = ProfileView.from_proto(table.scheduling) if table.HasField("scheduling") else None
        return cls(
            table.version, models, priorities, default, scoring, table.max_body_bytes, table.version_header, scheduling
        )

    def model(self, name: str) -> ModelView | None:
        return self.models.get(name)

    def entry_body(self, name: str) -> bytes | None:
        """GET /v1/models/{name}: the entry of the model or LoRA adapter ``name``; None if neither."""
        model = self.models.get(name)
        if model is not None:
            return model.openai_body
        adapter = self.adapters.get(name)
        return adapter.openai_body if adapter is not None else None

    def priority(self, name: str | None) -> PriorityView:
        """The class named ``name``; the default class for None or an unknown name (not an error)."""
        if name is None:
            return self.default_priority
        return self.priorities.get(name, self.default_priority)

    def __repr__(self) -> str:
        return f"RoutingView(version={self.version}, models={list(self.models)})"


class Reading:
    """One replica's load. ``scraped_at`` is the monotonic time of its last good scrape
    (``-inf`` when it never answered), so its age at any moment is ``now - scraped_at``.

    ``prefill_tokens_per_s``, ``prefill_tokens_mean`` and ``decode_step_s`` are what a
    time-to-first-token estimate needs (the ``ttft`` scorer); 0 = not measured. ``adapters``: the
    LoRA adapters active there (running or waiting requests); ``max_adapters``: how many distinct
    ones a batch may hold (0 = unknown); ``slots``: the batch slots, max_num_seqs (0 = unknown)."""

    __slots__ = (
        "address",
        "waiting",
        "running",
        "kv_cache",
        "gpu_util",
        "reachable",
        "scraped_at",
        "latency_s",
        "prefill_tokens_per_s",
        "prefill_tokens_mean",
        "decode_step_s",
        "adapters",
        "max_adapters",
        "slots",
    )

    def __init__(
        self,
        address: str,
        waiting: float = 0.0,
        running: float = 0.0,
        kv_cache: float = 0.0,
        gpu_util: float = -1.0,
        reachable: bool = True,
        scraped_at: float = 0.0,
        latency_s: float = 0.0,
        prefill_tokens_per_s: float = 0.0,
        prefill_tokens_mean: float = 0.0,
        decode_step_s: float = 0.0,
        adapters: tuple[str, ...] = (),
        max_adapters: int = 0,
        slots: float = 0.0,
    ):
        self.address = address
        self.waiting = waiting
        self.running = running
        self.kv_cache = kv_cache
        self.gpu_util = gpu_util
        self.reachable = reachable
        self.scraped_at = scraped_at
        self.latency_s = latency_s  # recent mean end-to-end latency; 0 = unknown
        self.prefill_tokens_per_s = prefill_tokens_per_s  # prompt tokens computed per second of prefill
        self.prefill_tokens_mean = prefill_tokens_mean  # prompt tokens computed per request, recent mean
        self.decode_step_s = decode_step_s  # time per output token: one engine step at the running batch
        self.adapters = adapters
        self.max_adapters = max_adapters
        self.slots = slots  # batch slots (max_num_seqs); 0 = unknown

    def age(self, now: float) -> float:
        return now - self.scraped_at

    def __repr__(self) -> str:
        return (
            f"Reading({self.address}, waiting={self.waiting}, running={self.running}, kv={self.kv_cache}, "
            f"reachable={self.reachable}, scraped_at={self.scraped_at})"
        )


class LoadView:
    """The live load: address -> ``Reading``. ``received_at`` is ``time.monotonic()`` at arrival."""

    __slots__ = ("sequence", "received_at", "readings")

    def __init__(self, sequence: int, received_at: float, readings: dict[str, Reading]):
        self.sequence = sequence
        self.received_at = received_at
        self.readings = readings

    @classmethod
    def from_proto(cls, report: mesh_pb2.LoadReport, received_at: float) -> LoadView:
        readings = {}
        for e in report.endpoints:
            age = e.age_s
            scraped_at = received_at - age if math.isfinite(age) else -math.inf
            readings[e.address] = Reading(
                e.address,
                e.waiting,
                e.running,
                e.kv_cache,
                e.gpu_util,
                e.reachable and not (e.not_ready or e.ejected),  # unready or ejected: no requests
                scraped_at,
                e.latency_s,
                e.prefill_tokens_per_s,
                e.prefill_tokens_mean,
                e.decode_step_s,
                tuple(e.adapters),
                e.max_adapters,
                e.slots,
            )
        return cls(report.sequence, received_at, readings)

    def get(self, address: str) -> Reading | None:
        return self.readings.get(address)

    def __repr__(self) -> str:
        return f"LoadView(sequence={self.sequence}, endpoints={len(self.readings)})"
