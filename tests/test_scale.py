"""Scale smoke test: a 200-model mesh builds correctly and incrementally, and reaches a real Envoy.

No timing is asserted here (bench/scale.py measures); this checks that the memoized, reusing build
the control plane runs is *the same* config as a fresh translation, and that changes touch only
what they must.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import httpx

from bench.scale import STATIC_CLUSTERS, Builder, envoy_options, synthetic_spec
from controlplane.model.mesh_model import MeshModelMemo, build_mesh_model
from controlplane.spec.schema import MeshSpec
from controlplane.state.overrides import Overrides
from controlplane.translate.envoy import translate
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import add_to_server
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot, check_consistency, resources_by_type
from imesh.envoy_process import admin_ready, envoy_process
from imesh.ports import EnvoyPorts
from tests.test_ads import eventually
from tests.xds_fixtures import free_port

MODELS = 200


def changed(before: Snapshot, after: Snapshot) -> dict[str, set[str]]:
    """Per type (short name): the resources added, changed or removed between two snapshots."""
    out = {}
    for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        old, new = before.resource_versions(t), after.resource_versions(t)
        out[t.rsplit(".", 1)[1]] = {n for n in old.keys() | new.keys() if old.get(n) != new.get(n)}
    return {k: v for k, v in out.items() if v}


def fresh(spec: MeshSpec, builder: Builder, overrides: Overrides) -> Snapshot:
    """The same config translated from scratch: no memo, no reuse."""
    model = build_mesh_model(spec, overrides, builder.version)
    return Snapshot("", resources_by_type(translate(model, builder.options)))


def test_200_models_build_consistently_and_incrementally() -> None:
    spec = synthetic_spec(MODELS, 10)
    builder = Builder(spec, envoy_options(free_port()))
    first, _ = builder.build()
    model = builder.model
    versions = [v for m in model.models for v in m.versions]
    assert len(versions) == MODELS + MODELS // 4  # every 4th model runs two versions
    assert check_consistency(first, STATIC_CLUSTERS) == []
    assert set(first.resources[CLUSTER]) == set(first.resources[ENDPOINT]) == {v.cluster for v in versions}
    assert sum(len(e.lb_endpoints) for c in first.resources[ENDPOINT].values() for e in c.endpoints) == MODELS * 10
    assert list(first.resources[LISTENER]) == ["imesh_http"] and list(first.resources[ROUTE]) == ["imesh_routes"]
    routes = first.resources[ROUTE]["imesh_routes"].virtual_hosts[0].routes
    assert {m.name for m in model.models} <= {r.name for r in routes}, "every model has its weighted split route"
    assert first.eds_names() == {v.cluster for v in versions} and first.rds_names() == {"imesh_routes"}

    # Rebuilding an unchanged model reuses every message, serialized bytes and digest.
    again, _ = builder.build()
    assert again.same_resources(first) and changed(first, again) == {}
    for t in (CLUSTER, ENDPOINT, ROUTE):
        assert all(again.anys(t)[n] is first.anys(t)[n] for n in first.anys(t)), t

    # One endpoint drained: one ClusterLoadAssignment changes, nothing else (routes ignore endpoints).
    address = model.models[7].versions[0].endpoints[3].address
    drained, _ = builder.build(Overrides(drained=frozenset({address})))
    assert changed(again, drained) == {"ClusterLoadAssignment": {"model-0007/v1"}}
    assert drained.same_resources(fresh(spec, builder, Overrides(drained=frozenset({address}))))

    # One canary weight: only the route configuration changes.
    weights = Overrides(drained=frozenset({address}), weights={"model-0008": {"v1": 60, "v2": 40}})
    reweighted, _ = builder.build(weights)
    assert changed(drained, reweighted) == {"RouteConfiguration": {"imesh_routes"}}
    assert reweighted.same_resources(fresh(spec, builder, weights))

    # A model removed and one added (a new spec): their clusters, endpoints and the routes change.
    data = spec.model_dump(mode="json", by_alias=True)
    removed = data["models"].pop(5)
    data["models"].append({**removed, "name": "brand-new"})
    data["models"][10]["routing_mode"] = "fast"  # a mesh-wide effect too: the listener's ext_proc filter
    respec = MeshSpec.model_validate(data)
    builder.spec = respec
    rebuilt, _ = builder.build(weights)
    assert check_consistency(rebuilt, STATIC_CLUSTERS) == []
    delta = changed(reweighted, rebuilt)
    assert delta["Cluster"] == delta["ClusterLoadAssignment"] == {"model-0005/v1", "brand-new/v1"}
    assert delta["RouteConfiguration"] == {"imesh_routes"}
    assert rebuilt.same_resources(fresh(respec, builder, weights))

    # Unchanged model objects are shared between builds (so the memo finds them by identity, and a
    # rebuild with nothing changed translates nothing); with that sharing forgotten, the memo
    # translates again what it no longer recognises, and the result is the same.
    again_model = build_mesh_model(respec, weights, builder.version + 1, memo=builder.model_memo)
    assert all(a is b for a, b in zip(again_model.models[0].versions, builder.model.models[0].versions, strict=True))
    misses = builder.memo.misses
    same, _ = builder.build(weights)
    assert builder.memo.misses == misses and same.same_resources(rebuilt)
    builder.model_memo = MeshModelMemo()
    unshared, _ = builder.build(weights)
    assert unshared.same_resources(rebuilt)


async def test_200_models_reach_a_real_envoy_over_delta_xds(tmp_path: Path) -> None:
    spec = synthetic_spec(MODELS, 10)
    builder = Builder(spec, envoy_options(free_port()))
    full, _ = builder.build()
    cache = SnapshotCache(STATIC_CLUSTERS)
    server = grpc.aio.server()
    servicer = add_to_server(server, cache)
    xds_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    ports = EnvoyPorts(admin=free_port(), xds=xds_port, extproc=free_port())
    node = f"scale-{uuid.uuid4().hex[:6]}"
    envoy = envoy_process(tmp_path, ports, node_id=node, xds_api="delta")
    admin = f"http://127.0.0.1:{ports.admin}"
    try:
        published = await cache.publish(full)
        envoy.start()
        await asyncio.to_thread(envoy.wait_until, admin_ready(ports), 30.0)
        await eventually(lambda: cache.status(node).synced_version == published.version, 30, "the full config ACKed")
        async with httpx.AsyncClient(timeout=10.0) as http:
            dump = (await http.get(f"{admin}/config_dump?include_eds")).json()
            by_kind = {c["@type"].rsplit(".", 1)[1]: c for c in dump["configs"]}
            clusters = by_kind["ClustersConfigDump"].get("dynamic_active_clusters", [])
            assert len(clusters) == len(full.resources[CLUSTER]) and not by_kind["ClustersConfigDump"].get(
                "dynamic_warming_clusters"
            )
            eds = by_kind["EndpointsConfigDump"]["dynamic_endpoint_configs"]
            assert (
                sum(len(loc.get("lb_endpoints", [])) for e in eds for loc in e["endpoint_config"].get("endpoints", []))
                == MODELS * 10
            )
            routes = by_kind["RoutesConfigDump"]["dynamic_route_configs"]
            assert [r["route_config"]["name"] for r in routes] == ["imesh_routes"]

            # One endpoint drained: one resource on the wire, and Envoy shows it.
            [stream] = servicer.streams
            cluster = builder.model.models[3].versions[0]
            address = cluster.endpoints[0].address
            snapshot, _ = builder.build(Overrides(drained=frozenset({address})))
            v2 = await cache.publish(snapshot)
            await eventually(lambda: cache.status(node).synced_version == v2.version, 30, "the drain ACKed")
            assert [(t, names) for t, v, names, _ in stream.sent_log if v == v2.version] == [
                (ENDPOINT, (cluster.cluster,))
            ]
            url = f"{admin}/config_dump?resource=dynamic_endpoint_configs&include_eds&name_regex=^{cluster.cluster}$"
            [config] = (await http.get(url)).json()["configs"]
            statuses = {
                _host(lb["endpoint"]["address"]["socket_address"]): lb.get("health_status")
                for loc in config["endpoint_config"]["endpoints"]
                for lb in loc["lb_endpoints"]
            }
            assert statuses[address] != "HEALTHY" and list(statuses.values()).count("HEALTHY") == len(statuses) - 1
    finally:
        envoy.stop()
        await server.stop(0)


def _host(socket_address: dict) -> str:
    """The "ip:port" of a config_dump socket_address."""
    return f"{socket_address['address']}:{socket_address['port_value']}"
