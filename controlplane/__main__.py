"""`python -m controlplane`: run the control plane (ADS + mesh API + load monitor) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from controlplane.server import ControlPlane, ControlPlaneConfig
from controlplane.spec import SpecError, load_spec
from controlplane.translate_envoy import EnvoyOptions
from telemetry.http_server import start_http_server


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
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    config = ControlPlaneConfig(
        spec=load_spec(args.spec),
        state_dir=args.state_dir,
        host=args.host,
        grpc_port=args.grpc_port,
        envoy=EnvoyOptions(listener_host=args.listener_host, listener_port=args.listener_port),
        scrape_interval_s=args.scrape_interval,
    )
    control_plane = ControlPlane(config)
    await control_plane.start()
    http = await start_http_server(args.host, args.metrics_port, lambda: control_plane.ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await http.cleanup()
    await control_plane.stop()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per scrape would drown the log
    try:
        uvloop.run(serve(args))
    except SpecError as exc:
        print(f"error: invalid spec:\n{exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
