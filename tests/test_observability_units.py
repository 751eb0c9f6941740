"""The observability pieces on their own: record fan-out, windows, label bounds, token counting, xDS hooks."""

from __future__ import annotations

import json

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.canary.controller import VersionWindows
from controlplane.load.monitor import LoadMonitor
from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import parse_spec
from controlplane.traffic.access_log import MeshLabels, to_record
from controlplane.traffic.metrics import RequestMetrics, code_label
from controlplane.traffic.observability import Observability
from controlplane.traffic.record import RequestRecord, RequestRecords, weighted_percentile
from controlplane.traffic.stats import RequestStats
from controlplane.translate.envoy import EnvoyOptions
from controlplane.translate.telemetry import access_logs
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER
from extproc.telemetry import ExtprocMetrics, TokenMeter, TokenSampler
from protos import mesh_pb2

SPEC = """
apiVersion: imesh/v1
kind: Mesh
pools: [{name: fast}, {name: cheap}]
models:
  - name: chat
    versions:
      - {name: v1, endpoints: [{address: 10.0.0.1:8000, pool: fast}, {address: 10.0.0.2:8000, pool: cheap}]}
"""


def labels(spec: str = SPEC) -> MeshLabels:
    return MeshLabels.from_model(build_mesh_model(parse_spec(spec, "test")))


def record(**fields) -> RequestRecord:
    base = dict(
        model="chat",
        version="v1",
        endpoint="10.0.0.1:8000",
        pool="fast",
        priority="standard",
        status=200,
        duration_s=0.1,
        ttft_s=0.01,
        upstream_failure=False,
        shed=False,
        request_bytes=10,
        response_bytes=20,
    )
    return RequestRecord(**{**base, **fields})


def samples(registry: CollectorRegistry) -> dict:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ---------------------------------------------------------------- records


def test_a_failing_sink_does_not_starve_the_others():
    hub, seen = RequestRecords(), []
    hub.add_sink(lambda r: 1 / 0)
    remove = hub.add_sink(seen.append)
    hub.emit(record())
    remove()
    hub.emit(record())
    assert len(seen) == 1 and hub.sink_errors == 2 and hub.received == 2


def test_access_log_entry_becomes_a_labelled_record():
    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = "chat/v1"
    common.upstream_remote_address.socket_address.address = "10.0.0.2"
    common.upstream_remote_address.socket_address.port_value = 8000
    common.time_to_first_upstream_rx_byte.FromMilliseconds(20)
    common.time_to_last_upstream_rx_byte.FromMilliseconds(220)
    common.duration.FromMilliseconds(230)
    common.metadata.filter_metadata["imesh"].update({"output_tokens": 50})
    entry.request.request_headers["x-priority"] = "no-such-class"
    entry.response.response_code.value = 200
    entry.response.response_headers["content-type"] = "text/event-stream"
    r = to_record(entry, labels(), node="envoy-1")
    assert (r.model, r.version, r.endpoint, r.pool, r.priority) == ("chat", "v1", "10.0.0.2:8000", "cheap", "standard")
    assert r.streamed and abs(r.ttft_s - 0.02) < 1e-9 and abs(r.generation_s - 0.2) < 1e-9
    assert r.output_tokens == 50 and abs(r.output_tokens_per_s - 250) < 1e-6 and not r.error


def test_a_shed_entry_keeps_the_model_the_ext_proc_named():
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.metadata.filter_metadata["imesh"].update({"model": "chat"})
    entry.response.response_code.value = 429
    entry.response.response_code_details = "imesh_overloaded"
    r = to_record(entry, labels())
    assert (r.model, r.version, r.endpoint, r.shed, r.rate_limited) == ("chat", "", "", True, False)
    entry.common_properties.metadata.filter_metadata["imesh"].update({"model": "made-up"})
    assert to_record(entry, labels()).model == "other"


def test_a_sampled_fast_path_success_stands_for_n_requests_and_the_rest_for_one():
    def entry(status: int, picked: bool = False, flag: bool = False) -> accesslog_pb2.HTTPAccessLogEntry:
        e = accesslog_pb2.HTTPAccessLogEntry()
        e.common_properties.upstream_cluster = "chat/v1"
        e.response.response_code.value = status
        if picked:
            e.common_properties.metadata.filter_metadata["envoy.lb"].update({"x-imesh-endpoint": "10.0.0.1:8000"})
        if flag:
            e.common_properties.response_flags.upstream_remote_reset = True
        return e

    assert to_record(entry(200), labels(), one_in=10).weight == 10  # only 1 in 10 of these reach the log
    assert to_record(entry(200, picked=True), labels(), one_in=10).weight == 1
    assert to_record(entry(503), labels(), one_in=10).weight == 1
    assert to_record(entry(404), labels(), one_in=10).weight == 1
    assert to_record(entry(200, flag=True), labels(), one_in=10).weight == 1
    assert to_record(entry(200), labels(), one_in=1).weight == 1


def test_envoy_logs_filter_matches_the_weights():
    """Both access logs carry one filter: the pick, a failure or a flag logs; else 1 in N (MILLION scale)."""
    logs = access_logs(EnvoyOptions(fast_path_log_sample=10))
    assert [log.name for log in logs] == ["envoy.access_loggers.http_grpc", "envoy.access_loggers.file"]
    assert len({log.filter.SerializeToString() for log in logs}) == 1  # the same filter on both
    branches = logs[0].filter.or_filter.filters
    assert [b.WhichOneof("filter_specifier") for b in branches] == [
        "metadata_filter",
        "status_code_filter",
        "response_flag_filter",
        "runtime_filter",
    ]
    assert branches[0].metadata_filter.matcher.filter == "envoy.lb"
    assert branches[0].metadata_filter.match_if_key_not_found.value is False  # Envoy's default would log all
    assert branches[1].status_code_filter.comparison.value.default_value == 400
    assert branches[3].runtime_filter.percent_sampled.numerator == 100_000
    assert not any(log.HasField("filter") for log in access_logs(EnvoyOptions(fast_path_log_sample=1)))


def test_weighted_records_count_as_many_requests_in_every_sink():
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, labels())
    now = [1000.0]
    stats = RequestStats(window_s=10, labels=labels(), clock=lambda: now[0])
    windows = VersionWindows(clock=lambda: now[0])
    windows.watch(["chat"])
    for sink in (metrics, stats, windows):
        sink(record(duration_s=0.1, weight=10))
        sink(record(status=503, duration_s=2.0))
    s = samples(registry)
    known = dict(model="chat", version="v1", pool="fast", endpoint="10.0.0.1:8000", priority="standard")
    assert s[("imesh_requests_total", frozenset({**known, "code": "200"}.items()))] == 10
    assert s[("imesh_request_duration_seconds_count", frozenset(known.items()))] == 11
    assert s[("imesh_request_errors_total", frozenset(known.items()))] == 1
    (endpoint,) = stats.fill(mesh_pb2.MeshStatus()).endpoint_traffic
    assert (endpoint.requests, endpoint.errors, endpoint.p50_s, endpoint.p99_s) == (11, 1, 0.1, 2.0)
    reading = windows.reading("chat", "v1", since=0)
    assert (reading.samples, reading.errors, reading.p99_s) == (11, 1, 2.0)


# ---------------------------------------------------------------- metrics sink


def test_request_metrics_bound_labels_and_drop_removed_endpoints():
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, labels())
    metrics(record())
    metrics(record(endpoint="10.9.9.9:1", model="ghost", version="v9", status=599))
    s = samples(registry)
    known = dict(model="chat", version="v1", pool="fast", endpoint="10.0.0.1:8000", priority="standard")
    assert s[("imesh_requests_total", frozenset({**known, "code": "200"}.items()))] == 1
    other = dict(model="other", version="other", pool="other", endpoint="other", priority="standard")
    assert s[("imesh_requests_total", frozenset({**other, "code": "5xx"}.items()))] == 1
    assert s[("imesh_request_errors_total", frozenset(other.items()))] == 1
    # The endpoint leaves the spec: its series go, so churn does not grow the exposition.
    metrics.set_labels(labels(SPEC.replace("address: 10.0.0.1:8000, pool: fast", "address: 10.0.0.3:8000, pool: fast")))
    assert not any(dict(k[1]).get("endpoint") == "10.0.0.1:8000" for k in samples(registry))
    assert code_label(0) == "0" and code_label(429) == "429" and code_label(418) == "4xx"


# ---------------------------------------------------------------- status window


def test_request_stats_window_counts_exactly_and_forgets_old_traffic():
    now = [1000.0]
    stats = RequestStats(window_s=10, labels=labels(), clock=lambda: now[0])
    for i in range(10):
        stats(record(duration_s=(i + 1) / 100))
    stats(record(status=503, duration_s=1.0))
    stats(record(status=429, shed=True, duration_s=0.0001, endpoint="", version=""))
    status = stats.fill(mesh_pb2.MeshStatus())
    (endpoint,) = status.endpoint_traffic
    assert (endpoint.endpoint, endpoint.requests, endpoint.errors, endpoint.shed) == ("10.0.0.1:8000", 11, 1, 0)
    assert endpoint.p50_s == 0.06 and endpoint.p99_s == 1.0 and abs(endpoint.rate_rps - 1.1) < 1e-9
    (model,) = status.model_traffic
    assert (model.requests, model.shed) == (12, 1)  # the shed one counts, but not in the latency samples
    now[0] += 11
    assert not stats.fill(mesh_pb2.MeshStatus()).endpoint_traffic


def test_weighted_percentile_counts_each_sample_weight_times():
    assert weighted_percentile([], 0.5) == 0.0
    assert weighted_percentile([(v, 1) for v in (4.0, 1.0, 3.0, 2.0)], 0.5) == 2.0  # nearest rank, unsorted input
    # One sample standing for 10 requests outweighs nine single ones.
    assert weighted_percentile([(0.1, 10)] + [(1.0, 1)] * 9, 0.5) == 0.1
    assert weighted_percentile([(0.1, 10)] + [(1.0, 1)] * 9, 0.99) == 1.0
    assert weighted_percentile([(0.1, 1), (5.0, 1)], 1.0) == 5.0


# ---------------------------------------------------------------- xDS hooks


async def test_nacks_and_acks_feed_the_counters():
    cache = SnapshotCache()
    obs = Observability(cache, LoadMonitor(), lambda: 7, registry=CollectorRegistry())
    cache.record_nack("envoy-1", CLUSTER, "3", "bad cluster")
    s = samples(obs.registry)
    assert s[("imesh_xds_nacks_total", frozenset({"type": "Cluster"}.items()))] == 1
    assert s[("imesh_config_version", frozenset())] == 7
    for hook in cache.ack_hooks:
        hook("envoy-1", "4", 0.2)
    s = samples(obs.registry)
    assert s[("imesh_xds_acks_total", frozenset())] == 1
    assert s[("imesh_xds_convergence_seconds_count", frozenset())] == 1


# ---------------------------------------------------------------- output tokens


def _body(data: bytes, end: bool = False) -> ext.HttpBody:
    return ext.HttpBody(body=data, end_of_stream=end)


def _tokens(response: ext.ProcessingResponse) -> float | None:
    fields = response.dynamic_metadata.fields
    return fields["imesh"].struct_value.fields["output_tokens"].number_value if "imesh" in fields else None


def test_token_meter_reads_usage_or_counts_content_chunks():
    metrics = ExtprocMetrics(enabled=False)
    chunk = lambda text: b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"  # noqa: E731
    stream = chunk("") + chunk("a") + chunk("b") + chunk("c") + b"data: [DONE]\n\n"
    meter = TokenMeter()
    # Chunks split anywhere, even inside an event.
    assert _tokens(meter.feed(_body(stream[:17]), metrics)) is None
    assert _tokens(meter.feed(_body(stream[17:], end=True), metrics)) == 3
    usage = b'data: {"choices":[],"usage":{"completion_tokens":9}}\n\n'
    meter = TokenMeter()
    assert _tokens(meter.feed(_body(stream[:-14] + usage + b"data: [DONE]\n\n", end=True), metrics)) == 9
    meter = TokenMeter()
    meter.feed(_body(b'{"usage": {"completion_'), metrics)
    assert _tokens(meter.feed(_body(b'tokens": 12}}', end=True), metrics)) == 12
    assert _tokens(TokenMeter().feed(_body(b'{"error": {}}', end=True), metrics)) is None


def test_token_sampler_takes_every_nth_generation_request():
    sampler = TokenSampler(0.25)
    picks = [sampler.due("/v1/chat/completions") for _ in range(8)]
    assert picks == [False, False, False, True] * 2
    assert not TokenSampler(0.0).due("/v1/chat/completions") and not TokenSampler(1).due("/v1/embeddings")
    asked = TokenSampler.ask_for_body(ext.ProcessingResponse(request_headers=ext.HeadersResponse()))
    assert asked.mode_override.response_body_mode == asked.mode_override.STREAMED


def test_scheduler_plugin_times_appear_after_picks():
    from controlplane.translate.table import translate_routing_table
    from extproc.routing_view import RoutingView
    from extproc.scheduler.picker import Picker
    from extproc.scheduler.results import Pick

    registry = CollectorRegistry()
    picker = Picker(timer=ExtprocMetrics(registry))
    routing = RoutingView.from_proto(translate_routing_table(build_mesh_model(parse_spec(SPEC, "test"))))
    for _ in range(4):
        assert isinstance(picker.pick(routing, None, "chat", None, {}), Pick)
    got = samples(registry)
    count = "imesh_extproc_plugin_duration_seconds_count"
    assert got[(count, frozenset({("plugin", "rank"), ("extension_point", "pick")}))] == 4  # one per request
    # One plan: each plugin of the default profile once, at its extension point.
    assert got[(count, frozenset({("plugin", "drop-drained"), ("extension_point", "filter")}))] == 1
    assert got[(count, frozenset({("plugin", "queue"), ("extension_point", "scorer")}))] == 1
    assert ExtprocMetrics(enabled=False).rank_timer() is None
