"""One immutable xDS snapshot: every resource Envoy gets, under one version, checked before use.

Why a snapshot and not per-type updates: Envoy applies CDS, EDS, LDS and RDS one at a time, so a
change that spans types (a new cluster and the route to it) is only safe when all of it is built
together, checked together (`check_consistency`) and versioned together. The serialized `Any`s are
built once here, so N Envoy streams do not serialize the same resources N times, and so a later
mutation of a caller's protobuf message cannot change what a snapshot sends.

Each resource also gets a content digest (`resource_versions`): delta xDS uses it as the
resource's version, so an unchanged resource is never re-sent, even across a control-plane or
Envoy restart. A snapshot built with `reuse=` the previous one takes the packed `Any` and digest
of every message object the two share (the incremental translator hands back the same objects for
unchanged model versions), so a one-endpoint change serializes one resource, not ten thousand.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"

# The order ADS sends types in: clusters exist before endpoints fill them, listeners before routes.
TYPE_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# CDS and LDS are wildcard subscriptions: Envoy wants them all, and absence means "delete".
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

_HCM_TYPE = _PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_EXT_PROC_TYPE = _PREFIX + ext_proc_pb2.ExternalProcessor.DESCRIPTOR.full_name

Resources: TypeAlias = Mapping[str, Message] | Iterable[Message]


class ResourceSet(Protocol):
    """Envoy resources by kind, such as translate/envoy.py's EnvoyResources."""

    @property
    def clusters(self) -> Resources: ...
    @property
    def endpoints(self) -> Resources: ...
    @property
    def listeners(self) -> Resources: ...
    @property
    def routes(self) -> Resources: ...


def resource_name(message: Message) -> str:
    """The xDS name of a resource: `cluster_name` for a ClusterLoadAssignment, `name` otherwise."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return message.name


def _by_name(resources: Resources) -> dict[str, Message]:
    if isinstance(resources, Mapping):
        return dict(resources)
    return {resource_name(m): m for m in resources}


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic bytes, so two builds of the same config compare equal (publish skips no-ops).
    packed.Pack(message, deterministic=True)
    return packed


def _digest(packed: any_pb2.Any) -> str:
    """A resource's version for delta xDS: a hash of its deterministic bytes (96 bits)."""
    return hashlib.blake2b(packed.value, digest_size=12).hexdigest()


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Resources per type URL (name → message) under one version.

    `version` may be left empty: the cache stamps versions, so they only ever increase.
    Equality is identity; compare contents with `same_resources`.
    """

    version: str
    resources: Mapping[str, Mapping[str, Message]]
    # An earlier snapshot whose packed `Any`s may be reused for the very same message objects.
    reuse: InitVar[Snapshot | None] = None
    _anys: Mapping[str, Mapping[str, any_pb2.Any]] = field(init=False, repr=False, compare=False)
    _versions: Mapping[str, Mapping[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self, reuse: Snapshot | None) -> None:
        frozen = {t: MappingProxyType(dict(self.resources.get(t, {}))) for t in TYPE_ORDER}
        unknown = set(self.resources) - set(TYPE_ORDER)
        if unknown:
            raise ValueError(f"unsupported type URLs: {sorted(unknown)}")
        object.__setattr__(self, "resources", MappingProxyType(frozen))
        anys: dict[str, MappingProxyType] = {}
        versions: dict[str, MappingProxyType] = {}
        for t in TYPE_ORDER:
            old_messages = reuse.resources[t] if reuse is not None else {}
            old_anys = reuse._anys[t] if reuse is not None else {}
            old_versions = reuse._versions[t] if reuse is not None else {}
            packed: dict[str, any_pb2.Any] = {}
            digests: dict[str, str] = {}
            for name, message in frozen[t].items():
                if old_messages.get(name) is message:  # the same object: its bytes cannot differ
                    packed[name], digests[name] = old_anys[name], old_versions[name]
                else:
                    packed[name] = _pack(message)
                    digests[name] = _digest(packed[name])
            anys[t], versions[t] = MappingProxyType(packed), MappingProxyType(digests)
        object.__setattr__(self, "_anys", MappingProxyType(anys))
        object.__setattr__(self, "_versions", MappingProxyType(versions))
        if reuse is not None:  # what was derived from an unchanged type holds for this snapshot too
            for t in TYPE_ORDER:
                if t in reuse.__dict__.get("_refs_cache", {}) and versions[t] == reuse._versions[t]:
                    self.__dict__.setdefault("_refs_cache", {})[t] = reuse.__dict__["_refs_cache"][t]
                    derived = {CLUSTER: "_eds_names", LISTENER: "_rds_names"}.get(t)
                    if derived in reuse.__dict__:
                        self.__dict__[derived] = reuse.__dict__[derived]

    @classmethod
    def build(
        cls,
        version: str = "",
        *,
        clusters: Resources = (),
        endpoints: Resources = (),
        listeners: Resources = (),
        routes: Resources = (),
        reuse: Snapshot | None = None,
    ) -> Snapshot:
        """Build from messages (named by their own name) or from name → message mappings."""
        return cls(
            version,
            {
                CLUSTER: _by_name(clusters),
                ENDPOINT: _by_name(endpoints),
                LISTENER: _by_name(listeners),
                ROUTE: _by_name(routes),
            },
            reuse,
        )

    def anys(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        """The packed resources of one type, serialized once for every stream."""
        return self._anys[type_url]

    def resource_versions(self, type_url: str) -> Mapping[str, str]:
        """name → content digest of one type: the per-resource version delta xDS sends and compares."""
        return self._versions[type_url]

    def with_version(self, version: str) -> Snapshot:
        """The same resources under another version, reusing the packed `Any`s."""
        clone = object.__new__(Snapshot)
        object.__setattr__(clone, "version", version)
        object.__setattr__(clone, "resources", self.resources)
        object.__setattr__(clone, "_anys", self._anys)
        object.__setattr__(clone, "_versions", self._versions)
        return clone

    def same_resources(self, other: Snapshot | None) -> bool:
        if other is None:
            return False
        return all(self._versions[t] == other._versions[t] for t in TYPE_ORDER)

    def expected_types(self) -> frozenset[str]:
        """The types a node must ACK before this snapshot counts as applied.

        Envoy always subscribes to CDS and LDS; it only asks for EDS when some cluster is an EDS
        cluster, and for RDS when some listener's HCM uses RDS.
        """
        types = {CLUSTER, LISTENER}
        if self.eds_names():
            types.add(ENDPOINT)
        if self.rds_names():
            types.add(ROUTE)
        return frozenset(types)

    def eds_names(self) -> frozenset[str]:
        """The ClusterLoadAssignment names the EDS clusters of this snapshot will ask for."""
        cached = self.__dict__.get("_eds_names")
        if cached is None:
            refs = _refs_of(self, CLUSTER).values()
            cached = self.__dict__["_eds_names"] = frozenset(r.eds for r in refs if r.eds)
        return cached

    def rds_names(self) -> frozenset[str]:
        """The RouteConfiguration names the listeners of this snapshot will ask for."""
        cached = self.__dict__.get("_rds_names")
        if cached is None:
            refs = _refs_of(self, LISTENER).values()
            cached = self.__dict__["_rds_names"] = frozenset(name for r in refs for name in r.rds)
        return cached


def resources_by_type(resources: ResourceSet) -> dict[str, dict[str, Message]]:
    """`Snapshot.resources` from an object with `clusters`, `endpoints`, `listeners` and `routes`
    (name → message mappings or message lists), such as translate/envoy.py's EnvoyResources."""
    return {
        CLUSTER: _by_name(resources.clusters),
        ENDPOINT: _by_name(resources.endpoints),
        LISTENER: _by_name(resources.listeners),
        ROUTE: _by_name(resources.routes),
    }


class InconsistentSnapshotError(ValueError):
    """A snapshot that would leave Envoy with dangling references; `problems` lists them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("inconsistent snapshot:\n  " + "\n  ".join(problems))


def check_consistency(snapshot: Snapshot, known_static_clusters: Iterable[str] = ()) -> list[str]:
    """Every dangling reference in `snapshot`, one line each; an empty list means it is safe to push.

    Envoy accepts a route to a missing cluster (it answers 503 at request time) and an EDS cluster
    with no endpoints (it warms forever), so these must be caught here, before publishing.
    What each resource refers to is memoized by its content digest, so re-checking a snapshot that
    shares most resources with the last one costs set operations, not a walk of every route.
    """
    problems: list[str] = []
    clusters = snapshot.resources[CLUSTER].keys() | set(known_static_clusters)
    endpoints = snapshot.resources[ENDPOINT]
    routes = snapshot.resources[ROUTE]
    refs = {t: _refs_of(snapshot, t) for t in TYPE_ORDER}

    for type_url in TYPE_ORDER:
        for key, ref in refs[type_url].items():
            if not key or key != ref.name:
                problems.append(f"{_short(type_url)} {key!r}: key does not match the resource's name {ref.name!r}")

    for name, ref in refs[CLUSTER].items():
        if ref.eds and ref.eds not in endpoints:
            problems.append(f"cluster {name!r}: EDS cluster has no ClusterLoadAssignment {ref.eds!r}")

    for name, ref in refs[ROUTE].items():
        for target in ref.clusters:
            if target not in clusters:
                problems.append(f"route_config {name!r}: routes to unknown cluster {target!r}")

    for name, ref in refs[LISTENER].items():
        for route_config in ref.rds:
            if route_config not in routes:
                problems.append(f"listener {name!r}: RDS route_config {route_config!r} does not exist")
        for target in ref.clusters:
            if target not in clusters:
                problems.append(f"listener {name!r}: inline route routes to unknown cluster {target!r}")
        for target in ref.filter_clusters:
            if target not in clusters:
                problems.append(f"listener {name!r}: http filter calls unknown cluster {target!r}")
    return problems


@dataclass(frozen=True)
class _Refs:
    """What one resource names and refers to (kept per content digest)."""

    name: str
    eds: str = ""  # cluster: the ClusterLoadAssignment it needs ("" when not an EDS cluster)
    clusters: tuple[str, ...] = ()  # route config / listener's inline routes: clusters routed to
    rds: tuple[str, ...] = ()  # listener: route configs its HCMs fetch over RDS
    filter_clusters: tuple[str, ...] = ()  # listener: clusters its HTTP filters call (ext_proc)


_REFS: dict[tuple[str, str], _Refs] = {}
_REFS_LIMIT = 200_000


def _refs_of(snapshot: Snapshot, type_url: str) -> dict[str, _Refs]:
    """name → references of one type's resources; once per snapshot (clones share it)."""
    cache: dict[str, dict[str, _Refs]] = snapshot.__dict__.setdefault("_refs_cache", {})
    found = cache.get(type_url)
    if found is None:
        found = cache[type_url] = {}
        messages = snapshot.resources[type_url]
        for name, digest in snapshot._versions[type_url].items():
            refs = _REFS.get((type_url, digest))
            if refs is None:
                refs = _compute_refs(type_url, messages[name])
                if len(_REFS) >= _REFS_LIMIT:
                    _REFS.clear()
                _REFS[(type_url, digest)] = refs
            found[name] = refs
    return found


def _compute_refs(type_url: str, message: Message) -> _Refs:
    own = resource_name(message)
    if type_url == CLUSTER:
        return _Refs(own, eds=_eds_name(message) if _is_eds(message) else "")
    if type_url == ROUTE:
        return _Refs(own, clusters=tuple(dict.fromkeys(_route_clusters(message))))
    if type_url == LISTENER:
        rds: list[str] = []
        inline: list[str] = []
        filters: list[str] = []
        for hcm in _http_connection_managers(message):
            kind = hcm.WhichOneof("route_specifier")
            if kind == "rds":
                rds.append(hcm.rds.route_config_name)
            elif kind == "route_config":
                inline.extend(_route_clusters(hcm.route_config))
            filters.extend(_filter_clusters(hcm))
        return _Refs(own, clusters=tuple(inline), rds=tuple(rds), filter_clusters=tuple(filters))
    return _Refs(own)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


def _is_eds(cluster: cluster_pb2.Cluster) -> bool:
    return cluster.WhichOneof("cluster_discovery_type") == "type" and cluster.type == cluster_pb2.Cluster.EDS


def _eds_name(cluster: cluster_pb2.Cluster) -> str:
    return cluster.eds_cluster_config.service_name or cluster.name


def _route_clusters(route_config: route_pb2.RouteConfiguration) -> Iterable[str]:
    for vhost in route_config.virtual_hosts:
        for route in vhost.routes:
            if route.WhichOneof("action") != "route":
                continue
            action = route.route
            kind = action.WhichOneof("cluster_specifier")
            if kind == "cluster":
                yield action.cluster
            elif kind == "weighted_clusters":
                yield from (w.name for w in action.weighted_clusters.clusters if w.name)
            yield from (m.cluster for m in action.request_mirror_policies if m.cluster)


def _http_connection_managers(listener: listener_pb2.Listener) -> Iterable[hcm_pb2.HttpConnectionManager]:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for network_filter in chain.filters:
            if network_filter.typed_config.type_url == _HCM_TYPE:
                hcm = hcm_pb2.HttpConnectionManager()
                network_filter.typed_config.Unpack(hcm)
                yield hcm


def _filter_clusters(hcm: hcm_pb2.HttpConnectionManager) -> Iterable[str]:
    """Clusters the HTTP filters call out to (the ext_proc picker), which must exist too."""
    for http_filter in hcm.http_filters:
        if http_filter.typed_config.type_url == _EXT_PROC_TYPE:
            ext_proc = ext_proc_pb2.ExternalProcessor()
            http_filter.typed_config.Unpack(ext_proc)
            if ext_proc.grpc_service.WhichOneof("target_specifier") == "envoy_grpc":
                yield ext_proc.grpc_service.envoy_grpc.cluster_name
