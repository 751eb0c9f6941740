"""Canary and A/B end to end: the `imesh` CLI -> mesh API -> xDS -> the real Envoy -> the simulated fleet.

One mesh serves the read-mostly tests (each leaves the mesh as it found it):
  chat   v1 (chat-a, chat-b) 100 / v2 (chat-canary) 0   ab.allow_version_override: true
  fixed  v1 (fixed-a) 100 / v2 (fixed-b) 0              forced versions not allowed
  pair   v1 (pair-a, pair-b)                            for drain
Progressive canaries each get a mesh of their own (they inject faults and restart the control plane).

Splits are checked within statistical bounds (binomial, +-4.5 sigma), never as exact counts.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import Replica, chat, make_mesh, send_many
from tests.harness import TestMesh as Mesh  # not collected as a test class

IMESH = shutil.which("imesh", path=str(Path(sys.executable).parent)) or "imesh"

REPLICAS = [
    Replica("chat-a", "chat", "v1"),
    Replica("chat-b", "chat", "v1"),
    Replica("chat-canary", "chat", "v2", pool="cheap", gpu="l4"),
    Replica("fixed-a", "fixed", "v1"),
    Replica("fixed-b", "fixed", "v2"),
    Replica("pair-a", "pair", "v1"),
    Replica("pair-b", "pair", "v1"),
]


def start_mesh(tmp_path: Path, replicas: list[Replica], weights: dict, ab: dict | None = None) -> Mesh:
    test_mesh = make_mesh(tmp_path, [Replica(**vars(r)) for r in replicas], weights=weights)
    for model in test_mesh.spec["models"]:
        if model["name"] in (ab or {}):
            model["ab"] = ab[model["name"]]
    test_mesh.save_spec()
    test_mesh.mesh.start()
    return test_mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    test_mesh = start_mesh(
        tmp_path_factory.mktemp("canary"),
        REPLICAS,
        weights={"chat": {"v1": 100, "v2": 0}, "fixed": {"v1": 100, "v2": 0}},
        ab={"chat": {"allow_version_override": True}},
    )
    try:
        for model in ("chat", "fixed", "pair"):
            test_mesh.mesh.wait_for_completion(model)
        yield test_mesh
    finally:
        test_mesh.mesh.stop()


def imesh(mesh: Mesh, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI against the mesh's control plane (through the environment variable)."""
    env = {**os.environ, "IMESH_SERVER": mesh.mesh.control_plane_address}
    result = subprocess.run([IMESH, *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, f"imesh {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def imesh_json(mesh: Mesh, *args: str):
    return json.loads(imesh(mesh, "-o", "json", *args).stdout)


def canary_of(mesh: Mesh, model: str) -> dict:
    return imesh_json(mesh, "canary", "status", model)["canaries"][0]


def versions_served(
    mesh: Mesh, count: int, model: str = "chat", headers: dict | None = None, by_header: bool = False
) -> collections.Counter:
    """Send `count` chat completions; count the versions that served them (all must succeed)."""

    def one(client: httpx.Client, i: int) -> httpx.Response:
        extra = {"x-model-id": model} if by_header else {}
        return client.post(
            "/v1/chat/completions", json=chat(None if by_header else model), headers={**extra, **(headers or {})}
        )

    responses = send_many(mesh.url, count, one, concurrency=16)
    bad = [r for r in responses if r.status_code != 200]
    assert not bad, f"{len(bad)} failed, e.g. {bad[0].status_code} {bad[0].text}"
    return collections.Counter(r.headers["x-imesh-version"] for r in responses)


def within(observed: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return abs(observed - mean) <= sigmas * sd


@pytest.fixture
def clean(mesh):
    """Leave chat/fixed/pair as the spec has them: no active canary, nothing drained, no faults."""
    yield mesh
    for model in ("chat", "fixed"):
        status = imesh_json(mesh, "canary", "status", model)["canaries"]
        if status and status[0]["phase"] in ("manual", "progressing", "promoted"):
            imesh(mesh, "canary", "rollback", model)
    for replica in mesh.replicas:
        if replica.model == "pair":  # the only ones a test drains
            imesh(mesh, "endpoint", "undrain", replica.address)
        httpx.delete(f"http://{replica.address}/sim/faults", timeout=5).raise_for_status()


# ---------------------------------------------------------------- weights


def test_canary_set_splits_95_5_within_statistical_bounds(clean):
    mesh = clean
    out = imesh(mesh, "canary", "set", "chat", "v2", "5").stdout
    assert "chat: v2 at 5%" in out and "v1 95%, v2 5%" in out
    versions = imesh_json(mesh, "get", "versions")
    assert {(v["version"], v["percent"]) for v in versions if v["model"] == "chat"} == {("v1", 95.0), ("v2", 5.0)}
    served = versions_served(mesh, 1000)
    assert set(served) <= {"v1", "v2"}
    assert within(served["v2"], 1000, 0.05), served


def test_set_promote_and_rollback_change_traffic_live(clean):
    mesh = clean
    imesh(mesh, "canary", "set", "chat", "v2", "40")
    served = versions_served(mesh, 300)
    assert within(served["v2"], 300, 0.40), served

    out = imesh(mesh, "canary", "promote", "chat").stdout
    assert "v2 promoted to 100% (previous stable: v1)" in out
    assert versions_served(mesh, 100) == {"v2": 100}
    status = canary_of(mesh, "chat")
    assert status["phase"] == "promoted" and status["previous_stable"] == "v1"

    spec = json.loads(json.dumps(mesh.spec))
    spec["models"][0]["versions"][1]["weight"] = 1  # the spec now says v1 100 / v2 1
    dry = imesh(mesh, "apply", "-f", str(mesh.write_spec(spec, "after-promote.yaml")), "--dry-run").stdout
    assert "~ models.chat: the spec's weights replace the live ones set by `imesh canary`" in dry

    out = imesh(mesh, "canary", "rollback", "chat").stdout
    assert "rolled back" in out and "v1 100%, v2 0%" in out
    assert versions_served(mesh, 100) == {"v1": 100}
    history = [e["message"] for e in canary_of(mesh, "chat")["history"]]
    assert [h.split(":")[0] for h in history] == ["canary v2 set to 40%", "promoted by the operator", "rolled back"]


def test_describe_and_get_routes_show_the_live_split(clean):
    mesh = clean
    imesh(mesh, "canary", "set", "chat", "v2", "10")
    routes = {r["route"]: r for r in imesh_json(mesh, "get", "routes")}
    assert routes["chat"]["destination"] == "chat/v1 90%, chat/v2 10%"
    assert routes["chat"]["sticky"] == "x-session-id"
    assert "chat/v2/forced" in routes and "fixed/v2/forced" not in routes
    text = imesh(mesh, "describe", "model", "chat").stdout
    assert "canary v2, manual, 10%" in text and "forced version   allowed with header x-model-version" in text
    doc = imesh_json(mesh, "describe", "model", "chat")
    assert {e["address"] for e in doc["endpoints"]} == {r.address for r in mesh.replicas if r.model == "chat"}
    assert doc["canary"]["weights"] == {"v1": 9000, "v2": 1000}


# ---------------------------------------------------------------- A/B


def test_sticky_sessions_keep_one_version_and_split_by_weight(clean):
    mesh = clean
    imesh(mesh, "canary", "set", "chat", "v2", "30")
    sessions = [f"user-{i}" for i in range(200)]

    def session_versions() -> dict[str, set[str]]:
        def one(client, i):
            return client.post(
                "/v1/chat/completions", json=chat("chat"), headers={"x-session-id": sessions[i % len(sessions)]}
            )

        seen = collections.defaultdict(set)
        for i, response in enumerate(send_many(mesh.url, 3 * len(sessions), one, concurrency=16)):
            assert response.status_code == 200, response.text
            seen[sessions[i % len(sessions)]].add(response.headers["x-imesh-version"])
        return seen

    at_30 = session_versions()
    assert all(len(v) == 1 for v in at_30.values()), "a session saw two versions"
    on_canary = {s for s, v in at_30.items() if v == {"v2"}}
    assert within(len(on_canary), len(sessions), 0.30), len(on_canary)

    # The canary grows: the weights keep one total, so sessions already on it stay on it.
    imesh(mesh, "canary", "set", "chat", "v2", "60")
    at_60 = session_versions()
    assert all(len(v) == 1 for v in at_60.values())
    assert on_canary <= {s for s, v in at_60.items() if v == {"v2"}}
    assert within(sum(v == {"v2"} for v in at_60.values()), len(sessions), 0.60)


def test_forced_version_only_where_the_spec_allows_it(clean):
    mesh = clean
    forced = {"x-model-version": "v2"}
    assert versions_served(mesh, 20, "chat", headers=forced) == {"v2": 20}  # weight 0, still forced
    assert versions_served(mesh, 20, "fixed", headers=forced) == {"v1": 20}  # not allowed: ignored
    with httpx.Client(base_url=mesh.url, timeout=10) as client:
        response = client.post("/v1/chat/completions", json=chat("chat"), headers={"x-model-version": "v9"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "v9" in response.json()["error"]["message"]


# ---------------------------------------------------------------- drain


def test_drain_sends_nothing_new_and_lets_in_flight_requests_finish(clean):
    mesh = clean
    a, b = mesh.replica("pair-a").address, mesh.replica("pair-b").address
    imesh(mesh, "endpoint", "drain", b)  # everything goes to pair-a, where it stalls
    mesh.set_faults("pair-a", stall_s=2.0)
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        with_pool = collections.deque()
        slow = [
            threading.Thread(target=lambda: with_pool.append(client.post("/v1/chat/completions", json=chat("pair"))))
            for _ in range(4)
        ]
        for thread in slow:
            thread.start()
        time.sleep(0.5)  # sequencing only (the stall is 2 s): the slow requests are on pair-a now

        out = imesh(mesh, "endpoint", "drain", a).stdout
        assert f"{a} (pair/v1) drained" in out
        imesh(mesh, "endpoint", "undrain", b)
        states = {e["address"]: e["state"] for e in imesh_json(mesh, "get", "endpoints")}
        assert states[a] == "drained" and states[b] != "drained"
        fresh = send_many(mesh.url, 40, lambda c, i: c.post("/v1/chat/completions", json=chat("pair")))
        assert {r.status_code for r in fresh} == {200}
        assert {r.headers["x-imesh-endpoint"] for r in fresh} == {b}

        for thread in slow:
            thread.join(30)
    assert [r.status_code for r in with_pool] == [200] * 4
    assert {r.headers["x-imesh-endpoint"] for r in with_pool} == {a}


# ---------------------------------------------------------------- errors and apply


def test_every_error_exits_1_with_a_clear_message(clean, tmp_path):
    mesh = clean
    cases = [
        (("canary", "set", "nope", "v2", "5"), "unknown model 'nope'"),
        (("canary", "set", "chat", "v9", "5"), "model 'chat' has no version 'v9' (versions: v1, v2)"),
        (("canary", "promote", "chat"), "no canary in progress for chat"),
        (("canary", "rollback", "fixed"), "no canary of fixed to roll back"),
        (("canary", "start", "chat", "v2", "--steps", "50,10"), "steps must increase"),
        (("endpoint", "drain", "10.0.0.1:1"), "no endpoint '10.0.0.1:1'"),
        (("describe", "model", "nope"), "unknown model 'nope'"),
        (
            ("apply", "-f", str(mesh.write_spec({"models": [{"name": "x", "wieght": 1}]}, "typo.yaml"))),
            "models[0].wieght: unknown field (check the spelling)",
        ),
    ]
    for args, message in cases:
        result = imesh(mesh, *args, check=False)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)

    imesh(mesh, "canary", "set", "chat", "v2", "5")
    result = imesh(mesh, "canary", "set", "chat", "v1", "50", check=False)
    assert result.returncode == 1 and "canary of chat/v2 is in progress" in result.stderr

    # A spec change that pulls the weights from under the canary is refused, dry run included.
    spec = json.loads(json.dumps(mesh.spec))
    spec["models"][0]["versions"][1]["weight"] = 50
    path = mesh.write_spec(spec, "weights.yaml")
    for extra in (["--dry-run"], []):
        result = imesh(mesh, "apply", "-f", str(path), *extra, check=False)
        assert result.returncode == 1 and "canary of chat/v2 is in progress" in result.stderr

    unreachable = subprocess.run(
        [IMESH, "--server", "127.0.0.1:1", "status"], capture_output=True, text=True, timeout=60
    )
    assert unreachable.returncode == 1 and "cannot reach the control plane at 127.0.0.1:1" in unreachable.stderr


def test_apply_shows_the_diff_and_surfaces_envoys_own_rejection(clean):
    mesh = clean
    spec = json.loads(json.dumps(mesh.spec))
    spec["defaults"] = {"extra_response_headers": {"x-served-by": "%UPSTREAM_HOST%"}}
    path = mesh.write_spec(spec, "headers.yaml")
    before = imesh_json(mesh, "status")["config_version"]
    dry = imesh(mesh, "apply", "-f", str(path), "--dry-run").stdout
    assert "defaults.extra_response_headers.x-served-by" in dry and "dry run" in dry
    assert imesh_json(mesh, "status")["config_version"] == before

    spec["defaults"] = {"extra_response_headers": {"x-broken": "%NO_SUCH_COMMAND%"}}
    bad = imesh(mesh, "apply", "-f", str(mesh.write_spec(spec, "bad.yaml")), check=False)
    assert bad.returncode == 1
    assert "Envoy rejected config version" in bad.stderr and "NO_SUCH_COMMAND" in bad.stderr, bad.stderr
    # Reverted: the mesh serves as before, on a newer config version.
    assert imesh_json(mesh, "status")["config_version"] > before
    assert versions_served(mesh, 10, "fixed") == {"v1": 10}


# ---------------------------------------------------------------- fail-open (last: it stops the ext_proc)


def test_weights_sticky_and_forced_versions_hold_with_the_ext_proc_down(clean):
    mesh = clean
    imesh(mesh, "canary", "set", "chat", "v2", "5")
    mesh.mesh.processes["extproc"].kill()
    try:
        served = versions_served(mesh, 1000, by_header=True)  # no ext_proc: the client names the model
        assert within(served["v2"], 1000, 0.05), served
        sticky = versions_served(mesh, 30, by_header=True, headers={"x-session-id": "alice"})
        assert len(sticky) == 1
        assert versions_served(mesh, 10, by_header=True, headers={"x-model-version": "v2"}) == {"v2": 10}
        assert versions_served(mesh, 10, "fixed", by_header=True, headers={"x-model-version": "v2"}) == {"v1": 10}
        with httpx.Client(base_url=mesh.url, timeout=10) as client:
            response = client.post(
                "/v1/chat/completions", json=chat("chat"), headers={"x-model-id": "chat", "x-model-version": "v9"}
            )
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    finally:
        mesh.mesh.start_extproc()


# ---------------------------------------------------------------- progressive canary


class Traffic:
    """Steady background requests for `model` while a progressive canary runs."""

    def __init__(self, mesh: Mesh, model: str, workers: int = 4):
        self._stop = threading.Event()
        self.statuses: collections.Counter = collections.Counter()
        self._threads = [
            threading.Thread(target=self._run, args=(mesh.url, model), daemon=True) for _ in range(workers)
        ]

    def _run(self, url: str, model: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/v1/chat/completions", json=chat(model))
                    self.statuses[response.status_code] += 1
                except httpx.HTTPError:
                    self.statuses["error"] += 1
                    time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def wait_for_canary(mesh: Mesh, model: str, done, timeout_s: float = 40.0) -> dict:
    """Poll the canary's status (as `imesh -o json canary status` shows it) through the mesh API
    directly: a CLI process per poll would be slower than a 1 s step."""
    from imesh.client import MeshClient, MeshError
    from imesh.commands.canary import _as_dict

    deadline = time.monotonic() + timeout_s
    status: dict = {}
    while time.monotonic() < deadline:
        try:
            with MeshClient(mesh.mesh.control_plane_address, timeout_s=2.0) as client:
                status = _as_dict(client.canary_status(model).canaries[0])
        except MeshError:  # restarting
            time.sleep(0.1)
            continue
        if done(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"canary did not get there in {timeout_s:.0f}s: {json.dumps(status, indent=1)}")


CANARY_REPLICAS = [Replica("stable", "chat", "v1"), Replica("next", "chat", "v2")]


def settles_on(mesh: Mesh, version: str, timeout_s: float = 15.0) -> None:
    """All traffic goes to `version` (bounded wait). Envoy has the weights when the API answers; the
    ext_procs get the routing table a moment later (and, after a control-plane restart, once their
    stream has reconnected), and until then a picker may still pin a version from the previous split."""
    deadline = time.monotonic() + timeout_s
    served: collections.Counter = collections.Counter()
    while time.monotonic() < deadline:
        served = versions_served(mesh, 20)
        if served == {version: 20}:
            return
        time.sleep(0.2)
    raise AssertionError(f"traffic did not settle on {version}: {served}")


def test_progressive_canary_promotes_a_healthy_version(tmp_path):
    mesh = start_mesh(tmp_path, CANARY_REPLICAS, weights={"chat": {"v1": 100, "v2": 0}})
    try:
        mesh.mesh.wait_for_completion("chat")
        with Traffic(mesh, "chat"):
            out = imesh(
                mesh,
                "canary",
                "start",
                "chat",
                "v2",
                "--steps",
                "20,50,100",
                "--interval",
                "1s",
                "--max-error-rate",
                "5%",
                "--max-p99",
                "10s",
                "--min-samples",
                "10",
            ).stdout
            assert "progressive canary of v2 started at 20%" in out
            status = wait_for_canary(mesh, "chat", lambda s: s["phase"] != "progressing")
        assert status["phase"] == "promoted", status
        assert status["weights"] == {"v1": 0, "v2": 10000}
        passed = [e["message"] for e in status["history"] if "passed" in e["message"]]
        assert len(passed) == 3 and "all 3 steps passed" in passed[-1]
        settles_on(mesh, "v2")
        assert "promoted" in imesh(mesh, "canary", "status").stdout
    finally:
        mesh.mesh.stop()


def test_progressive_canary_rolls_back_a_failing_version_and_says_why(tmp_path):
    mesh = start_mesh(tmp_path, CANARY_REPLICAS, weights={"chat": {"v1": 100, "v2": 0}})
    try:
        mesh.mesh.wait_for_completion("chat")
        mesh.set_faults("next", error_rate=0.5)
        with Traffic(mesh, "chat"):
            imesh(
                mesh,
                "canary",
                "start",
                "chat",
                "v2",
                "--steps",
                "20,50,100",
                "--interval",
                "1s",
                "--max-error-rate",
                "1%",
                "--min-samples",
                "10",
            )
            status = wait_for_canary(mesh, "chat", lambda s: s["phase"] != "progressing")
        assert status["phase"] == "rolled_back", status
        assert "step 1/3 at 20%: error rate" in status["reason"] and "> 1.0%" in status["reason"]
        assert status["weights"] == {"v1": 100, "v2": 0}
        settles_on(mesh, "v1")
        text = imesh(mesh, "canary", "status", "chat").stdout
        assert "rolled back" in text and "reason     step 1/3 at 20%: error rate" in text
    finally:
        mesh.mesh.stop()


def test_a_control_plane_restart_in_the_middle_of_a_canary_resumes_it(tmp_path):
    mesh = start_mesh(tmp_path, CANARY_REPLICAS, weights={"chat": {"v1": 100, "v2": 0}})
    try:
        mesh.mesh.wait_for_completion("chat")
        with Traffic(mesh, "chat"):
            started = imesh_json(
                mesh,
                "canary",
                "start",
                "chat",
                "v2",
                "--steps",
                "10,50,100",
                "--interval",
                "1.5s",
                "--max-error-rate",
                "5%",
                "--min-samples",
                "20",
            )
            wait_for_canary(mesh, "chat", lambda s: s["step"] >= 1)
        # No traffic: step 2 cannot gather its samples, so the restart lands in the middle of it.
        before = canary_of(mesh, "chat")
        assert (before["phase"], before["step"]) == ("progressing", 1), before
        mesh.mesh.processes["controlplane"].stop()
        mesh.mesh.start_control_plane()

        resumed = wait_for_canary(mesh, "chat", lambda s: "control plane restarted" in s["history"][-1]["message"])
        assert (resumed["phase"], resumed["step"], resumed["percent"]) == ("progressing", 1, 50.0)
        assert resumed["weights"] == {"v1": 5000, "v2": 5000}
        assert resumed["history"][-1]["message"].startswith("control plane restarted: resuming step 2/3 at 50%")
        assert imesh_json(mesh, "status")["config_version"] > int(started["config_version"])  # never backwards
        with Traffic(mesh, "chat"):
            status = wait_for_canary(mesh, "chat", lambda s: s["phase"] != "progressing")
        assert status["phase"] == "promoted", status
        settles_on(mesh, "v2")
    finally:
        mesh.mesh.stop()


# ---------------------------------------------------------------- persistence under a crash


def test_a_killed_control_plane_loses_no_acknowledged_change(tmp_path):
    """SIGKILL in the middle of a burst of canary changes: the state file is whole, holds at least
    every acknowledged change, and the config version did not go backwards."""
    from imesh.client import MeshClient, MeshError
    from imesh.local_mesh import LocalMesh
    from imesh.ports import MeshPorts, free_ports
    from tests.harness import build_spec

    replicas = [Replica("a", "chat", "v1"), Replica("b", "chat", "v2")]
    for replica, port in zip(replicas, free_ports(2), strict=True):
        replica.address = f"127.0.0.1:{port}"  # nothing listens: the control plane alone is under test
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(build_spec(replicas, {"chat": {"v1": 100, "v2": 0}})))
    local = LocalMesh(spec=tmp_path / "mesh.yaml", workdir=tmp_path, ports=MeshPorts.ephemeral())
    local.start_control_plane()
    acked: list[tuple[int, float]] = []
    try:
        with MeshClient(local.control_plane_address) as client:

            def burst() -> None:
                for i in range(10_000):
                    try:
                        change = client.set_canary("chat", "v2", float(1 + i % 90))
                    except MeshError:
                        return  # the control plane died under us
                    acked.append((change.config_version, change.canary.percent))

            writer = threading.Thread(target=burst)
            writer.start()
            deadline = time.monotonic() + 20
            while len(acked) < 15 and time.monotonic() < deadline:
                time.sleep(0.01)
            local.processes["controlplane"].kill()
            writer.join(30)
        assert len(acked) >= 15
        local.start_control_plane()
        with MeshClient(local.control_plane_address) as client:
            status = client.canary_status("chat").canaries[0]
            version = client.status().config_version
        last_version, last_percent = acked[-1]
        assert version >= last_version
        # The last acknowledged change, or the one after it that was written but not yet acknowledged.
        assert status.percent in (last_percent, 1 + last_percent % 90)
    finally:
        local.stop()
