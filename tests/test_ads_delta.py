"""Incremental (delta) ADS against the real Envoy on loopback, plus protocol unit tests with a fake Envoy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.delta import DeltaStream
from controlplane.xds.snapshot import CLUSTER, ENDPOINT, LISTENER, ROUTE, Snapshot
from tests.test_ads import Mesh, envoy_on_ads, eventually, start_xds
from tests.xds_fixtures import (
    FakeEnvoyBase,
    direct,
    eds_cluster,
    listener,
    load_assignment,
    route_config,
    to_cluster,
    upstream,
    with_bad_header_formatter,
)


def build(ports: dict[str, int], listener_port: int, body: str = "one", bad: bool = False) -> Snapshot:
    """Clusters named by `ports` (cluster → upstream port), /<cluster> routed to each, /direct → `body`."""
    routes = [to_cluster(f"/{name}", name) for name in sorted(ports)]
    if bad:
        routes[-1] = with_bad_header_formatter(routes[-1])
    return Snapshot.build(
        clusters=[eds_cluster(name) for name in sorted(ports)],
        endpoints=[load_assignment(name, port) for name, port in sorted(ports.items())],
        listeners=[listener(listener_port)],
        routes=[route_config(direct("/direct", body), *routes)],
    )


class DeltaMesh(Mesh):
    up2: int = 0  # a second upstream, answering "from upstream two"

    def stream(self) -> DeltaStream:
        [stream] = [s for s in self.servicer.streams if isinstance(s, DeltaStream)]
        return stream

    def sent_for(self, version: str) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """(type, names sent, names removed) of every delta response that carried `version`."""
        return [(t, names, removed) for t, v, names, removed in self.stream().sent_log if v == version]

    async def hosts(self, cluster: str) -> set[int]:
        """The ports of the hosts Envoy has in `cluster` (admin /clusters)."""
        raw = (await self.http.get(f"http://127.0.0.1:{self.ports.admin}/clusters?format=json")).json()
        for status in raw.get("cluster_statuses", []):
            if status["name"] == cluster:
                return {h["address"]["socket_address"]["port_value"] for h in status.get("host_statuses", [])}
        return set()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[DeltaMesh]:
    with upstream() as up, upstream(b"from upstream two") as up2:

        def first(listener_port: int) -> Snapshot:
            return build({"a": up, "b": up, "c": up}, listener_port)

        async with envoy_on_ads(tmp_path, first, up, "delta", DeltaMesh) as m:
            m.up2 = up2
            yield m


# ---------------------------------------------------------------- Envoy end to end


async def test_initial_sync_then_one_endpoint_change_sends_only_that_resource(mesh: DeltaMesh) -> None:
    up, up2 = mesh.upstream_port, mesh.up2
    assert mesh.cache.status(mesh.node_id).xds_api == "delta"
    # Initial sync: every resource once, in CDS → EDS → LDS → RDS order.
    sent = mesh.sent_for("1")
    assert [t for t, _, _ in sent] == [CLUSTER, ENDPOINT, LISTENER, ROUTE]
    assert [set(names) for _, names, _ in sent] == [
        {"a", "b", "c"},
        {"a", "b", "c"},
        {"test_listener"},
        {"test_routes"},
    ]
    assert (await mesh.get("/b")).text == "from upstream"
    dump = await mesh.dump()
    assert set(dump["clusters"]["active"]) == {"a", "b", "c"} and not dump["clusters"]["warming"]
    # Resource versions read "<config version>-<content digest>", so config_dump says where each came from.
    assert all(v.startswith("1-") for v in dump["clusters"]["active"].values())
    assert dump["routes"]["active"]["test_routes"].startswith("1-")

    # One endpoint moves: exactly one ClusterLoadAssignment travels, nothing else.
    v2 = await mesh.cache.publish(build({"a": up, "b": up2, "c": up}, mesh.listener_port))
    await eventually(lambda: mesh.synced(v2.version), what="v2 ACKed")
    assert mesh.sent_for(v2.version) == [(ENDPOINT, ("b",), ())]
    await eventually(lambda: _hosts_are(mesh, "b", {up2}), what="b's new endpoint on Envoy's admin")
    assert (await mesh.get("/b")).text == "from upstream two"
    assert (await mesh.get("/a")).text == "from upstream"
    assert mesh.cache.status(mesh.node_id).acked == {t: v2.version for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}

    # A route-only change sends only the route configuration.
    v3 = await mesh.cache.publish(build({"a": up, "b": up2, "c": up}, mesh.listener_port, body="three"))
    await eventually(lambda: mesh.synced(v3.version), what="v3 ACKed")
    assert mesh.sent_for(v3.version) == [(ROUTE, ("test_routes",), ())]
    assert (await mesh.get("/direct")).text == "three"
    assert (await mesh.dump())["routes"]["active"]["test_routes"].startswith(f"{v3.version}-")
    assert [c.version for c in mesh.cache.convergence] == ["1", v2.version, v3.version]


async def test_added_cluster_warms_before_routes_and_removal_is_make_before_break(mesh: DeltaMesh) -> None:
    up = mesh.upstream_port
    # Adding d: CDS, then its endpoints (once Envoy asks), and only then the routes naming it.
    v2 = await mesh.cache.publish(build({"a": up, "b": up, "c": up, "d": up}, mesh.listener_port))
    await eventually(lambda: mesh.synced(v2.version), what="v2 ACKed")
    assert mesh.sent_for(v2.version) == [(CLUSTER, ("d",), ()), (ENDPOINT, ("d",), ()), (ROUTE, ("test_routes",), ())]
    assert (await mesh.get("/d")).status_code == 200

    # Removing b and d: the routes that stop naming them go first; the clusters are removed last.
    v3 = await mesh.cache.publish(build({"a": up, "c": up}, mesh.listener_port))
    await eventually(lambda: mesh.synced(v3.version), what="v3 ACKed")
    sent = mesh.sent_for(v3.version)
    assert sent == [(ROUTE, ("test_routes",), ()), (CLUSTER, (), ("b", "d"))] or sent == [
        (ROUTE, ("test_routes",), ()),
        (CLUSTER, (), ("d", "b")),
    ], sent
    dump = await mesh.dump()
    assert set(dump["clusters"]["active"]) == {"a", "c"}
    assert set(dump["endpoints"]["active"]) == {"a", "c"}, "Envoy unsubscribed the removed clusters' endpoints"
    assert (await mesh.get("/a")).status_code == 200
    assert (await mesh.get("/b")).status_code == 404  # no route any more (not a 503 to a missing cluster)


async def test_nack_keeps_last_good_config_and_is_reported(mesh: DeltaMesh) -> None:
    nacks: list[tuple[str, str, str, str]] = []
    mesh.cache.nack_hooks.append(lambda *args: nacks.append(args))
    up = mesh.upstream_port
    # v2 adds cluster d (accepted) and an invalid route (rejected by RDS).
    bad = await mesh.cache.publish(build({"a": up, "b": up, "c": up, "d": up}, mesh.listener_port, "two", bad=True))
    await eventually(lambda: mesh.cache.status(mesh.node_id).nack is not None, what="the NACK")
    status = mesh.cache.status(mesh.node_id)
    assert status.nack.type_url == ROUTE and status.nack.version == bad.version
    assert "NOT_A_COMMAND" in status.nack.message, status.nack.message
    assert nacks and nacks[0][:3] == (mesh.node_id, ROUTE, bad.version)

    # Rolled back under a new version: the cluster that came with the rejected routes is gone again.
    await eventually(lambda: mesh.cache.status(mesh.node_id).synced_version not in ("1", bad.version), what="rollback")
    status = mesh.cache.status(mesh.node_id)
    revert = status.synced_version
    assert int(revert) > int(bad.version) and status.parked_versions == (bad.version,)
    assert status.nack is not None, "the rejection stays visible after the rollback"
    dump = await mesh.dump()
    assert set(dump["clusters"]["active"]) == {"a", "b", "c"}
    # The good routes were re-sent; Envoy, holding the same content, keeps them as version 1.
    assert dump["routes"]["active"]["test_routes"].startswith("1-"), "Envoy never applied the rejected routes"
    assert (await mesh.get("/direct")).text == "one" and (await mesh.get("/a")).status_code == 200
    assert mesh.cache.convergence[-1].revert

    # No resend loop: the stream stays quiet.
    sent = mesh.cache.status(mesh.node_id).sent
    await asyncio.sleep(1.0)
    assert mesh.cache.status(mesh.node_id).sent == sent

    fixed = await mesh.cache.publish(build({"a": up, "b": up, "c": up, "d": up}, mesh.listener_port, "fixed"))
    await eventually(lambda: mesh.synced(fixed.version), what="fixed snapshot ACKed")
    assert mesh.cache.status(mesh.node_id).nack is None
    assert (await mesh.get("/direct")).text == "fixed" and (await mesh.get("/d")).status_code == 200


async def test_reconnect_sends_only_what_changed(mesh: DeltaMesh) -> None:
    up, up2 = mesh.upstream_port, mesh.up2
    await mesh.server.stop(0)
    for _ in range(3):  # Envoy keeps serving its last config while the control plane is down
        assert (await mesh.get("/b")).text == "from upstream"
        await asyncio.sleep(0.1)

    # A fresh control plane (empty cache) whose config differs from Envoy's in one endpoint only.
    cache = SnapshotCache()
    await cache.publish(build({"a": up, "b": up2, "c": up}, mesh.listener_port))
    mesh.server, mesh.servicer, _ = await start_xds(cache, mesh.ports.xds)
    mesh.cache = cache
    await eventually(lambda: cache.status(mesh.node_id).in_sync, timeout=15, what="in sync after reconnect")
    # Envoy's initial_resource_versions spared everything it already had: the wildcard types get an
    # empty answer, EDS only b.
    stream = mesh.stream()
    assert stream.resources_sent == 1, list(stream.sent_log)
    assert [(t, names) for t, _, names, _ in stream.sent_log if names] == [(ENDPOINT, ("b",))]
    await eventually(lambda: _text_is(mesh, "/b", "from upstream two"), what="the changed endpoint in use")
    assert (await mesh.get("/a")).text == "from upstream"


async def _hosts_are(mesh: DeltaMesh, cluster: str, ports: set[int]) -> bool:
    return await mesh.hosts(cluster) == ports


async def _text_is(mesh: DeltaMesh, path: str, text: str) -> bool:
    return (await mesh.get(path)).text == text


# ---------------------------------------------------------------- the protocol, with a fake Envoy


class FakeDeltaEnvoy(FakeEnvoyBase):
    """Drives a DeltaStream like Envoy would."""

    stream_class = DeltaStream

    def send(
        self,
        type_url: str,
        nonce: str = "",
        subscribe: tuple[str, ...] = (),
        unsubscribe: tuple[str, ...] = (),
        initial: dict[str, str] | None = None,
        error: str = "",
    ) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            response_nonce=nonce,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            initial_resource_versions=initial or {},
        )
        self._put(request, error)

    def ack(self, response: discovery_pb2.DeltaDiscoveryResponse, **kwargs) -> None:
        self.send(response.type_url, response.nonce, **kwargs)


def _names(response: discovery_pb2.DeltaDiscoveryResponse) -> set[str]:
    return {r.name for r in response.resources}


async def _synced_fake(cache: SnapshotCache, clusters: dict[str, int]) -> FakeDeltaEnvoy:
    """A fake Envoy that subscribed to everything and ACKed version 1 of `clusters`."""
    await cache.publish(build(clusters, 1))
    envoy = FakeDeltaEnvoy(cache)
    envoy.send(CLUSTER)
    [cds] = await envoy.settle()
    envoy.ack(cds)
    envoy.send(LISTENER)  # sent early: answered only once the clusters and endpoints are ACKed
    assert await envoy.settle() == []
    envoy.send(ENDPOINT, subscribe=tuple(clusters))
    [eds] = await envoy.settle()
    envoy.ack(eds)
    [lds] = await envoy.settle()
    assert lds.type_url == LISTENER
    envoy.ack(lds)
    envoy.send(ROUTE, subscribe=("test_routes",))
    [rds] = await envoy.settle()
    envoy.ack(rds)
    assert await envoy.settle() == []
    assert cache.status("fake").synced_version == "1"
    return envoy


async def test_fake_stale_nonce_subscriptions_and_missing_resources() -> None:
    cache = SnapshotCache()
    envoy = await _synced_fake(cache, {"a": 1, "b": 2})

    # An unknown nonce (an earlier stream's) is not an ACK or a NACK, but its subscription counts;
    # a name that does not exist is answered with removed_resources at once.
    envoy.send(ENDPOINT, nonce="999-1", subscribe=("ghost",), error="old complaint")
    [answer] = await envoy.settle()
    assert answer.type_url == ENDPOINT and not answer.resources and list(answer.removed_resources) == ["ghost"]
    assert envoy.stream.stale_ignored == 1 and cache.status("fake").nack is None
    envoy.ack(answer)

    # Re-subscribing to a name Envoy already has must be answered too.
    envoy.send(ENDPOINT, subscribe=("a",))
    [again] = await envoy.settle()
    assert _names(again) == {"a"}
    envoy.ack(again)
    # Unsubscribing needs no answer; a later change to that resource is not sent.
    envoy.send(ENDPOINT, unsubscribe=("b",))
    assert await envoy.settle() == []
    await cache.publish(build({"a": 1, "b": 3}, 1))
    assert await envoy.settle() == []
    await envoy.close()


async def test_fake_nack_of_an_older_response_still_in_force_parks_the_current_version() -> None:
    cache = SnapshotCache()
    envoy = await _synced_fake(cache, {"a": 1, "b": 2})
    # v2 changes a's endpoints; v3 changes b's, before Envoy answered v2.
    await cache.publish(build({"a": 5, "b": 2}, 1))
    [eds2] = await envoy.settle()
    await cache.publish(build({"a": 5, "b": 6}, 1))
    [eds3] = await envoy.settle()
    assert (_names(eds2), _names(eds3)) == ({"a"}, {"b"})
    # Envoy rejects v2's a, which v3 still carries: v3 is rejected in effect, and must not count as applied.
    envoy.send(ENDPOINT, eds2.nonce, error="bad a")
    rollback = await envoy.settle()
    status = cache.status("fake")
    assert status.nack.version == "3" and status.parked_versions == ("3",)
    # The rollback (v1's content as v4) re-sends a and b; nothing of v3 is sent again.
    assert [(r.type_url, _names(r)) for r in rollback] == [(ENDPOINT, {"a", "b"})]
    assert rollback[0].system_version_info == "4"
    envoy.ack(eds3)  # the late ACK of v3's b: already superseded by the rollback
    envoy.ack(rollback[0])
    assert await envoy.settle() == []
    assert cache.status("fake").synced_version == "4"
    await envoy.close()
