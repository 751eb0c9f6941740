"""The Prometheus sink for RequestRecords: request, error, latency, TTFT and token-rate series.

Cardinality is bounded by the spec, never by what clients send: a model, version, endpoint or
priority the spec does not have becomes "other", a missing one "none", and status codes outside a
short list collapse to their class ("2xx"). When a config change drops endpoints, their series
are removed, so replica churn (pods coming and going) does not grow the exposition forever.

Per record the cost is one tuple, one dict lookup and a few increments on pre-bound children
(docs/observability.md has the measured number). A record with ``weight`` N (a fast-path success
Envoy logged 1 in N of) counts N requests and is observed N times, so rates, ratios and histogram
quantiles stay unbiased estimates.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from controlplane.traffic.access_log import MeshLabels
from controlplane.traffic.record import RequestRecord

# Status codes worth their own series; anything else is counted by class.
KNOWN_CODES = frozenset({200, 201, 204, 400, 401, 403, 404, 408, 413, 422, 429, 499, 500, 502, 503, 504})

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0, 2500.0)

REQUEST_LABELS = ("model", "version", "pool", "endpoint", "priority")
TOKEN_LABELS = ("model", "version", "pool", "priority")


def code_label(status: int) -> str:
    if status in KNOWN_CODES or status == 0:
        return str(status)
    return f"{status // 100}xx"


class RequestMetrics:
    """A RecordSink: call it with each record. ``set_labels`` on every config change."""

    def __init__(self, registry: CollectorRegistry, labels: MeshLabels | None = None):
        self.requests = Counter(
            "imesh_requests",
            "Requests that finished, by where they went and the status the client got.",
            [*REQUEST_LABELS, "code"],
            registry=registry,
        )
        self.errors = Counter(
            "imesh_request_errors",
            "Requests that failed on the serving side: 5xx, an Envoy upstream failure, or no answer.",
            REQUEST_LABELS,
            registry=registry,
        )
        self.duration = Histogram(
            "imesh_request_duration_seconds",
            "End-to-end request duration as Envoy measured it.",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "imesh_time_to_first_token_seconds",
            "Streamed responses: request start to the first upstream byte (the first token on vLLM).",
            TOKEN_LABELS,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.token_rate = Histogram(
            "imesh_output_tokens_per_second",
            "Sampled responses: output tokens over the generation time (first to last byte when streamed).",
            TOKEN_LABELS,
            buckets=TOKEN_RATE_BUCKETS,
            registry=registry,
        )
        self.shed = Counter(
            "imesh_requests_shed",
            "Requests refused with 429 because the replicas were saturated.",
            ("model", "priority"),
            registry=registry,
        )
        self.rate_limited = Counter(
            "imesh_requests_rate_limited",
            "Requests refused with 429 by a rate limit.",
            ("model", "priority"),
            registry=registry,
        )
        self._labels = labels or MeshLabels()
        # label tuple -> pre-bound children, built on first use (labels() takes a lock and hashes)
        self._request_children: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}
        self._code_children: dict[tuple[str, ...], Counter] = {}
        self._token_children: dict[tuple[str, ...], tuple[Histogram, Histogram]] = {}

    # ------------------------------------------------------------ labels

    def set_labels(self, labels: MeshLabels) -> None:
        """Adopt a new config's label values; drop the series of endpoints and versions it no longer has."""
        self._labels = labels
        gone = [key for key in self._request_children if not self._still_valid(key[0], key[1], key[3], labels)]
        for key in gone:
            del self._request_children[key]
            for metric in (self.errors, self.duration):
                _remove(metric, key)
        for key in [k for k in self._code_children if not self._still_valid(k[0], k[1], k[3], labels)]:
            del self._code_children[key]
            _remove(self.requests, key)
        for key in [k for k in self._token_children if not self._still_valid(k[0], k[1], "none", labels)]:
            del self._token_children[key]
            for metric in (self.ttft, self.token_rate):
                _remove(metric, key)

    @staticmethod
    def _still_valid(model: str, version: str, endpoint: str, labels: MeshLabels) -> bool:
        version_ok = version in ("none", "other") or (model, version) in labels.versions
        endpoint_ok = endpoint in ("none", "other") or endpoint in labels.pools
        return version_ok and endpoint_ok

    def _label_values(self, record: RequestRecord) -> tuple[str, str, str, str, str]:
        labels = self._labels
        model = record.model if record.model in labels.models else ("other" if record.model else "none")
        if not record.version:
            version = "none"
        else:
            version = record.version if (record.model, record.version) in labels.versions else "other"
        if not record.endpoint:
            endpoint, pool = "none", "none"
        elif record.endpoint in labels.pools:
            endpoint, pool = record.endpoint, labels.pools[record.endpoint]
        else:
            endpoint, pool = "other", "other"
        priority = record.priority if record.priority in labels.priorities else "other"
        return model, version, pool, endpoint, priority

    # ------------------------------------------------------------ the sink

    def __call__(self, record: RequestRecord) -> None:
        key = self._label_values(record)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.errors.labels(*key), self.duration.labels(*key))
        code_key = (*key, code_label(record.status))
        counter = self._code_children.get(code_key)
        if counter is None:
            counter = self._code_children[code_key] = self.requests.labels(*code_key)
        weight = record.weight
        counter.inc(weight)
        errors, duration = children
        if record.error:
            errors.inc(weight)
        _observe(duration, record.duration_s, weight)
        model, version, pool, _, priority = key
        if record.shed:
            self.shed.labels(model, priority).inc(weight)
        elif record.rate_limited:
            self.rate_limited.labels(model, priority).inc(weight)
        ttft = record.ttft_s if record.streamed else None  # time to first token means something only streamed
        rate = record.output_tokens_per_s
        if ttft is not None or rate is not None:
            token_key = (model, version, pool, priority)
            token_children = self._token_children.get(token_key)
            if token_children is None:
                token_children = self._token_children[token_key] = (
                    self.ttft.labels(*token_key),
                    self.token_rate.labels(*token_key),
                )
            if ttft is not None:
                _observe(token_children[0], ttft, weight)
            if rate is not None:
                _observe(token_children[1], rate, weight)


def _observe(histogram: Histogram, value: float, weight: int) -> None:
    # prometheus_client has no weighted observe; N calls for a record that stands for N requests.
    for _ in range(weight):
        histogram.observe(value)


def _remove(metric, key: tuple) -> None:
    try:
        metric.remove(*key)
    except KeyError:
        pass
