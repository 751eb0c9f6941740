"""`imesh up --demo` as a user runs it: it serves, the CLI reads it, and SIGTERM stops everything.

The demo fleet listens on its fixed ports (127.0.0.1:19000-19004), so this is the one test that
does not use ephemeral ports for everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from imesh.local_mesh import free_ports

IMESH = str(Path(sys.executable).parent / "imesh")


def test_up_demo_serves_and_stops_every_process(tmp_path):
    listener, admin, cp, cp_metrics, ep, ep_metrics = free_ports(6)
    argv = [
        IMESH,
        "up",
        "--demo",
        "--workdir",
        str(tmp_path),
        "--listener-port",
        str(listener),
        "--admin-port",
        str(admin),
        "--control-plane-port",
        str(cp),
        "--extproc-port",
        str(ep),
        "--control-plane-metrics-port",
        str(cp_metrics),
        "--extproc-metrics-port",
        str(ep_metrics),
    ]
    up = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        banner = _read_until(up, "Ctrl-C stops everything", timeout_s=90)
        assert f"http://127.0.0.1:{listener}" in banner and "curl" in banner

        response = httpx.post(
            f"http://127.0.0.1:{listener}/v1/chat/completions",
            headers={"x-model-id": "llama-3-8b"},
            json={"model": "llama-3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-imesh-endpoint"].startswith("127.0.0.1:1900")
        assert response.headers["x-imesh-version"] in ("v1", "v2")

        env = {**os.environ, "IMESH_SERVER": f"127.0.0.1:{cp}"}
        models = subprocess.run([IMESH, "-o", "json", "get", "models"], env=env, capture_output=True, text=True)
        assert models.returncode == 0, models.stderr
        assert {m["model"] for m in json.loads(models.stdout)} == {"llama-3-8b", "intent-classifier"}
        status = subprocess.run([IMESH, "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and "llama-3-8b" in status.stdout and "imesh-envoy" in status.stdout

        children = _descendants(up.pid)
        assert len(children) >= 4  # fleet, control plane, ext_proc, envoy
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], "imesh up left processes behind"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_cli_errors_are_clear_and_exit_non_zero(tmp_path):
    (port,) = free_ports(1)
    unreachable = subprocess.run([IMESH, "--server", f"127.0.0.1:{port}", "status"], capture_output=True, text=True)
    assert unreachable.returncode == 1
    assert "cannot reach the control plane" in unreachable.stderr
    no_spec = subprocess.run([IMESH, "up"], capture_output=True, text=True)
    assert no_spec.returncode == 2 and "--demo" in no_spec.stderr


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
