"""`python -m controlplane`: run the control plane (ADS + mesh API + load monitor) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

import uvloop
from prometheus_client import disable_created_metrics

from controlplane.errors import StateError
from controlplane.server import ControlPlane, ControlPlaneConfig
from controlplane.spec.schema import SpecError, load_spec
from controlplane.translate.envoy import EnvoyOptions
from telemetry.http_server import start_http_server


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m controlplane", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="initial spec (used when --state-dir is empty)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where every change is persisted")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=18000, help="ADS and mesh API")
    parser.add_argument("--metrics-port", type=int, default=9090)
    parser.add_argument("--listener-host", default="127.0.0.1", help="address Envoy's listener binds")
    parser.add_argument("--listener-port", type=int, default=8080)
    parser.add_argument("--scrape-interval", type=float, default=0.1, help="seconds between load scrapes")
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=5.0,
        help="seconds a change waits for every Envoy's ACK before the API reports it unconfirmed",
    )
    parser.add_argument("--stats-window", type=float, default=30.0, help="seconds of traffic `imesh status` reports")
    telemetry = parser.add_argument_group("telemetry (docs/observability.md)")
    telemetry.add_argument("--access-log-path", default="/dev/stdout", help="Envoy's JSON access log file ('' = none)")
    telemetry.add_argument(
        "--access-log-flush",
        type=float,
        default=0.5,
        help="seconds Envoy batches access log entries for the control plane",
    )
    telemetry.add_argument(
        "--fast-path-log-sample",
        type=_positive_int,
        default=10,
        metavar="N",
        help="log 1 in N successful fast-path requests (failures and picker-routed requests "
        "are always logged; metrics count each sampled one as N); 1 logs every request",
    )
    telemetry.add_argument(
        "--no-grpc-access-log",
        action="store_true",
        help="no access log stream to the control plane (no request metrics or status traffic)",
    )
    telemetry.add_argument("--tracing-collector", default="", help="OTLP/gRPC collector host:port for Envoy's tracer")
    telemetry.add_argument(
        "--trace-sampling",
        type=float,
        default=100.0,
        help="percent of requests traced when the client sent no sampling decision",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = ControlPlaneConfig(
        spec=load_spec(args.spec),
        state_dir=args.state_dir,
        host=args.host,
        grpc_port=args.grpc_port,
        envoy=EnvoyOptions(
            listener_host=args.listener_host,
            listener_port=args.listener_port,
            grpc_access_log=not args.no_grpc_access_log,
            access_log_flush_s=args.access_log_flush,
            access_log_path=args.access_log_path,
            fast_path_log_sample=args.fast_path_log_sample,
            tracing_collector=args.tracing_collector,
            trace_sampling_percent=args.trace_sampling,
        ),
        scrape_interval_s=args.scrape_interval,
        stats_window_s=args.stats_window,
        ack_timeout_s=args.ack_timeout,
    )
    control_plane = ControlPlane(config)
    await control_plane.start()
    # What start-up built (the spec, the mesh model's shared objects, the first snapshot) lives as
    # long as the process: keep the cyclic GC from re-scanning it during every rebuild (at 10,000
    # endpoints a full collection otherwise stalls a rebuild by ~50 ms; docs/xds.md).
    gc.freeze()
    http = await start_http_server(
        args.host, args.metrics_port, lambda: control_plane.ready, registry=control_plane.observability.registry
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await http.cleanup()
    await control_plane.stop()


def main() -> None:
    args = parse_args()
    disable_created_metrics()  # *_created series: twice the series, unused by Prometheus' text format
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape would drown the log
    try:
        uvloop.run(serve(args))
    except SpecError as exc:
        print(f"error: invalid spec:\n{exc}", file=sys.stderr)
        sys.exit(2)
    except StateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
