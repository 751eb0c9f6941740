"""`python -m extproc`: run the ext_proc picker until SIGTERM.

`--workers N` starts N processes sharing the gRPC port through SO_REUSEPORT: Python's GIL makes
one process one core, and the picker is the data path's bottleneck. Each worker follows the
control plane on its own; worker 0 also serves /metrics and /readyz.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal

import grpc
import uvloop
from prometheus_client import disable_created_metrics
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from extproc.mesh_view import MeshView
from extproc.service import ExternalProcessor
from extproc.sync import ControlPlaneSync
from extproc.telemetry import ExtprocMetrics
from telemetry.http_server import start_http_server

log = logging.getLogger("imesh.extproc")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--metrics-port", type=int, default=9091)
    parser.add_argument("--control-plane", default="127.0.0.1:18000", help="control plane gRPC address")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--token-sample-rate", type=float, default=0.02,
                        help="fraction of generation requests whose output tokens are counted (docs/observability.md)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace, worker: int) -> None:
    view = MeshView()
    sync = ControlPlaneSync(view, args.control_plane, client_id=f"extproc-{os.getpid()}")
    sync.start()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    metrics = ExtprocMetrics()
    metrics.watch(view)
    processor = ExternalProcessor(view, metrics=metrics, token_sample_rate=args.token_sample_rate)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, server)
    server.add_insecure_port(f"{args.host}:{args.port}")
    await server.start()
    http = await start_http_server(args.host, args.metrics_port, lambda: view.ready) if worker == 0 else None
    log.info("ext_proc worker %d serving on %s:%d", worker, args.host, args.port)
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


def main() -> None:
    args = parse_args()
    if args.workers <= 1:
        run_worker(args, 0)
        return
    children = [multiprocessing.Process(target=run_worker, args=(args, i)) for i in range(args.workers)]
    for child in children:
        child.start()
    signal.signal(signal.SIGTERM, lambda *_: [c.terminate() for c in children])
    for child in children:
        child.join()


if __name__ == "__main__":
    main()
