"""`imesh up --demo` as a user runs it: it serves, the CLI reads it, and SIGTERM stops everything.

`--ports ephemeral` puts the mesh and the demo fleet on free ports (the demo's own are fixed), so
this runs beside a `make run` on the same machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from imesh.local_mesh import DEMO_FLEET
from imesh.ports import free_ports

IMESH = str(Path(sys.executable).parent / "imesh")


def test_up_demo_serves_and_stops_every_process(tmp_path):
    (listener,) = free_ports(1)  # one port given explicitly: it wins over --ports ephemeral
    argv = [IMESH, "up", "--demo", "--ports", "ephemeral", "--workdir", str(tmp_path), "--listener-port", str(listener)]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        banner = _read_until(up, "Ctrl-C stops everything", timeout_s=90)
        assert f"http://127.0.0.1:{listener}" in banner and "curl" in banner
        control_plane = re.search(r"control plane \(gRPC\)\s+(\S+)", banner)
        assert control_plane is not None, banner
        cp = control_plane.group(1)
        assert f"imesh status --server {cp}" in banner
        fleet = _fleet_addresses(tmp_path / "demo-ephemeral" / "fleet.yaml")
        assert len(fleet) == len(_fleet_addresses(DEMO_FLEET)) and not fleet & _fleet_addresses(DEMO_FLEET)

        response = httpx.post(
            f"http://127.0.0.1:{listener}/v1/chat/completions",
            headers={"x-model-id": "llama-3-8b"},
            json={"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-imesh-endpoint"] in fleet
        assert response.headers["x-imesh-version"] in ("v1", "v2")

        env = {**os.environ, "IMESH_SERVER": cp}
        models = subprocess.run([IMESH, "-o", "json", "get", "models"], env=env, capture_output=True, text=True)
        assert models.returncode == 0, models.stderr
        assert {m["model"] for m in json.loads(models.stdout)} == {"llama-3-8b", "intent-classifier"}
        endpoints = subprocess.run([IMESH, "get", "endpoints", "-o", "json"], env=env, capture_output=True, text=True)
        assert endpoints.returncode == 0, endpoints.stderr
        assert {e["address"] for e in json.loads(endpoints.stdout)} == fleet
        status = subprocess.run([IMESH, "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "llama-3-8b" in status.stdout and "imesh-envoy" in status.stdout

        children = _descendants(up.pid)
        assert len(children) >= 4  # fleet, control plane, ext_proc, envoy
        # Streams that started before SIGTERM run to their end: the mesh drains before it stops.
        streams = [_Stream(f"http://127.0.0.1:{listener}") for _ in range(4)]
        for stream in streams:
            stream.started.wait(30)
        up.send_signal(signal.SIGTERM)
        for stream in streams:
            stream.join(60)
        assert [s.outcome for s in streams] == ["complete"] * 4, [s.outcome for s in streams]
        assert up.wait(60) == 0
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "imesh up left processes behind"
    finally:
        # Whatever failed: no process of this mesh may outlive the test. Its children run in their
        # own sessions (so Ctrl-C reaches `imesh up` alone), so the group kill does not reach them.
        leftovers = _descendants(up.pid)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_cli_errors_are_clear_and_exit_non_zero(tmp_path):
    (port,) = free_ports(1)
    unreachable = subprocess.run([IMESH, "--server", f"127.0.0.1:{port}", "status"], capture_output=True, text=True)
    assert unreachable.returncode == 1
    assert "cannot reach the control plane" in unreachable.stderr
    no_spec = subprocess.run([IMESH, "up"], capture_output=True, text=True)
    assert no_spec.returncode == 2 and "--demo" in no_spec.stderr


def _fleet_addresses(path: Path) -> set[str]:
    return {r["address"] for r in yaml.safe_load(path.read_text())["replicas"]}


class _Stream(threading.Thread):
    """One long streamed chat completion; ``outcome`` says how it ended."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.outcome, self.started = url, "running", threading.Event()
        self.start()

    def run(self) -> None:
        body = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "tell"}], "max_tokens": 150}
        body["stream"] = True
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=60) as response:
                chunks = []
                for chunk in response.iter_text():
                    chunks.append(chunk)
                    self.started.set()
                text = "".join(chunks)
            self.outcome = "complete" if response.status_code == 200 and "data: [DONE]" in text else text[-200:]
        except httpx.HTTPError as exc:
            self.outcome = f"{type(exc).__name__}: {exc}"
        finally:
            self.started.set()


def _read_until(process: subprocess.Popen, marker: str, timeout_s: float) -> str:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError("imesh up did not come up:\n" + "".join(seen))


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    parents: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        parents.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
