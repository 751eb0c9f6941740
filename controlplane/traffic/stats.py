"""Recent request traffic per endpoint, per model version and per model, for `imesh status` / `top`.

A RecordSink. Counts are exact over the window (per-second buckets) for what Envoy logged, and
weighted estimates for the fast path's sampled successes; latency percentiles come from the
window's most recent records (at most ``max_samples`` per key), so memory stays bounded at any
request rate. Shed requests count as requests and as shed, but not in the latency samples: a 429
answered in microseconds would hide the latency of the requests that were served.

Only spec'd endpoints and versions get rows (the same bound as the metrics' labels).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from controlplane.traffic.access_log import MeshLabels
from controlplane.traffic.record import RequestRecord, weighted_percentile
from protos import mesh_pb2

K = TypeVar("K", bound=Hashable)


class _Window:
    __slots__ = ("seconds", "samples", "ttfts")

    def __init__(self, max_samples: int):
        self.seconds: deque[list] = deque()  # [second, requests, errors, shed]
        self.samples: deque[tuple[float, float, int]] = deque(maxlen=max_samples)  # (time, duration, weight)
        self.ttfts: deque[tuple[float, float, int]] = deque(maxlen=max_samples)

    def add(self, now: float, record: RequestRecord) -> None:
        second = int(now)
        seconds = self.seconds
        if seconds and seconds[-1][0] == second:
            bucket = seconds[-1]
        else:
            bucket = [second, 0, 0, 0]
            seconds.append(bucket)
        weight = record.weight
        bucket[1] += weight
        bucket[2] += record.error * weight
        bucket[3] += record.shed * weight
        if not record.shed:
            self.samples.append((now, record.duration_s, weight))
            if record.streamed and record.ttft_s is not None:
                self.ttfts.append((now, record.ttft_s, weight))

    def prune(self, now: float, window_s: float) -> None:
        oldest = now - window_s
        while self.seconds and self.seconds[0][0] + 1 <= oldest:
            self.seconds.popleft()
        for samples in (self.samples, self.ttfts):
            while samples and samples[0][0] < oldest:
                samples.popleft()

    def stats(self, window_s: float, **key: str) -> mesh_pb2.TrafficStats:
        requests = sum(b[1] for b in self.seconds)
        durations = [(d, w) for _, d, w in self.samples]
        ttfts = [(t, w) for _, t, w in self.ttfts]
        return mesh_pb2.TrafficStats(
            requests=requests,
            errors=sum(b[2] for b in self.seconds),
            shed=sum(b[3] for b in self.seconds),
            rate_rps=requests / window_s,
            p50_s=weighted_percentile(durations, 0.5),
            p99_s=weighted_percentile(durations, 0.99),
            ttft_p50_s=weighted_percentile(ttfts, 0.5),
            **key,
        )


class RequestStats:
    """Sliding-window traffic stats. Call with each record; ``fill(status)`` adds them to a MeshStatus."""

    def __init__(
        self,
        window_s: float = 30.0,
        max_samples: int = 2000,
        labels: MeshLabels | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window_s = window_s
        self.max_samples = max_samples
        self._labels = labels or MeshLabels()
        self._clock = clock
        self._endpoints: dict[str, _Window] = {}
        self._versions: dict[tuple[str, str], _Window] = {}
        self._models: dict[str, _Window] = {}

    def set_labels(self, labels: MeshLabels) -> None:
        self._labels = labels
        self._endpoints = {k: w for k, w in self._endpoints.items() if k in labels.pools}
        self._versions = {k: w for k, w in self._versions.items() if k in labels.versions}
        self._models = {k: w for k, w in self._models.items() if k in labels.models}

    def _window(self, table: dict, key) -> _Window:
        window = table.get(key)
        if window is None:
            window = table[key] = _Window(self.max_samples)
        return window

    def __call__(self, record: RequestRecord) -> None:
        now = self._clock()
        labels = self._labels
        if record.model in labels.models:
            self._window(self._models, record.model).add(now, record)
            if (record.model, record.version) in labels.versions:
                self._window(self._versions, (record.model, record.version)).add(now, record)
        if record.endpoint in labels.pools:
            self._window(self._endpoints, record.endpoint).add(now, record)

    def fill(self, status: mesh_pb2.MeshStatus) -> mesh_pb2.MeshStatus:
        """Add the window's traffic to `status` (rows only for keys with requests in the window)."""
        now, window_s = self._clock(), self.window_s
        status.traffic_window_s = window_s
        _fill(self._endpoints, status.endpoint_traffic, lambda k: {"endpoint": k}, now, window_s)
        _fill(self._versions, status.version_traffic, lambda k: {"model": k[0], "version": k[1]}, now, window_s)
        _fill(self._models, status.model_traffic, lambda k: {"model": k}, now, window_s)
        return status


def _fill(
    table: dict[K, _Window], out: Any, key_of: Callable[[K], dict[str, str]], now: float, window_s: float
) -> None:
    """Append a row to `out` (a repeated TrafficStats) per key with requests in the window."""
    for key in list(table):
        window = table[key]
        window.prune(now, window_s)
        if not window.seconds:
            del table[key]  # idle: forget it, so idle keys cost nothing
            continue
        out.append(window.stats(window_s, **key_of(key)))
