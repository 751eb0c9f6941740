"""Observability end to end: real Envoy, control plane, ext_proc and fleet; known traffic, exact deltas.

One mesh serves the module:
  chat  v1 (chat-a, pool fast)
  code  v2 (code-b, pool cheap)
Envoy streams its access log to the control plane every 0.1 s, the ext_proc counts the output
tokens of every generation response (sample rate 1), status keeps a 600 s window (so nothing
expires during the module), and Envoy traces to an OTLP collector this module runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from click.testing import CliRunner
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from prometheus_client.parser import text_string_to_metric_families

from imesh.cli import cli
from tests.harness import Replica, chat, make_mesh

IMESH = str(Path(sys.executable).parent / "imesh")
REPO = Path(__file__).resolve().parent.parent
PRIORITIES = [{"name": "critical"}, {"name": "standard"}, {"name": "sheddable", "shed_threshold": 0.5}]
WINDOW_S = 600.0


class Collector:
    """A real OTLP/gRPC trace collector (generic handler: xds-protos ships the messages, not the stubs)."""

    def __init__(self) -> None:
        self.spans: list = []
        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self._export,
                    request_deserializer=otlp.ExportTraceServiceRequest.FromString,
                    response_serializer=otlp.ExportTraceServiceResponse.SerializeToString,
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _export(self, request, context):
        for resource_spans in request.resource_spans:
            # xds-protos' OTLP is older: ScopeSpans (field 2) is still named instrumentation_library_spans.
            for scope in resource_spans.instrumentation_library_spans:
                self.spans.extend(scope.spans)
        return otlp.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    c.server.start()
    yield c
    c.server.stop(0)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, collector):
    test_mesh = make_mesh(
        tmp_path_factory.mktemp("obs"),
        [Replica("chat-a", "chat", "v1", pool="fast"), Replica("code-b", "code", "v2", pool="cheap")],
        priorities=PRIORITIES,
    )
    test_mesh.mesh.controlplane_args += (
        "--access-log-flush",
        "0.1",
        "--stats-window",
        str(WINDOW_S),
        "--tracing-collector",
        f"127.0.0.1:{collector.port}",
    )
    test_mesh.mesh.extproc_args = ("--token-sample-rate", "1")
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion("chat")
        test_mesh.mesh.wait_for_completion("code")
        settled(test_mesh)  # start every test from a quiet mesh: no warm-up entry still in flight
        yield test_mesh


# ---------------------------------------------------------------- helpers


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def cp_metrics(mesh) -> dict:
    return scrape(mesh.mesh.ports.control_plane_metrics)


def ep_metrics(mesh) -> dict:
    return scrape(mesh.mesh.ports.extproc_metrics)


def envoy_completed(mesh) -> int:
    """Requests Envoy's listener finished: each one is one access log entry on its way."""
    stats = httpx.get(f"{mesh.mesh.admin_url}/stats?filter=^http\\.imesh\\.downstream_rq_completed$", timeout=5).text
    return int(stats.split(":")[1])


def settled(mesh, timeout_s: float = 10.0) -> dict:
    """The control plane's metrics once it has the access log entry of every request Envoy finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        target = envoy_completed(mesh)
        samples = cp_metrics(mesh)
        if value(samples, "imesh_access_log_entries_total") >= target or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def wait_for_entries(mesh, at_least: float, timeout_s: float = 10.0) -> dict:
    """The control plane's metrics once it received `at_least` access log entries in all."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = cp_metrics(mesh)
        if value(samples, "imesh_access_log_entries_total") >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def endpoint_labels(mesh, replica: str, model: str, version: str, pool: str, priority: str) -> dict:
    return {
        "model": model,
        "version": version,
        "pool": pool,
        "endpoint": mesh.replica(replica).address,
        "priority": priority,
    }


def unpacked(request_id: str) -> str:
    return request_id[:14] + "4" + request_id[15:]


def imesh(mesh, *args: str) -> subprocess.CompletedProcess:
    """The installed `imesh` as an operator runs it."""
    return subprocess.run(
        [IMESH, "--server", mesh.mesh.control_plane_address, *args], capture_output=True, text=True, timeout=30
    )


def imesh_in_process(mesh, *args: str):
    """The same CLI code, in this process (no interpreter start-up per call)."""
    result = CliRunner().invoke(cli, ["--server", mesh.mesh.control_plane_address, *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


# ---------------------------------------------------------------- request metrics


def test_request_metrics_move_exactly_for_known_traffic(mesh):
    before_cp, before_ep = settled(mesh), ep_metrics(mesh)
    entries = value(before_cp, "imesh_access_log_entries_total")
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        ok = [
            client.post("/v1/chat/completions", headers={"x-priority": "critical"}, json=chat("chat", max_tokens=3))
            for _ in range(5)
        ]
        streamed = [
            client.post("/v1/chat/completions", json={**chat("chat", max_tokens=4), "stream": True}) for _ in range(2)
        ]
        mesh.set_faults("code-b", error_rate=1.0)
        try:
            failed = [
                client.post("/v1/completions", json={"model": "code", "prompt": "x", "max_tokens": 2}) for _ in range(3)
            ]
        finally:
            mesh.set_faults("code-b", error_rate=0.0)
        unknown = client.post("/v1/chat/completions", json=chat("no-such-model"))
    assert [r.status_code for r in ok + streamed] == [200] * 7
    assert [r.status_code for r in failed] == [500] * 3
    assert unknown.status_code == 404

    after = wait_for_entries(mesh, entries + 11)
    delta = lambda name, **labels: value(after, name, **labels) - value(before_cp, name, **labels)  # noqa: E731
    critical = endpoint_labels(mesh, "chat-a", "chat", "v1", "fast", "critical")
    standard = endpoint_labels(mesh, "chat-a", "chat", "v1", "fast", "standard")
    code = endpoint_labels(mesh, "code-b", "code", "v2", "cheap", "standard")
    none = {"model": "other", "version": "none", "pool": "none", "endpoint": "none", "priority": "standard"}

    assert delta("imesh_requests_total", **critical, code="200") == 5
    assert delta("imesh_requests_total", **standard, code="200") == 2
    assert delta("imesh_requests_total", **code, code="500") == 3
    assert delta("imesh_requests_total", **none, code="404") == 1
    assert delta("imesh_request_errors_total", **code) == 3
    assert delta("imesh_request_errors_total", **critical) == 0
    assert delta("imesh_request_duration_seconds_count", **critical) == 5
    assert delta("imesh_request_duration_seconds_bucket", **critical, le="+Inf") == 5
    assert delta("imesh_request_duration_seconds_count", **code) == 3
    # Time to first token only for the streamed responses; token rate for every successful generation.
    chat_standard = {k: v for k, v in standard.items() if k != "endpoint"}
    chat_critical = {k: v for k, v in critical.items() if k != "endpoint"}
    assert delta("imesh_time_to_first_token_seconds_count", **chat_standard) == 2
    assert delta("imesh_time_to_first_token_seconds_count", **chat_critical) == 0
    assert delta("imesh_output_tokens_per_second_count", **chat_critical) == 5
    assert delta("imesh_output_tokens_per_second_count", **chat_standard) == 2

    ep = ep_metrics(mesh)
    ep_delta = lambda name, **labels: value(ep, name, **labels) - value(before_ep, name, **labels)  # noqa: E731
    assert ep_delta("imesh_extproc_picks_total", model="chat", priority="critical") == 5
    assert ep_delta("imesh_extproc_picks_total", model="chat", priority="standard") == 2
    assert ep_delta("imesh_extproc_picks_total", model="code", priority="standard") == 3
    assert ep_delta("imesh_extproc_refusals_total", model="other", priority="standard", reason="model_not_found") == 1
    # Every request's headers were decided on; the body phase named the model of each.
    assert ep_delta("imesh_extproc_decision_seconds_count", phase="request_headers") == 11
    assert ep_delta("imesh_extproc_decision_seconds_count", phase="request_body") == 11
    assert ep_delta("imesh_extproc_token_samples_total") == 7  # the 500s carry no usage
    # The scheduler: one ranking per pick; the plugins' plan-time work is a series of its own.
    plugin_count = "imesh_extproc_plugin_duration_seconds_count"
    assert ep_delta(plugin_count, plugin="rank", extension_point="pick") == 10
    assert value(ep, plugin_count, plugin="drop-drained", extension_point="filter") >= 1
    assert value(ep, plugin_count, plugin="queue", extension_point="scorer") >= 1


def test_output_tokens_reach_the_json_access_log(mesh):
    ids = [unpacked(str(uuid.uuid4())) for _ in range(3)]
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        post = lambda i, body: client.post("/v1/chat/completions", json=body, headers={"x-request-id": ids[i]})  # noqa: E731
        plain = post(0, chat("chat", max_tokens=6))
        streamed = post(1, {**chat("chat", max_tokens=5), "stream": True, "stream_options": {"include_usage": True}})
        counted = post(2, {**chat("chat", max_tokens=4), "stream": True})  # no usage: one token per content chunk
    assert all(r.status_code == 200 for r in (plain, streamed, counted))
    usage = [
        plain.json()["usage"]["completion_tokens"],
        json.loads(streamed.text.split("data: ")[-2])["usage"]["completion_tokens"],
    ]
    chunks = sum(
        1
        for event in counted.text.split("\n\n")
        if event.startswith("data: {") and json.loads(event[6:])["choices"][0]["delta"].get("content")
    )
    log_path = mesh.mesh.workdir / "envoy" / "envoy.log"
    deadline = time.monotonic() + 10
    by_id: dict[str, dict] = {}
    while time.monotonic() < deadline and len(by_id) < 3:  # Envoy flushes its file log about once a second
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        # Envoy's tracer rewrites one nibble of a UUID request id (it packs the trace decision there).
        by_id = {unpacked(entry["request_id"]): entry for entry in lines if unpacked(entry["request_id"]) in ids}
        time.sleep(0.1)
    entries = [by_id.get(i) for i in ids]
    assert None not in entries, by_id
    assert [e["output_tokens"] for e in entries] == [usage[0], usage[1], chunks]
    assert usage == [6, 5] and chunks == 4
    for entry in entries:
        assert entry["request_id"] and entry["model"] == "chat" and entry["version"] == "v1"
        assert entry["cluster"] == "chat/v1" and entry["endpoint"] == mesh.replica("chat-a").address
        assert entry["status"] == 200 and entry["duration_ms"] >= 0 and entry["first_byte_ms"] >= 0


def test_shed_requests_are_counted_with_their_model_and_priority(mesh):
    before_cp, before_ep = settled(mesh), ep_metrics(mesh)
    entries = value(before_cp, "imesh_access_log_entries_total")
    mesh.set_faults("chat-a", extra_waiting=50)
    try:
        deadline = time.monotonic() + 10
        sent = 0
        with httpx.Client(base_url=mesh.url, timeout=30) as client:
            while True:  # until the load monitor has seen the queue (one scrape, ~0.1 s)
                shed = client.post("/v1/chat/completions", headers={"x-priority": "sheddable"}, json=chat("chat"))
                sent += 1
                if shed.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    finally:
        mesh.set_faults("chat-a", extra_waiting=0)
    assert shed.status_code == 429, shed.text
    after = wait_for_entries(mesh, entries + sent)
    after_ep = ep_metrics(mesh)
    shed_cp = value(after, "imesh_requests_shed_total", model="chat", priority="sheddable") - value(
        before_cp, "imesh_requests_shed_total", model="chat", priority="sheddable"
    )
    shed_ep = value(
        after_ep, "imesh_extproc_refusals_total", model="chat", priority="sheddable", reason="overloaded"
    ) - value(before_ep, "imesh_extproc_refusals_total", model="chat", priority="sheddable", reason="overloaded")
    assert shed_cp == 1 and shed_ep == 1
    assert value(after, "imesh_requests_rate_limited_total", model="chat", priority="sheddable") == 0


def test_labels_stay_bounded_whatever_clients_send(mesh):
    entries = value(cp_metrics(mesh), "imesh_access_log_entries_total")
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        for i in range(5):
            client.post(
                "/v1/chat/completions",
                headers={"x-model-id": f"junk-{i}", "x-priority": f"prio-{i}"},
                json=chat(f"junk-{i}"),
            )
            client.post("/v1/chat/completions", headers={"x-priority": f"prio-{i}"}, json=chat("chat"))
    wait_for_entries(mesh, entries + 10)
    for port in (mesh.mesh.ports.control_plane_metrics, mesh.mesh.ports.extproc_metrics):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "junk-" not in text and "prio-" not in text
    # Unknown priority names are the default class, as the picker treats them.
    samples = cp_metrics(mesh)
    assert (
        value(
            samples,
            "imesh_requests_total",
            model="other",
            version="none",
            pool="none",
            endpoint="none",
            priority="standard",
            code="404",
        )
        >= 5
    )


# ---------------------------------------------------------------- live load and xDS


def test_live_load_gauges_per_endpoint(mesh):
    mesh.set_faults("code-b", extra_waiting=7)
    try:
        deadline = time.monotonic() + 10
        while True:
            samples = cp_metrics(mesh)
            code = {"endpoint": mesh.replica("code-b").address, "pool": "cheap"}
            if value(samples, "imesh_endpoint_queue_requests", **code) >= 7 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        mesh.set_faults("code-b", extra_waiting=0)
    assert value(samples, "imesh_endpoint_queue_requests", **code) == 7
    assert value(samples, "imesh_endpoint_reachable", **code) == 1
    assert 0 <= value(samples, "imesh_endpoint_reading_age_seconds", **code) < 5
    assert ("imesh_endpoint_kv_cache_usage_ratio", frozenset(code.items())) in samples
    assert ("imesh_endpoint_running_requests", frozenset(code.items())) in samples


def test_xds_pushes_acks_and_convergence_are_counted(mesh):
    before = cp_metrics(mesh)
    spec = json.loads(json.dumps(mesh.spec))
    spec["defaults"] = {"request_timeout_s": 123}  # changes every route: one new config version
    path = mesh.write_spec(spec, "obs-v2.yaml")
    result = imesh(mesh, "apply", "-f", str(path))
    assert result.returncode == 0, result.stderr
    after = cp_metrics(mesh)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("imesh_config_version") == 1
    assert delta("imesh_xds_acks_total") == 1
    assert delta("imesh_xds_convergence_seconds_count") == 1
    assert delta("imesh_xds_pushes_total", type="RouteConfiguration") >= 1
    assert delta("imesh_xds_nacks_total", type="Listener") == 0
    version = value(after, "imesh_config_version")
    assert value(after, "imesh_envoy_config_version", node="imesh-envoy") == version
    assert value(after, "imesh_envoy_in_sync", node="imesh-envoy") == 1
    assert value(after, "imesh_envoy_connected", node="imesh-envoy") == 1


# ---------------------------------------------------------------- status and top


def test_status_and_top_carry_the_right_numbers(mesh):
    def traffic() -> dict:
        document = json.loads(imesh_in_process(mesh, "-o", "json", "status"))
        rows = {(r["model"], r["version"]): r for r in document["traffic"]["models"]}
        endpoints = {r["address"]: r for r in document["endpoints"]}
        return {"document": document, "rows": rows, "endpoints": endpoints}

    entries = value(cp_metrics(mesh), "imesh_access_log_entries_total")
    before = traffic()
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        for _ in range(4):
            assert (
                client.post("/v1/completions", json={"model": "code", "prompt": "p", "max_tokens": 2}).status_code
                == 200
            )
        mesh.set_faults("code-b", error_rate=1.0)
        try:
            for _ in range(2):
                assert (
                    client.post("/v1/completions", json={"model": "code", "prompt": "p", "max_tokens": 2}).status_code
                    == 500
                )
        finally:
            mesh.set_faults("code-b", error_rate=0.0)
    wait_for_entries(mesh, entries + 6)
    after = traffic()
    code_b = mesh.replica("code-b").address

    window = after["document"]["traffic"]["window_s"]
    assert window == WINDOW_S
    for key in (("code", "*"), ("code", "v2")):
        row, old = after["rows"][key], before["rows"][key]
        assert row["errors"] - old["errors"] == 2
        requests_before = round(old["rps"] * window)
        assert round(row["rps"] * window) - requests_before == 6
        assert row["percent"] == 100.0 and row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"]
    endpoint, old = after["endpoints"][code_b], before["endpoints"][code_b]
    assert endpoint["errors"] - old["errors"] == 2 and round((endpoint["rps"] - old["rps"]) * window) == 6
    assert endpoint["model"] == "code" and endpoint["pool"] == "cheap" and endpoint["state"] == "ready"
    envoy = after["document"]["envoys"][0]
    assert envoy["connected"] == "yes" and envoy["synced"] == "yes"
    assert envoy["acked_version"] == str(after["document"]["config_version"])

    text = imesh(mesh, "status").stdout
    assert "MODELS (traffic over the last 600s)" in text and "P99_MS" in text and "ERRORS" in text
    assert code_b in text

    once = imesh_in_process(mesh, "top", "--once")
    assert "\x1b[" not in once
    assert "imesh top" in once and code_b in once and "SYNCED" in once
    live = imesh_in_process(mesh, "top", "--interval", "0.1", "--iterations", "2")
    assert live.count("\x1b[H") == 2 and live.count("imesh top") == 2  # redrawn in place


# ---------------------------------------------------------------- tracing


def test_envoy_traces_and_propagates_traceparent(mesh, collector):
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    response = httpx.post(
        f"{mesh.url}/v1/chat/completions",
        json=chat("chat"),
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
        timeout=30,
    )
    assert response.status_code == 200
    # The replica was called in the same trace, by Envoy's upstream span.
    _, seen_trace, seen_parent, _ = response.headers["x-sim-traceparent"].split("-")
    assert seen_trace == trace_id and seen_parent != parent
    deadline = time.monotonic() + 15  # Envoy exports spans every 5 s (or every 5 spans)
    while time.monotonic() < deadline:
        spans = {s.span_id.hex(): s for s in list(collector.spans) if s.trace_id.hex() == trace_id}
        if any(s.parent_span_id.hex() == parent for s in spans.values()) and seen_parent in spans:
            break
        time.sleep(0.1)
    ingress = [s for s in spans.values() if s.parent_span_id.hex() == parent]
    assert len(ingress) == 1, spans  # Envoy's server span continues the client's
    assert spans[seen_parent].parent_span_id == ingress[0].span_id  # the upstream call is its child


# ---------------------------------------------------------------- lint


def test_promtool_accepts_both_expositions(mesh):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: .ci/run installs the Debian package `prometheus`")
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    httpx.post(f"{mesh.url}/v1/chat/completions", json={**chat("chat"), "stream": True}, timeout=30)
    exported: set[str] = set()
    for port in (mesh.mesh.ports.control_plane_metrics, mesh.mesh.ports.extproc_metrics):
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "imesh_" in text
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"port {port}:\n{result.stdout}{result.stderr}"
        for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.M):
            exported |= {name, f"{name}_bucket", f"{name}_count", f"{name}_sum"} if kind == "histogram" else {name}

    # deploy/: the scrape config is valid, and every dashboard query parses and names a series we export.
    result = subprocess.run(
        [promtool, "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    dashboard = json.loads((REPO / "deploy/grafana/imesh-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 20
    concrete = [e.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$pool", ".*") for e in exprs]
    rules = mesh.mesh.workdir / "dashboard-rules.yaml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "dashboard",
                        "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(concrete)],
                    }
                ]
            }
        )
    )
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    used = {name for e in exprs for name in re.findall(r"\b(imesh_[a-z_]+)", e)}
    assert used <= exported, used - exported
