"""One ext_proc worker process: the gRPC servicer on its port, following the control plane.

A module of its own (not ``__main__``) so that ``multiprocessing``'s spawn can import ``run_worker``
in each worker (extproc/__main__.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

from extproc.mesh_view import MeshView
from extproc.prefix.subscriber import KVEventSubscriber
from extproc.service import ExternalProcessor
from extproc.sync import ControlPlaneSync
from extproc.telemetry import ExtprocMetrics
from telemetry.http_server import start_http_server

log = logging.getLogger("imesh.extproc")
FIRST_TABLE_WAIT_S = 10.0


def _exposition(workers: int) -> CollectorRegistry:
    """The registry worker 0 serves: with several workers, all of their counters and histograms summed
    from the files prometheus_client's multiprocess mode keeps under $PROMETHEUS_MULTIPROC_DIR."""
    if workers <= 1:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def _listening(address: tuple[str, int]) -> bool:
    """Whether another worker has opened its gRPC port (it does once it holds a routing table):
    worker 0's /readyz speaks for all of them."""
    try:
        socket.create_connection(address, timeout=0.2).close()
        return True
    except OSError:
        return False


async def _first_table(sync: ControlPlaneSync, control_plane: str) -> None:
    """Listen only once there is a routing table: until then Envoy's health check keeps this worker
    out of its balancing, and a sibling (or Envoy's own routes) serves. A control plane that stays
    down does not keep the worker out for ever: after FIRST_TABLE_WAIT_S it passes requests through."""
    try:
        await asyncio.wait_for(sync.table_received.wait(), FIRST_TABLE_WAIT_S)
    except TimeoutError:
        log.warning(
            "no routing table from %s after %.0f s: serving without one (requests pass through)",
            control_plane,
            FIRST_TABLE_WAIT_S,
        )


async def serve(args: argparse.Namespace, worker: int) -> None:
    view = MeshView()
    server = grpc.aio.server()
    metrics = ExtprocMetrics()
    processor = ExternalProcessor(view, metrics=metrics, token_sample_rate=args.token_sample_rate)
    # Precise prefix affinity: this worker follows the engines' KV events into its own indexes.
    kv_events = KVEventSubscriber(processor.picker.prefix, metrics=metrics)

    def on_table() -> None:
        processor.prepare()
        if view.routing is not None:
            kv_events.follow(view.routing.kv_events)

    sync = ControlPlaneSync(view, args.control_plane, client_id=f"extproc-{os.getpid()}", on_table=on_table)
    sync.start()
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    port = args.port[worker]
    http = None
    if worker == 0:
        exposition = _exposition(args.workers)
        metrics.watch(view, exposition)  # worker 0's view of the mesh stands for all
        metrics.watch_kv_events(kv_events.live, exposition)
        others = [(args.host, other) for other in args.port[1:]]
        http = await start_http_server(
            args.host, args.metrics_port, lambda: view.ready and all(map(_listening, others)), exposition
        )
    await _first_table(sync, args.control_plane)
    server.add_insecure_port(f"{args.host}:{port}")
    await server.start()
    log.info("ext_proc worker %d serving on %s:%d", worker, args.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    await sync.stop()
    await kv_events.close()
    if http is not None:
        await http.cleanup()


def run_worker(args: argparse.Namespace, worker: int) -> None:
    disable_created_metrics()  # *_created series: twice the series, unused by Prometheus' text format
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s %(name)s[{worker}]: %(message)s")
    uvloop.run(serve(args, worker))
