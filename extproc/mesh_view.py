"""What one ext_proc process knows about the mesh: routing table, live load, its own recent picks.

Each piece is an immutable view replaced whole by the sync task (a single attribute store is
atomic in CPython), so the per-request path reads without locks.

Recent picks stand in for in-flight requests the replicas' metrics cannot show yet: a pick made
after the last scrape is not in that scrape's queue. Envoy closes the ext_proc stream right after
the last phase it needs, not when the request ends, so completions are not seen here; instead a
pick counts only for as long as the replica's recent mean latency (Little's law: in flight =
arrivals x latency). Without that, a fast replica that finished fifty requests since the last
scrape would look fifty requests busy. The counts reset when a newer load report arrives, which
then includes the requests still running itself.
"""

from __future__ import annotations

import time
from collections import deque

from extproc.routing_view import LoadView, RoutingView
from protos import mesh_pb2


class MeshView:
    __slots__ = ("routing", "load", "recent_picks", "table_version", "_pick_log")

    def __init__(self) -> None:
        self.routing: RoutingView | None = None
        self.load: LoadView | None = None
        self.recent_picks: dict[str, float] = {}  # address -> estimated requests in flight since the report
        self._pick_log: dict[str, deque[tuple[float, float]]] = {}  # address -> (time, share) per pick
        self.table_version = 0

    @property
    def ready(self) -> bool:
        return self.routing is not None

    def apply_table(self, table: mesh_pb2.RoutingTable) -> None:
        self.routing = RoutingView.from_proto(table)
        self.table_version = table.version

    def apply_load(self, report: mesh_pb2.LoadReport) -> None:
        self.load = LoadView.from_proto(report, time.monotonic())
        self.recent_picks = {}
        self._pick_log = {}

    def note_pick(self, primaries: tuple[tuple[str, float], ...]) -> None:
        """Count a pick against each version's primary host, weighted by that version's traffic share
        (Envoy's canary split, not this process, decides which version serves it)."""
        now = time.monotonic()
        picks, logs, load = self.recent_picks, self._pick_log, self.load
        for address, share in primaries:
            log = logs.get(address)
            if log is None:
                log = logs[address] = deque()
            log.append((now, share))
            total = picks.get(address, 0.0) + share
            reading = load.readings.get(address) if load is not None else None
            if reading is not None and reading.latency_s > 0.0:
                horizon = now - reading.latency_s
                while log[0][0] < horizon:  # finished by now, on average
                    total -= log.popleft()[1]
            picks[address] = max(total, 0.0)
