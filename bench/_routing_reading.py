"""What the routing benchmark's numbers say about the picker and the fast path, and what is left.

The mechanisms are described from the code (extproc/scheduler/, controlplane/load/fast_path.py); every
figure, and every claim that depends on one (which setup keeps a tenant in one place, where the tail
was served, which target is missed and why), comes from the run, so the text stays true when the
numbers move.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from bench._routing_report import fmt_s
from bench._routing_results import TARGETS, Capacity, Cell, Results, Settings, capacity_shares
from bench._routing_setups import (
    ADAPTERS,
    FAST,
    FLEET,
    LEAST_REQUEST,
    MAX_LORAS,
    PICKER,
    PICKER_PREFIX,
    RANDOM,
    ROUND_ROBIN,
)

SLOW = FLEET[-1].name  # the slowest replica of bench/_routing_setups.py's fleet
FASTEST = FLEET[0].name


def _share(results: Results, setup: str, workload: str, load: float, replica: str) -> float:
    s = results.get(setup, workload, load)
    if s is None or not s.sent:
        return math.nan
    return s.sent.get(replica, 0) / sum(s.sent.values())


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def _x(value: float) -> str:
    return "n/a" if math.isnan(value) or math.isinf(value) else f"{value:.2f}x"


def spread(cell: Cell | None) -> float:
    """Replicas that served a group (a tenant, an adapter), on average over its requests: 1 when
    every group stayed on one replica, the fleet's size when each went everywhere."""
    if cell is None:
        return math.nan
    where: dict[str, Counter[str]] = defaultdict(Counter)
    for run in cell.runs:
        for o in run.outcomes:
            if o.group is not None and o.replica is not None:
                where[o.group][o.replica] += 1
    total = sum(sum(c.values()) for c in where.values())
    return sum(len(c) * sum(c.values()) for c in where.values()) / total if total else math.nan


def tail_on(cell: Cell | None, replica: str, fraction: float = 0.01) -> tuple[int, int]:
    """(of the slowest ``fraction`` of the cell's requests by TTFT, how many ``replica`` served; how many)."""
    if cell is None:
        return 0, 0
    outcomes = sorted((o for r in cell.runs for o in r.outcomes), key=lambda o: math.inf if o.ttft is None else o.ttft)
    tail = outcomes[len(outcomes) - max(1, round(fraction * len(outcomes))) :]
    return sum(o.replica == replica for o in tail), len(tail)


def _metric(results: Results, setup: str, workload: str, load: float, name: str) -> float:
    s = results.get(setup, workload, load)
    return s.metric(name) if s is not None else math.nan


def _vs(results: Results, setup: str, base: str, workload: str, load: float, name: str) -> float:
    a, b = _metric(results, setup, workload, load, name), _metric(results, base, workload, load, name)
    if math.isnan(a) or math.isnan(b) or not b or math.isinf(b):
        return math.nan
    return a / b


def text(results: Results, capacities: dict[str, Capacity], settings: Settings) -> str:
    load = 0.9 if 0.9 in results.loads else max(results.loads)
    out = ["### Reading", ""]
    for paragraph in (
        _slow_replica(results, capacities, load),
        _picker(results, load),
        _prefix(results, settings, load),
        _fast_path(results, capacities, load),
        _lora(results, load),
        _missed(results),
    ):
        if paragraph:
            out += [paragraph, ""]
    return "\n".join(out)


def _slow_replica(results: Results, capacities: dict[str, Capacity], load: float) -> str:
    if "sharegpt" not in results.workloads:
        return ""
    shares = capacity_shares(capacities, "sharegpt")
    slow_cap = shares.get(SLOW, math.nan)
    speed = shares.get(FASTEST, math.nan) / slow_cap if slow_cap else math.nan

    def sent(setup: str) -> str:
        return _pct(_share(results, setup, "sharegpt", load, SLOW))

    return (
        f"**The slow replica decides the tail.** Under saturation `{SLOW}` gets through {_pct(slow_cap)} of "
        f"the fleet's ShareGPT-like work, `{FASTEST}` about {speed:.0f}x as much (the distribution table). "
        f"ROUND_ROBIN and RANDOM give every replica the same share, so `{SLOW}` gets a quarter of the "
        f"requests ({sent(ROUND_ROBIN.key)} and {sent(RANDOM.key)} at {load:.0%} load) and its queue grows "
        "for the whole run: what is still queued when the run ends becomes errors, and their p90 and p99 run "
        "into seconds or are ∞ (more than 10% or 1% of the requests got no token). LEAST_REQUEST equalises "
        f"outstanding requests; that one replica gets through {speed:.0f}x less work is invisible to it: it "
        f"sent `{SLOW}` {sent(LEAST_REQUEST.key)}."
    )


def _picker(results: Results, load: float) -> str:
    if "sharegpt" not in results.workloads:
        return ""
    default = results.cells.get((PICKER.key, "sharegpt", load))
    aware = results.cells.get((PICKER_PREFIX.key, "sharegpt", load))
    on_slow, tail = tail_on(default, SLOW)
    aware_on_slow, aware_tail = tail_on(aware, SLOW)
    p99 = _metric(results, PICKER.key, "sharegpt", load, "ttft_p99")
    aware_p99 = _metric(results, PICKER_PREFIX.key, "sharegpt", load, "ttft_p99")
    return (
        f"**The picker's tail, and what the time-to-first-token estimate changes.** With the default profile "
        f"the picker sent `{SLOW}` {_pct(_share(results, PICKER.key, 'sharegpt', load, SLOW))} of the "
        f"ShareGPT-like requests at {load:.0%}; {on_slow} of its slowest {tail} were served there (p99 "
        f"{fmt_s(p99)}, {_x(_vs(results, PICKER.key, LEAST_REQUEST.key, 'sharegpt', load, 'ttft_p99'))} "
        "LEAST_REQUEST's). The default profile's scores are counts: the queue term `S/(S + waiting + n)` "
        "(S = `saturation_queue`, 5) is near 1 for a replica whose 2 slots are full but whose queue is still "
        "empty, and only the latency term sees speed, as how long one request takes, not how many run at "
        "once. The prefix-aware profile adds `ttft`, which estimates each replica's wait in seconds: queued "
        "prefill at its measured prefill rate, the wait for a batch slot (waiting + running + 1 - slots, "
        "times latency / slots: the replicas' `vllm:num_requests_max`, which the load monitor now reads), "
        f"one decode step, and the request's own uncached prompt. With it the picker sent `{SLOW}` "
        f"{_pct(_share(results, PICKER_PREFIX.key, 'sharegpt', load, SLOW))}, {aware_on_slow} of its slowest "
        f"{aware_tail} were served there, and its p99 was {fmt_s(aware_p99)} "
        f"({_x(aware_p99 / p99 if p99 else math.nan)} the default profile's) on a workload without shared "
        "prefixes, where prefix-affinity has nothing to add."
    )


def _prefix(results: Results, settings: Settings, load: float) -> str:
    if "shared-prefix" not in results.workloads:
        return ""
    cache = sum(r.profile().prefix_cache_blocks * r.profile().block_size for r in FLEET)
    smallest = min(r.profile().prefix_cache_blocks * r.profile().block_size for r in FLEET)
    rows = [
        (setup, results.cells.get((setup.key, "shared-prefix", load)), results.get(setup.key, "shared-prefix", load))
        for setup in results.setups
    ]
    listed = "; ".join(
        f"{setup.label} {_pct(s.hit_rate)}, {spread(cell):.1f}" for setup, cell, s in rows if s is not None
    )
    aware = results.get(PICKER_PREFIX.key, "shared-prefix", load)
    rr = results.get(ROUND_ROBIN.key, "shared-prefix", load)
    tokens = _vs(results, PICKER_PREFIX.key, ROUND_ROBIN.key, "shared-prefix", load, "tokens_per_s")
    text = (
        f"**Keeping a tenant's prefix in one place.** The fleet's prefix caches hold {cache:,} tokens together, "
        f"the smallest {smallest:,}; the {settings.tenants} tenants' system prompts {settings.tenant_prompt_tokens:,}. "
        f"At {load:.0%} load, the prefix-cache hit rate the replicas report and the replicas a tenant's requests "
        f"were served by, on average: {listed}. Only `prefix-affinity` remembers where a prefix went (the "
        "prompt's block hashes, per ext_proc worker) and prefers that replica while its headroom lasts; every "
        "other setup spreads each tenant over the fleet and hits only what several tenants' traffic happens "
        "to leave behind."
    )
    if aware is not None and rr is not None:
        text += (
            f" The hits are prefill not computed: the prefix-aware picker's TTFT p90 was {fmt_s(aware.ttft_p90)} "
            f"against ROUND_ROBIN's {fmt_s(rr.ttft_p90)}, and its output {tokens:.2f}x ROUND_ROBIN's."
        )
    return text


def _fast_path(results: Results, capacities: dict[str, Capacity], load: float) -> str:
    if "sharegpt" not in results.workloads or results.get(FAST.key, "sharegpt", load) is None:
        return ""
    shares = capacity_shares(capacities, "sharegpt")
    ratios = ", ".join(
        f"{_x(_vs(results, FAST.key, LEAST_REQUEST.key, 'sharegpt', x, 'ttft_p99'))} at {x:.0%}" for x in results.loads
    )
    on_slow, tail = tail_on(results.cells.get((FAST.key, "sharegpt", load)), SLOW)
    relative = ", ".join(f"`{name}` {weight:.0%}" for name, weight in idle_capacities().items())
    return (
        "**The fast path** balances with Envoy's least-request on EDS weights "
        "(controlplane/load/fast_path.py) that now start from each replica's capacity, slots over its "
        "decode step relative to the fastest replica of the version, and are discounted by its queue and "
        f"KV. With its batch full, each replica's capacity relative to the fastest, from the profiles: "
        f"{relative} (before, every idle replica weighed 100). "
        f"It sent `{SLOW}` {_pct(_share(results, FAST.key, 'sharegpt', load, SLOW))} of the ShareGPT-like "
        f"requests at {load:.0%} ({_pct(shares.get(SLOW, math.nan))} of the capacity); {on_slow} of its "
        f"slowest {tail} were served there. Its p99 TTFT against LEAST_REQUEST's: {ratios}. What is left is "
        "what a balancer without a per-request decision cannot see: weights change at most once a second "
        "and only by 20 points or more, and Envoy weighs them against its own count of active requests, not "
        "against the queue behind a full batch."
    )


def idle_capacities() -> dict[str, float]:
    """Each replica's slots over its decode step with the batch full, relative to the largest: the
    fast path's capacity factor (the decode step as the profiles model it, not as measured)."""
    capacity = {}
    for r in FLEET:
        p = r.profile()
        capacity[r.name] = p.max_num_seqs / (p.decode_base_s + p.decode_per_seq_s * p.max_num_seqs)
    top = max(capacity.values())
    return {name: c / top for name, c in capacity.items()}


def _lora(results: Results, load: float) -> str:
    if "lora" not in results.workloads:
        return ""
    rows = []
    for setup in results.setups:
        s = results.get(setup.key, "lora", load)
        if s is None:
            continue
        cell = results.cells.get((setup.key, "lora", load))
        rows.append(
            f"{setup.label} {100 * s.adapter_loads / s.requests:.1f} loads per 100 requests, "
            f"{spread(cell):.1f} replicas per adapter, p99 {fmt_s(s.ttft_p99)}"
        )
    return (
        f"**LoRA adapters.** Every replica serves the {len(ADAPTERS)} adapters with `max_loras` {MAX_LORAS}: "
        "a batch holds requests of at most that many distinct adapters, others wait for one to finish, and "
        "an adapter not on the GPU is loaded first. Static balancers route an adapter as its base model, so "
        "each replica sees every adapter and swaps them; the picker's `lora-affinity` (in every profile "
        "here) prefers a replica where the adapter is active, then one with a free adapter slot. At "
        f"{load:.0%} load: " + "; ".join(rows) + "."
    )


def _missed(results: Results) -> str:
    missed = []
    for target in TARGETS:
        for setup in (PICKER, PICKER_PREFIX, FAST):
            value = target.measured(results, setup.key)
            if not math.isnan(value) and not target.met(value):
                missed.append(f"{target.text} ({setup.label}, {target.workload}, {target.load:.0%})")
    if not missed:
        return "**Targets.** Every target in the table is met in this run."
    return (
        "**Targets missed in this run**: "
        + "; ".join(missed)
        + ". The targets table's last column says, from this run's data, where the slowest requests were "
        "served or what capped the throughput."
    )
