"""One immutable xDS snapshot: every resource Envoy gets, under one version, checked before use.

Why a snapshot and not per-type updates: Envoy applies CDS, EDS, LDS and RDS one at a time, so a
change that spans types (a new cluster and the route to it) is only safe when all of it is built
together, checked together (`check_consistency`) and versioned together. The serialized `Any`s are
built once here, so N Envoy streams do not serialize the same resources N times, and so a later
mutation of a caller's protobuf message cannot change what a snapshot sends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Union

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

Resources = Union[Mapping[str, Message], Iterable[Message]]


def resource_name(message: Message) -> str:
    """The xDS name of a resource: `cluster_name` for a ClusterLoadAssignment, `name` otherwise."""
    if isinstance(message, endpoint_pb2.ClusterLoadAssignment):
        return message.cluster_name
    return message.name  # type: ignore[attr-defined]


def _by_name(resources: Resources) -> dict[str, Message]:
    if isinstance(resources, Mapping):
        return dict(resources)
    return {resource_name(m): m for m in resources}


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    # Deterministic bytes, so two builds of the same config compare equal (publish skips no-ops).
    packed.Pack(message, deterministic=True)
    return packed


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Resources per type URL (name → message) under one version.

    `version` may be left empty: the cache stamps versions, so they only ever increase.
    Equality is identity; compare contents with `same_resources`.
    """

    version: str
    resources: Mapping[str, Mapping[str, Message]]
    _anys: Mapping[str, Mapping[str, any_pb2.Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        frozen = {t: MappingProxyType(dict(self.resources.get(t, {}))) for t in TYPE_ORDER}
        unknown = set(self.resources) - set(TYPE_ORDER)
        if unknown:
            raise ValueError(f"unsupported type URLs: {sorted(unknown)}")
        object.__setattr__(self, "resources", MappingProxyType(frozen))
        anys = {t: MappingProxyType({n: _pack(m) for n, m in frozen[t].items()}) for t in TYPE_ORDER}
        object.__setattr__(self, "_anys", MappingProxyType(anys))

    @classmethod
    def build(
        cls,
        version: str = "",
        *,
        clusters: Resources = (),
        endpoints: Resources = (),
        listeners: Resources = (),
        routes: Resources = (),
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
        )

    def anys(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        """The packed resources of one type, serialized once for every stream."""
        return self._anys[type_url]

    def with_version(self, version: str) -> Snapshot:
        """The same resources under another version, reusing the packed `Any`s."""
        clone = object.__new__(Snapshot)
        object.__setattr__(clone, "version", version)
        object.__setattr__(clone, "resources", self.resources)
        object.__setattr__(clone, "_anys", self._anys)
        return clone

    def same_resources(self, other: Snapshot | None) -> bool:
        if other is None:
            return False
        return all(
            {n: a.value for n, a in self._anys[t].items()} == {n: a.value for n, a in other._anys[t].items()}
            for t in TYPE_ORDER
        )

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
        return frozenset(_eds_name(c) for c in self.resources[CLUSTER].values() if _is_eds(c))

    def rds_names(self) -> frozenset[str]:
        """The RouteConfiguration names the listeners of this snapshot will ask for."""
        return frozenset(
            hcm.rds.route_config_name
            for listener in self.resources[LISTENER].values()
            for hcm in _http_connection_managers(listener)
            if hcm.WhichOneof("route_specifier") == "rds"
        )


def resources_by_type(resources: object) -> dict[str, dict[str, Message]]:
    """`Snapshot.resources` from an object with `clusters`, `endpoints`, `listeners` and `routes`
    (name → message mappings or message lists), such as translate_envoy's EnvoyResources."""
    return {
        CLUSTER: _by_name(getattr(resources, "clusters")),
        ENDPOINT: _by_name(getattr(resources, "endpoints")),
        LISTENER: _by_name(getattr(resources, "listeners")),
        ROUTE: _by_name(getattr(resources, "routes")),
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
    """
    problems: list[str] = []
    clusters = set(snapshot.resources[CLUSTER]) | set(known_static_clusters)
    endpoints = snapshot.resources[ENDPOINT]
    routes = snapshot.resources[ROUTE]

    for type_url in TYPE_ORDER:
        for key, message in snapshot.resources[type_url].items():
            if not key or key != resource_name(message):
                problems.append(
                    f"{_short(type_url)} {key!r}: key does not match the resource's name {resource_name(message)!r}"
                )

    for name, cluster in snapshot.resources[CLUSTER].items():
        if _is_eds(cluster) and _eds_name(cluster) not in endpoints:
            problems.append(f"cluster {name!r}: EDS cluster has no ClusterLoadAssignment {_eds_name(cluster)!r}")

    for name, route_config in routes.items():
        for target in _route_clusters(route_config):
            if target not in clusters:
                problems.append(f"route_config {name!r}: routes to unknown cluster {target!r}")

    for name, listener in snapshot.resources[LISTENER].items():
        for hcm in _http_connection_managers(listener):
            kind = hcm.WhichOneof("route_specifier")
            if kind == "rds" and hcm.rds.route_config_name not in routes:
                problems.append(f"listener {name!r}: RDS route_config {hcm.rds.route_config_name!r} does not exist")
            elif kind == "route_config":
                for target in _route_clusters(hcm.route_config):
                    if target not in clusters:
                        problems.append(f"listener {name!r}: inline route routes to unknown cluster {target!r}")
            for target in _filter_clusters(hcm):
                if target not in clusters:
                    problems.append(f"listener {name!r}: http filter calls unknown cluster {target!r}")
    return problems


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
