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

import grpc
import uvloop
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry, disable_created_metrics
from prometheus_client.multiprocess import MultiProcessCollector

from extproc.mesh_view import MeshView
from extproc.service import ExternalProcessor
from extproc.sync import ControlPlaneSync
from extproc.telemetry import ExtprocMetrics
from telemetry.http_server import start_http_server

log = logging.getLogger("imesh.extproc")


def _exposition(workers: int) -> CollectorRegistry:
    """The registry worker 0 serves: with several workers, all of their counters and histograms summed
    from the files prometheus_client's multiprocess mode keeps under $PROMETHEUS_MULTIPROC_DIR."""
    if workers <= 1:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


async def serve(args: argparse.Namespace, worker: int) -> None:
    view = MeshView()
    sync = ControlPlaneSync(view, args.control_plane, client_id=f"extproc-{os.getpid()}")
    sync.start()
    server = grpc.aio.server()
    metrics = ExtprocMetrics()
    processor = ExternalProcessor(view, metrics=metrics, token_sample_rate=args.token_sample_rate)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    port = args.port[worker]
    server.add_insecure_port(f"{args.host}:{port}")
    await server.start()
    http = None
    if worker == 0:
        exposition = _exposition(args.workers)
        metrics.watch(view, exposition)  # worker 0's view of the mesh stands for all
        http = await start_http_server(args.host, args.metrics_port, lambda: view.ready, exposition)
    log.info("ext_proc worker %d serving on %s:%d", worker, args.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)
    await sync.stop()
    if http is not None:
        await http.cleanup()


def run_worker(args: argparse.Namespace, worker: int) -> None:
    disable_created_metrics()  # *_created series: twice the series, unused by Prometheus' text format
    logging.basicConfig(level=args.log_level, format=f"%(asctime)s %(levelname)s %(name)s[{worker}]: %(message)s")
    uvloop.run(serve(args, worker))
