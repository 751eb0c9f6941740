"""`python -m extproc`: run the ext_proc picker until SIGTERM.

`--workers N` starts N processes, worker i on gRPC port PORT+i (or on the i-th of `--port A,B,...`):
Python's GIL makes one process one core, and the picker is the data path's bottleneck. Envoy's
ext_proc cluster lists every worker's port (envoy/bootstrap.yaml, EXTPROC_ENDPOINTS), so Envoy
spreads the streams itself; one shared SO_REUSEPORT port would not do, because Envoy multiplexes
all of a worker thread's streams on one HTTP/2 connection and the kernel balances connections,
not streams (measured: one worker got all the work). Each worker follows the control plane on its
own; worker 0 also serves /metrics (every worker's counters, summed through prometheus_client's
multiprocess mode) and /readyz.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time

from extproc.worker import run_worker

log = logging.getLogger("imesh.extproc")
RESTART_INTERVAL_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m extproc", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port",
        type=_ports,
        default=[18001],
        help="gRPC port, or one per worker (A,B,...); a single port P gives worker i port P+i",
    )
    parser.add_argument("--metrics-port", type=int, default=9091)
    parser.add_argument("--control-plane", default="127.0.0.1:18000", help="control plane gRPC address")
    parser.add_argument("--workers", type=int, default=1, help="processes, one core each (module docstring)")
    parser.add_argument(
        "--token-sample-rate",
        type=float,
        default=0.02,
        help="fraction of generation requests whose output tokens are counted (docs/observability.md)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be 1 or more, got {args.workers}")
    if len(args.port) == 1:
        args.port = [args.port[0] + i for i in range(args.workers)]
    elif len(args.port) != args.workers:
        parser.error(f"--port names {len(args.port)} ports for {args.workers} workers: give one, or one per worker")
    return args


def _ports(text: str) -> list[int]:
    try:
        ports = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port or a comma-separated list of ports, got {text!r}") from None
    if not all(0 < port < 65536 for port in ports):
        raise argparse.ArgumentTypeError(f"ports must be between 1 and 65535, got {text!r}")
    return ports


def main() -> None:
    args = parse_args()
    if args.workers <= 1:
        run_worker(args, 0)
        return
    with tempfile.TemporaryDirectory(prefix="imesh-extproc-metrics-") as metrics_dir:
        # Set before the workers start, and "spawn" rather than fork: prometheus_client chooses
        # multiprocess values when it is first imported, which this process has done already.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        _supervise(args, multiprocessing.get_context("spawn"))


def _supervise(args: argparse.Namespace, spawn) -> None:
    """Run the workers until SIGTERM; restart one that dies (Envoy's streams to its port fail open
    to Envoy's own balancing meanwhile), at most once a second each, so a crash loop cannot spin."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s[supervisor]: %(message)s")
    stopping = False

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive():
                child.terminate()

    children = [spawn.Process(target=run_worker, args=(args, i)) for i in range(args.workers)]
    started = [time.monotonic()] * args.workers
    for child in children:
        child.start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        alive = [c.sentinel for c in children if c.is_alive()]
        multiprocessing.connection.wait(alive, timeout=1.0 if len(alive) == len(children) else 0.1)
        for i, child in enumerate(children):
            if stopping or child.is_alive() or time.monotonic() - started[i] < RESTART_INTERVAL_S:
                continue
            log.warning("ext_proc worker %d (pid %s) exited with %s; restarting it", i, child.pid, child.exitcode)
            children[i] = spawn.Process(target=run_worker, args=(args, i))
            started[i] = time.monotonic()
            children[i].start()
    for child in children:
        child.join()


if __name__ == "__main__":
    main()
