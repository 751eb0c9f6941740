"""`python -m extproc --workers 2` behind real Envoy: both workers get streams, /metrics counts all.

  chat  v1 (chat-a, chat-b)

Envoy multiplexes an Envoy worker's ext_proc streams on one HTTP/2 connection, so a shared
SO_REUSEPORT port gave one ext_proc worker everything; the bootstrap now lists one port per worker
and Envoy round-robins the streams. Worker 0's /metrics sums every worker's counters.
"""

from __future__ import annotations

import re

import httpx

from tests.harness import Replica, chat, make_mesh
from tests.test_observability import scrape


def _extproc_requests_by_port(admin_url: str) -> dict[int, int]:
    text = httpx.get(f"{admin_url}/clusters", timeout=5).text
    return {int(m.group(1)): int(m.group(2))
            for m in re.finditer(r"^imesh_extproc::[\d.]+:(\d+)::rq_total::(\d+)$", text, re.M)}


def _picks(port: int) -> float:
    return sum(v for (name, _), v in scrape(port).items() if name == "imesh_extproc_picks_total")


def test_two_extproc_workers_share_the_streams_and_one_endpoint_counts_both(tmp_path):
    test_mesh = make_mesh(tmp_path, [Replica("chat-a", "chat", "v1"), Replica("chat-b", "chat", "v1")],
                          time_scale=0.01)
    mesh = test_mesh.mesh
    mesh.extproc_workers = 2
    with mesh:
        mesh.wait_for_completion("chat")
        ports = mesh.extproc_ports
        assert len(ports) == 2 and len(set(ports)) == 2
        before_streams = _extproc_requests_by_port(mesh.admin_url)
        before_picks = _picks(mesh.ports.extproc_metrics)
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            for _ in range(40):
                response = client.post("/v1/chat/completions", json=chat("chat"))  # named in the body: a pick
                assert response.status_code == 200, response.text
                assert response.headers["x-imesh-endpoint"] in {r.address for r in test_mesh.replicas}
        streams = _extproc_requests_by_port(mesh.admin_url)
        per_worker = {port: streams.get(port, 0) - before_streams.get(port, 0) for port in ports}
        assert sum(per_worker.values()) == 40 and min(per_worker.values()) >= 10, per_worker
        assert _picks(mesh.ports.extproc_metrics) - before_picks == 40  # every worker's picks, on worker 0's port
