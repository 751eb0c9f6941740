"""Hand-made Envoy resources and loopback helpers for the xDS tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2
from google.rpc import status_pb2

from imesh.ports import free_ports

LISTENER_NAME = "test_listener"
ROUTE_NAME = "test_routes"


def free_port() -> int:
    return free_ports(1)[0]


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource(), resource_api_version="V3")


def _any(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(nanos=250_000_000),
    )


def load_assignment(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    address = address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=address))
                ]
            )
        ],
    )


def listener(port: int, route_name: str = ROUTE_NAME) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="test",
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=_ads()),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_any(manager)
                    )
                ]
            )
        ],
    )


def to_cluster(prefix: str, cluster: str) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=route_components_pb2.RouteAction(cluster=cluster),
    )


def to_weighted(prefix: str, weights: dict[str, int]) -> route_components_pb2.Route:
    clusters = [
        route_components_pb2.WeightedCluster.ClusterWeight(name=n, weight={"value": w}) for n, w in weights.items()
    ]
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        route=route_components_pb2.RouteAction(
            weighted_clusters=route_components_pb2.WeightedCluster(clusters=clusters)
        ),
    )


def direct(prefix: str, body: str, status: int = 200) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=prefix),
        direct_response=route_components_pb2.DirectResponseAction(
            status=status, body=base_pb2.DataSource(inline_string=body)
        ),
    )


def route_config(*routes: route_components_pb2.Route, name: str = ROUTE_NAME) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[route_components_pb2.VirtualHost(name="all", domains=["*"], routes=list(routes))],
    )


def with_bad_header_formatter(route: route_components_pb2.Route) -> route_components_pb2.Route:
    """A route Envoy accepts as a proto but rejects when it builds it: an unknown formatter command."""
    bad = route_components_pb2.Route()
    bad.CopyFrom(route)
    bad.response_headers_to_add.append(
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-bad", value="%NOT_A_COMMAND%"))
    )
    return bad


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextmanager
def upstream(body: bytes = b"from upstream") -> Iterator[int]:
    """A tiny HTTP server on a free loopback port, in a thread; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    server.body = body  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class FakeEnvoyBase:
    """Drives an ADS stream (either variant) like Envoy would, collecting every response.

    Subclasses name the stream class and build their own request messages; this part is shared.
    """

    stream_class: type

    def __init__(self, cache, node_id: str = "fake"):
        self.node_id = node_id
        self.stream = self.stream_class(cache)
        self.responses: list = []
        self._requests: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._collect())
        self._first = True
        self._seen = 0

    async def _requests_iter(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def _collect(self) -> None:
        async for response in self.stream.run(self._requests_iter()):
            self.responses.append(response)

    def _put(self, request, error: str) -> None:
        """Queue a request; the first carries the node id, an `error` makes it a NACK."""
        if self._first:
            request.node.id = self.node_id
            self._first = False
        if error:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put_nowait(request)

    async def settle(self) -> list:
        """The responses produced since the last call, once the stream has nothing more to say."""
        await asyncio.sleep(0.05)
        new, self._seen = self.responses[self._seen :], len(self.responses)
        return new

    async def close(self) -> None:
        self._requests.put_nowait(None)
        await asyncio.wait_for(self._task, 2)
