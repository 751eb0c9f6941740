"""Changes under traffic, a config Envoy rejects, and parts of the mesh going away.

Each test gets its own mesh (they stop and restart processes). Real Envoy, real processes.
Background traffic is counted, not timed: a test waits for so many requests before and after a
change (deadlines against hanging only), so a loaded machine makes it slower, never wrong.
"""

from __future__ import annotations

import collections
import re
import signal
import threading
import time

import httpx
import pytest

from imesh.client import MeshClient, MeshError
from tests.harness import Replica, chat, make_mesh, wait_until


def two_version_mesh(tmp_path, v2_weight: int = 0):
    return make_mesh(
        tmp_path,
        [Replica("a1", "chat", "v1"), Replica("a2", "chat", "v1"), Replica("b1", "chat", "v2", pool="cheap")],
        weights={"chat": {"v1": 100 - v2_weight, "v2": v2_weight}},
    )


class Traffic:
    """Requests in a loop on a background thread until stopped; keeps every outcome."""

    def __init__(self, url: str, model: str = "chat"):
        self.outcomes: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, model), daemon=True)

    def _run(self, url: str, model: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 60  # bounded even if never stopped
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    r = client.post("/v1/chat/completions", json=chat(model))
                    self.outcomes.append((r.status_code, r.headers.get("x-imesh-version")))
                except httpx.HTTPError as exc:
                    self.outcomes.append((0, type(exc).__name__))

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def failures(self) -> list:
        return [o for o in self.outcomes if o[0] != 200]

    def wait_for(self, count: int) -> int:
        """Block until ``count`` requests have ended; returns how many have."""
        wait_until(lambda: len(self.outcomes) >= count, 50, f"{count} requests of background traffic")
        return len(self.outcomes)

    def versions(self, start: int, stop: int | None = None) -> set[str | None]:
        return {version for _, version in self.outcomes[start:stop]}


def versions_served(url: str, n: int = 40) -> collections.Counter:
    with httpx.Client(base_url=url, timeout=10) as client:
        return collections.Counter(
            client.post("/v1/chat/completions", json=chat("chat")).headers.get("x-imesh-version") for _ in range(n)
        )


def test_spec_change_under_traffic_takes_effect_without_failed_requests(tmp_path):
    mesh = two_version_mesh(tmp_path, v2_weight=0)
    with mesh.mesh:
        assert versions_served(mesh.url) == {"v1": 40}
        spec = dict(mesh.spec)
        spec["models"] = [
            {
                **spec["models"][0],
                "versions": [{**v, "weight": 0 if v["name"] == "v1" else 100} for v in spec["models"][0]["versions"]],
            }
        ]
        path = mesh.write_spec(spec)
        with Traffic(mesh.url) as traffic, MeshClient(mesh.mesh.control_plane_address) as client:
            before = traffic.wait_for(11)
            result = client.apply(path.read_text(), str(path))
            # From here on each request starts after apply returned (the one in flight may not).
            applied = len(traffic.outcomes) + 1
            traffic.wait_for(applied + 10)
        assert result.changed and result.config_version > 1
        assert "~ models.chat.versions.v1.weight: 100 -> 0" in result.diff
        assert len(traffic.outcomes) > 20 and traffic.failures() == []
        assert traffic.versions(0, before) == {"v1"} and "v2" in traffic.versions(applied), traffic.outcomes
        # Once apply returned, Envoy serves the new split.
        assert versions_served(mesh.url) == {"v2": 40}


def test_config_envoy_rejects_is_reported_and_not_half_applied(tmp_path):
    mesh = two_version_mesh(tmp_path)
    with mesh.mesh, MeshClient(mesh.mesh.control_plane_address) as client:
        before = client.spec()
        spec = dict(mesh.spec)
        # Valid to our schema, but Envoy refuses the formatter: a NACK on RDS after CDS was accepted.
        spec["defaults"] = {"extra_response_headers": {"x-served-by": "%NOT_A_COMMAND%"}}
        spec["models"] = spec["models"] + [
            {"name": "extra", "versions": [{"name": "v1", "endpoints": [{"address": "127.0.0.1:9", "pool": "fast"}]}]}
        ]
        path = mesh.write_spec(spec)
        with Traffic(mesh.url) as traffic:
            traffic.wait_for(3)
            with pytest.raises(MeshError) as rejected:
                client.apply(path.read_text(), str(path))
            traffic.wait_for(len(traffic.outcomes) + 3)
        # Envoy's own words reach the operator.
        assert "NOT_A_COMMAND" in str(rejected.value)
        status = client.status()
        assert any("NOT_A_COMMAND" in n.last_nack_message for n in status.nodes)
        # Nothing of it stays: not in the desired state, not in Envoy, not in traffic.
        assert client.spec().spec_yaml == before.spec_yaml
        dump = httpx.get(f"{mesh.mesh.admin_url}/config_dump").text
        assert "extra/v1" not in dump
        r = httpx.post(f"{mesh.url}/v1/chat/completions", json=chat("extra"))
        assert r.status_code == 404
        assert traffic.failures() == [] and len(traffic.outcomes) > 5
        assert httpx.post(f"{mesh.url}/v1/chat/completions", json=chat("chat")).status_code == 200


def test_a_change_a_hung_envoy_never_acked_is_not_reported_as_applied(tmp_path):
    mesh = two_version_mesh(tmp_path, v2_weight=0)
    mesh.mesh.controlplane_args = ("--ack-timeout", "1")
    with mesh.mesh, MeshClient(mesh.mesh.control_plane_address) as client:
        assert versions_served(mesh.url, 10) == {"v1": 10}
        table_before = client.status().table.version
        envoy = mesh.mesh.processes["envoy"].popen
        envoy.send_signal(signal.SIGSTOP)  # connected, but it reads and ACKs nothing
        try:
            with pytest.raises(MeshError) as unconfirmed:
                client.set_canary("chat", "v2", 100)
            message = str(unconfirmed.value)
            assert re.search(r"config version \d+ is saved, but Envoy \S+ has not acknowledged it within 1 s", message)
            # The pickers keep the table Envoy is known to have: no steering to routes it may lack.
            assert client.status().table.version == table_before
            assert any(n.connected for n in client.status().nodes)
        finally:
            envoy.send_signal(signal.SIGCONT)
        # Saved, so applied once Envoy catches up: the late ACK releases the held table.
        wait_until(lambda: client.status().table.version > table_before, 30, "the held routing table")
        wait_until(lambda: versions_served(mesh.url, 10) == {"v2": 10}, 30, "traffic on v2")


def test_envoy_serves_while_control_plane_is_down_and_resyncs_after(tmp_path):
    mesh = two_version_mesh(tmp_path)
    with mesh.mesh:
        control_plane = mesh.mesh.processes["controlplane"]
        with Traffic(mesh.url) as traffic:
            traffic.wait_for(5)
            control_plane.kill()  # a crash, not a clean stop (kill returns once it is dead)
            killed = len(traffic.outcomes) + 1
            time.sleep(1.5)  # down for a while: Envoy's and the ext_proc's streams break and retry
            traffic.wait_for(killed + 20)
        assert traffic.failures() == [] and len(traffic.outcomes) > 20
        # Back on the same state directory: the change below must reach the running Envoy.
        mesh.mesh.start_control_plane()
        spec = dict(mesh.spec)
        spec["models"] = [
            {
                **spec["models"][0],
                "versions": [{**v, "weight": 0 if v["name"] == "v1" else 100} for v in spec["models"][0]["versions"]],
            }
        ]
        path = mesh.write_spec(spec)
        with MeshClient(mesh.mesh.control_plane_address) as client:
            # Envoy's xDS retry backs off, with jitter: the deadline is generous.
            wait_until(lambda: any(n.connected for n in client.status().nodes), 60, "Envoy reconnecting")
            applied = client.apply(path.read_text(), str(path)).config_version
        assert versions_served(mesh.url) == {"v2": 40}
        # The ext_proc found the restarted control plane too: it runs on the new routing table.
        wait_until(lambda: _extproc_table_version(mesh) >= applied, 60, "the ext_proc following the control plane")


def _extproc_table_version(mesh) -> int:
    text = httpx.get(f"http://127.0.0.1:{mesh.mesh.ports.extproc_metrics}/metrics", timeout=5).text
    match = re.search(r"^imesh_extproc_routing_table_version (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


def test_control_plane_restart_keeps_changes_and_versions_never_go_back(tmp_path):
    mesh = two_version_mesh(tmp_path)
    with mesh.mesh:
        spec = dict(mesh.spec)
        spec["pools"] = spec["pools"] + [{"name": "extra-pool", "tier": "batch"}]
        path = mesh.write_spec(spec)
        with MeshClient(mesh.mesh.control_plane_address) as client:
            applied = client.apply(path.read_text(), str(path)).config_version
        mesh.mesh.processes["controlplane"].kill()
        mesh.mesh.start_control_plane()
        with MeshClient(mesh.mesh.control_plane_address) as client:
            restored = client.spec()
        assert "extra-pool" in restored.spec_yaml
        assert restored.config_version >= applied


def test_requests_survive_the_picker_going_down(tmp_path):
    """failure_mode_allow: with the ext_proc dead, Envoy routes on the same RDS weights itself."""
    mesh = two_version_mesh(tmp_path, v2_weight=50)
    with mesh.mesh:
        mesh.mesh.processes["extproc"].kill()
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            responses = [
                client.post("/v1/chat/completions", headers={"x-model-id": "chat"}, json=chat("chat"))
                for _ in range(60)
            ]
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        versions = collections.Counter(r.headers["x-imesh-version"] for r in responses)
        assert versions["v1"] > 10 and versions["v2"] > 10, versions

        # A model named only in the body cannot be read without the picker: an honest 503 with
        # Retry-After (the model exists), never the catch-all's 404; what Envoy can judge stays 404.
        body_named = httpx.post(f"{mesh.url}/v1/chat/completions?x=1", json=chat("chat"), timeout=10)
        assert body_named.status_code == 503 and body_named.headers["retry-after"] == "1"
        error = body_named.json()["error"]
        assert error["code"] == "picker_unavailable" and error["type"] == "service_unavailable"
        assert "x-model-id" in error["message"]
        unknown = httpx.post(
            f"{mesh.url}/v1/chat/completions", headers={"x-model-id": "nope"}, json=chat("nope"), timeout=10
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        assert httpx.get(f"{mesh.url}/not-an-api", timeout=10).status_code == 404
