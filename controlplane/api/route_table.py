"""`imesh get routes`: Envoy's route table as the control plane pushes it, one readable row per route.

Described from the very RouteConfiguration that translate_envoy builds (not from the spec), so
what an operator reads is what Envoy matches: order, header matches and the weighted split.
"""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2

from controlplane.model.mesh_model import MeshModel
from controlplane.translate.envoy import translate_routes
from protos import mesh_pb2


def route_entries(model: MeshModel) -> list[mesh_pb2.RouteEntry]:
    config = translate_routes(model)
    return [_entry(route) for vhost in config.virtual_hosts for route in vhost.routes]


def _entry(route: route_components_pb2.Route) -> mesh_pb2.RouteEntry:
    sticky = ""
    if route.HasField("route"):
        sticky = ",".join(p.header.header_name for p in route.route.hash_policy if p.HasField("header"))
    return mesh_pb2.RouteEntry(
        name=route.name, match=_match(route.match), destination=_destination(route), sticky_header=sticky
    )


def _match(match: route_components_pb2.RouteMatch) -> str:
    kind = match.WhichOneof("path_specifier")
    parts = [f"{kind} {getattr(match, kind)}"] if kind else []
    for header in match.headers:
        if header.HasField("string_match"):
            parts.append(f"{header.name}={header.string_match.exact}")
        elif header.present_match:
            parts.append(f"{header.name} present")
        else:
            parts.append(header.name)
    return " & ".join(parts)


def _destination(route: route_components_pb2.Route) -> str:
    if route.HasField("direct_response"):
        return f"direct {route.direct_response.status}"
    action = route.route
    if action.HasField("weighted_clusters"):
        clusters = action.weighted_clusters.clusters
        total = sum(c.weight.value for c in clusters)
        return ", ".join(f"{c.name} {100.0 * c.weight.value / total:g}%" if total else f"{c.name} 0%" for c in clusters)
    return action.cluster
