"""Routing quality: the mesh's picker and fast path against Envoy's own balancers, on a simulated fleet.

One heterogeneous simulated fleet (bench/_routing_setups.py: fast and slow GPUs, large and small KV
caches, prefix caches as large as the KV caches) is driven through six setups, each with the fleet
restarted fresh: the mesh's picker with the default scheduler profile and with a prefix-aware one
(bench/_routing_setups.py: PROFILES), the mesh's fast path, and Envoy ROUND_ROBIN, LEAST_REQUEST and
RANDOM (the same Envoy binary, the fast-path mesh's own configuration made static).

1. Fleet capacity, per workload: a closed loop of ``CAPACITY_CLIENTS`` clients through Envoy
   LEAST_REQUEST (enough that every replica has a queue, so the balancer does not matter), output
   tokens per second after a warm-up (requests per second: that over the mean output), and each
   replica's simulated busy time over the wall time (1.0 when its simulated GPU, not this machine's
   CPU, is what limits it).
2. Per setup, workload and load (``LOADS`` x capacity): for each seed a fresh Poisson schedule of
   ``REQUESTS`` streamed chat completions (bench/_loadgen.py: open loop, latencies from the
   scheduled send time), the fleet idle and its prefix caches emptied before each.
3. Per cell, over all its seeds: TTFT p50/p90/p99 (a request that never got a token counts as
   infinitely slow), end-to-end p99, output tokens/s and requests/s, errors, the prefix-cache hit
   rate the replicas report in /metrics; per seed the p99 TTFT, to show the spread.

Workloads (bench/_workload.py): ShareGPT-like lengths, a multi-tenant shared-prefix workload, and a
LoRA-adapter mix (the fleet then serves ``ADAPTERS`` with ``MAX_LORAS`` per batch; the spec declares
them, so the static Envoys route an adapter as the base model, from the fast path's own routes).

``IMESH_BENCH_ROUTING`` runs a part of it for development (``_subset``: workloads, setups, loads,
seeds, requests); the section it prints is then that part's.

What this machine's two cores can carry sets the scale: a streamed token costs CPU (fleet, Envoy,
client), so outputs are ShareGPT's / ``OUTPUT_SCALE``, the replicas have a quarter of their
profiles' batch slots (``SLOTS_DIVISOR``: a few hundred requests are then many times what the fleet
holds at once) and the simulated clock runs at ``TIME_SCALES``; each run checks that the simulated
GPUs, not the CPUs, were the limit, and marks the cells where other jobs saturated the machine.
The results: the section's tables, bench/_routing_report.py; the reading, bench/_routing_reading.py.

``python -m bench --only routing`` puts the section into docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import resource
import shutil
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from bench import _routing_plots, _routing_reading
from bench import _routing_report as report
from bench._common import cpu_seconds, scratch_dir
from bench._loadgen import closed_loop, open_loop
from bench._routing_results import Capacity, Cell, Results, SeedRun, Settings
from bench._routing_setups import (
    ADAPTERS,
    FAST,
    FLEET,
    LEAST_REQUEST,
    MODEL,
    SETUPS,
    TRIAL_SETUPS,
    Fleet,
    ReplicaCounters,
    Running,
    Setup,
    fast_path_bootstrap,
    start_mesh,
    start_static,
)
from bench._workload import Request, lora_mix, poisson_offsets, shared_prefix, sharegpt_like, tenant_prompts

TITLE = "Routing quality: the picker and the fast path against Envoy's balancers"
ORDER = 20

QUICK = os.environ.get("IMESH_BENCH_QUICK") == "1"
WORKLOADS: tuple[str, ...] = ("sharegpt", "shared-prefix", "lora")
# Simulated time runs at this multiple of the profiles' (fleet/profiles.py), per workload: slow
# enough that the simulated GPUs, not this machine's two cores, bound the fleet (the busy check).
# A streamed token costs CPU here, a prompt token does not: the shared-prefix workload, mostly
# prefill, runs its fleet faster still to fit the same number of requests into the time; the LoRA
# mix as ShareGPT (its requests are ShareGPT-like).
TIME_SCALES = {"sharegpt": 0.35, "shared-prefix": 0.25, "lora": 0.35}
OUTPUT_SCALE = 8  # output lengths are ShareGPT's / 8, for the same reason
TENANTS = 32
LOADS = (0.9, 1.1) if QUICK else (0.5, 0.9, 1.1)
SEEDS = (1,) if QUICK else (1, 2, 3)
REQUESTS = 120 if QUICK else 334  # per seed and cell: 3 x 334 >= 1,000
GRACE_S = 5.0  # after the last arrival; what has not finished then is an error
CAPACITY_SECONDS, CAPACITY_WARMUP_S = (6.0, 2.0) if QUICK else (12.0, 3.0)
CAPACITY_CLIENTS = 2 * sum(r.profile().max_num_seqs for r in FLEET)
CAPACITY_SEED = 0
RUN_SETUPS: tuple[Setup, ...] = SETUPS


def _subset(text: str) -> None:
    """A part of the run, for development: ``IMESH_BENCH_ROUTING="workloads=shared-prefix;
    setups=picker,picker_prefix;loads=0.9;seeds=1,2;requests=200"`` (every key optional; Envoy
    LEAST_REQUEST always runs first: it measures the capacity)."""
    global WORKLOADS, LOADS, SEEDS, REQUESTS, RUN_SETUPS
    known = {s.key: s for s in (*SETUPS, *TRIAL_SETUPS)}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, _, value = item.partition("=")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if key == "workloads":
            WORKLOADS = tuple(values)
        elif key == "loads":
            LOADS = tuple(float(v) for v in values)
        elif key == "seeds":
            SEEDS = tuple(int(v) for v in values)
        elif key == "requests":
            REQUESTS = int(values[0])
        elif key == "setups":
            RUN_SETUPS = (LEAST_REQUEST, *(known[v] for v in values if v != LEAST_REQUEST.key))
        else:
            raise SystemExit(f"IMESH_BENCH_ROUTING: unknown key {key!r}")


_subset(os.environ.get("IMESH_BENCH_ROUTING", ""))


def workload(name: str, seed: int, count: int) -> list[Request]:
    if name == "sharegpt":
        return sharegpt_like(seed, count, MODEL, OUTPUT_SCALE)
    if name == "lora":
        return lora_mix(seed, count, MODEL, list(ADAPTERS), OUTPUT_SCALE)
    return shared_prefix(seed, count, MODEL, TENANTS, OUTPUT_SCALE)


T = TypeVar("T")


def _run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # a load generator with less CPU
        return runner.run(coroutine)


# ----------------------------------------------------------------------------- accounting


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far, whoever used them."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def _busy_cores(interval_s: float = 0.5) -> float:
    """Cores busy machine-wide over the next ``interval_s``."""
    busy0, total0 = _machine_busy()
    time.sleep(interval_s)
    busy1, total1 = _machine_busy()
    return (busy1 - busy0) / max(1.0, total1 - total0) * (os.cpu_count() or 1)


@dataclass
class Quiet:
    """Before each cell, waits for other jobs to leave the machine below ``threshold`` busy cores, at
    most ``each_s`` at a time and ``budget_s`` in all: fewer cells measured on a saturated machine,
    at a bounded cost in run time."""

    threshold: float = 1.0
    each_s: float = 15.0
    budget_s: float = 120.0
    waited_s: float = 0.0

    def wait(self) -> None:
        start = time.monotonic()
        deadline = start + max(0.0, min(self.each_s, self.budget_s - self.waited_s))
        while time.monotonic() < deadline and _busy_cores() >= self.threshold:
            pass
        self.waited_s += time.monotonic() - start


class Meter:
    """CPU and replica counters over one measured interval."""

    def __init__(self, fleet: Fleet, running: Running):
        self.fleet = fleet
        self.pids = {"fleet": fleet.pid, **running.pids}

    def __enter__(self) -> Meter:
        self.counters = self.fleet.counters()
        self.cpu = {k: cpu_seconds(p) for k, p in self.pids.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.own = usage.ru_utime + usage.ru_stime
        self.machine = _machine_busy()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.t0
        after = self.fleet.counters()
        self.replicas = {name: _delta(self.counters[name], after[name]) for name in after}
        self.busy = {name: c.busy_s / self.wall for name, c in self.replicas.items()}
        self.cores = {k: (cpu_seconds(p) - self.cpu[k]) / self.wall for k, p in self.pids.items()}
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cores["load generator"] = (usage.ru_utime + usage.ru_stime - self.own) / self.wall
        busy, total = _machine_busy()
        self.cores["machine"] = (busy - self.machine[0]) / max(1.0, total - self.machine[1]) * (os.cpu_count() or 1)


def _delta(before: ReplicaCounters, after: ReplicaCounters) -> ReplicaCounters:
    return ReplicaCounters(
        prefix_queries=after.prefix_queries - before.prefix_queries,
        prefix_hits=after.prefix_hits - before.prefix_hits,
        served=after.served - before.served,
        busy_s=after.busy_s - before.busy_s,
        idle=after.idle,
        adapter_loads=after.adapter_loads - before.adapter_loads,
    )


# ----------------------------------------------------------------------------- measuring


def _start(setup: Setup, fleet: Fleet, base: dict, workdir: Path) -> Running:
    if setup.routing_mode is not None:
        running, _ = start_mesh(fleet, setup.routing_mode, workdir, setup.scheduling)
        time.sleep(1.0)  # a few load reports: the picker's readings, the fast path's first EDS weights
        return running
    assert setup.lb_policy is not None
    return start_static(base, setup.lb_policy, workdir)


def _capacity(fleet: Fleet, running: Running, name: str) -> Capacity:
    requests = workload(name, CAPACITY_SEED, 4 * CAPACITY_CLIENTS)
    fleet.settle()
    meter = Meter(fleet, running)
    with meter:
        saturation = _run_async(
            closed_loop(
                running.url,
                MODEL,
                requests,
                CAPACITY_CLIENTS,
                CAPACITY_SECONDS,
                CAPACITY_WARMUP_S,
                fleet.busy_seconds,
            )
        )
    assert saturation.probes is not None
    first, last = saturation.probes
    busy = {replica: (last[replica] - first[replica]) / saturation.seconds for replica in last}
    return Capacity(name, saturation, _means(requests)[1], busy, meter.cores)


def _seed_run(fleet: Fleet, running: Running, requests: list[Request], seed: int, rate: float) -> SeedRun:
    fleet.settle()
    offsets = poisson_offsets(seed, len(requests), rate)
    meter = Meter(fleet, running)
    with meter:
        result = _run_async(open_loop(running.url, MODEL, requests, offsets, GRACE_S))
    return SeedRun(seed, result, meter.replicas, meter.busy, meter.cores)


def _fast_path_base(fleet: Fleet, workdir: Path) -> dict:
    """The static configuration Envoy's balancers run: the fast-path mesh's own, from its config dump."""
    fleet.restart(TIME_SCALES[WORKLOADS[0]])
    running, mesh = start_mesh(fleet, FAST.routing_mode or "fast", workdir / "dump")
    try:
        return fast_path_bootstrap(mesh)
    finally:
        running.stop()


def _measure_setup(
    fleet: Fleet, setup: Setup, base: dict, workdir: Path, name: str, capacity: Capacity | None, quiet: Quiet
) -> tuple[list[Cell], Capacity]:
    """One setup on one workload, on a freshly started fleet: every load, every seed. Envoy
    LEAST_REQUEST measures the fleet's capacity first; the others get it."""
    fleet.restart(TIME_SCALES[name], lora=name == "lora")
    running = _start(setup, fleet, base, workdir / f"{setup.key}-{name}")
    cells = []
    try:
        if capacity is None:
            capacity = _capacity(fleet, running, name)
        for load in LOADS:
            cell = Cell(setup, name, load, load * capacity.requests_per_s)
            quiet.wait()
            for seed in SEEDS:
                cell.runs.append(_seed_run(fleet, running, workload(name, seed, REQUESTS), seed, cell.rate))
            cells.append(cell)
            print(f"bench: routing {report.progress(cell)}", flush=True)
    finally:
        running.stop()
    return cells, capacity


def measure(workdir: Path, quiet: Quiet) -> tuple[list[Cell], dict[str, Capacity]]:
    fleet = Fleet(workdir)
    cells: list[Cell] = []
    capacities: dict[str, Capacity] = {}
    try:
        base = _fast_path_base(fleet, workdir)
        for name in WORKLOADS:
            for setup in (LEAST_REQUEST, *(s for s in RUN_SETUPS if s != LEAST_REQUEST)):
                got, capacities[name] = _measure_setup(fleet, setup, base, workdir, name, capacities.get(name), quiet)
                cells += got
    finally:
        fleet.close()
    return cells, capacities


def _means(requests: list[Request]) -> tuple[float, float]:
    """Mean prompt and output tokens."""
    return (
        sum(r.prompt_tokens for r in requests) / len(requests),
        sum(r.output_tokens for r in requests) / len(requests),
    )


def run(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = scratch_dir("routing")
    load_before = os.getloadavg()[0]
    quiet = Quiet()
    try:
        cells, capacities = measure(workdir, quiet)
    finally:
        if os.environ.get("IMESH_BENCH_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
    settings = Settings(
        quick=QUICK,
        time_scales=TIME_SCALES,
        output_scale=OUTPUT_SCALE,
        tenants=TENANTS,
        seeds=SEEDS,
        requests=REQUESTS,
        grace_s=GRACE_S,
        capacity_clients=CAPACITY_CLIENTS,
        capacity_seconds=CAPACITY_SECONDS - CAPACITY_WARMUP_S,
        load=(load_before, os.getloadavg()[0]),
        means={name: _means(workload(name, SEEDS[0], REQUESTS)) for name in WORKLOADS},
        tenant_prompt_tokens=sum(len(p.split()) for p in tenant_prompts(SEEDS[0], TENANTS)),
        quiet_wait_s=quiet.waited_s,
        quiet_limits=(quiet.each_s, quiet.budget_s),
    )
    saved = os.environ.get("IMESH_BENCH_ROUTING_SAVE")
    if saved:  # the measurements, to render again without measuring (render_saved)
        Path(saved).write_bytes(pickle.dumps((cells, capacities, settings)))
    return _render(out_dir, cells, capacities, settings)


def _render(out_dir: Path, cells: list[Cell], capacities: dict[str, Capacity], settings: Settings) -> str:
    plots = _routing_plots.plots(out_dir, cells)
    reading = _routing_reading.text(Results(cells), capacities, settings)
    return report.render(cells, capacities, settings, plots) + "\n" + reading


def render_saved(saved: Path, out_dir: Path) -> str:
    """The section from measurements ``IMESH_BENCH_ROUTING_SAVE`` kept (a report change, no rerun)."""
    cells, capacities, settings = pickle.loads(saved.read_bytes())  # our own file, written above
    out_dir.mkdir(parents=True, exist_ok=True)
    return _render(out_dir, cells, capacities, settings)


if __name__ == "__main__":
    print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")))
