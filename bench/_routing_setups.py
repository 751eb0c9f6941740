"""The routing benchmark's fleet and the five ways of routing to it.

The fleet is one ``python -m fleet`` process on fixed loopback ports (chosen free once), started
fresh for every setup and workload. The setups all serve the same model on the same replica addresses:

* the mesh with ``routing_mode: picker`` (the ext_proc picks per request) and with
  ``routing_mode: fast`` (Envoy balances on the control plane's capacity- and load-aware EDS weights), each a
  fresh ``LocalMesh`` (control plane, ext_proc, Envoy);
* Envoy ``LEAST_REQUEST``, ``ROUND_ROBIN`` and ``RANDOM``: the fast-path mesh's own listener,
  routes and cluster, taken from its Envoy's config dump (bench/envoy_features.py), made static:
  no ext_proc filter, no access logs (their collector is the control plane, not running here),
  equal endpoint weights, and the cluster's ``lb_policy`` set; the same Envoy binary, 1 worker.
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench._common import _envoy
from bench._loadgen import PATH
from bench.envoy_features import _hcms, _kind, _routes, _virtual_hosts, static_bootstrap, without_access_log
from fleet.profiles import GpuProfile, get_profile
from imesh.local_mesh import LocalMesh
from imesh.ports import MeshPorts, free_ports
from imesh.processes import ManagedProcess, python_module
from protos.wire import MODEL_ID_HEADER

MODEL = "chat"
CONTEXT_WINDOW = 8192
# LoRA adapters of the model (the LoRA-mix workload's; the spec declares them in every run, the
# fleet serves them only for that workload). Every replica's batch holds at most MAX_LORAS of them.
ADAPTERS = tuple(f"{MODEL}-lora-{i}" for i in range(8))
MAX_LORAS = 2


# Every replica gets a quarter of its profile's batch slots: a run of a few hundred requests is
# then many times what the fleet holds at once, so the queues a balancer builds show within a run
# (the fleet's clock runs faster to make up for the throughput: bench/routing.py).
SLOTS_DIVISOR = 4
# The engine's step, as vLLM V1 runs it (fleet/scheduler.py): chunked prefill under the profile's
# token budget, optimistic admission with preemption under KV pressure. Both off gives the older
# model (whole-prompt prefill, admission on prompt + max_tokens, no preemption).
SCHEDULER: dict[str, bool] = {"enable_chunked_prefill": True, "optimistic_admission": True}


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    gpu: str  # a profile of fleet/profiles.py
    kv_capacity_tokens: int | None = None  # None: the profile's

    def overrides(self, lora: bool = False) -> dict[str, int | bool]:
        """The batch slots, the KV capacity, a prefix cache as large as the KV cache (in vLLM the
        cached blocks live in the KV cache), so a replica with less memory also caches less, the
        engine's ``SCHEDULER`` switches, and with ``lora`` the adapters a batch may hold."""
        profile = get_profile(self.gpu)
        kv = self.kv_capacity_tokens or profile.kv_capacity_tokens
        out = {
            "max_num_seqs": max(1, profile.max_num_seqs // SLOTS_DIVISOR),
            "kv_capacity_tokens": kv,
            "prefix_cache_blocks": kv // profile.block_size,
            **SCHEDULER,
        }
        if lora:
            out["max_loras"] = MAX_LORAS
        return out

    def profile(self) -> GpuProfile:
        return get_profile(self.gpu).with_overrides(self.overrides())


# Fast and slow replicas, large and small KV caches.
FLEET = (
    ReplicaSpec("h100-big-kv", "h100"),
    ReplicaSpec("h100-small-kv", "h100", kv_capacity_tokens=16384),
    ReplicaSpec("a100", "a100"),
    ReplicaSpec("l4", "l4"),
)


@dataclass
class ReplicaCounters:
    """Cumulative counters of one replica: what it reports in /metrics, and the simulator's state."""

    prefix_queries: float = 0.0  # vllm:prefix_cache_queries, tokens
    prefix_hits: float = 0.0  # vllm:prefix_cache_hits, tokens
    served: int = 0
    busy_s: float = 0.0  # simulated step time spent (a GPU busy the whole run: busy_s == wall time)
    idle: bool = True
    adapter_loads: int = 0  # LoRA adapters loaded onto the GPU (each costs the profile's adapter_load_s)


_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:queries|hits))_total\{[^}]*\} ([0-9.e+-]+)$", re.M)


class Fleet:
    """The simulated fleet as one process; ``restart()`` gives fresh replicas on the same ports."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.addresses = {r.name: f"127.0.0.1:{p}" for r, p in zip(FLEET, free_ports(len(FLEET)), strict=True)}
        self.config = workdir / "fleet.yaml"
        self.process: ManagedProcess | None = None
        self._http = httpx.Client(timeout=5)
        self._starts = 0

    def _config(self, time_scale: float, lora: bool) -> dict:
        replicas = [
            {
                "name": r.name,
                "address": self.addresses[r.name],
                "models": [MODEL],
                "gpu": r.gpu,
                **({"adapters": list(ADAPTERS)} if lora else {}),
                "overrides": r.overrides(lora),
            }
            for r in FLEET
        ]
        return {"seed": 7, "time_scale": time_scale, "replicas": replicas}

    def restart(self, time_scale: float, lora: bool = False) -> None:
        """Fresh replicas; ``lora``: serving ADAPTERS (without, they export no LoRA metric, as vLLM
        without --enable-lora, so the other workloads run as before)."""
        self.stop()
        self.config.write_text(yaml.safe_dump(self._config(time_scale, lora), sort_keys=False))
        self._starts += 1
        argv = python_module("fleet", "--config", str(self.config), "--log-level", "WARNING")
        process = ManagedProcess("fleet", argv, self.workdir / "logs" / f"fleet-{self._starts}.log").start()
        self.process = process
        process.wait_until(lambda: "fleet ready" in process.log_tail(5), 30)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def close(self) -> None:
        self.stop()
        self._http.close()

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.popen is not None
        return self.process.popen.pid

    def counters(self) -> dict[str, ReplicaCounters]:
        out = {}
        for name, address in self.addresses.items():
            c = ReplicaCounters()
            for metric, value in _COUNTER.findall(self._http.get(f"http://{address}/metrics").text):
                if metric.endswith("queries"):
                    c.prefix_queries += float(value)
                else:
                    c.prefix_hits += float(value)
            state = self._http.get(f"http://{address}/sim/state").json()
            c.served, c.busy_s = state["served"], state["busy_s"]
            c.adapter_loads = state.get("lora", {}).get("loads", 0)
            c.idle = state["waiting"] == 0 and state["running"] == 0
            out[name] = c
        return out

    async def busy_seconds(self) -> dict[str, float]:
        """Each replica's simulated busy time so far (for use inside the load generator's loop)."""
        async with httpx.AsyncClient(timeout=5) as client:
            states = await asyncio.gather(*(client.get(f"http://{a}/sim/state") for a in self.addresses.values()))
        return {name: r.json()["busy_s"] for name, r in zip(self.addresses, states, strict=True)}

    def settle(self, timeout_s: float = 30.0) -> None:
        """Wait until no replica has work left, then empty every prefix cache: the next run starts cold."""
        deadline = time.monotonic() + timeout_s
        while not all(c.idle for c in self.counters().values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fleet still had work {timeout_s:.0f} s after a run")
            time.sleep(0.05)
        for address in self.addresses.values():
            self._http.post(f"http://{address}/reset_prefix_cache").raise_for_status()


# ----------------------------------------------------------------------------- the setups


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    routing_mode: str | None = None  # the mesh's, for the mesh's setups
    lb_policy: str | None = None  # Envoy's, for the static ones
    scheduling: str | None = None  # a profile of PROFILES for the picker; None: the default profile


# Scheduler profiles (the spec's `scheduling:`) a picker setup may run besides the default one.
_DEFAULT_SCORERS = [
    {"type": "queue", "weight": 2},
    {"type": "kv-cache", "weight": 2},
    {"type": "inflight", "weight": 1},
    {"type": "latency", "weight": 2},
    {"type": "running", "weight": 1},
    {"type": "lora-affinity", "weight": 2},
]
PROFILES: dict[str, dict] = {
    # The default scorers plus the prompt-aware ones: prefix-affinity (stick to the replica that holds the
    # prompt's prefix) and ttft (queued prefill against the uncached prompt, in seconds).
    "prefix-aware": {
        "scorers": [*_DEFAULT_SCORERS, {"type": "prefix-affinity", "weight": 3}, {"type": "ttft", "weight": 3}]
    },
    "default-ttft": {"scorers": [*_DEFAULT_SCORERS, {"type": "ttft", "weight": 3}]},
    "prefix-ttft": {"scorers": [{"type": "prefix-affinity", "weight": 2}, {"type": "ttft", "weight": 2}]},
    "ttft-queue": {
        "scorers": [
            {"type": "queue", "weight": 2},
            {"type": "inflight", "weight": 1},
            {"type": "prefix-affinity", "weight": 2},
            {"type": "ttft", "weight": 4},
            {"type": "lora-affinity", "weight": 2},
        ]
    },
}

PICKER = Setup("picker", "mesh: picker (ext_proc)", routing_mode="picker")
PICKER_PREFIX = Setup(
    "picker_prefix", "mesh: picker, prefix-aware profile", routing_mode="picker", scheduling="prefix-aware"
)
PICKER_PT = Setup("picker_pt", "mesh: picker, prefix + ttft only", routing_mode="picker", scheduling="prefix-ttft")
PICKER_TTFT = Setup("picker_ttft", "mesh: picker, default + ttft", routing_mode="picker", scheduling="default-ttft")
PICKER_TQ = Setup("picker_tq", "mesh: picker, ttft-led profile", routing_mode="picker", scheduling="ttft-queue")
FAST = Setup("fast", "mesh: fast path (EDS weights)", routing_mode="fast")
LEAST_REQUEST = Setup("least_request", "Envoy LEAST_REQUEST", lb_policy="LEAST_REQUEST")
ROUND_ROBIN = Setup("round_robin", "Envoy ROUND_ROBIN", lb_policy="ROUND_ROBIN")
RANDOM = Setup("random", "Envoy RANDOM", lb_policy="RANDOM")
SETUPS = (LEAST_REQUEST, PICKER, PICKER_PREFIX, FAST, ROUND_ROBIN, RANDOM)
# Run only when asked for by name (bench/routing.py's IMESH_BENCH_ROUTING): profiles under trial.
TRIAL_SETUPS = (PICKER_TTFT, PICKER_PT, PICKER_TQ)


def mesh_spec(fleet: Fleet, routing_mode: str, scheduling: str | None = None) -> dict:
    endpoints = [{"address": fleet.addresses[r.name], "pool": r.gpu} for r in FLEET]
    spec: dict = {
        "apiVersion": "imesh/v1",
        "kind": "Mesh",
        "pools": [{"name": gpu} for gpu in dict.fromkeys(r.gpu for r in FLEET)],
        "models": [
            {
                "name": MODEL,
                "routing_mode": routing_mode,
                "versions": [
                    {
                        "name": "v1",
                        "context_window": CONTEXT_WINDOW,
                        "adapters": list(ADAPTERS),
                        "endpoints": endpoints,
                    }
                ],
            }
        ],
    }
    if scheduling is not None:
        spec["models"][0]["scheduling"] = PROFILES[scheduling]
    return spec


@dataclass
class Running:
    """A started setup: where to send requests, and its processes (for CPU accounting)."""

    url: str
    pids: dict[str, int]
    stop_all: list[Callable[[], None]] = field(default_factory=list)  # in order

    def stop(self) -> None:
        for stop in self.stop_all:
            stop()


def start_mesh(
    fleet: Fleet, routing_mode: str, workdir: Path, scheduling: str | None = None
) -> tuple[Running, LocalMesh]:
    spec = workdir / "mesh.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump(mesh_spec(fleet, routing_mode, scheduling), sort_keys=False))
    mesh = LocalMesh(spec=spec, workdir=workdir, ports=MeshPorts.ephemeral())
    mesh.start()
    running = Running(mesh.url, {}, [mesh.stop])
    try:
        _wait_serves(mesh.url)
        for name, label in (("envoy", "Envoy"), ("extproc", "ext_proc"), ("controlplane", "control plane")):
            popen = mesh.processes[name].popen
            assert popen is not None
            running.pids[label] = popen.pid
    except BaseException:
        mesh.stop()
        raise
    return running, mesh


def start_static(base: dict, lb_policy: str, workdir: Path) -> Running:
    config = static_config(base, lb_policy)
    admin, port = free_ports(2)
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    listener = config["static_resources"]["listeners"][0]
    listener["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    process = _envoy(workdir, f"envoy-{lb_policy.lower()}", yaml.safe_dump(config, sort_keys=False)).start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_serves(url)
    except BaseException:
        process.stop()
        raise
    assert process.popen is not None
    return Running(url, {"Envoy": process.popen.pid}, [process.stop])


def _wait_serves(url: str, timeout_s: float = 30.0) -> None:
    """Until one streamed request for the model completes through ``url`` with the header it routes on."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url + PATH, json=body, headers={MODEL_ID_HEADER: MODEL}, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not serve {MODEL} in {timeout_s:.0f} s (last: {last})")


def fast_path_bootstrap(mesh: LocalMesh) -> dict:
    """The fast-path mesh's Envoy configuration as one static bootstrap, once EDS has every replica."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        dump = httpx.get(mesh.admin_url + "/config_dump", params={"include_eds": ""}, timeout=5).json()
        base, _ = static_bootstrap(dump)
        if _endpoint_count(base) >= len(FLEET):
            return base
        time.sleep(0.2)
    raise RuntimeError("the fast-path mesh's EDS did not carry every replica in 30 s")


def _model_clusters(b: dict) -> Iterator[dict]:
    for cluster in b["static_resources"]["clusters"]:
        if cluster["name"].startswith(f"{MODEL}/"):
            yield cluster


def _endpoint_count(b: dict) -> int:
    return sum(
        len(locality.get("lb_endpoints", []))
        for cluster in _model_clusters(b)
        for locality in cluster.get("load_assignment", {}).get("endpoints", [])
    )


def _drop_ext_proc(b: dict) -> None:
    for hcm in _hcms(b):
        hcm["http_filters"] = [
            f for f in hcm["http_filters"] if _kind(f.get("typed_config", {})) != "ExternalProcessor"
        ]
        hcm.get("route_config", {}).pop("typed_per_filter_config", None)
    for holder in [*_virtual_hosts(b), *_routes(b)]:
        per_filter = holder.get("typed_per_filter_config", {})
        per_filter.pop("envoy.filters.http.ext_proc", None)
        if not per_filter:
            holder.pop("typed_per_filter_config", None)
    b["static_resources"]["clusters"] = [
        c for c in b["static_resources"]["clusters"] if not c["name"].startswith("imesh_")
    ]


def static_config(base: dict, lb_policy: str) -> dict:
    """``base`` (``fast_path_bootstrap``) as Envoy alone with ``lb_policy``: see the module docstring."""
    b = copy.deepcopy(base)
    without_access_log(b)
    _drop_ext_proc(b)
    for cluster in _model_clusters(b):
        cluster.pop("load_balancing_policy", None)
        cluster["lb_policy"] = lb_policy
        for locality in cluster.get("load_assignment", {}).get("endpoints", []):
            for lb_endpoint in locality.get("lb_endpoints", []):
                lb_endpoint.pop("load_balancing_weight", None)  # the fast path's load weights
    return b
