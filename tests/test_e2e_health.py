"""Envoy's health checks, outlier detection and retries on model clusters, against real replicas.

Real Envoy, real fleet processes; a replica is made unready, failing or hung through its fault
injection (`/sim/faults`). Each test asserts where requests went and how they ended, never how
long anything took: waits are bounded only against hanging.
"""

from __future__ import annotations

import collections
import re

import httpx
import pytest

from imesh.client import MeshClient
from tests.harness import Replica, chat, make_mesh, send_many, served_by, wait_until

# Fast checks so the test needs no long waits; ejections that outlast the test.
RESILIENCE = {
    "health_checks": {"interval_s": 0.2, "timeout_s": 0.2, "unhealthy_threshold": 1, "healthy_threshold": 1},
    "outlier_detection": {"consecutive_5xx": 3, "base_ejection_s": 60, "max_ejection_percent": 50},
    "retries": {"per_try_timeout_s": 5.0},
}
HEADERS = {"x-model-id": "chat"}


def three_replicas(tmp_path, **resilience):
    replicas = [Replica(name, "chat", "v1") for name in ("r1", "r2", "r3")]
    return make_mesh(tmp_path, replicas, resilience={**RESILIENCE, **resilience})


def cluster_health(mesh) -> dict[str, str]:
    """Each chat/v1 host's health flags as Envoy's admin /clusters reports them ("healthy" if none)."""
    text = httpx.get(f"{mesh.mesh.admin_url}/clusters", timeout=5).text
    flags = {}
    for line in text.splitlines():
        cluster, _, rest = line.partition("::")
        host, _, field_value = rest.partition("::")
        if cluster == "chat/v1" and field_value.startswith("health_flags::"):
            flags[host] = field_value.removeprefix("health_flags::")
    return flags


def requests(mesh, count: int = 30, body_named: bool = False) -> list[httpx.Response]:
    headers = {} if body_named else HEADERS
    return send_many(mesh.url, count, lambda c, i: c.post("/v1/chat/completions", json=chat("chat"), headers=headers))


@pytest.mark.parametrize("picker", [True, False], ids=["picker", "envoy-alone"])
def test_an_unready_replica_gets_no_requests_until_it_is_ready_again(tmp_path, picker):
    """The picker (which asks the same readiness route) and Envoy's own balancing (with the ext_proc
    gone: its health check alone decides) both leave an unready replica out."""
    mesh = three_replicas(tmp_path)
    body_named = picker
    with mesh.mesh:
        mesh.mesh.wait_for_completion("chat")
        if not picker:
            mesh.mesh.processes["extproc"].kill()
        r2 = mesh.replica("r2").address
        wait_until(lambda: set(cluster_health(mesh).values()) == {"healthy"}, 30, "every replica checked healthy")
        mesh.set_faults("r2", not_ready=True)  # /health answers 503; /metrics and inference still work
        wait_until(lambda: "failed_active_hc" in cluster_health(mesh).get(r2, ""), 30, "r2 failing its check")
        if picker:  # the picker learns it from the load report: the control plane's probe, then a push
            with MeshClient(mesh.mesh.control_plane_address) as client:
                wait_until(lambda: _reading(client, r2).not_ready, 30, "r2 reported not ready")
            wait_until(lambda: r2 not in served_by(requests(mesh, 10, body_named)), 30, "the picker leaving r2 out")
        out = requests(mesh, 40, body_named)
        assert all(r.status_code == 200 for r in out), collections.Counter(r.status_code for r in out)
        assert r2 not in served_by(out), served_by(out)

        mesh.set_faults("r2", not_ready=False)
        wait_until(lambda: cluster_health(mesh).get(r2) == "healthy", 30, "r2 healthy again")
        wait_until(lambda: r2 in served_by(requests(mesh, 30, body_named)), 30, "r2 serving again")


@pytest.mark.parametrize("picker", [True, False], ids=["picker", "envoy-alone"])
def test_a_replica_answering_500s_is_ejected_and_traffic_moves(tmp_path, picker):
    """Envoy's outlier detection ejects it from Envoy's own balancing (the ext_proc gone), and the
    control plane's passive ejection from the picker's, whose picks Envoy would honour regardless.
    Passing /health does not cut either short."""
    mesh = three_replicas(tmp_path)
    with mesh.mesh, MeshClient(mesh.mesh.control_plane_address) as client:
        mesh.mesh.wait_for_completion("chat")
        if not picker:
            mesh.mesh.processes["extproc"].kill()
        r3 = mesh.replica("r3").address
        mesh.set_faults("r3", error_rate=1.0, error_status=500)  # 500 is not retried: it reaches the client
        first = requests(mesh, 60)
        failed = [r for r in first if r.status_code == 500]
        assert failed and all(r.headers.get("x-imesh-endpoint") == r3 for r in failed)
        if picker:
            wait_until(lambda: _reading(client, r3).ejected, 30, "r3 reported ejected")
        else:
            assert "failed_outlier_check" in cluster_health(mesh).get(r3, "")
        after = requests(mesh, 40)
        assert all(r.status_code == 200 for r in after) and r3 not in served_by(after)


def _reading(client: MeshClient, address: str):
    return next(e for e in client.status().load.endpoints if e.address == address)


def test_a_503_and_a_hung_replica_are_retried_on_another_replica(tmp_path):
    # No ejection (this is about retries), and a budget that lets every first try be retried: the
    # budget's point is to stop retry storms, and here a third of all tries fail by design.
    mesh = three_replicas(
        tmp_path,
        outlier_detection={"consecutive_5xx": 0, "consecutive_gateway_failure": 0},
        # Every concurrent client's first try may fail at once: retries in flight are not capped below that.
        retries={"per_try_timeout_s": 5.0, "budget_percent": 100, "min_retry_concurrency": 16},
    )
    with mesh.mesh:
        mesh.mesh.wait_for_completion("chat")
        r1 = mesh.replica("r1").address
        mesh.set_faults("r1", error_rate=1.0, error_status=503)
        out = requests(mesh, 40)
        assert all(r.status_code == 200 for r in out), [
            (r.status_code, r.text[:200]) for r in out if r.status_code != 200
        ]
        assert r1 not in served_by(out)  # every try that landed there was retried elsewhere
        stats = httpx.get(f"{mesh.mesh.admin_url}/stats?filter=cluster.chat/v1.upstream_rq_retry$").text
        assert int(stats.rsplit(":", 1)[1]) > 0

        mesh.set_faults("r1", error_rate=0.0, stall_s=30.0)  # takes the request, never answers
        out = requests(mesh, 20)
        assert all(r.status_code == 200 for r in out), collections.Counter(r.status_code for r in out)
        assert r1 not in served_by(out)
        stats = httpx.get(f"{mesh.mesh.admin_url}/stats?filter=cluster.chat/v1.upstream_rq_per_try_timeout$").text
        assert int(stats.rsplit(":", 1)[1]) > 0


def test_a_replica_dying_mid_stream_ends_the_clients_stream_and_counts_against_it(tmp_path):
    """Never a hang: the client's stream ends (cut short), and the error is the replica's."""
    mesh = three_replicas(tmp_path)
    with mesh.mesh:
        mesh.mesh.wait_for_completion("chat")
        for name in ("r1", "r2", "r3"):
            mesh.set_faults(name, crash_after_tokens=3)
        body = {**chat("chat", max_tokens=40), "stream": True}
        with httpx.stream("POST", f"{mesh.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30) as r:
            served = r.headers["x-imesh-endpoint"]
            with pytest.raises(httpx.RemoteProtocolError):  # the body ends without its end: a reset
                b"".join(r.iter_bytes())

        def errors_counted() -> float:
            port = mesh.mesh.ports.control_plane_metrics
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            pattern = rf'^imesh_request_errors_total{{[^}}]*endpoint="{re.escape(served)}"[^}}]*}} (\S+)$'
            return sum(float(m) for m in re.findall(pattern, text, re.M))

        wait_until(lambda: errors_counted() >= 1, 30, "the cut stream counted against its replica")
