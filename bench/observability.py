"""What the mesh's telemetry costs (docs/observability.md): access logs, token counting, metrics.

Same run, interleaved rounds, medians; wrk (1 thread) on loopback; every process shares this
machine's cores. Configurations, each a whole mesh of its own started side by side:

* access logging, on a fast static upstream (bench/_common.py) with the model in a header:
  ``none`` (no gRPC access log, no file log), ``als`` (the gRPC access log stream to the control
  plane only), ``als+file`` (plus the JSON access log line, the default);
* output-token counting (the ext_proc's response-body phase), token sample rate 0 vs 1: on the
  static upstream (one unstreamed JSON body: one extra round) and on the simulated fleet streaming
  16 tokens (one round per SSE chunk);
* in-process micro-benchmarks: the ext_proc's per-request metric updates, and the control plane's
  per-record work (ALS entry -> RequestRecord -> Prometheus sink -> status window).

``python -m bench.observability`` prints the report; ``python -m bench`` puts it in docs/benchmarks.md.
The figures quoted in docs/observability.md come from this module.
"""

from __future__ import annotations

import json
import os
import sys
import time
import timeit
from pathlib import Path

import httpx
import yaml

from bench._common import (
    CHAT_BODY,
    WrkResult,
    cpu_seconds,
    lua_script,
    machine_summary,
    scratch_dir,
    settle,
    start_upstream,
    wrk,
)
from imesh.local_mesh import LocalMesh
from imesh.ports import MeshPorts, free_ports
from imesh.processes import StartupError
from protos.wire import MODEL_ID_HEADER, PRIORITY_HEADER

TITLE = "Telemetry: access logs, token counting, metrics"
ORDER = 50
QUICK = os.environ.get("IMESH_BENCH_QUICK") == "1"
ROUNDS = 2 if QUICK else 5
SECONDS = 2
SATURATION = 32
STREAM_TOKENS = 16
PATH = "/v1/chat/completions"


def _model(name: str, addresses: list[str], mode: str = "picker") -> dict:
    return {
        "name": name,
        "routing_mode": mode,
        "versions": [{"name": "v1", "endpoints": [{"address": a, "pool": "p"} for a in addresses]}],
    }


def _spec(*models: dict) -> dict:
    return {
        "apiVersion": "imesh/v1",
        "kind": "Mesh",
        "pools": [{"name": "p", "tier": "standard"}],
        "models": list(models),
    }


class _Variant:
    """One configuration: a mesh and the wrk script sent to it."""

    def __init__(self, name: str, mesh: LocalMesh, script: Path):
        self.name, self.mesh, self.script = name, mesh, script
        self.runs: dict[int, list[WrkResult]] = {}
        self.cpu: dict[str, list[float]] = {}  # process -> µs per request at saturation, idle work taken out
        self.idle: dict[str, float] = {}  # process -> CPU seconds per second with no traffic (load scrapes)

    def _pids(self) -> dict[str, int]:
        return {name: p.popen.pid for name, p in self.mesh.processes.items() if p.popen is not None}

    def measure_idle(self, seconds: float = 2.0) -> None:
        pids = self._pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(seconds)
        self.idle = {name: (cpu_seconds(pid) - before[name]) / seconds for name, pid in pids.items()}

    def measure(self, connections: int) -> None:
        pids = self._pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result = wrk(self.mesh.url + PATH, self.script, connections, SECONDS)
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self.runs.setdefault(connections, []).append(result)
        if connections == SATURATION and result.requests:
            for name in pids:
                busy = after[name] - before[name] - self.idle.get(name, 0.0) * result.seconds
                self.cpu.setdefault(name, []).append(max(busy, 0.0) / result.requests * 1e6)
        settle(0.3)

    # Best of the rounds, not the median: on a shared machine other work only ever adds time, so the
    # least disturbed round is the closest to the cost itself.
    def best(self, connections: int, attr: str) -> float:
        values = [getattr(r, attr) for r in self.runs[connections]]
        return max(values) if attr == "rps" else min(values)

    def cpu_us(self, process: str) -> float:
        return min(self.cpu[process]) if self.cpu.get(process) else 0.0


def _wait(mesh: LocalMesh, body: str, headers: dict[str, str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(mesh.url + PATH, content=body, headers=headers, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{mesh.workdir.name}: no successful request in {timeout_s:.0f}s")


def _static_variants(workdir: Path) -> tuple[list, list[_Variant], list[_Variant]]:
    """Access logging on the fast path (Envoy alone decides: its cost is what is left), and token
    counting on the picker path, both against the static upstream."""
    upstream, addresses = start_upstream(workdir, replicas=4)
    spec = workdir / "static.yaml"
    spec.write_text(
        yaml.safe_dump(
            _spec(_model("bench", addresses[:2]), _model("bench-fast", addresses[2:], "fast")), sort_keys=False
        )
    )
    fast = lua_script(workdir, "fast", CHAT_BODY, {MODEL_ID_HEADER: "bench-fast"})
    picker = lua_script(workdir, "picker", CHAT_BODY, {MODEL_ID_HEADER: "bench"})
    quiet = ("--no-grpc-access-log", "--access-log-path", "")
    meshes = {}
    for name, cp_args, ext_args in (
        ("none", quiet, ("--token-sample-rate", "0")),
        ("als-all", ("--access-log-path", "", "--fast-path-log-sample", "1"), ("--token-sample-rate", "0")),
        ("als", ("--access-log-path", ""), ("--token-sample-rate", "0")),
        ("als+file", (), ("--token-sample-rate", "0")),
        ("tokens", (), ("--token-sample-rate", "1")),
    ):
        meshes[name] = LocalMesh(
            spec=spec,
            workdir=workdir / name.replace("+", "-"),
            ports=MeshPorts.ephemeral(),
            controlplane_args=cp_args,
            extproc_args=ext_args,
        )
    logging = [
        _Variant("fast path, no access logs", meshes["none"], fast),
        _Variant("fast path, gRPC access log, every request", meshes["als-all"], fast),
        _Variant("fast path, gRPC access log, 1 in 10 successes", meshes["als"], fast),
        _Variant("fast path, gRPC + JSON file access logs, 1 in 10 (default)", meshes["als+file"], fast),
    ]
    tokens = [
        _Variant("picker, token sample rate 0", meshes["als+file"], picker),
        _Variant("picker, token sample rate 1", meshes["tokens"], picker),
    ]
    return [upstream], logging, tokens


def _stream_variants(workdir: Path) -> list[_Variant]:
    (port,) = free_ports(1)
    fleet = workdir / "fleet.yaml"
    fleet.write_text(
        yaml.safe_dump(
            {
                "seed": 7,
                "time_scale": 0.05,
                "replicas": [
                    {"name": "sim", "address": f"127.0.0.1:{port}", "models": ["sim"], "gpu": "h100", "overrides": {}}
                ],
            }
        )
    )
    spec = workdir / "stream.yaml"
    spec.write_text(yaml.safe_dump(_spec(_model("sim", [f"127.0.0.1:{port}"])), sort_keys=False))
    body = json.dumps(
        {
            "model": "sim",
            "stream": True,
            "max_tokens": STREAM_TOKENS,
            "messages": [{"role": "user", "content": "Say hello."}],
        }
    )
    script = lua_script(workdir, "stream", body, {MODEL_ID_HEADER: "sim"})
    variants = []
    for i, rate in enumerate(("0", "1")):
        mesh = LocalMesh(
            spec=spec,
            workdir=workdir / f"stream-{rate}",
            ports=MeshPorts.ephemeral(),
            fleet_config=fleet if i == 0 else None,
            extproc_args=("--token-sample-rate", rate),
        )
        variants.append(_Variant(f"stream, token sample rate {rate}", mesh, script))
    return variants


# ---------------------------------------------------------------- micro-benchmarks


def _micro() -> dict[str, float]:
    """Nanoseconds per operation of the per-request (ext_proc) and per-record (control plane) work."""
    from envoy.data.accesslog.v3 import accesslog_pb2
    from prometheus_client import CollectorRegistry

    from controlplane.model.mesh_model import build_mesh_model
    from controlplane.spec.schema import parse_spec
    from controlplane.traffic.access_log import MeshLabels, to_record
    from controlplane.traffic.metrics import RequestMetrics
    from controlplane.traffic.stats import RequestStats
    from controlplane.translate.table import translate_routing_table
    from extproc.routing_view import RoutingView
    from extproc.telemetry import ExtprocMetrics

    spec = parse_spec(yaml.safe_dump(_spec(_model("bench", ["10.0.0.1:8000", "10.0.0.2:8000"]))), "bench")
    model = build_mesh_model(spec)
    labels = MeshLabels.from_model(model)
    routing = RoutingView.from_proto(translate_routing_table(model))
    metrics = ExtprocMetrics(CollectorRegistry())
    n = 100_000

    def per_request() -> None:
        started = time.perf_counter_ns()
        metrics.picked(routing, "bench", None)
        metrics.decision("request_headers", started)

    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = "bench/v1"
    common.upstream_remote_address.socket_address.address = "10.0.0.1"
    common.upstream_remote_address.socket_address.port_value = 8000
    common.time_to_first_upstream_rx_byte.FromMicroseconds(900)
    common.time_to_last_upstream_rx_byte.FromMicroseconds(1900)
    common.duration.FromMicroseconds(2000)
    entry.request.request_headers[PRIORITY_HEADER] = "standard"
    entry.response.response_code.value = 200
    entry.response.response_headers["content-type"] = "application/json"
    sinks = [RequestMetrics(CollectorRegistry(), labels), RequestStats(labels=labels)]
    wire = entry.SerializeToString()

    def per_record() -> None:
        record = to_record(accesslog_pb2.HTTPAccessLogEntry.FromString(wire), labels)
        for sink in sinks:
            sink(record)

    best = lambda fn: min(timeit.repeat(fn, number=n // 5, repeat=25)) / (n // 5) * 1e9  # noqa: E731 (least disturbed)
    return {
        "ext_proc metrics per request (timer, decision histogram, picks counter)": best(per_request),
        "control plane per access log entry (parse, RequestRecord, Prometheus sink, status window)": best(per_record),
    }


# ---------------------------------------------------------------- report


def _row(v: _Variant, processes: list[str]) -> str:
    cells = [f"{v.best(SATURATION, 'rps'):,.0f}", f"{v.best(1, 'p50_ms'):.3f}", f"{v.best(1, 'p99_ms'):.3f}"]
    cells += [f"{v.cpu_us(p):.1f}" for p in processes]
    errors = sum(r.errors + r.non2xx for rs in v.runs.values() for r in rs)
    return f"| {v.name} | " + " | ".join(cells) + f" | {errors} |"


PROCESSES = ["envoy", "extproc", "controlplane"]
HEAD = (
    f"| configuration | req/s at {SATURATION} conns | p50 ms at 1 conn | p99 ms at 1 conn | "
    "Envoy µs/req | ext_proc µs/req | control plane µs/req | errors |"
)


def _table(title: str, variants: list[_Variant]) -> list[str]:
    return [title, "", HEAD, "|---|" + "---:|" * 7, *(_row(v, PROCESSES) for v in variants), ""]


def _delta(a: _Variant, b: _Variant) -> str:
    """What b adds over a: CPU per request by process, p50 at 1 connection, throughput ratio."""
    cpu = ", ".join(
        f"{name} {b.cpu_us(p) - a.cpu_us(p):+.1f} µs"
        for name, p in (("Envoy", "envoy"), ("ext_proc", "extproc"), ("control plane", "controlplane"))
    )
    p50 = (b.best(1, "p50_ms") - a.best(1, "p50_ms")) * 1e3
    rps = b.best(SATURATION, "rps") / a.best(SATURATION, "rps")
    return f"CPU per request {cpu}; p50 {p50:+.0f} µs at 1 connection; {rps:.2f}x the throughput"


def _report(logging: list[_Variant], tokens: list[_Variant], stream: list[_Variant], micro: dict[str, float]) -> str:
    out = [
        f"Machine: {machine_summary()}. wrk 1 thread, {ROUNDS} interleaved rounds of {SECONDS:g} s; each "
        "figure is the best round (highest req/s, lowest latency and CPU): other work only adds time. "
        f"CPU per request: user+system time of each process over a {SATURATION}-connection run, minus its "
        "idle rate (load scrapes), over the requests served.",
        "",
    ]
    out += _table("Access logs, fast path (no ext_proc: Envoy and the static upstream only):", logging)
    none, every, sampled, both = logging
    out += [
        f"- gRPC access log, every request: {_delta(none, every)};",
        f"- gRPC access log, 1 in 10 fast-path successes (`--fast-path-log-sample`, default 10): "
        f"{_delta(none, sampled)};",
        f"- JSON file log on top (same filter): {_delta(sampled, both)}.",
        "",
    ]
    out += _table("Output-token counting, picker path, unstreamed JSON responses (one extra ext_proc round):", tokens)
    out += [f"- counting every response: {_delta(*tokens)}.", ""]
    out += _table(
        f"Output-token counting, simulated fleet, streamed completions of {STREAM_TOKENS} tokens "
        "(one extra ext_proc round per chunk):",
        stream,
    )
    out += [f"- counting every stream: {_delta(*stream)}.", ""]
    out += ["In-process micro-benchmarks (best of 25 runs of 20,000):", "", "| operation | ns |", "|---|---:|"]
    out += [f"| {k} | {v:,.0f} |" for k, v in micro.items()]
    return "\n".join(out) + "\n"


def _start(mesh: LocalMesh, attempts: int = 3) -> LocalMesh:
    """Start `mesh`; on a port another process took between choosing and binding, choose again."""
    for attempt in range(attempts):
        try:
            return mesh.start()
        except StartupError:
            if attempt == attempts - 1:
                raise
            mesh.ports = MeshPorts.ephemeral()
    raise AssertionError("unreachable")


def run(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = scratch_dir("observability")
    processes, logging, tokens = _static_variants(workdir)
    stream = _stream_variants(workdir)
    meshes = list({id(v.mesh): v.mesh for v in [*logging, *tokens, *stream]}.values())
    started: list[LocalMesh] = []
    try:
        for mesh in meshes:  # the first stream mesh starts the fleet both stream meshes use
            started.append(_start(mesh))
        for v in [*logging, *tokens]:
            _wait(v.mesh, CHAT_BODY, {MODEL_ID_HEADER: "bench-fast" if "fast" in v.name else "bench"})
        for v in stream:
            _wait(
                v.mesh,
                '{"model": "sim", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}',
                {MODEL_ID_HEADER: "sim"},
            )
        for v in [*logging, *tokens, *stream]:
            v.measure_idle()
        for round_ in range(ROUNDS):
            for group in (logging, tokens, stream):
                for v in group if round_ % 2 == 0 else list(reversed(group)):
                    for connections in (1, SATURATION):
                        v.measure(connections)
        micro = _micro()
    finally:
        for mesh in reversed(started):
            mesh.stop()
        for process in processes:
            process.stop()
    return _report(logging, tokens, stream, micro)


if __name__ == "__main__":
    print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")))
