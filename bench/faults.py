"""Fault suite: parts of the mesh and of the fleet fail under load; what clients saw, and how fast it healed.

Each case runs its own mesh on loopback (every replica its own fleet process, so one can be
SIGKILLed), sends bounded closed-loop traffic from a few client threads, injects one fault, and
counts every request: sent, failed (anything but a complete 200), and the recovery time (the fault
to the last failure, 0 if none failed). The figures go into docs/resilience.md (between its
`faults` markers) and into this section of docs/benchmarks.md.

Cases (the issue's list; tests/ holds the quick versions that run in `make test`):

- replica SIGKILLed under load (non-streamed requests: none had started streaming);
- replica that hangs (takes requests, never answers): retried after the per-try bound;
- replica answering 500s: ejected;
- the ext_proc SIGKILLed under load, then the control plane SIGKILLed and restarted under load;
- SIGTERM-like drain during streamed requests: every stream completes;
- 2,000 concurrent streamed requests through one Envoy worker and one ext_proc worker.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench._common import scratch_dir
from imesh.local_mesh import LocalMesh
from imesh.ports import MeshPorts, free_ports
from imesh.processes import ManagedProcess, python_module

TITLE = "Fault suite: replicas, the picker and the control plane failing under load"
ORDER = 60

QUICK = os.environ.get("IMESH_BENCH_QUICK") == "1"
REPO = Path(__file__).resolve().parent.parent
RESILIENCE_DOC = REPO / "docs" / "resilience.md"
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"
MODEL = "chat"
CLIENTS = 8
CONCURRENT_STREAMS = 500 if QUICK else 2000
# Checks and ejections fast enough for a run of seconds; the per-try bound the hang case relies on.
RESILIENCE = {
    "health_checks": {"interval_s": 0.5, "timeout_s": 0.5, "unhealthy_threshold": 1},
    "outlier_detection": {"consecutive_5xx": 3, "base_ejection_s": 30},
    "retries": {"per_try_timeout_s": 2.0, "budget_percent": 100, "min_retry_concurrency": 16},
}


@dataclass
class Result:
    case: str
    sent: int
    failed: int
    recovery_s: float
    note: str = ""


@dataclass
class Outcome:
    at: float  # monotonic, when it ended
    ok: bool
    endpoint: str = ""


@dataclass
class Traffic:
    """CLIENTS threads sending requests back to back until stopped (bounded by ``limit_s``)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    limit_s: float = 120.0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def _run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
        deadline = time.monotonic() + self.limit_s
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    r = client.post("/v1/chat/completions", json=body, headers=self.headers)
                    ok = r.status_code == 200 and bool(r.json().get("choices"))
                    self.outcomes.append(Outcome(time.monotonic(), ok, r.headers.get("x-imesh-endpoint", "")))
                except (httpx.HTTPError, ValueError):
                    self.outcomes.append(Outcome(time.monotonic(), False))

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.outcomes) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def result(self, case: str, fault_at: float, note: str = "") -> Result:
        failures = [o.at for o in self.outcomes if not o.ok]
        recovery = max(0.0, max(failures) - fault_at) if failures else 0.0
        return Result(case, len(self.outcomes), len(failures), recovery, note)


# ---------------------------------------------------------------- a mesh of separate replica processes


@dataclass
class FaultMesh:
    mesh: LocalMesh
    replicas: dict[str, ManagedProcess]  # name -> its own fleet process
    addresses: dict[str, str]

    def faults(self, name: str, **faults: object) -> None:
        httpx.post(f"http://{self.addresses[name]}/sim/faults", json=faults, timeout=5).raise_for_status()


@contextmanager
def fault_mesh(workdir: Path, replicas: int = 3, max_num_seqs: int = 32) -> Iterator[FaultMesh]:
    names = [f"r{i + 1}" for i in range(replicas)]
    addresses = {name: f"127.0.0.1:{port}" for name, port in zip(names, free_ports(replicas), strict=True)}
    processes: dict[str, ManagedProcess] = {}
    mesh = LocalMesh(spec=_write_spec(workdir, addresses), workdir=workdir, ports=MeshPorts.ephemeral())
    try:
        for name, address in addresses.items():
            config = workdir / f"fleet-{name}.yaml"
            replica = {"name": name, "address": address, "models": [MODEL], "gpu": "h100"}
            replica["overrides"] = {"max_num_seqs": max_num_seqs}
            config.write_text(yaml.safe_dump({"seed": 7, "time_scale": 0.2, "replicas": [replica]}))
            process = ManagedProcess(
                f"fleet-{name}", python_module("fleet", "--config", str(config)), workdir / "logs" / f"{name}.log"
            ).start()
            process.wait_until(lambda p=process: "fleet ready" in p.log_tail(5), 30)
            processes[name] = process
        mesh.start()
        mesh.wait_for_completion(MODEL)
        yield FaultMesh(mesh, processes, addresses)
    finally:
        mesh.stop()
        for process in processes.values():
            process.stop()


def _write_spec(workdir: Path, addresses: dict[str, str]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "pools": [{"name": "gpu", "tier": "low-latency"}],
        "resilience": RESILIENCE,
        "models": [
            {
                "name": MODEL,
                "versions": [{"name": "v1", "endpoints": [{"address": a, "pool": "gpu"} for a in addresses.values()]}],
            }
        ],
    }
    path = workdir / "mesh.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---------------------------------------------------------------- the cases


def replica_killed(workdir: Path) -> Result:
    with fault_mesh(workdir) as m, Traffic(m.mesh.url) as traffic:
        traffic.wait(100)
        fault_at = time.monotonic()
        m.replicas["r2"].kill()
        traffic.wait(len(traffic.outcomes) + 400)
    after = [o for o in traffic.outcomes if o.at > fault_at + 1.0]
    strays = sum(o.endpoint == m.addresses["r2"] for o in after)
    return traffic.result("replica SIGKILLed under load", fault_at, f"served by it a second after the kill: {strays}")


def replica_hangs(workdir: Path) -> Result:
    with fault_mesh(workdir) as m, Traffic(m.mesh.url) as traffic:
        traffic.wait(100)
        fault_at = time.monotonic()
        m.faults("r2", stall_s=3600)
        traffic.wait(len(traffic.outcomes) + 300)
        stats = httpx.get(f"{m.mesh.admin_url}/stats?filter=upstream_rq_per_try_timeout$", timeout=5).text
    timeouts = sum(int(v) for v in re.findall(r": (\d+)$", stats, re.M))
    note = f"tries abandoned after the {RESILIENCE['retries']['per_try_timeout_s']:g} s per-try bound: {timeouts}"
    return traffic.result("replica hangs (takes requests, never answers)", fault_at, note)


def replica_500s(workdir: Path) -> Result:
    with fault_mesh(workdir) as m, Traffic(m.mesh.url) as traffic:
        traffic.wait(100)
        fault_at = time.monotonic()
        m.faults("r3", error_rate=1.0, error_status=500)
        traffic.wait(len(traffic.outcomes) + 400)
    note = "500 is not retried (the request's own fault, usually): each failure reached a client until the ejection"
    return traffic.result("replica answering 500s", fault_at, note)


def picker_then_control_plane_killed(workdir: Path) -> Result:
    with fault_mesh(workdir) as m, Traffic(m.mesh.url, headers={"x-model-id": MODEL}) as traffic:
        traffic.wait(100)
        fault_at = time.monotonic()
        m.mesh.processes["extproc"].kill()
        traffic.wait(len(traffic.outcomes) + 200)
        m.mesh.processes["controlplane"].kill()
        traffic.wait(len(traffic.outcomes) + 200)
        m.mesh.start_control_plane()
        m.mesh.start_extproc()
        traffic.wait(len(traffic.outcomes) + 200)
    note = "the model in x-model-id: Envoy routes on its last config with both down, then both come back"
    return traffic.result("ext_proc SIGKILLed, then the control plane SIGKILLed and restarted", fault_at, note)


def drain_during_streams(workdir: Path) -> Result:
    with fault_mesh(workdir) as m:
        done: list[bool] = []
        started = threading.Semaphore(0)

        def stream() -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 200, "stream": True}
            try:
                with httpx.stream("POST", f"{m.mesh.url}/v1/chat/completions", json=body, timeout=60) as r:
                    chunks = []
                    for chunk in r.iter_text():
                        if not chunks:
                            started.release()
                        chunks.append(chunk)
                done.append(r.status_code == 200 and "data: [DONE]" in "".join(chunks))
            except httpx.HTTPError:
                started.release()
                done.append(False)

        threads = [threading.Thread(target=stream, daemon=True) for _ in range(50)]
        for thread in threads:
            thread.start()
        for _ in threads:
            started.acquire(timeout=30)
        fault_at = time.monotonic()
        left = m.mesh.drain(30.0)
        for thread in threads:
            thread.join(60)
        drained_s = time.monotonic() - fault_at
    failed = done.count(False) + (len(threads) - len(done))
    note = f"drained in {drained_s:.1f} s, {left} still active at the end of the window"
    return Result("drain (Ctrl-C / SIGTERM to `imesh up`) during 50 streams", len(threads), failed, 0.0, note)


def concurrent_streams(workdir: Path) -> Result:
    with fault_mesh(workdir, max_num_seqs=512) as m:
        outcomes: collections.Counter[str] = collections.Counter()

        async def one(client: httpx.AsyncClient, i: int) -> None:
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8}
            try:
                async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                    text = b"".join([c async for c in r.aiter_bytes()])
                    outcomes["ok" if r.status_code == 200 and b"[DONE]" in text else str(r.status_code)] += 1
            except httpx.HTTPError as exc:
                outcomes[type(exc).__name__] += 1

        async def all_at_once() -> None:
            limits = httpx.Limits(max_connections=CONCURRENT_STREAMS + 10)
            async with httpx.AsyncClient(base_url=m.mesh.url, timeout=300, limits=limits) as client:
                await asyncio.gather(*(one(client, i) for i in range(CONCURRENT_STREAMS)))

        started = time.monotonic()
        asyncio.run(all_at_once())
        took = time.monotonic() - started
        stats = httpx.get(f"{m.mesh.admin_url}/stats", timeout=5).text
    overflow = _stat(stats, "cluster.imesh_extproc.upstream_rq_active_overflow")
    failed_open = _stat(stats, "http.imesh.ext_proc.failure_mode_allowed")
    failed = CONCURRENT_STREAMS - outcomes["ok"]
    note = (
        f"model in the body; {took:.0f} s in all; ext_proc breaker overflows {overflow}, failed open {failed_open}"
        + (f"; {dict(outcomes)}" if failed else "")
    )
    return Result(
        f"{CONCURRENT_STREAMS} concurrent streams, 1 Envoy worker, 1 ext_proc worker",
        CONCURRENT_STREAMS,
        failed,
        0.0,
        note,
    )


def _stat(text: str, name: str) -> int:
    match = re.search(rf"^{re.escape(name)}: (\d+)$", text, re.M)
    return int(match.group(1)) if match else 0


CASES: tuple[Callable[[Path], Result], ...] = (
    replica_killed,
    replica_hangs,
    replica_500s,
    picker_then_control_plane_killed,
    drain_during_streams,
    concurrent_streams,
)


# ---------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    rows = ["| case | requests | failed | recovery | notes |", "|---|---:|---:|---:|---|"]
    for r in results:
        recovery = f"{r.recovery_s:.1f} s" if r.failed else "-"
        rows.append(f"| {r.case} | {r.sent} | {r.failed} | {recovery} | {r.note} |")
    return "\n".join(rows)


def _write_resilience_doc(text: str) -> None:
    doc = RESILIENCE_DOC.read_text()
    if BEGIN in doc and END in doc:
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        RESILIENCE_DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def run(out_dir: Path) -> str:
    root = scratch_dir("faults")
    load_before = os.getloadavg()[0]
    results = [case(root / case.__name__) for case in CASES]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (
        f"<sub>`bench/faults.py`, {when}; {CLIENTS} client threads back to back, 3 simulated replicas, each its own"
        f" process; {os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} when it started,"
        f" {os.getloadavg()[0]:.1f} when it ended</sub>\n\nA failed request is anything but a complete 200;"
        " recovery is the fault to the last failure.\n\n" + table(results)
    )
    _write_resilience_doc(text)
    return text
