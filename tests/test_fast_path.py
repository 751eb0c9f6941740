"""The fast path (routing_mode: fast): Envoy routes without the ext_proc, on load-aware EDS weights.

chat  v1 (fast-a, fast-b), routing_mode fast
"""

from __future__ import annotations

import collections
import re
import time

import httpx
import yaml

from controlplane.load.fast_path import MIN_WEIGHT, LoadWeights, endpoint_weight, relative_capacities
from controlplane.spec.schema import ScoringSpec, parse_spec
from protos import mesh_pb2
from tests.harness import Replica, chat, make_mesh, send_many
from tests.test_observability import scrape


def _stat(admin_url: str, name: str) -> int:
    text = httpx.get(f"{admin_url}/stats", params={"filter": f"^{re.escape(name)}$"}, timeout=5).text
    match = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.M)
    return int(match.group(1)) if match else 0


def _weights(admin_url: str, cluster: str) -> dict[str, int]:
    text = httpx.get(f"{admin_url}/clusters", timeout=5).text
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(rf"^{re.escape(cluster)}::([\d.]+:\d+)::weight::(\d+)$", text, re.M)
    }


def test_fast_path_serves_without_extproc_and_shifts_weight_from_a_loaded_replica(tmp_path):
    replicas = [Replica("fast-a", "chat", "v1"), Replica("fast-b", "chat", "v1")]
    test_mesh = make_mesh(tmp_path, replicas, time_scale=0.01, defaults={"routing_mode": "fast"})
    mesh = test_mesh.mesh
    a, b = (test_mesh.replica(n).address for n in ("fast-a", "fast-b"))
    with mesh:
        mesh.wait_for_completion("chat")
        admin = mesh.admin_url
        streams = "http.imesh.ext_proc.streams_started"

        # Named by header: served, by both replicas, and the ext_proc never asked.
        before = _stat(admin, streams)
        responses = send_many(
            mesh.url, 40, lambda c, i: c.post("/v1/chat/completions", json=chat("chat"), headers={"x-model-id": "chat"})
        )
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
        served = collections.Counter(r.headers["x-sim-replica"] for r in responses)
        assert set(served) == {"fast-a", "fast-b"}, served
        assert _stat(admin, streams) == before

        # Named only in the body: the ext_proc still identifies the model (one picker round).
        response = httpx.post(f"{mesh.url}/v1/chat/completions", json=chat("chat"), timeout=10)
        assert response.status_code == 200, response.text
        assert _stat(admin, streams) > before

        # Load one replica: the control plane lowers its EDS weight and Envoy sends it ~nothing.
        test_mesh.set_faults("fast-a", extra_waiting=50)
        deadline = time.monotonic() + 10
        weights = {}
        while time.monotonic() < deadline:
            weights = _weights(admin, "chat/v1")
            if weights.get(a) == MIN_WEIGHT and weights.get(b, 0) > 10 * MIN_WEIGHT:
                break
            time.sleep(0.1)
        assert weights.get(a) == MIN_WEIGHT and weights.get(b, 0) > 10, weights
        responses = send_many(
            mesh.url, 60, lambda c, i: c.post("/v1/chat/completions", json=chat("chat"), headers={"x-model-id": "chat"})
        )
        assert all(r.status_code == 200 for r in responses)
        served = collections.Counter(r.headers["x-sim-replica"] for r in responses)
        assert served["fast-a"] <= 6, served  # weight 1 against ~90: about 1 in 90 expected

        # Load gone: the weight comes back.
        test_mesh.set_faults("fast-a", extra_waiting=0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _weights(admin, "chat/v1").get(a) == MIN_WEIGHT:
            time.sleep(0.1)
        assert _weights(admin, "chat/v1").get(a, 0) > 10


# ---------------------------------------------------------------- weights, no processes


SPEC = parse_spec(
    """
defaults: {routing_mode: fast}
pools: [{name: p}]
models:
  - name: a
    versions: [{name: v1, endpoints: [{address: "10.0.0.1:1", pool: p}, {address: "10.0.0.2:1", pool: p}]}]
  - name: b
    routing_mode: picker
    versions: [{name: v1, endpoints: [{address: "10.0.0.3:1", pool: p}]}]
"""
)


def _report(**waiting: float) -> mesh_pb2.LoadReport:
    return mesh_pb2.LoadReport(
        endpoints=[
            mesh_pb2.EndpointLoad(address=f"10.0.0.{i}:1", waiting=w, kv_cache=0.1, age_s=0.05, reachable=True)
            for i, w in ((int(k[1:]), v) for k, v in waiting.items())
        ]
    )


def test_weight_follows_load():
    scoring = ScoringSpec()
    idle = endpoint_weight(mesh_pb2.EndpointLoad(waiting=0, kv_cache=0.1, age_s=0.1, reachable=True), scoring)
    busy = endpoint_weight(mesh_pb2.EndpointLoad(waiting=3, kv_cache=0.5, age_s=0.1, reachable=True), scoring)
    full = endpoint_weight(mesh_pb2.EndpointLoad(waiting=9, kv_cache=0.1, age_s=0.1, reachable=True), scoring)
    stale = endpoint_weight(mesh_pb2.EndpointLoad(waiting=9, kv_cache=0.1, age_s=60, reachable=True), scoring)
    down = endpoint_weight(mesh_pb2.EndpointLoad(reachable=False, age_s=float("inf")), scoring)
    assert idle > busy > full == MIN_WEIGHT
    assert stale == 50 and down == MIN_WEIGHT and endpoint_weight(None, scoring) == 50


def _sized(waiting: float, slots: float, step_s: float, **more) -> mesh_pb2.EndpointLoad:
    return mesh_pb2.EndpointLoad(
        waiting=waiting, kv_cache=0.1, age_s=0.05, reachable=True, slots=slots, decode_step_s=step_s, **more
    )


def test_weights_start_from_each_replica_capacity_within_its_version():
    # e1: 8 slots at 10 ms a step (800 requests advanced a second), e2: 2 slots at 40 ms (50).
    report = mesh_pb2.LoadReport(
        endpoints=[
            _sized(0, 8, 0.01, address="10.0.0.1:1"),
            _sized(0, 2, 0.04, address="10.0.0.2:1"),
            _sized(0, 1, 0.1, address="10.0.0.3:1"),  # model b, on the picker: not weighted
        ]
    )
    weights = LoadWeights().compute(SPEC, report)
    # Both idle (headroom 0.95 at 10% KV): the fast one 95, the slow one 95 x 50/800 = 6 -> 5.
    assert weights == {"10.0.0.1:1": 95, "10.0.0.2:1": 5}
    # Its queue discounts the fast one (headroom (2 x 5/8 + 2 x 0.9)/4 = 0.76) but capacity still rules.
    report.endpoints[0].waiting = 3
    assert LoadWeights().compute(SPEC, report) == {"10.0.0.1:1": 75, "10.0.0.2:1": 5}


def test_without_known_capacities_weights_are_the_load_alone():
    assert relative_capacities({"a": None, "b": None}) == {"a": 1.0, "b": 1.0}
    # One unknown among known ones counts as their median, not as the fastest nor as nothing.
    assert relative_capacities({"a": 800, "b": 400, "c": 200, "d": None}) == {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.5}
    # A reading that was never fresh has no capacity: the neutral 50 (the other one's is the median).
    report = mesh_pb2.LoadReport(
        endpoints=[_sized(0, 8, 0.01, address="10.0.0.1:1"), _sized(0, 2, 0.04, address="10.0.0.2:1")]
    )
    report.endpoints[0].age_s = 60
    assert LoadWeights().compute(SPEC, report) == {"10.0.0.1:1": 50, "10.0.0.2:1": 95}


def test_a_stale_reading_keeps_its_last_measured_capacity():
    """A fast replica whose scrape is late must not weigh less than an idle slow one (the slow one
    would then get the fast one's share): its capacity is what it was, its load unknown."""
    weights = LoadWeights()
    report = mesh_pb2.LoadReport(
        endpoints=[_sized(0, 8, 0.01, address="10.0.0.1:1"), _sized(0, 2, 0.04, address="10.0.0.2:1")]
    )
    assert weights.compute(SPEC, report) == {"10.0.0.1:1": 95, "10.0.0.2:1": 5}
    report.endpoints[0].age_s = 60  # the fast one's reading goes stale
    assert weights.compute(SPEC, report) == {"10.0.0.1:1": 50, "10.0.0.2:1": 5}
    report.endpoints[0].age_s, report.endpoints[1].age_s = 0.05, 60  # the slow one stale: 50 x 50/800, in steps of 5
    assert weights.compute(SPEC, report) == {"10.0.0.1:1": 95, "10.0.0.2:1": 5}


def test_hysteresis_holds_small_changes_and_rate_limits():
    weights = LoadWeights(min_interval_s=1.0)
    first = weights.update(SPEC, _report(e1=0, e2=0), now=0.0)
    assert first is not None and set(first) == {"10.0.0.1:1", "10.0.0.2:1"}  # picker-mode model b is not weighted
    assert weights.update(SPEC, _report(e1=0.3, e2=0), now=5.0) is None  # jitter: no push
    assert weights.update(SPEC, _report(e1=9, e2=0), now=5.2) is not None  # saturated: push
    assert weights.update(SPEC, _report(e1=0, e2=0), now=5.5) is None  # back, but within the interval
    again = weights.update(SPEC, _report(e1=0, e2=0), now=6.3)  # the held-back change goes out
    assert again is not None and again["10.0.0.1:1"] > MIN_WEIGHT
    assert weights.pushes == 3


def test_translation_disables_the_extproc_on_fast_routes_and_sets_weights():
    from controlplane.model.mesh_model import build_mesh_model
    from controlplane.translate.envoy import EXTPROC_FILTER, MODEL_HEADER, translate

    model = build_mesh_model(SPEC, lb_weights={"10.0.0.1:1": 1, "10.0.0.2:1": 90, "10.0.0.3:1": 7})
    resources = translate(model)
    routes = resources.routes["imesh_routes"].virtual_hosts[0].routes
    for route in routes:
        disabled = EXTPROC_FILTER in route.typed_per_filter_config
        fast_model = route.name == "a" or route.name.startswith("a/")
        on_internal_header = any(h.name == MODEL_HEADER for h in route.match.headers)
        assert disabled == (fast_model and not on_internal_header), route.name
    sockets = [
        (e.endpoint.address.socket_address, e.load_balancing_weight.value)
        for cla in resources.endpoints.values()
        for loc in cla.endpoints
        for e in loc.lb_endpoints
    ]
    weights = {f"{s.address}:{s.port_value}": weight for s, weight in sockets}
    assert weights == {"10.0.0.1:1": 1, "10.0.0.2:1": 90, "10.0.0.3:1": 0}  # picker-mode b: Envoy's default
    # The filter is off by default (not even created on fast routes) and on for everything else.
    assert EXTPROC_FILTER in resources.routes["imesh_routes"].typed_per_filter_config
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm

    manager = hcm.HttpConnectionManager()
    resources.listeners["imesh_http"].filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.disabled for f in manager.http_filters if f.name == EXTPROC_FILTER] == [True]
    # A mesh without a fast path keeps its listener as it was.
    picker_only = build_mesh_model(parse_spec("pools: [{name: p}]\nmodels: [{name: b, versions: [{name: v1}]}]"))
    plain = translate(picker_only)
    manager = hcm.HttpConnectionManager()
    plain.listeners["imesh_http"].filter_chains[0].filters[0].typed_config.Unpack(manager)
    assert [f.disabled for f in manager.http_filters if f.name == EXTPROC_FILTER] == [False]
    assert not plain.routes["imesh_routes"].typed_per_filter_config


# ---------------------------------------------------------------- telemetry on the fast path


def test_fast_path_logs_every_failure_and_one_in_n_successes(tmp_path):
    """Envoy logs 1 in 10 fast-path successes, each counted as 10 requests; every failure and every
    picker-routed request is logged and counted exactly (translate_telemetry.log_filter)."""
    replicas = [Replica("fast-a", "chat", "v1"), Replica("fast-b", "chat", "v1"), Replica("pick-c", "code", "v1")]
    test_mesh = make_mesh(tmp_path, replicas, time_scale=0.01, defaults={"routing_mode": "fast"})
    spec = dict(test_mesh.spec)
    spec["models"] = [{**m, "routing_mode": "picker"} if m["name"] == "code" else m for m in spec["models"]]
    test_mesh.mesh.spec.write_text(yaml.safe_dump(spec, sort_keys=False))
    test_mesh.mesh.controlplane_args += ("--fast-path-log-sample", "10", "--access-log-flush", "0.1")
    mesh = test_mesh.mesh
    fast = {"x-model-id": "chat"}
    with mesh:
        mesh.wait_for_completion("chat")
        mesh.wait_for_completion("code")
        time.sleep(0.5)  # those two requests' log entries arrive first
        before = scrape(mesh.ports.control_plane_metrics)

        ok = send_many(mesh.url, 600, lambda c, i: c.post("/v1/chat/completions", json=chat("chat"), headers=fast))
        assert all(r.status_code == 200 for r in ok)
        picked = send_many(mesh.url, 30, lambda c, i: c.post("/v1/chat/completions", json=chat("code")))
        assert all(r.status_code == 200 for r in picked)
        test_mesh.set_faults("fast-b", error_rate=1.0)
        mixed = send_many(mesh.url, 60, lambda c, i: c.post("/v1/chat/completions", json=chat("chat"), headers=fast))
        failed = sum(r.status_code >= 500 for r in mixed)
        assert 0 < failed < 60 and all(r.status_code in (200, 500) for r in mixed), collections.Counter(
            r.status_code for r in mixed
        )

        def delta(samples, name, **labels):
            return _sum(samples, name, **labels) - _sum(before, name, **labels)

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            after = scrape(mesh.ports.control_plane_metrics)
            if (
                delta(after, "imesh_requests_total", model="code") >= 30
                and delta(after, "imesh_request_errors_total", model="chat") >= failed
            ):
                break
            time.sleep(0.1)
        time.sleep(0.5)  # the sampled successes' last flush
        after = scrape(mesh.ports.control_plane_metrics)

        # Exact: every failure and every picked request.
        assert delta(after, "imesh_request_errors_total", model="chat") == failed
        assert delta(after, "imesh_requests_total", model="chat", code="500") == failed
        assert delta(after, "imesh_requests_total", model="code", code="200") == 30
        # Sampled: each logged success stands for 10; the estimate is within 4.5 sigma of the truth
        # (records ~ Binomial(n, 0.1), sigma of the estimate = 10 * sqrt(n * 0.1 * 0.9)).
        successes = 600 + (60 - failed)
        estimate = delta(after, "imesh_requests_total", model="chat", code="200")
        assert estimate % 10 == 0, estimate
        sigma = 10 * (successes * 0.1 * 0.9) ** 0.5
        assert abs(estimate - successes) <= 4.5 * sigma, (estimate, successes)
        entries = delta(after, "imesh_access_log_entries_total")
        assert entries <= 30 + failed + successes * 0.1 + 4.5 * sigma / 10, entries  # far fewer than requests
        # The latency histogram counts what the counter does.
        assert delta(after, "imesh_request_duration_seconds_count", model="chat") == estimate + failed


def _sum(samples: dict, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
