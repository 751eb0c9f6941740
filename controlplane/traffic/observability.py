"""The control plane's telemetry, wired in one place: access-log records, /metrics, status traffic.

- ``records``: the RequestRecords hub; the ALS servicer emits into it, sinks consume. Two sinks
  are ours (``RequestMetrics`` for /metrics, ``RequestStats`` for `imesh status`); other features
  (canary gates) add their own with ``control_plane.request_records.add_sink(fn)``.
- xDS: ACK/NACK hooks on the snapshot cache feed counters and the convergence histogram; pushes
  and per-Envoy sync state are read from the cache at scrape time.
- Live load: read from the load monitor at scrape time. Reading it on demand (rather than setting
  gauges from the monitor's per-scrape callback) costs nothing between Prometheus scrapes, however
  many replicas are scraped how often, and a removed endpoint's series disappear on their own.

Everything registers on a registry of its own, so several control planes can live in one process
(tests) and /metrics shows exactly this one's series.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from controlplane.load.monitor import LoadMonitor
from controlplane.model.mesh_model import MeshModel
from controlplane.traffic.access_log import AccessLogServicer, MeshLabels
from controlplane.traffic.access_log import add_to_server as add_access_log_server
from controlplane.traffic.metrics import RequestMetrics
from controlplane.traffic.record import RequestRecords
from controlplane.traffic.stats import RequestStats
from controlplane.xds.cache import SnapshotCache
from protos import mesh_pb2

CONVERGENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Observability:
    def __init__(
        self,
        cache: SnapshotCache,
        load_monitor: LoadMonitor,
        config_version: Callable[[], int],
        *,
        stats_window_s: float = 30.0,
        log_sample: int = 1,
        registry: CollectorRegistry | None = None,
    ):
        self.registry = registry or _process_registry()
        self.records = RequestRecords()
        self.labels = MeshLabels()
        self.request_metrics = RequestMetrics(self.registry)
        self.request_stats = RequestStats(window_s=stats_window_s)
        self.records.add_sink(self.request_metrics)
        self.records.add_sink(self.request_stats)
        self.access_log: AccessLogServicer | None = None
        self.log_sample = log_sample  # EnvoyOptions.fast_path_log_sample: a sampled record's weight

        self.acks = Counter(
            "imesh_xds_acks", "Config versions an Envoy fully applied (every type ACKed).", registry=self.registry
        )
        self.nacks = Counter(
            "imesh_xds_nacks", "xDS responses an Envoy rejected, by resource type.", ("type",), registry=self.registry
        )
        self.convergence = Histogram(
            "imesh_xds_convergence_seconds",
            "Config change (or Envoy connect) to that Envoy's full ACK.",
            buckets=CONVERGENCE_BUCKETS,
            registry=self.registry,
        )
        cache.ack_hooks.append(self._on_ack)
        cache.nack_hooks.append(self._on_nack)
        self.registry.register(_MeshCollector(self, cache, load_monitor, config_version))

    # ------------------------------------------------------------ wiring

    def add_to_server(self, server) -> None:
        """Serve Envoy's access log stream on the control plane's gRPC server (before it starts)."""
        self.access_log = add_access_log_server(server, self.records, self.labels, self.log_sample)

    def set_model(self, model: MeshModel) -> None:
        """A new config: the label values every sink resolves against."""
        self.labels = MeshLabels.from_model(model)
        if self.access_log is not None:
            self.access_log.labels = self.labels
        self.request_metrics.set_labels(self.labels)
        self.request_stats.set_labels(self.labels)

    def fill_status(self, status: mesh_pb2.MeshStatus) -> mesh_pb2.MeshStatus:
        return self.request_stats.fill(status)

    # ------------------------------------------------------------ xDS hooks

    def _on_ack(self, node_id: str, version: str, seconds: float) -> None:
        self.acks.inc()
        self.convergence.observe(seconds)

    def _on_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        self.nacks.labels(type_url.rsplit(".", 1)[-1]).inc()


def _process_registry() -> CollectorRegistry:
    """A fresh registry with the usual process_*, python_gc_* and python_info series."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _MeshCollector(Collector):
    """Series read at scrape time: xDS pushes and sync state, live load per endpoint, ALS health."""

    def __init__(
        self, obs: Observability, cache: SnapshotCache, load_monitor: LoadMonitor, config_version: Callable[[], int]
    ):
        self._obs, self._cache, self._load, self._version = obs, cache, load_monitor, config_version

    def describe(self) -> Iterable:
        return []  # collected lazily; nothing to check for duplicates up front

    def collect(self) -> Iterable:
        yield GaugeMetricFamily(
            "imesh_config_version", "Config version the control plane publishes.", value=self._version()
        )
        yield from self._xds()
        yield from self._endpoints()
        obs = self._obs
        yield CounterMetricFamily(
            "imesh_access_log_entries",
            "Access log entries received from Envoy.",
            value=obs.access_log.entries if obs.access_log else 0,
        )
        yield GaugeMetricFamily(
            "imesh_access_log_streams",
            "Open access log streams (one per Envoy worker).",
            value=obs.access_log.streams if obs.access_log else 0,
        )
        yield CounterMetricFamily(
            "imesh_request_sink_errors", "Request record sinks that raised.", value=obs.records.sink_errors
        )

    def _xds(self) -> Iterable:
        pushes = CounterMetricFamily(
            "imesh_xds_pushes", "xDS responses sent to Envoys, by resource type.", labels=("type",)
        )
        connected = GaugeMetricFamily("imesh_envoy_connected", "Envoys with an open ADS stream.", labels=("node",))
        synced = GaugeMetricFamily(
            "imesh_envoy_config_version", "Config version each connected Envoy fully ACKed.", labels=("node",)
        )
        in_sync = GaugeMetricFamily(
            "imesh_envoy_in_sync", "1 when the Envoy runs the version it should.", labels=("node",)
        )
        sent: dict[str, int] = {}
        for node in self._cache.node_statuses():
            for type_url, count in node.sent.items():
                short = type_url.rsplit(".", 1)[-1]
                sent[short] = sent.get(short, 0) + count
            if not node.connected:  # only live Envoys get per-node series: churn does not pile up
                continue
            connected.add_metric([node.node_id], 1)
            version = node.synced_version
            synced.add_metric([node.node_id], int(version) if version and version.isdigit() else 0)
            in_sync.add_metric([node.node_id], 1 if node.in_sync else 0)
        for short, count in sorted(sent.items()):
            pushes.add_metric([short], count)
        yield from (pushes, connected, synced, in_sync)

    def _endpoints(self) -> Iterable:
        pools = self._obs.labels.pools
        families = {
            "waiting": GaugeMetricFamily(
                "imesh_endpoint_queue_requests", "Requests waiting in the replica's queue.", labels=("endpoint", "pool")
            ),
            "running": GaugeMetricFamily(
                "imesh_endpoint_running_requests",
                "Requests in the replica's running batch.",
                labels=("endpoint", "pool"),
            ),
            "kv_cache": GaugeMetricFamily(
                "imesh_endpoint_kv_cache_usage_ratio", "KV cache in use, 0..1.", labels=("endpoint", "pool")
            ),
            "gpu_util": GaugeMetricFamily(
                "imesh_endpoint_gpu_utilization_ratio",
                "GPU utilization 0..1, where the engine reports it.",
                labels=("endpoint", "pool"),
            ),
            "age_s": GaugeMetricFamily(
                "imesh_endpoint_reading_age_seconds",
                "Seconds since the last successful load scrape (+Inf: never).",
                labels=("endpoint", "pool"),
            ),
            "reachable": GaugeMetricFamily(
                "imesh_endpoint_reachable", "1 when the last load scrape succeeded.", labels=("endpoint", "pool")
            ),
        }
        for reading in self._load.build_report().endpoints:
            labels = [reading.address, pools.get(reading.address, "none")]
            families["reachable"].add_metric(labels, 1 if reading.reachable else 0)
            families["age_s"].add_metric(labels, reading.age_s)
            if math.isinf(reading.age_s):
                continue  # never answered: no load to report
            families["waiting"].add_metric(labels, reading.waiting)
            families["running"].add_metric(labels, reading.running)
            families["kv_cache"].add_metric(labels, reading.kv_cache)
            if reading.gpu_util >= 0:
                families["gpu_util"].add_metric(labels, reading.gpu_util)
        yield from families.values()
