"""The ext_proc's own telemetry: decision latency, picks and refusals, scheduler plugin times, and
sampled token counts.

Hot-path cost is kept to pre-bound prometheus_client children found by one dict lookup, and two
``perf_counter_ns`` calls per phase (measured in docs/observability.md: about 1.5 µs a request).
Label values are bounded by the routing table: a model it lacks is "other", none is "none", and a
priority is the class the picker actually applied (unknown names get the default class).

Scheduler plugins: each plugin's work per plan (filters, scorers) is one observation of
``imesh_extproc_plugin_duration_seconds{plugin, extension_point}``, made at plan time; the
per-request ranking is one series of it (``plugin="rank"``), not one per plugin, so a request pays
two clock reads and one observation for it (docs/scheduler.md).

Prefix affinity (docs/prefix-affinity.md): per request routed with it, the prompt's blocks and
the blocks the chosen replica already held by the index (counters: their ratio is the predicted
prefix-cache hit ratio); and the process's prefix indexes (entries, approximate bytes, evictions
by reason), published by the requests that change them at most once per ``INDEX_PUBLISH_S``
(reading the indexes costs more than the rest of the metrics), as series that several workers sum.

Precise mode (extproc/prefix/subscriber.py): the engines' KV events applied, by type, and the
sequence gaps (counters, workers summed); and, at scrape time, the replicas subscribed to and
whether each one's events are live (worker 0's subscriptions, standing for all, as its view does).

Output tokens: Envoy's access log cannot see a response's ``usage``, so on a sampled fraction of
generation requests (every Nth) the ext_proc asks Envoy for the response body too
(``mode_override``, STREAMED, so streams keep streaming), counts the tokens (``usage`` when the
response has it, else one per SSE chunk with content), and hands the count back in dynamic
metadata ``imesh.output_tokens`` (protos/wire.py's telemetry namespace and keys), which the access
log carries to the control plane.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from extproc.mesh_view import MeshView
from extproc.prefix.index import IndexStats
from extproc.routing_view import RoutingView
from protos.wire import TELEMETRY_METADATA_NAMESPACE, TELEMETRY_MODEL_KEY, TELEMETRY_OUTPUT_TOKENS_KEY

DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2)
PLUGIN_BUCKETS = (1e-6, 2.5e-6, 5e-6, *DECISION_BUCKETS)  # a filter over a few replicas takes a microsecond
RANK_PLUGIN, RANK_EXTENSION_POINT = "rank", "pick"  # the per-request ranking's series
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
INDEX_PUBLISH_S = 1.0  # how stale the prefix index gauges may be
EVICTION_REASONS = ("lru", "expired", "removed")  # IndexStats' evicted_lru, evicted_expired, removed
MAX_BUFFERED_BODY = 1 << 20  # an unstreamed body larger than this is not counted (a JSON object, not a stream)

_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
CONTINUE_RESPONSE_BODY = ext.ProcessingResponse(response_body=ext.BodyResponse())


class ExtprocMetrics:
    """The ext_proc's Prometheus series. ``enabled=False`` makes every call a no-op (unit tests)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        enabled: bool = True,
        index_publish_s: float = INDEX_PUBLISH_S,
    ):
        self.enabled = enabled and registry is not None
        if not self.enabled:
            return
        self._decision = Histogram(
            "imesh_extproc_decision_seconds",
            "Time the ext_proc spends answering one phase of a request.",
            ("phase",),
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self._picks = Counter(
            "imesh_extproc_picks",
            "Requests routed with a pick, by model and priority class.",
            ("model", "priority"),
            registry=registry,
        )
        self._refusals = Counter(
            "imesh_extproc_refusals",
            "Requests the ext_proc answered itself, by reason (overloaded = shed for saturation).",
            ("model", "priority", "reason"),
            registry=registry,
        )
        self._token_samples = Counter(
            "imesh_extproc_token_samples", "Responses whose output tokens were counted.", registry=registry
        )
        self._plugin_seconds = Histogram(
            "imesh_extproc_plugin_duration_seconds",
            "Time one scheduler plugin spends on one plan (extension_point filter or scorer), "
            "or ranking one request (plugin rank).",
            ("plugin", "extension_point"),
            buckets=PLUGIN_BUCKETS,
            registry=registry,
        )
        self._plugin_children: dict[tuple[str, str], Histogram] = {}
        self._prefix_blocks = Counter(
            "imesh_extproc_prefix_blocks",
            "Prompt blocks of the requests routed with prefix affinity.",
            registry=registry,
        )
        self._prefix_hit_blocks = Counter(
            "imesh_extproc_prefix_hit_blocks",
            "Of those blocks, the ones the chosen replica already held by the prefix index (predicted cache hits).",
            registry=registry,
        )
        # livesum: with several workers, each worker's index is its own; their sum is the memory.
        self._index_entries = Gauge(
            "imesh_extproc_prefix_index_entries",
            "Block entries in this process's prefix indexes.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._index_bytes = Gauge(
            "imesh_extproc_prefix_index_bytes",
            "Approximate memory of this process's prefix indexes.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        evictions = Counter(
            "imesh_extproc_prefix_index_evictions",
            "Prefix index entries dropped: lru (over the bounds), expired (ttl), removed (replica gone or engine).",
            ("reason",),
            registry=registry,
        )
        self._evictions = tuple(evictions.labels(reason) for reason in EVICTION_REASONS)
        self._kv_events = Counter(
            "imesh_extproc_kv_events_applied",
            "Engine KV-cache events applied to the prefix index, by type (malformed and unknown: skipped).",
            ("type",),
            registry=registry,
        )
        self._kv_event_children: dict[str, Counter] = {}
        self._kv_gaps = Counter(
            "imesh_extproc_kv_events_gaps",
            "KV event batches that never arrived (sequence numbers skipped).",
            registry=registry,
        )
        self._evicted = (0, 0, 0)  # the index totals last published
        self._index_publish_s = index_publish_s
        self._index_published_at = -math.inf
        self._phases: dict[str | None, Histogram] = {}
        # Raw (model, priority) as the request named them -> pre-bound child, for the current routing
        # table only (a table change can turn a model into "other"); cleared if clients send junk.
        self._routing: RoutingView | None = None
        self._pick_children: dict[tuple[str, str | None], Counter] = {}
        self._refusal_children: dict[tuple[str | None, str | None, str], Counter] = {}

    def decision(self, phase: str | None, started_ns: int) -> None:
        if not self.enabled:
            return
        elapsed = (time.perf_counter_ns() - started_ns) * 1e-9
        child = self._phases.get(phase)
        if child is None:
            child = self._phases[phase] = self._decision.labels(phase or "none")
        child.observe(elapsed)

    def _children(self, routing: RoutingView | None) -> None:
        if routing is not self._routing:
            self._routing, self._pick_children, self._refusal_children = routing, {}, {}

    def picked(self, routing: RoutingView | None, model: str, priority: str | None) -> None:
        if not self.enabled:
            return
        if routing is not self._routing:
            self._children(routing)
        key = (model, priority)
        child = self._pick_children.get(key)
        if child is None:
            if len(self._pick_children) > 4096:
                self._pick_children.clear()
            child = self._pick_children[key] = self._picks.labels(*_labels(routing, model, priority))
        child.inc()

    def refused(self, routing: RoutingView | None, model: str | None, priority: str | None, reason: str) -> None:
        if not self.enabled:
            return
        if routing is not self._routing:
            self._children(routing)
        key = (model, priority, reason)
        child = self._refusal_children.get(key)
        if child is None:
            if len(self._refusal_children) > 4096:
                self._refusal_children.clear()
            child = self._refusal_children[key] = self._refusals.labels(*_labels(routing, model, priority), reason)
        child.inc()

    def plugin_time(self, plugin: str, extension_point: str, seconds: float) -> None:
        """One plugin's work for one plan (extproc/scheduler/interfaces.py's ``PluginTimer``)."""
        if not self.enabled:
            return
        key = (plugin, extension_point)
        child = self._plugin_children.get(key)
        if child is None:  # bounded by the plugins the profiles name
            child = self._plugin_children[key] = self._plugin_seconds.labels(plugin, extension_point)
        child.observe(seconds)

    def rank_timer(self) -> Callable[[float], None] | None:
        """The pre-bound observer of one request's ranking; None when metrics are off."""
        if not self.enabled:
            return None
        return self._plugin_seconds.labels(RANK_PLUGIN, RANK_EXTENSION_POINT).observe

    def prefix_routed(self, blocks: int, held: float, stats: Callable[[], IndexStats], now: float) -> None:
        """One request routed with prefix affinity at ``now`` (monotonic): its prompt blocks, those
        the pick probably finds cached, and the indexes' state after recording it (``stats``, read
        at most once per ``index_publish_s``)."""
        if not self.enabled:
            return
        self._prefix_blocks.inc(blocks)
        if held:
            self._prefix_hit_blocks.inc(held)
        if now - self._index_published_at >= self._index_publish_s:
            self._index_published_at = now
            self._publish_index(stats())

    def _publish_index(self, stats: IndexStats) -> None:
        self._index_entries.set(stats.entries)
        self._index_bytes.set(stats.approx_bytes)
        evicted = (stats.evicted_lru, stats.evicted_expired, stats.removed)
        for child, total, before in zip(self._evictions, evicted, self._evicted, strict=True):
            if total > before:
                child.inc(total - before)
        self._evicted = evicted

    def kv_events(self, kind: str, count: int) -> None:
        """``count`` engine KV events of ``kind`` applied (subscriber.py's ``KVEventMetrics``)."""
        if not self.enabled:
            return
        child = self._kv_event_children.get(kind)
        if child is None:  # bounded: the event types, malformed and unknown
            child = self._kv_event_children[kind] = self._kv_events.labels(kind)
        child.inc(count)

    def kv_gaps(self, count: int) -> None:
        if self.enabled:
            self._kv_gaps.inc(count)

    def watch_kv_events(self, live: Callable[[], dict[str, bool]], registry: CollectorRegistry = REGISTRY) -> None:
        """Expose, at scrape time, the replicas whose events this process follows and which are live."""
        if self.enabled:
            registry.register(_FeedCollector(live))

    def token_sample(self) -> None:
        if self.enabled:
            self._token_samples.inc()

    def watch(self, view: MeshView, registry: CollectorRegistry = REGISTRY) -> None:
        """Also expose what this process knows of the mesh: routing table version, load report age."""
        if self.enabled:
            registry.register(_ViewCollector(view))


class _ViewCollector(Collector):
    def __init__(self, view: MeshView):
        self._view = view

    def describe(self):
        return []

    def collect(self):
        view = self._view
        yield GaugeMetricFamily(
            "imesh_extproc_routing_table_version",
            "Config version of the routing table in use.",
            value=view.table_version,
        )
        load = view.load
        age = time.monotonic() - load.received_at if load is not None else math.inf
        yield GaugeMetricFamily(
            "imesh_extproc_load_report_age_seconds",
            "Seconds since the last live load report arrived (+Inf: none yet).",
            value=age,
        )


class _FeedCollector(Collector):
    def __init__(self, live: Callable[[], dict[str, bool]]):
        self._live = live

    def describe(self):
        return []

    def collect(self):
        live = self._live()
        yield GaugeMetricFamily(
            "imesh_extproc_kv_events_feeds", "Replicas whose KV events this process subscribes to.", value=len(live)
        )
        yield GaugeMetricFamily(
            "imesh_extproc_kv_events_feeds_live",
            "Of those, the replicas whose events arrived recently (precise mode; the others are approximate).",
            value=sum(live.values()),
        )
        per = GaugeMetricFamily(
            "imesh_extproc_kv_events_live",
            "1 while the replica's KV events are live (precise mode), 0 when they stopped (approximate).",
            labels=("endpoint",),
        )
        for address, is_live in sorted(live.items()):
            per.add_metric((address,), 1.0 if is_live else 0.0)
        yield per


def _labels(routing: RoutingView | None, model: str | None, priority: str | None) -> tuple[str, str]:
    if routing is None:
        return ("none" if not model else "other", priority or "none")
    if not model:
        label = "none"
    else:
        label = model if routing.model(model) is not None else "other"
    return label, routing.priority(priority).name


def note_model(response: ext.ProcessingResponse, model: str) -> ext.ProcessingResponse:
    """Tell the access log which model a refused request asked for (it never reached a cluster)."""
    notes = response.dynamic_metadata.fields[TELEMETRY_METADATA_NAMESPACE].struct_value
    notes.fields[TELEMETRY_MODEL_KEY].string_value = model
    return response


# ---------------------------------------------------------------- output tokens


class TokenSampler:
    """Every ``1/rate``-th generation request gets its response body counted. rate 0: never."""

    def __init__(self, rate: float = 0.0):
        self.every = 0 if rate <= 0 else max(1, round(1 / min(rate, 1.0)))
        self._countdown = self.every

    def due(self, path: str | None) -> bool:
        if not self.every or not path or not path.startswith(GENERATION_PATHS):
            return False
        self._countdown -= 1
        if self._countdown > 0:
            return False
        self._countdown = self.every
        return True

    @staticmethod
    def ask_for_body(response: ext.ProcessingResponse) -> ext.ProcessingResponse:
        """`response` (a request-headers response) also asking Envoy to stream the response body here.

        Returns a copy: the servicer's constant responses are shared between requests.
        """
        sampled = ext.ProcessingResponse()
        sampled.CopyFrom(response)
        sampled.mode_override.response_body_mode = _STREAMED
        return sampled


class TokenMeter:
    """Counts the output tokens of one response body, chunk by chunk."""

    __slots__ = ("_buffer", "_sse", "_chunks", "_usage", "_overflow")

    def __init__(self) -> None:
        self._buffer = b""
        self._sse: bool | None = None
        self._chunks = 0
        self._usage: int | None = None
        self._overflow = False

    def feed(self, body: ext.HttpBody, metrics: ExtprocMetrics) -> ext.ProcessingResponse:
        data = body.body
        if self._sse is None and data:
            self._sse = data.lstrip().startswith(b"data:")
        if self._sse:
            self._buffer += data
            events = self._buffer.split(b"\n\n")
            self._buffer = events.pop()
            for event in events:
                self._event(event)
        elif not self._overflow:
            self._buffer += data
            if len(self._buffer) > MAX_BUFFERED_BODY:
                self._overflow, self._buffer = True, b""
        if not body.end_of_stream:
            return CONTINUE_RESPONSE_BODY
        tokens = self.tokens()
        if tokens is None:
            return CONTINUE_RESPONSE_BODY
        metrics.token_sample()
        response = ext.ProcessingResponse(response_body=ext.BodyResponse())
        notes = response.dynamic_metadata.fields[TELEMETRY_METADATA_NAMESPACE].struct_value
        notes.fields[TELEMETRY_OUTPUT_TOKENS_KEY].number_value = tokens
        return response

    def tokens(self) -> int | None:
        if self._sse:
            if self._buffer.strip():
                self._event(self._buffer)
                self._buffer = b""
            return self._usage if self._usage is not None else (self._chunks or None)
        if self._overflow or not self._buffer:
            return None
        try:
            usage = json.loads(self._buffer).get("usage") or {}
        except (ValueError, AttributeError):
            return None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return tokens if isinstance(tokens, int) and tokens > 0 else None

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(obj, dict):
                continue
            usage = obj.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                self._usage = usage["completion_tokens"]
            for choice in obj.get("choices") or ():
                delta = choice.get("delta") if isinstance(choice, dict) else None
                text = (
                    delta.get("content")
                    if isinstance(delta, dict)
                    else choice.get("text")
                    if isinstance(choice, dict)
                    else None
                )
                if text:
                    self._chunks += 1
