"""The ADS gRPC service: one servicer for both variants, State-of-the-World (`sotw.py`) and
incremental (`delta.py`), on the same port and from the same snapshot cache; docs/xds.md."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.xds.cache import SnapshotCache
from controlplane.xds.delta import DeltaStream
from controlplane.xds.sotw import SotwStream
from controlplane.xds.stream import CONTROL_PLANE_ID, ProtocolError

AdsStream = SotwStream | DeltaStream


class AggregatedDiscoveryServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """`envoy.service.discovery.v3.AggregatedDiscoveryService`: State-of-the-World and incremental."""

    def __init__(self, cache: SnapshotCache, control_plane_id: str = CONTROL_PLANE_ID):
        self.cache = cache
        self.control_plane_id = control_plane_id
        self.streams: set[AdsStream] = set()  # live ones, for introspection and tests

    async def StreamAggregatedResources(  # noqa: N802 (gRPC name)
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for response in self._serve(SotwStream(self.cache, self.control_plane_id), request_iterator, context):
            yield response

    async def DeltaAggregatedResources(  # noqa: N802 (gRPC name)
        self, request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        async for response in self._serve(DeltaStream(self.cache, self.control_plane_id), request_iterator, context):
            yield response

    async def _serve(
        self, stream: AdsStream, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Run one Envoy stream (either variant), registered while it lives."""
        self.streams.add(stream)
        try:
            async for response in stream.run(request_iterator):
                yield response
        except ProtocolError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        finally:
            self.streams.discard(stream)


def add_to_server(
    server: grpc.aio.Server, cache: SnapshotCache, control_plane_id: str = CONTROL_PLANE_ID
) -> AggregatedDiscoveryServicer:
    """Serve ADS from `cache` on `server` (before `server.start()`); returns the servicer."""
    servicer = AggregatedDiscoveryServicer(cache, control_plane_id)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
    return servicer
