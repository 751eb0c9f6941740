"""What one ext_proc process knows about the mesh: routing table, live load, its own recent picks.

Each piece is an immutable view replaced whole by the sync task (a single attribute store is
atomic in CPython), so the per-request path reads without locks.

Recent picks stand in for in-flight requests the replicas' metrics cannot show yet: a pick made
after the last scrape is not in that scrape's queue. The counts reset when a newer load report
arrives, which then includes those requests itself. (Envoy closes the ext_proc stream right after
the last phase it needs, not when the request ends, so stream lifetime cannot measure in-flight.)
"""

from __future__ import annotations

import time

from extproc.routing_view import LoadView, RoutingView
from protos import mesh_pb2


class MeshView:
    __slots__ = ("routing", "load", "recent_picks", "table_version", "load_sequence")

    def __init__(self) -> None:
        self.routing: RoutingView | None = None
        self.load: LoadView | None = None
        self.recent_picks: dict[str, float] = {}
        self.table_version = 0
        self.load_sequence = 0

    @property
    def ready(self) -> bool:
        return self.routing is not None

    def apply_table(self, table: mesh_pb2.RoutingTable) -> None:
        self.routing = RoutingView.from_proto(table)
        self.table_version = table.version

    def apply_load(self, report: mesh_pb2.LoadReport) -> None:
        self.load = LoadView.from_proto(report, time.monotonic())
        self.recent_picks = {}
        self.load_sequence = report.sequence

    def note_pick(self, primaries: tuple[tuple[str, float], ...]) -> None:
        """Count a pick against each version's primary host, weighted by that version's traffic share
        (Envoy's canary split, not this process, decides which version serves it)."""
        picks = self.recent_picks
        for address, share in primaries:
            picks[address] = picks.get(address, 0) + share
