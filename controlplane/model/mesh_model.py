"""The mesh model: the spec resolved into the flat, immutable facts the translators need.

The spec is what an operator wrote; the model is what is true now. It adds live overrides
(canary weights set from the CLI, drained endpoints) on top of the spec, resolves each
endpoint's pool into tier, cost and locality, and names each version's Envoy cluster.
Translators read only this, never the spec, so the data flows one way:
spec -> mesh model -> Envoy resources / routing table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from controlplane.spec.resilience import ResilienceSpec
from controlplane.spec.schema import (
    Defaults,
    EndpointSpec,
    MeshSpec,
    ModelSpec,
    SchedulingSpec,
    ScoringSpec,
    VersionSpec,
)
from controlplane.state.overrides import Overrides


@dataclass(frozen=True)
class EndpointModel:
    address: str
    pool: str
    tier: str
    cost_per_hour: float
    region: str
    zone: str
    drained: bool
    max_concurrency: int
    # EDS load_balancing_weight from live load, for models on the fast path (controlplane/load/fast_path.py);
    # 0 = none (Envoy's default of 1 for every host).
    lb_weight: int = 0
    kv_events: str = ""  # ZMQ endpoint of the replica's KV-cache events; "" = none

    @property
    def ip(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True)
class VersionModel:
    model: str
    name: str
    weight: int
    engine: str
    context_window: int
    upstream_protocol: str
    endpoints: tuple[EndpointModel, ...]

    @property
    def cluster(self) -> str:
        """One Envoy EDS cluster per model version: the unit canary weights split across."""
        return f"{self.model}/{self.name}"


@dataclass(frozen=True)
class AdapterModel:
    """A LoRA adapter of a model: a name clients send as the model, served by the base model's
    replicas. ``version``: "" when every routed version serves it (the model's weighted split),
    else the one version requests for it are pinned to."""

    name: str
    version: str = ""


@dataclass(frozen=True)
class ModelModel:
    name: str
    versions: tuple[VersionModel, ...]
    sticky_header: str = ""  # the weighted split hashes this header (same value -> same version); "" = random
    allow_version_override: bool = False  # the client's defaults.version_header may force a version
    routing_mode: str = "picker"  # "fast": Envoy routes header/path-named requests without the ext_proc
    adapters: tuple[AdapterModel, ...] = ()  # LoRA adapters, in spec order
    tokenizer: str = ""  # the model's HF tokenizer.json, for precise prefix affinity; "" = none

    def version(self, name: str) -> VersionModel | None:
        return next((v for v in self.versions if v.name == name), None)


@dataclass(frozen=True)
class PriorityModel:
    name: str
    rank: int
    preferred_tiers: tuple[str, ...]
    strict_tiers: bool
    shed_threshold: float


@dataclass(frozen=True)
class MeshModel:
    version: int
    models: tuple[ModelModel, ...]
    priorities: tuple[PriorityModel, ...]
    defaults: Defaults
    scoring: ScoringSpec
    scheduling: SchedulingSpec | None = None  # every model's scheduling profile; None: the default one
    # model name -> its own profile. Here rather than on ModelModel: a ModelModel is a memo key
    # (hashed), a profile holds lists; and a profile change is rare enough to reset the memo.
    model_scheduling: Mapping[str, SchedulingSpec] = field(default_factory=dict)
    resilience: ResilienceSpec = ResilienceSpec()  # health checks, ejection, retries of every model cluster

    def model(self, name: str) -> ModelModel | None:
        return next((m for m in self.models if m.name == name), None)

    @property
    def endpoints(self) -> tuple[tuple[VersionModel, EndpointModel], ...]:
        return tuple((v, e) for m in self.models for v in m.versions for e in v.endpoints)


def build_mesh_model(
    spec: MeshSpec,
    overrides: Overrides | None = None,
    version: int = 0,
    lb_weights: Mapping[str, int] | None = None,
    memo: MeshModelMemo | None = None,
) -> MeshModel:
    """``lb_weights``: address -> EDS weight from live load, applied to the endpoints of fast-path models.

    ``memo``: what the previous build with it left, so unchanged parts come back as the very same
    objects; without one, nothing is reused (a one-off build).
    """
    overrides = overrides if overrides is not None else Overrides()
    memo = memo if memo is not None else MeshModelMemo()
    pools = {p.name: p for p in spec.pools}
    lb_weights = lb_weights or {}
    previous, versions = memo.versions, {}
    shared = memo.shared  # bound once: it runs per endpoint

    def endpoint(e: EndpointSpec, fast: bool = False) -> EndpointModel:
        pool = pools[e.pool]
        return shared(
            EndpointModel,
            address=e.address,
            pool=pool.name,
            tier=pool.tier,
            cost_per_hour=pool.cost_per_hour,
            region=pool.locality.region,
            zone=pool.locality.zone,
            drained=e.drained or e.address in overrides.drained,
            max_concurrency=e.max_concurrency,
            lb_weight=lb_weights.get(e.address, 0) if fast else 0,
            kv_events=e.kv_events,
        )

    def version_model(m: ModelSpec, v: VersionSpec) -> VersionModel:
        """The version's model, reused without walking its endpoints when none of its inputs changed:
        at 10,000 endpoints a one-endpoint change otherwise rebuilds every EndpointModel key."""
        fast = routing_mode(spec, m) == "fast"
        weight = overrides.weights.get(m.name, {}).get(v.name, v.weight)
        entry = previous.get(id(v))
        if entry is not None and (entry.spec is not v or entry.pools is not spec.pools):
            entry = None  # an id reused by a new object, or the pools changed under the same version
        addresses = entry.addresses if entry is not None else frozenset(e.address for e in v.endpoints)
        lb = tuple(sorted((a, lb_weights[a]) for a in addresses if a in lb_weights)) if fast else ()
        inputs = (m.name, weight, fast, addresses & overrides.drained, lb)
        if entry is None or entry.inputs != inputs:
            built = shared(
                VersionModel,
                model=m.name,
                name=v.name,
                weight=weight,
                engine=v.engine,
                context_window=v.context_window,
                upstream_protocol=v.upstream_protocol,
                endpoints=tuple(endpoint(e, fast) for e in v.endpoints),
            )
            entry = _VersionEntry(v, spec.pools, addresses, inputs, built)
        versions[id(v)] = entry
        return entry.model

    def model_model(m: ModelSpec) -> ModelModel:
        built = tuple(version_model(m, v) for v in m.versions)
        return ModelModel(
            name=m.name,
            versions=built,
            sticky_header=m.ab.sticky_header if m.ab.sticky_header is not None else spec.defaults.sticky_header,
            allow_version_override=m.ab.allow_version_override,
            routing_mode=routing_mode(spec, m),
            adapters=adapter_models(m, built),
            tokenizer=m.tokenizer,
        )

    models = tuple(model_model(m) for m in spec.models)
    memo.versions = versions  # only the versions of this build: what the spec dropped is let go
    priorities = tuple(
        PriorityModel(p.name, rank, tuple(p.preferred_tiers), p.strict_tiers, p.shed_threshold)
        for rank, p in enumerate(spec.priorities)
    )
    model_scheduling = {m.name: m.scheduling for m in spec.models if m.scheduling is not None}
    return MeshModel(
        version,
        models,
        priorities,
        spec.defaults,
        spec.scoring,
        spec.scheduling,
        model_scheduling,
        resilience=spec.resilience,
    )


def adapter_models(model: ModelSpec, versions: tuple[VersionModel, ...]) -> tuple[AdapterModel, ...]:
    """Each adapter the model's versions declare, with where its requests go: the model's split
    when every routed version (weight > 0) serves it; else pinned to the heaviest routed version
    that does (the first such in spec order), or, when none routed does, the first that declares it."""
    routed = [v for v in versions if v.weight > 0]
    heaviest_first = sorted(routed, key=lambda v: -v.weight)  # stable: spec order among equals
    serving: dict[str, list[str]] = {}
    for spec_version in model.versions:
        for name in spec_version.adapters:
            serving.setdefault(name, []).append(spec_version.name)
    adapters = []
    for name, names in serving.items():
        if all(v.name in names for v in routed):
            version = ""
        else:
            version = next((v.name for v in heaviest_first if v.name in names), names[0])
        adapters.append(AdapterModel(name, version))
    return tuple(adapters)


def routing_mode(spec: MeshSpec, model: ModelSpec) -> str:
    """A model's routing mode: its own ``routing_mode``, else ``defaults.routing_mode``."""
    return model.routing_mode or spec.defaults.routing_mode


@dataclass(frozen=True, slots=True)
class _VersionEntry:
    spec: VersionSpec  # the spec it was built from (held, so its id cannot be reused meanwhile)
    pools: object  # the spec's pool list it resolved endpoints against (compared by identity)
    addresses: frozenset[str]
    inputs: tuple[object, ...]  # everything else the version's model depends on
    model: VersionModel


_Shareable = TypeVar("_Shareable", bound=EndpointModel | VersionModel)


class MeshModelMemo:
    """What one build of the mesh model keeps for the next, owned by whoever rebuilds the same mesh
    (the control plane; the scale benchmark). Unchanged parts of the model stay the very same
    objects from one rebuild to the next: the translation memo (controlplane/translate/memo.py)
    then finds them by identity, and a one-endpoint change at 10,000 endpoints rebuilds in
    milliseconds (docs/xds.md).
    """

    SHARED_LIMIT = 60_000  # per generation; bounds the memory to what ~6 rebuilds at 10,000 endpoints use

    def __init__(self) -> None:
        self.versions: dict[int, _VersionEntry] = {}  # id(VersionSpec) -> entry, for the versions of the last build
        self._shared: dict[tuple[object, ...], Any] = {}
        self._shared_old: dict[tuple[object, ...], Any] = {}  # the previous generation: what is still used moves back

    def shared(self, cls: type[_Shareable], **fields: Any) -> _Shareable:
        """``cls(**fields)`` for a frozen model class, or the equal instance built before.

        The key is the field values, with a tuple of model objects keyed by their identities (they are
        shared themselves, and kept alive by the instance that holds them, so an identity cannot be
        reused while its entry exists).
        """
        if cls is EndpointModel:  # scalars only: the hot case, 10,000 a build at 1,000 models
            key = (cls, tuple(fields), *fields.values())
        else:
            values = (tuple(map(id, v)) if type(v) is tuple and v and _is_model(v[0]) else v for v in fields.values())
            key = (cls, tuple(fields), *values)
        found = self._shared.get(key)
        if found is None:
            found = self._shared_old.get(key)
            if found is None:
                found = cls(**fields)
            if len(self._shared) >= self.SHARED_LIMIT:
                self._shared_old, self._shared = self._shared, {}
            self._shared[key] = found
        return found


def _is_model(value: object) -> bool:
    return type(value) in (EndpointModel, VersionModel, ModelModel)
