"""The routing benchmark's measurements and what is computed from them: per-cell statistics, targets.

A cell is one (setup, workload, load) measured over several seeds; its percentiles pool every
seed's requests. A request that never received a token counts as infinitely slow for TTFT, and a
request that did not complete as infinitely slow end to end: a setup that drops or strands more
than 1% of its requests has an infinite p99, shown as ∞, never a flattering number.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from bench._loadgen import Outcome, Run, Saturation
from bench._routing_setups import LEAST_REQUEST, ROUND_ROBIN, SETUPS, TRIAL_SETUPS, ReplicaCounters, Setup

INF = math.inf
SUBJECTS = ("picker", "picker_prefix", "fast")  # the setups the targets are about


@dataclass
class SeedRun:
    seed: int
    run: Run
    replicas: dict[str, ReplicaCounters]  # what each replica did during the run (counter deltas)
    busy: dict[str, float]  # each replica's simulated busy time over the wall time
    cores: dict[str, float]  # CPU cores each process used on average during the run

    @property
    def outcomes(self) -> list[Outcome]:
        return self.run.outcomes


@dataclass
class Cell:
    setup: Setup
    workload: str
    load: float
    rate: float  # requests per second offered
    runs: list[SeedRun] = field(default_factory=list)


@dataclass
class Capacity:
    workload: str
    saturation: Saturation[dict[str, float]]
    mean_output: float  # tokens per request of the workload
    busy: dict[str, float]  # each replica's simulated busy time over the saturated window
    cores: dict[str, float]

    @property
    def requests_per_s(self) -> float:
        """Sustainable requests per second: output tokens per second over tokens per request
        (a closed loop's completions over a short window overcount the short requests)."""
        return self.saturation.tokens_per_s / self.mean_output


@dataclass(frozen=True)
class Settings:
    quick: bool
    time_scales: dict[str, float]  # workload -> the fleet's time_scale
    output_scale: float
    tenants: int
    seeds: tuple[int, ...]
    requests: int
    grace_s: float
    capacity_clients: int
    capacity_seconds: float
    load: tuple[float, float]  # 1-minute load average before and after
    means: dict[str, tuple[float, float]]  # workload -> mean prompt and output tokens of its requests
    tenant_prompt_tokens: int  # the shared-prefix workload's system prompts, all tenants together
    quiet_wait_s: float  # waited in all for other jobs to leave the machine (routing.Quiet)
    quiet_limits: tuple[float, float] = (0.0, 0.0)  # Quiet's wait before one cell, and in all


# ----------------------------------------------------------------------------- statistics


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``inf`` values sort last); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _ttfts(outcomes: list[Outcome]) -> list[float]:
    return [INF if o.ttft is None else o.ttft for o in outcomes]


def _e2es(outcomes: list[Outcome]) -> list[float]:
    return [INF if o.e2e is None else o.e2e for o in outcomes]


@dataclass
class Stats:
    requests: int
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    e2e_p99: float
    tokens_per_s: float
    requests_per_s: float
    errors: int
    hit_rate: float
    p99_by_seed: list[float]
    p90_by_seed: list[float]
    tokens_by_seed: list[float]
    sent: dict[str, int]  # replica -> requests it answered (its header came back), finished or not
    machine_cores: float  # CPU cores busy machine-wide during the runs (every job on it), mean
    adapter_loads: int = 0  # LoRA adapters the replicas loaded during the runs

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def by_seed(self, name: str) -> list[float]:
        """The metric per seed (seed i of every cell is the same requests at the same times)."""
        seeds = {"ttft_p99": self.p99_by_seed, "ttft_p90": self.p90_by_seed, "tokens_per_s": self.tokens_by_seed}
        return seeds.get(name, [])


def stats(cell: Cell) -> Stats:
    outcomes = [o for r in cell.runs for o in r.outcomes]
    ttft = _ttfts(outcomes)
    seconds = sum(r.run.window_s for r in cell.runs)
    queries = sum(c.prefix_queries for r in cell.runs for c in r.replicas.values())
    hits = sum(c.prefix_hits for r in cell.runs for c in r.replicas.values())
    sent = Counter(o.replica for o in outcomes if o.replica is not None)
    return Stats(
        requests=len(outcomes),
        ttft_p50=percentile(ttft, 50),
        ttft_p90=percentile(ttft, 90),
        ttft_p99=percentile(ttft, 99),
        e2e_p99=percentile(_e2es(outcomes), 99),
        tokens_per_s=sum(r.run.window_tokens for r in cell.runs) / seconds if seconds else math.nan,
        requests_per_s=sum(r.run.window_completions for r in cell.runs) / seconds if seconds else math.nan,
        errors=sum(not o.ok for o in outcomes),
        hit_rate=hits / queries if queries else math.nan,
        p99_by_seed=[percentile(_ttfts(r.outcomes), 99) for r in cell.runs],
        p90_by_seed=[percentile(_ttfts(r.outcomes), 90) for r in cell.runs],
        tokens_by_seed=[r.run.window_tokens / r.run.window_s if r.run.window_s else math.nan for r in cell.runs],
        sent=dict(sent),
        machine_cores=sum(r.cores.get("machine", math.nan) for r in cell.runs) / len(cell.runs),
        adapter_loads=sum(c.adapter_loads for r in cell.runs for c in r.replicas.values()),
    )


def ratio(a: float, b: float) -> float:
    """a / b for latencies that may be infinite: inf/inf and x/nan are nan, x/inf is 0."""
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b)):
        return math.nan
    if math.isinf(b):
        return 0.0
    return a / b if b else math.nan


class Results:
    """The cells by (setup key, workload, load), with their stats computed once."""

    def __init__(self, cells: list[Cell]):
        self.cells = {(c.setup.key, c.workload, c.load): c for c in cells}
        self.stats = {key: stats(c) for key, c in self.cells.items()}
        self.loads = sorted({c.load for c in cells})
        self.workloads = list(dict.fromkeys(c.workload for c in cells))
        self.setups = [s for s in (*SETUPS, *TRIAL_SETUPS) if any(c.setup == s for c in cells)]

    def get(self, setup: str, workload: str, load: float) -> Stats | None:
        return self.stats.get((setup, workload, load))


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    text: str
    workload: str
    load: float
    metric: str  # a Stats field
    baseline: Setup | None
    bound: float
    higher_is_better: bool = False

    def measured(self, results: Results, setup: str) -> float:
        s = results.get(setup, self.workload, self.load)
        if s is None:
            return math.nan
        if self.baseline is None:
            return s.metric(self.metric)
        b = results.get(self.baseline.key, self.workload, self.load)
        if b is None:
            return math.nan
        if self.higher_is_better:
            return s.metric(self.metric) / b.metric(self.metric) if b.metric(self.metric) else math.nan
        return ratio(s.metric(self.metric), b.metric(self.metric))

    def measured_by_seed(self, results: Results, setup: str) -> list[float]:
        """The ratio seed by seed (paired: the same requests at the same times in both cells)."""
        s = results.get(setup, self.workload, self.load)
        b = results.get(self.baseline.key, self.workload, self.load) if self.baseline else None
        if s is None or b is None:
            return []
        pairs = zip(s.by_seed(self.metric), b.by_seed(self.metric), strict=False)
        if self.higher_is_better:
            return [x / y if y else math.nan for x, y in pairs]
        return [ratio(x, y) for x, y in pairs]

    def met(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.bound if self.higher_is_better else value <= self.bound


TARGETS = (
    Target("p99 TTFT <= 0.35x least-request", "sharegpt", 0.9, "ttft_p99", LEAST_REQUEST, 0.35),
    Target("p99 TTFT <= 0.2x round-robin", "sharegpt", 0.9, "ttft_p99", ROUND_ROBIN, 0.2),
    Target("output tokens/s >= least-request's", "sharegpt", 0.9, "tokens_per_s", LEAST_REQUEST, 1.0, True),
    Target("p90 TTFT <= 0.1x round-robin", "shared-prefix", 0.9, "ttft_p90", ROUND_ROBIN, 0.1),
    Target("output tokens/s >= 1.5x round-robin", "shared-prefix", 0.9, "tokens_per_s", ROUND_ROBIN, 1.5, True),
    Target("p99 TTFT <= 0.6x least-request", "sharegpt", 1.1, "ttft_p99", LEAST_REQUEST, 0.6),
    Target("no errors", "sharegpt", 1.1, "errors", None, 0.0),
)


def capacity_shares(capacities: dict[str, Capacity], workload: str) -> dict[str, float]:
    capacity = capacities.get(workload)
    if capacity is None or not capacity.saturation.by_replica:
        return {}
    total = sum(capacity.saturation.by_replica.values())
    return {name: n / total for name, n in capacity.saturation.by_replica.items()}
