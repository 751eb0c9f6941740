"""`python -m extproc --workers 2` behind real Envoy: both workers get streams, /metrics counts all.

  chat  v1 (chat-a, chat-b)

Envoy multiplexes an Envoy worker's ext_proc streams on one HTTP/2 connection, so a shared
SO_REUSEPORT port gave one ext_proc worker everything; the bootstrap now lists one port per worker
and Envoy round-robins the streams. Worker 0's /metrics sums every worker's counters.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx

from tests.harness import Replica, chat, make_mesh
from tests.test_observability import scrape


def _extproc_requests_by_port(admin_url: str) -> dict[int, int]:
    text = httpx.get(f"{admin_url}/clusters", timeout=5).text
    return {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"^imesh_extproc::[\d.]+:(\d+)::rq_total::(\d+)$", text, re.M)
    }


def _picks(port: int) -> float:
    return sum(v for (name, _), v in scrape(port).items() if name == "imesh_extproc_picks_total")


def test_two_extproc_workers_share_the_streams_and_one_endpoint_counts_both(tmp_path):
    test_mesh = make_mesh(tmp_path, [Replica("chat-a", "chat", "v1"), Replica("chat-b", "chat", "v1")], time_scale=0.01)
    mesh = test_mesh.mesh
    mesh.extproc_workers = 2
    with mesh:
        mesh.wait_for_completion("chat")
        ports = mesh.extproc_ports
        assert len(ports) == 2 and len(set(ports)) == 2
        # The mesh was ready only once both workers listened; Envoy's health check admits each
        # within an interval (0.5 s) of that.
        _wait(
            lambda: all(_health(mesh.admin_url, port) == "healthy" for port in ports),
            "Envoy did not admit both ext_proc workers",
        )
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


def test_a_dead_extproc_worker_leaves_envoys_balancing_and_is_restarted(tmp_path):
    test_mesh = make_mesh(tmp_path, [Replica("chat-a", "chat", "v1")], time_scale=0.01)
    mesh = test_mesh.mesh
    mesh.extproc_workers = 2
    with mesh:
        mesh.wait_for_completion("chat")
        supervisor = mesh.processes["extproc"].popen.pid
        workers = _children(supervisor)
        assert len(workers) == 2, workers
        dead_port = mesh.extproc_ports[1]
        _wait(lambda: _health(mesh.admin_url, dead_port) == "healthy", "Envoy did not admit worker 1")
        os.kill(workers[1], signal.SIGKILL)
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            # Envoy takes the dead worker out: at its first refused connection (outlier detection) or
            # its next health check. Until then a stream sent there fails open, which for a model
            # named only in the body is a 404 (Envoy's own routes need x-model-id).
            def dead_worker_out() -> bool:
                client.post("/v1/chat/completions", json=chat("chat"))
                return _health(mesh.admin_url, dead_port) != "healthy"

            _wait(dead_worker_out, "Envoy kept the dead worker in its balancing")
            # Now every request named only in the body is routed, by the live worker.
            for _ in range(20):
                response = client.post("/v1/chat/completions", json=chat("chat"))
                assert response.status_code == 200, response.text
            # The supervisor starts a new worker 1; it listens once it has the routing table and
            # Envoy's health check lets it back in.
            _wait(
                lambda: len(_children(supervisor)) == 2 and workers[1] not in _children(supervisor),
                "the dead worker was not restarted",
            )

            # Back in Envoy's balancing (health check passed, ejection over): it takes streams again.
            def new_worker_serves() -> bool:
                before = _extproc_requests_by_port(mesh.admin_url).get(dead_port, 0)
                for _ in range(4):
                    response = client.post("/v1/chat/completions", json=chat("chat"))
                    assert response.status_code == 200, response.text
                return _extproc_requests_by_port(mesh.admin_url).get(dead_port, 0) - before >= 2

            _wait(new_worker_serves, "the restarted worker took no streams")


def _wait(condition, message: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def _health(admin_url: str, port: int) -> str:
    text = httpx.get(f"{admin_url}/clusters", timeout=5).text
    match = re.search(rf"^imesh_extproc::[\d.]+:{port}::health_flags::(\S+)$", text, re.M)
    return match.group(1) if match else "absent"


def _children(pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [p for p in pids if b"spawn_main" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
