"""Build a small real mesh for a test: spec + simulated fleet on ephemeral loopback ports.

Everything runs as in production: separate control plane, ext_proc, Envoy and fleet processes
talking gRPC and HTTP over 127.0.0.1. Ports are ephemeral so tests run in parallel.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from imesh.local_mesh import LocalMesh
from imesh.ports import MeshPorts, free_ports

DEFAULT_POOLS = [
    {"name": "fast", "tier": "low-latency", "cost_per_hour": 4.0, "locality": {"region": "r1", "zone": "a"}},
    {"name": "cheap", "tier": "cost-effective", "cost_per_hour": 0.8, "locality": {"region": "r1", "zone": "b"}},
]


@dataclass
class Replica:
    name: str
    model: str
    version: str
    pool: str = "fast"
    gpu: str = "h100"
    address: str = ""
    overrides: dict = field(default_factory=dict)
    kv_events: bool = False  # publish KV events on a free port, named in the spec (precise mode)
    tokenizer: str = ""  # the HF tokenizer.json the replica tokenizes with
    events: str = ""  # its KV events endpoint, set by make_mesh


@dataclass
class TestMesh:
    mesh: LocalMesh
    replicas: list[Replica]
    spec: dict

    @property
    def url(self) -> str:
        return self.mesh.url

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def by_address(self) -> dict[str, Replica]:
        return {r.address: r for r in self.replicas}

    def set_faults(self, name: str, **faults) -> None:
        response = httpx.post(f"http://{self.replica(name).address}/sim/faults", json=faults, timeout=5)
        response.raise_for_status()

    def save_spec(self) -> None:
        """Write ``spec`` back as the file the control plane starts from, after a test edited it
        (before the mesh starts: a running one takes changes through ``imesh apply``)."""
        self.mesh.spec.write_text(yaml.safe_dump(self.spec, sort_keys=False))

    def write_spec(self, spec: dict, name: str = "mesh-v2.yaml") -> Path:
        path = self.mesh.workdir / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path


def build_spec(replicas: list[Replica], weights: dict[str, dict[str, int]] | None = None, **top) -> dict:
    """A mesh spec whose models/versions/endpoints are exactly the given replicas."""
    models: dict[str, dict[str, list]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in replicas:
        endpoint = {"address": r.address, "pool": r.pool}
        if r.events:
            endpoint["kv_events"] = r.events
        models[r.model][r.version].append(endpoint)
    weights = weights or {}
    spec = {
        "apiVersion": "imesh/v1",
        "kind": "Mesh",
        "pools": DEFAULT_POOLS,
        "models": [
            {
                "name": model,
                "versions": [
                    {"name": v, "weight": weights.get(model, {}).get(v, 100), "context_window": 4096, "endpoints": eps}
                    for v, eps in versions.items()
                ],
            }
            for model, versions in models.items()
        ],
    }
    spec.update(top)
    return spec


# A change an Envoy has not ACKed within --ack-timeout fails the API call (it is not reported as
# applied). On a shared 2-core machine running the suite in parallel an ACK can take seconds:
# tests allow for that, so they fail on what they check, not on the machine's load.
SLOW_MACHINE_ACK_TIMEOUT = ("--ack-timeout", "30")


def make_mesh(tmp_path: Path, replicas: list[Replica], time_scale: float = 0.05, **spec_options) -> TestMesh:
    for replica, port in zip(replicas, free_ports(len(replicas)), strict=True):
        replica.address = f"127.0.0.1:{port}"
    for replica in replicas:
        if replica.kv_events:
            replica.events = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    fleet = {
        "seed": 7,
        "time_scale": time_scale,
        "replicas": [
            {
                "name": r.name,
                "address": r.address,
                "models": [r.model],
                "gpu": r.gpu,
                "overrides": r.overrides,
                **({"kv_events": r.events} if r.events else {}),
                **({"tokenizer": r.tokenizer} if r.tokenizer else {}),
            }
            for r in replicas
        ],
    }
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    spec = build_spec(replicas, **spec_options)
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    mesh = LocalMesh(
        spec=tmp_path / "mesh.yaml",
        workdir=tmp_path,
        ports=MeshPorts.ephemeral(),
        fleet_config=tmp_path / "fleet.yaml",
        controlplane_args=SLOW_MACHINE_ACK_TIMEOUT,
    )
    return TestMesh(mesh, replicas, spec)


def chat(model: str | None, content: str = "hello", max_tokens: int = 2, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    if model is not None:
        body["model"] = model
    return body


def send_many(
    url: str, count: int, make_request, concurrency: int = 8, timeout_s: float = 30.0
) -> list[httpx.Response]:
    """Send `count` requests with bounded concurrency; `make_request(client, i)` returns a Response."""
    with httpx.Client(base_url=url, timeout=timeout_s, limits=httpx.Limits(max_connections=concurrency)) as client:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda i: make_request(client, i), range(count)))


def served_by(responses: list[httpx.Response]) -> collections.Counter:
    return collections.Counter(r.headers.get("x-imesh-endpoint") for r in responses)


def wait_until(check: Callable[[], object], timeout_s: float = 30.0, what: str = "the condition") -> None:
    """Poll ``check()`` until it is true. The timeout only keeps a broken mesh from hanging the
    run: it is generous, and how soon the condition held is not what a test asserts."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.02)


def _gauges(url: str, family: str) -> dict[str, float]:
    """The samples of one metric family, by their ``endpoint`` label ("" when unlabelled)."""
    text = httpx.get(url, timeout=5).text
    return {
        sample.labels.get("endpoint", ""): sample.value
        for metric in text_string_to_metric_families(text)
        if metric.name == family
        for sample in metric.samples
    }


def wait_for_queues(test_mesh: TestMesh, queues: dict[str, float], timeout_s: float = 30.0) -> None:
    """Block until the control plane reads each named replica's queue as given (the replicas' own
    queue plus an ``extra_waiting`` fault) and the ext_proc holds a load report sent after that.

    Replaces "sleep for a few scrapes": on a loaded machine a few scrapes can take longer.
    """
    ports = test_mesh.mesh.ports
    control_plane = f"http://{ports.host}:{ports.control_plane_metrics}/metrics"
    extproc = f"http://{ports.host}:{ports.extproc_metrics}/metrics"
    want = {test_mesh.replica(name).address: value for name, value in queues.items()}

    def control_plane_sees_them() -> bool:
        seen = _gauges(control_plane, "imesh_endpoint_queue_requests")
        return all(seen.get(address) == value for address, value in want.items())

    wait_until(control_plane_sees_them, timeout_s, f"the control plane reading queues {queues}")
    # A report received this long after the reading was built after it: reports are published on
    # every change and at least once per scrape interval.
    seen_at = time.monotonic() + 2 * test_mesh.mesh.scrape_interval_s

    def extproc_has_a_later_report() -> bool:
        asked_at = time.monotonic()
        age = _gauges(extproc, "imesh_extproc_load_report_age_seconds")[""]
        return asked_at - age > seen_at

    wait_until(extproc_has_a_later_report, timeout_s, "a load report reaching the ext_proc")
