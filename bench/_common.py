"""Shared pieces of the benchmarks: wrk, a static upstream, a plain Envoy proxy, process helpers.

Not a benchmark itself (the leading underscore keeps ``python -m bench`` from running it).
Everything listens on 127.0.0.1 ephemeral ports and every load run is bounded by ``wrk -d``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from imesh.envoy_process import envoy_binary
from imesh.ports import free_ports
from imesh.processes import ManagedProcess

# A chat completion as the OpenAI SDK sends it (~150 bytes): the body the mesh inspects when no
# header names the model.
CHAT_BODY = json.dumps(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello in one word."}], "max_tokens": 8}
)
# What the static replicas answer: a short OpenAI-style completion.
REPLY_BODY = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "chat.completion",
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8},
    }
)
# What the static replicas' /metrics say: an idle vLLM.
METRICS_BODY = (
    "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
    "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
    "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.1\n"
)


# ----------------------------------------------------------------------------- wrk


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not installed: `make bench` installs it (apt-get install wrk)")
    return found


_LUA = """
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"errors\\":%%d,\\"non2xx\\":%%d," ..
    "\\"p50\\":%%d,\\"p90\\":%%d,\\"p99\\":%%d,\\"mean\\":%%f}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    errors: int
    non2xx: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def lua_script(directory: Path, name: str, body: str, headers: dict[str, str]) -> Path:
    lines = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items())
    path = directory / f"{name}.lua"
    path.write_text(_LUA % {"body": json.dumps(body), "headers": lines})
    return path


def wrk(url: str, script: Path, connections: int, seconds: float, threads: int = 1) -> WrkResult:
    argv = [
        ensure_wrk(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(line[len("WRKJSON ") :])
    return WrkResult(
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        errors=d["errors"],
        non2xx=d["non2xx"],
        p50_ms=d["p50"] / 1e3,
        p90_ms=d["p90"] / 1e3,
        p99_ms=d["p99"] / 1e3,
        mean_ms=d["mean"] / 1e3,
    )


# ----------------------------------------------------------------------------- Envoys


def _envoy(workdir: Path, name: str, config: str, concurrency: int = 1) -> ManagedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    argv = [
        envoy_binary(),
        "-c",
        str(path),
        "--concurrency",
        str(concurrency),
        "--disable-hot-restart",
        "--log-level",
        "warning",
    ]
    return ManagedProcess(name, argv, workdir / f"{name}.log")


def _direct_listener(name: str, port: int) -> str:
    return f"""
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: replica
              domains: ["*"]
              routes:
              - match: {{path: /metrics}}
                direct_response: {{status: 200, body: {{inline_string: {json.dumps(METRICS_BODY)}}}}}
              - match: {{prefix: /}}
                direct_response: {{status: 200, body: {{inline_string: {json.dumps(REPLY_BODY)}}}}}
                response_headers_to_add:
                - header: {{key: content-type, value: application/json}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"""


def start_upstream(workdir: Path, replicas: int = 4) -> tuple[ManagedProcess, list[str]]:
    """One Envoy (1 worker) answering on ``replicas`` ports as static "replicas": a fast upstream,
    so that what is measured is the proxy in front of it."""
    admin, *ports = free_ports(replicas + 1)
    listeners = "".join(_direct_listener(f"replica{i}", port) for i, port in enumerate(ports))
    config = f"""
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:{listeners}
"""
    process = _envoy(workdir, "upstream", config).start()
    addresses = [f"127.0.0.1:{p}" for p in ports]
    process.wait_until(lambda: all(_ok(f"http://{a}/metrics") for a in addresses), 30)
    return process, addresses


def _lb_endpoint(address: str) -> str:
    """One `lb_endpoints` entry of the YAML below for "host:port" (a new line, then the entry, indented for it)."""
    host, _, port = address.rpartition(":")
    return f"""
        - endpoint: {{address: {{socket_address: {{address: {host}, port_value: {port}}}}}}}"""


def start_plain_proxy(workdir: Path, upstreams: list[str]) -> tuple[ManagedProcess, str]:
    """ "Envoy alone": one worker, a router, a round-robin cluster of the same upstreams; no ext_proc."""
    admin, port = free_ports(2)
    hosts = "".join(_lb_endpoint(a) for a in upstreams)
    config = f"""
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}}}
static_resources:
  listeners:
  - name: alone
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: alone
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:{hosts}
"""
    process = _envoy(workdir, "alone", config).start()
    url = f"http://127.0.0.1:{port}"
    process.wait_until(lambda: _ok(f"{url}/v1/chat/completions"), 30)
    return process, url


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------------- misc


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"


def scratch_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"imesh-bench-{prefix}-"))


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)


# ----------------------------------------------------------------------------- CPU accounting

_CLK = os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the ext_proc's workers are children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants so far."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _CLK
