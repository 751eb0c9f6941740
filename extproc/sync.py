"""Keeps a MeshView current from the control plane's MeshState streams.

When the control plane is unreachable the last view stays in use (Envoy keeps serving, and the
picker keeps picking on the last table; load readings age and the picker stops trusting them),
and the sync retries with capped backoff until it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from extproc.mesh_view import MeshView
from protos import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("imesh.extproc.sync")

# Retrying a control plane that is down costs a refused connection per try; what a long backoff
# would cost is routing-table lag after it restarts (it was up to 2 s with a 2 s cap).
INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 0.5


class ControlPlaneSync:
    def __init__(
        self,
        view: MeshView,
        target: str,
        client_id: str,
        on_table: Callable[[], None] | None = None,
    ):
        self._view = view
        self._on_table = on_table  # called after each new table is in the view
        self._target = target
        self._request = mesh_pb2.WatchRequest(client_id=client_id)
        self._tasks: list[asyncio.Task] = []
        self.table_received = asyncio.Event()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._follow("routing table", self._watch_table)),
            asyncio.create_task(self._follow("load", self._watch_load)),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, what: str, watch) -> None:
        backoff = INITIAL_BACKOFF_S
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                async with grpc.aio.insecure_channel(self._target) as channel:
                    await watch(mesh_pb2_grpc.MeshStateStub(channel))
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                log.warning("%s stream from %s lost (%s); keeping the last view", what, self._target, exc.code().name)
            if loop.time() - started > MAX_BACKOFF_S:  # the stream had lived: a fresh outage starts small
                backoff = INITIAL_BACKOFF_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _watch_table(self, stub: mesh_pb2_grpc.MeshStateStub) -> None:
        async for table in stub.WatchRoutingTable(self._request):
            self._view.apply_table(table)
            if self._on_table is not None:
                try:
                    self._on_table()
                except Exception:  # a bug there must not stop the table stream
                    log.exception("routing table %d: follow-up failed", table.version)
            self.table_received.set()
            log.info("routing table version %d: %d models", table.version, len(table.models))

    async def _watch_load(self, stub: mesh_pb2_grpc.MeshStateStub) -> None:
        async for report in stub.WatchLoad(self._request):
            self._view.apply_load(report)
