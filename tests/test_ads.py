"""The xDS control plane against the real Envoy on loopback, plus unit tests of the protocol rules."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import AggregatedDiscoveryServicer, add_to_server
from controlplane.xds.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    ROUTE,
    InconsistentSnapshotError,
    Snapshot,
    check_consistency,
)
from controlplane.xds.sotw import SotwStream
from imesh.envoy_process import admin_ready, envoy_process
from imesh.ports import EnvoyPorts
from imesh.processes import ManagedProcess
from tests.xds_fixtures import (
    FakeEnvoyBase,
    direct,
    eds_cluster,
    free_port,
    listener,
    load_assignment,
    route_config,
    to_cluster,
    to_weighted,
    upstream,
    with_bad_header_formatter,
)

# ---------------------------------------------------------------- helpers


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        except (httpx.HTTPError, KeyError, OSError) as error:
            last = error
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check} (last error: {last!r})")


async def start_xds(cache: SnapshotCache, port: int = 0) -> tuple[grpc.aio.Server, AggregatedDiscoveryServicer, int]:
    server = grpc.aio.server()
    servicer = add_to_server(server, cache)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, servicer, bound


@dataclass
class Mesh:
    cache: SnapshotCache
    server: grpc.aio.Server
    servicer: AggregatedDiscoveryServicer
    ports: EnvoyPorts
    envoy: ManagedProcess
    node_id: str
    listener_port: int
    upstream_port: int
    http: httpx.AsyncClient

    async def get(self, path: str) -> httpx.Response:
        return await self.http.get(f"http://127.0.0.1:{self.listener_port}{path}")

    async def dump(self) -> dict[str, dict]:
        """config_dump, reduced to: per type, the type's version and name → version of each resource."""
        raw = (await self.http.get(f"http://127.0.0.1:{self.ports.admin}/config_dump?include_eds")).json()
        out: dict[str, dict] = {}
        for config in raw["configs"]:
            kind = config["@type"].rsplit(".", 1)[-1]
            if kind == "ClustersConfigDump":
                active = {c["cluster"]["name"]: c["version_info"] for c in config.get("dynamic_active_clusters", [])}
                warming = {c["cluster"]["name"] for c in config.get("dynamic_warming_clusters", [])}
                out["clusters"] = {"version": config.get("version_info"), "active": active, "warming": warming}
            elif kind == "ListenersConfigDump":
                listeners = {
                    entry["name"]: entry.get("active_state", {}).get("version_info")
                    for entry in config.get("dynamic_listeners", [])
                }
                out["listeners"] = {"version": config.get("version_info"), "active": listeners}
            elif kind == "RoutesConfigDump":
                routes = {r["route_config"]["name"]: r["version_info"] for r in config.get("dynamic_route_configs", [])}
                out["routes"] = {"active": routes}
            elif kind == "EndpointsConfigDump":
                endpoints = {
                    e["endpoint_config"]["cluster_name"]: e.get("version_info")
                    for e in config.get("dynamic_endpoint_configs", [])
                }
                out["endpoints"] = {"active": endpoints}
        return out

    async def synced(self, version: str) -> bool:
        return self.cache.status(self.node_id).synced_version == version


def snapshot(
    mesh_ports: tuple[int, int], body: str = "one", extra_clusters: tuple[str, ...] = (), bad: bool = False
) -> Snapshot:
    """The test mesh: /up → EDS cluster `up` (the local upstream), /direct → a direct_response."""
    listener_port, upstream_port = mesh_ports
    names = ("up", *extra_clusters)
    up_route = to_cluster("/up", "up")
    routes = [
        with_bad_header_formatter(up_route) if bad else up_route,
        direct("/direct", body),
        *(to_weighted(f"/{n}", {n: 1, "up": 1}) for n in extra_clusters),
    ]
    return Snapshot.build(
        clusters=[eds_cluster(n) for n in names],
        endpoints=[load_assignment(n, upstream_port) for n in names],
        listeners=[listener(listener_port)],
        routes=[route_config(*routes)],
    )


@asynccontextmanager
async def envoy_on_ads(
    tmp_path: Path, first: Callable[[int], Snapshot], upstream_port: int, xds_api: str, mesh_type: type[Mesh] = Mesh
) -> AsyncIterator[Mesh]:
    """A real Envoy on a fresh ADS server, synced to ``first(listener_port)``; both fixtures use it."""
    cache = SnapshotCache()
    server, servicer, xds_port = await start_xds(cache)
    ports = EnvoyPorts(admin=free_port(), xds=xds_port, extproc=free_port())
    node_id = f"{xds_api}-{uuid.uuid4().hex[:8]}"
    listener_port = free_port()
    # Published before Envoy starts: Envoy is only /ready once its first CDS and LDS arrived.
    await cache.publish(first(listener_port))
    envoy = envoy_process(tmp_path, ports, node_id=node_id, xds_api=xds_api).start()
    async with httpx.AsyncClient(timeout=2.0) as http:
        m = mesh_type(cache, server, servicer, ports, envoy, node_id, listener_port, upstream_port, http)
        try:
            # wait_until sleeps: keep it off the event loop that serves ADS.
            await asyncio.to_thread(envoy.wait_until, admin_ready(ports), 20.0)
            await eventually(lambda: m.synced("1"), what="first snapshot ACKed")
            yield m
        finally:
            envoy.stop()
            await m.server.stop(0)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    with upstream() as upstream_port:  # delta: test_ads_delta.py
        async with envoy_on_ads(tmp_path, lambda port: snapshot((port, upstream_port)), upstream_port, "sotw") as m:
            yield m


# ---------------------------------------------------------------- Envoy end to end


async def test_envoy_gets_config_and_new_snapshots(mesh: Mesh) -> None:
    ports = (mesh.listener_port, mesh.upstream_port)
    up = await mesh.get("/up")
    assert up.status_code == 200 and up.text == "from upstream"
    assert (await mesh.get("/direct")).text == "one"
    dump = await mesh.dump()
    assert dump["clusters"]["version"] == "1" and dump["clusters"]["active"] == {"up": "1"}
    assert dump["listeners"]["version"] == "1" and dump["listeners"]["active"] == {"test_listener": "1"}
    assert dump["routes"]["active"] == {"test_routes": "1"}
    assert set(dump["endpoints"]["active"]) == {"up"}  # Envoy does not report EDS versions in config_dump
    assert [c.version for c in mesh.cache.convergence] == ["1"]

    acks: list[tuple[str, str, float]] = []
    mesh.cache.ack_hooks.append(lambda *args: acks.append(args))

    # A new body and a new cluster: both take effect, under one higher version.
    published = time.monotonic()
    v2 = await mesh.cache.publish(snapshot(ports, body="two", extra_clusters=("canary",)))
    assert v2.version == "2"
    await eventually(lambda: mesh.synced("2"), what="v2 ACKed")
    waited = {"2": time.monotonic() - published}
    assert (await mesh.get("/direct")).text == "two"
    assert (await mesh.get("/canary")).status_code == 200
    dump = await mesh.dump()
    assert dump["clusters"]["version"] == "2" and set(dump["clusters"]["active"]) == {"up", "canary"}
    assert dump["clusters"]["active"]["canary"] == "2" and not dump["clusters"]["warming"]
    assert dump["routes"]["active"] == {"test_routes": "2"}
    # Envoy ACKed LDS v2 but keeps showing "1": config_dump only moves a type's version when a
    # resource of that type changed (the listener did not). The cache's ACK record is the truth.
    assert dump["listeners"]["version"] == "1"
    assert mesh.cache.status(mesh.node_id).acked == {t: "2" for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}

    # Removing the cluster: make-before-break sends CDS twice (old ∪ new, then pruned).
    sent_before = mesh.cache.status(mesh.node_id).sent[CLUSTER]
    published = time.monotonic()
    v3 = await mesh.cache.publish(snapshot(ports, body="three"))
    await eventually(lambda: mesh.synced(v3.version), what="v3 ACKed")
    waited[v3.version] = time.monotonic() - published
    assert mesh.cache.status(mesh.node_id).sent[CLUSTER] - sent_before == 2
    dump = await mesh.dump()
    assert set(dump["clusters"]["active"]) == {"up"} and dump["clusters"]["version"] == "3"
    assert (await mesh.get("/direct")).text == "three"
    assert [c.version for c in mesh.cache.convergence] == ["1", "2", "3"]
    # Seconds from the change to the last ACK: no more than the test waited for that ACK.
    assert all(0 <= c.seconds < math.inf for c in mesh.cache.convergence)
    assert all(c.seconds <= waited[c.version] for c in mesh.cache.convergence if c.version in waited), waited

    assert [(n, v) for n, v, _ in acks] == [(mesh.node_id, "2"), (mesh.node_id, "3")]

    # Re-publishing the same config is a no-op, not a new version.
    assert (await mesh.cache.publish(snapshot(ports, body="three"))).version == "3"

    # Envoy going away closes its stream cleanly: status says so, and no reader task is left behind.
    await asyncio.to_thread(mesh.envoy.stop)
    await eventually(lambda: not mesh.cache.status(mesh.node_id).connected, what="disconnect noticed")
    assert not mesh.servicer.streams
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ads-read")]


async def test_rejected_snapshot_is_rolled_back_without_resend_loop(mesh: Mesh) -> None:
    nacks: list[tuple[str, str, str, str]] = []
    mesh.cache.nack_hooks.append(lambda *args: nacks.append(args))
    ports = (mesh.listener_port, mesh.upstream_port)

    # v2 adds cluster `canary` (CDS accepts it) but its routes are invalid (RDS rejects them).
    bad = await mesh.cache.publish(snapshot(ports, body="two", extra_clusters=("canary",), bad=True))
    await eventually(lambda: mesh.cache.status(mesh.node_id).nack is not None, what="the NACK")
    status = mesh.cache.status(mesh.node_id)
    assert status.nack.type_url == ROUTE and status.nack.version == bad.version
    assert "NOT_A_COMMAND" in status.nack.message, status.nack.message
    assert nacks and nacks[0][:3] == (mesh.node_id, ROUTE, bad.version)

    # Rolled back to v1's content under a new, higher version: nothing of v2 is left half-applied.
    await eventually(lambda: mesh.cache.status(mesh.node_id).synced_version not in ("1", bad.version), what="rollback")
    status = mesh.cache.status(mesh.node_id)
    revert = status.synced_version
    assert int(revert) > int(bad.version)
    assert status.nack is not None, "the rejection stays visible after the rollback"
    assert status.parked_versions == (bad.version,)
    dump = await mesh.dump()
    assert set(dump["clusters"]["active"]) == {"up"}, "the cluster that came with the rejected snapshot is gone"
    assert dump["clusters"]["version"] == revert
    assert dump["routes"]["active"] == {"test_routes": "1"}, "Envoy never applied the rejected routes"
    assert (await mesh.get("/up")).status_code == 200
    assert (await mesh.get("/direct")).text == "one"
    assert mesh.cache.convergence[-1].revert

    # No resend loop: the stream stays quiet.
    sent = mesh.cache.status(mesh.node_id).sent
    await asyncio.sleep(1.0)
    assert mesh.cache.status(mesh.node_id).sent == sent

    # A fixed snapshot goes through and clears the rejection.
    fixed = await mesh.cache.publish(snapshot(ports, body="fixed", extra_clusters=("canary",)))
    assert int(fixed.version) > int(revert)
    await eventually(lambda: mesh.synced(fixed.version), what="fixed snapshot ACKed")
    assert mesh.cache.status(mesh.node_id).nack is None
    # ... while the operator still sees the last rejection, in Envoy's words.
    assert "NOT_A_COMMAND" in mesh.cache.status(mesh.node_id).last_nack_message
    assert (await mesh.get("/direct")).text == "fixed"


async def test_envoy_survives_control_plane_restart_and_resyncs(mesh: Mesh) -> None:
    ports = (mesh.listener_port, mesh.upstream_port)
    v2 = await mesh.cache.publish(snapshot(ports, body="two"))
    await eventually(lambda: mesh.synced(v2.version), what="v2 ACKed")

    await mesh.server.stop(0)
    for _ in range(5):  # Envoy keeps serving its last config while the control plane is down
        assert (await mesh.get("/direct")).text == "two"
        assert (await mesh.get("/up")).status_code == 200
        await asyncio.sleep(0.1)

    # A fresh control plane (empty cache, numbering from scratch) on the same port.
    cache = SnapshotCache()
    await cache.publish(snapshot(ports, body="restarted"))
    mesh.server, mesh.servicer, _ = await start_xds(cache, mesh.ports.xds)
    mesh.cache = cache
    await eventually(
        lambda: _text_is(mesh.get("/direct"), "restarted"), timeout=15, what="Envoy resynced after restart"
    )
    await eventually(lambda: cache.status(mesh.node_id).in_sync, what="in sync after restart")
    status = cache.status(mesh.node_id)
    assert status.connected
    assert int(status.synced_version) > int(v2.version), "versions continue above what Envoy had"
    assert (await mesh.dump())["routes"]["active"] == {"test_routes": status.synced_version}


async def _text_is(response: Awaitable[httpx.Response], text: str) -> bool:
    return (await response).text == text


# ---------------------------------------------------------------- consistency and the cache


def test_inconsistent_snapshots_are_refused() -> None:
    bad = Snapshot.build(
        clusters=[eds_cluster("a"), eds_cluster("no_endpoints")],
        endpoints=[load_assignment("a", 1)],
        listeners=[listener(1, route_name="missing_routes")],
        routes=[route_config(to_cluster("/", "a"), to_weighted("/w", {"a": 1, "ghost": 1}), to_cluster("/x", "gone"))],
    )
    problems = check_consistency(bad)
    assert len(problems) == 4, problems
    assert any("no_endpoints" in p for p in problems)
    assert any("missing_routes" in p for p in problems)
    assert any("ghost" in p for p in problems) and any("gone" in p for p in problems)
    # Clusters from the bootstrap are valid targets when the cache is told about them.
    static = Snapshot.build(listeners=[listener(1)], routes=[route_config(to_cluster("/", "imesh_extproc"))])
    assert check_consistency(static, known_static_clusters=["imesh_extproc"]) == []
    assert check_consistency(static) != []


async def test_cache_refuses_inconsistent_snapshot_before_publishing() -> None:
    cache = SnapshotCache()
    good = await cache.publish(Snapshot.build(listeners=[listener(1)], routes=[route_config(direct("/", "ok"))]))
    woken: list[int] = []
    cache.connect("n", lambda: woken.append(1))
    with pytest.raises(InconsistentSnapshotError) as error:
        await cache.publish(Snapshot.build(listeners=[listener(1)], routes=[route_config(to_cluster("/", "nope"))]))
    assert "nope" in str(error.value)
    assert cache.snapshot is good and cache.snapshot_for("n") is good and woken == []
    # Caller-chosen versions are kept when they move forward, and replaced when they would not.
    v7 = await cache.publish(Snapshot.build("7", listeners=[listener(2)], routes=[route_config(direct("/", "x"))]))
    again = await cache.publish(Snapshot.build("7", listeners=[listener(3)], routes=[route_config(direct("/", "x"))]))
    assert (v7.version, again.version) == ("7", "8")


async def test_per_node_override() -> None:
    cache = SnapshotCache()
    common = await cache.publish(Snapshot.build(listeners=[listener(1)], routes=[route_config(direct("/", "all"))]))
    woken: list[str] = []
    cache.connect("a", lambda: woken.append("a"))
    cache.connect("b", lambda: woken.append("b"))
    special = await cache.publish(
        Snapshot.build(listeners=[listener(1)], routes=[route_config(direct("/", "b only"))]), node_id="b"
    )
    assert woken == ["b"] and cache.snapshot_for("a") is common and cache.snapshot_for("b") is special
    assert cache.status("b").target_version == special.version
    cache.clear_override("b")
    assert cache.snapshot_for("b") is common and woken == ["b", "b"]
    waiter = asyncio.create_task(cache.next_snapshot("a", common.version))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    newer = await cache.publish(Snapshot.build(listeners=[listener(2)], routes=[route_config(direct("/", "x"))]))
    assert await asyncio.wait_for(waiter, 1) is newer


# ---------------------------------------------------------------- the stream, with a fake Envoy


class FakeEnvoy(FakeEnvoyBase):
    """Drives a SotwStream (State of the World) like Envoy would."""

    stream_class = SotwStream

    def send(
        self, type_url: str, nonce: str = "", names: tuple[str, ...] = (), version: str = "", error: str = ""
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url, response_nonce=nonce, resource_names=list(names), version_info=version
        )
        self._put(request, error)

    def ack(self, response: discovery_pb2.DiscoveryResponse, names: tuple[str, ...] = ()) -> None:
        self.send(response.type_url, response.nonce, names, response.version_info)


def _names(response: discovery_pb2.DiscoveryResponse) -> set[str]:
    out = set()
    for resource in response.resources:
        message = {CLUSTER: eds_cluster("x"), ENDPOINT: load_assignment("x", 1)}.get(response.type_url)
        if message is None:
            return {r.type_url for r in response.resources}
        resource.Unpack(message)
        out.add(getattr(message, "name", "") or message.cluster_name)
    return out


def _two_cluster_snapshot(*clusters: str) -> Snapshot:
    return Snapshot.build(
        clusters=[eds_cluster(c) for c in clusters],
        endpoints=[load_assignment(c, 1) for c in clusters],
        listeners=[listener(1)],
        routes=[route_config(*(to_cluster(f"/{c}", c) for c in clusters))],
    )


async def test_stale_nonces_are_ignored() -> None:
    cache = SnapshotCache()
    await cache.publish(_two_cluster_snapshot("a"))
    envoy = FakeEnvoy(cache)
    envoy.send(CLUSTER)
    [first] = await envoy.settle()
    assert first.type_url == CLUSTER and first.version_info == "1"

    await cache.publish(_two_cluster_snapshot("a", "b"))
    [second] = await envoy.settle()
    assert second.version_info == "2" and second.nonce != first.nonce

    # Envoy's late reply to the first response (even a NACK) is stale: no response, no NACK recorded.
    envoy.send(CLUSTER, first.nonce, version="", error="stale complaint")
    assert await envoy.settle() == []
    assert envoy.stream.stale_ignored == 1 and cache.status("fake").nack is None

    envoy.ack(second)
    assert await envoy.settle() == []
    assert cache.status("fake").acked[CLUSTER] == "2"
    await envoy.close()
    assert not cache.status("fake").connected


async def test_order_eds_resend_and_make_before_break() -> None:
    cache = SnapshotCache()
    await cache.publish(_two_cluster_snapshot("a", "b"))
    envoy = FakeEnvoy(cache)
    envoy.send(CLUSTER)
    envoy.send(LISTENER)
    cds, lds = await envoy.settle()
    assert (cds.type_url, lds.type_url) == (CLUSTER, LISTENER)
    envoy.ack(cds)
    envoy.send(ENDPOINT, names=("a", "b"))
    envoy.ack(lds)
    envoy.send(ROUTE, names=("test_routes",))
    eds, rds = await envoy.settle()
    assert (eds.type_url, _names(eds), rds.type_url) == (ENDPOINT, {"a", "b"}, ROUTE)
    envoy.ack(eds, ("a", "b"))
    envoy.ack(rds, ("test_routes",))
    await envoy.settle()
    assert cache.status("fake").synced_version == "1"

    # v2 drops cluster b: CDS old ∪ new first, with EDS right behind it, then LDS and RDS.
    await cache.publish(_two_cluster_snapshot("a"))
    union, eds2, lds2, rds2 = await envoy.settle()
    assert [r.type_url for r in (union, eds2, lds2, rds2)] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    assert {r.version_info for r in (union, eds2, lds2, rds2)} == {"2"}
    assert _names(union) == {"a", "b"}
    envoy.ack(union)
    envoy.ack(eds2, ("a", "b"))
    envoy.ack(lds2)
    assert await envoy.settle() == [], "b must stay until the new routes are ACKed"
    assert cache.status("fake").synced_version == "1"
    envoy.ack(rds2, ("test_routes",))
    pruned, eds3 = await envoy.settle()
    assert (pruned.type_url, _names(pruned), eds3.type_url) == (CLUSTER, {"a"}, ENDPOINT)
    envoy.ack(pruned)
    envoy.ack(eds3, ("a",))  # Envoy drops b's endpoints: the names changed, so it gets an answer
    [eds4] = await envoy.settle()
    assert _names(eds4) == {"a"}
    envoy.ack(eds4, ("a",))
    assert await envoy.settle() == []
    assert cache.status("fake").synced_version == "2"

    # A NACK of the new version is not answered with the same version again.
    await cache.publish(_two_cluster_snapshot("a", "c"))
    responses = await envoy.settle()
    cds5 = responses[0]
    envoy.send(CLUSTER, cds5.nonce, version="2", error="no thanks")
    rollback = await envoy.settle()
    assert rollback and all(r.version_info == "4" for r in rollback)
    assert cache.status("fake").nack.message == "no thanks"
    await envoy.close()
