"""``python -m fleet --config FILE [--time-scale X] [--seed N]``: run a simulated fleet.

Prints ``fleet ready: N replicas`` on stdout (flushed) once every replica listens, which is
what ``imesh up --demo`` and the tests wait for; logs go to stderr. Runs until SIGTERM or
SIGINT; then it drains (readiness routes answer 503, so the mesh's health checks send nothing
new, while the requests queued and running finish, at most ``--drain-timeout`` seconds), stops
every replica and exits 0. A second signal stops at once. A bad config exits 2, a busy port 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from fleet.config import FleetConfig, FleetConfigError
from fleet.runner import start_fleet


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fleet", description="Run a simulated GPU fleet.")
    p.add_argument("--config", "-c", required=True, help="fleet YAML file")
    p.add_argument(
        "--time-scale",
        type=float,
        default=None,
        help="multiply every simulated duration (0.1 = 10x faster); overrides the config",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for text and error injection; overrides the config")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds the requests in flight get to finish after SIGTERM (default 30; 0: stop at once)",
    )
    p.add_argument("--log-level", default="INFO", help="stderr log level (default INFO)")
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    args = p.parse_args(argv)
    if args.time_scale is not None and args.time_scale <= 0:
        p.error("--time-scale must be > 0")
    return args


async def _serve(config: FleetConfig, time_scale: float | None, seed: int | None, drain_s: float) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        fleet = await start_fleet(config, time_scale=time_scale, seed=seed)
    except OSError as exc:
        print(f"error: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 1
    try:
        print(f"fleet ready: {len(fleet)} replicas", flush=True)
        await stop.wait()
        stop.clear()
        if drain_s > 0:
            logging.getLogger("fleet").info("draining (up to %gs; a second signal stops at once)", drain_s)
            drain, second = asyncio.ensure_future(fleet.drain(drain_s)), asyncio.ensure_future(stop.wait())
            await asyncio.wait([drain, second], return_when=asyncio.FIRST_COMPLETED)
            if drain.done() and drain.result():
                logging.getLogger("fleet").warning("still busy after %gs: %s", drain_s, ", ".join(drain.result()))
            for task in (drain, second):
                task.cancel()
        logging.getLogger("fleet").info("stopping")
    finally:
        await fleet.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = FleetConfig.load(args.config)
    except FleetConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    loop_factory = None
    if not args.no_uvloop:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(config, args.time_scale, args.seed, args.drain_timeout))


if __name__ == "__main__":
    sys.exit(main())
