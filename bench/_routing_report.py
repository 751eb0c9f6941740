"""The routing benchmark's section of docs/benchmarks.md: the setup, the targets and the tables."""

from __future__ import annotations

import math
import os
from collections import Counter

from bench._common import machine_summary
from bench._routing_results import (
    INF,
    SUBJECTS,
    TARGETS,
    Capacity,
    Cell,
    Results,
    Settings,
    Stats,
    Target,
    capacity_shares,
    ratio,
    stats,
)
from bench._routing_setups import (
    ADAPTERS,
    FLEET,
    LEAST_REQUEST,
    MAX_LORAS,
    PICKER_PREFIX,
    PROFILES,
    ROUND_ROBIN,
    SCHEDULER,
    SETUPS,
    SLOTS_DIVISOR,
    TRIAL_SETUPS,
    Setup,
)
from bench._workload import LORA_SHARE, SYSTEM_PROMPT_MAX, SYSTEM_PROMPT_MIN, adapter_weights

WORKLOAD_LABELS = {"sharegpt": "ShareGPT-like", "shared-prefix": "shared prefix", "lora": "LoRA mix"}


# ----------------------------------------------------------------------------- formatting


def fmt_s(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if math.isinf(seconds):
        return "∞"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_ratio(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞"
    if value == 0:  # a finite latency against an infinite one (``ratio``)
        return "≪1"
    return f"{value:.2f}x" if value < 100 else f"{value:.0f}x"


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return ""
    return f" ({fmt_s(min(values))}–{fmt_s(max(values))})"


def progress(cell: Cell) -> str:
    s = stats(cell)
    return (
        f"{cell.setup.key} {cell.workload} {cell.load:.0%}: TTFT p50 {fmt_s(s.ttft_p50)} p99 {fmt_s(s.ttft_p99)}, "
        f"{s.tokens_per_s:.0f} tok/s, {s.errors} errors, hit rate {s.hit_rate:.0%}; machine CPU "
        f"{s.machine_cores:.1f} of {os.cpu_count()} cores"
    )


# ----------------------------------------------------------------------------- targets


def verdict(target: Target, value: float, seeds: list[float]) -> str:
    if math.isnan(value):
        return "not measured"
    if target.met(value):
        return "met"
    if target.baseline is None:
        return f"missed by {value:.0f}"
    if not math.isfinite(value):
        return "missed: ∞"
    if target.higher_is_better:
        text = f"missed by {1 - value / target.bound:.0%}"
    else:
        text = f"missed: {value / target.bound:.1f}x the bound"
    finite = [v for v in seeds if math.isfinite(v)]
    if len(finite) > 1 and min(finite) <= target.bound <= max(finite):
        text += " (the bound is within the seeds' range)"
    return text


def why(target: Target, results: Results, setup: str, capacities: dict[str, Capacity]) -> str:
    """What in the measurements explains the figure (data, not a verdict)."""
    cell = results.cells.get((setup, target.workload, target.load))
    s = results.get(setup, target.workload, target.load)
    if cell is None or s is None:
        return ""
    b = results.get(target.baseline.key, target.workload, target.load) if target.baseline else None
    parts = []
    busy = [x for x in (s, b) if x is not None and contended(x)]
    if busy:
        parts.append(
            f"{CONTENDED_MARK.strip()} the machine was busy with other jobs ("
            + ", ".join(f"{x.machine_cores:.1f}" for x in busy)
            + f" of {os.cpu_count()} cores)"
        )
    if target.metric.startswith("ttft"):
        parts.append(_tail(cell, s, 0.01 if target.metric == "ttft_p99" else 0.10, capacities))
        if b is not None and target.baseline is not None and math.isinf(b.metric(target.metric)):
            parts.append(
                f"{target.baseline.label}'s is ∞: {b.errors} of its {b.requests} requests failed, "
                f"{sum(math.isinf(v) for v in b.by_seed(target.metric))} of its seeds ∞ on their own"
            )
    if target.metric == "tokens_per_s":
        offered = cell.rate * _mean_output(cell)
        parts.append(f"offered {offered:.0f} tok/s, delivered {s.tokens_per_s:.0f}")
        if target.baseline is not None and b is not None:
            parts.append(f"{target.baseline.label} {b.tokens_per_s:.0f}")
            if b.tokens_per_s and offered / b.tokens_per_s < target.bound:
                # Open loop: no setup delivers (much) more than is offered.
                parts.append(
                    f"the offered load itself is {offered / b.tokens_per_s:.2f}x {target.baseline.label}'s "
                    f"output, so no router reaches {target.bound:g}x at this load"
                )
    if target.workload == "shared-prefix":
        parts.append(f"prefix-cache hit rate {s.hit_rate:.0%}" + (f" vs {b.hit_rate:.0%}" if b is not None else ""))
    if s.errors:
        parts.append(_errors(cell))
    return "; ".join(p for p in parts if p)


def _mean_output(cell: Cell) -> float:
    outcomes = [o for r in cell.runs for o in r.outcomes if o.ok]
    return sum(o.tokens for o in outcomes) / len(outcomes) if outcomes else math.nan


def _tail(cell: Cell, s: Stats, fraction: float, capacities: dict[str, Capacity]) -> str:
    """Where the slowest ``fraction`` of the requests were served, against where all of them went."""
    outcomes = sorted((o for r in cell.runs for o in r.outcomes), key=lambda o: INF if o.ttft is None else o.ttft)
    tail = outcomes[len(outcomes) - max(1, round(fraction * len(outcomes))) :]
    where = Counter(o.replica or "no replica" for o in tail)
    name, count = where.most_common(1)[0]
    everywhere = Counter(o.replica or "no replica" for r in cell.runs for o in r.outcomes)
    shares = capacity_shares(capacities, cell.workload)
    text = (
        f"slowest {fraction:.0%}: {count} of {len(tail)} on {name} (which got {everywhere[name] / s.requests:.0%} "
        f"of all requests"
    )
    if name in shares:
        text += f", {shares[name]:.0%} of the fleet's capacity"
    return text + ")"


def _errors(cell: Cell) -> str:
    kinds = Counter(o.error for r in cell.runs for o in r.outcomes if not o.ok)
    return "errors: " + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(3))


# ----------------------------------------------------------------------------- tables


def _cell_row(results: Results, setup: Setup, workload: str, load: float, lora: bool = False) -> str:
    s = results.get(setup.key, workload, load)
    if s is None:
        return ""
    lr = results.get(LEAST_REQUEST.key, workload, load)
    rr = results.get(ROUND_ROBIN.key, workload, load)

    def vs(metric: str, higher: bool = False) -> str:
        out = []
        for base in (lr, rr):
            if base is None:
                out.append("n/a")
            elif higher:
                out.append(fmt_ratio(s.metric(metric) / base.metric(metric)) if base.metric(metric) else "n/a")
            else:
                out.append(fmt_ratio(ratio(s.metric(metric), base.metric(metric))))
        return " / ".join(out)

    return (
        f"| {load:.0%} | {setup.label} | {fmt_s(s.ttft_p50)} | {fmt_s(s.ttft_p90)} | {fmt_s(s.ttft_p99)}"
        f"{_spread(s.p99_by_seed)} | {vs('ttft_p90')} | {vs('ttft_p99')} | {fmt_s(s.e2e_p99)} "
        f"| {s.tokens_per_s:.0f} | {vs('tokens_per_s', True)} | {s.requests_per_s:.1f} | {s.errors} "
        f"| {s.hit_rate:.0%} |{f' {100 * s.adapter_loads / s.requests:.1f} |' if lora else ''}"
        f" {s.machine_cores:.1f}{CONTENDED_MARK if contended(s) else ''} |"
    )


CONTENDED = 0.9  # of the machine's cores busy (every job on it): a cell's latencies include CPU waits
CONTENDED_MARK = " †"


def contended(s: Stats) -> bool:
    return s.machine_cores >= CONTENDED * (os.cpu_count() or 1)


def _cells_table(results: Results, workload: str) -> list[str]:
    lora = workload == "lora"
    loads = " adapter loads per 100 requests |" if lora else ""
    out = [
        "| load | setup | TTFT p50 | TTFT p90 | TTFT p99 (seeds) | p90 vs LR / RR | p99 vs LR / RR | e2e p99 "
        f"| output tok/s | vs LR / RR | req/s | errors | prefix hit |{loads}"
        f" machine CPU, of {os.cpu_count()} cores |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if lora else "") + "---:|",
    ]
    for load in results.loads:
        for setup in results.setups:
            row = _cell_row(results, setup, workload, load, lora)
            if row:
                out.append(row)
    return out


def _targets_table(results: Results, capacities: dict[str, Capacity]) -> list[str]:
    out = [
        "| target | workload, load | setup | measured (seeds) | verdict | why (from this run's data) |",
        "|---|---|---|---:|---|---|",
    ]
    labels = {s.key: s.label for s in (*SETUPS, *TRIAL_SETUPS)}
    for target in TARGETS:
        for setup in SUBJECTS:
            value = target.measured(results, setup)
            seeds = target.measured_by_seed(results, setup)
            shown = f"{value:.0f}" if target.baseline is None else fmt_ratio(value)
            if len(seeds) > 1:
                shown += f" ({fmt_ratio(min(seeds))}–{fmt_ratio(max(seeds))})"
            out.append(
                f"| {target.text} | {WORKLOAD_LABELS[target.workload]}, {target.load:.0%} | {labels[setup]} "
                f"| {shown} | {verdict(target, value, seeds)} | {why(target, results, setup, capacities)} |"
            )
    return out


def _distribution_table(results: Results, capacities: dict[str, Capacity]) -> list[str]:
    """Where each setup sent the work, next to each replica's share of the fleet's capacity."""
    names = [r.name for r in FLEET]
    out = [
        "| workload, load | setup | " + " | ".join(names) + " |",
        "|---|---|" + "---:|" * len(names),
    ]
    for workload in results.workloads:
        shares = capacity_shares(capacities, workload)
        out.append(
            f"| {WORKLOAD_LABELS[workload]} | *capacity share (LR, saturated)* | "
            + " | ".join(f"*{shares.get(n, 0):.0%}*" for n in names)
            + " |"
        )
        load = max(results.loads)
        for setup in results.setups:
            s = results.get(setup.key, workload, 0.9 if 0.9 in results.loads else load)
            if s is None:
                continue
            total = sum(s.sent.values()) or 1
            out.append(
                f"| {WORKLOAD_LABELS[workload]}, {0.9 if 0.9 in results.loads else load:.0%} | {setup.label} | "
                + " | ".join(f"{s.sent.get(n, 0) / total:.0%}" for n in names)
                + " |"
            )
    return out


def _fleet_table(capacities: dict[str, Capacity]) -> list[str]:
    out = [
        f"| replica | GPU profile | batch slots (1/{SLOTS_DIVISOR} of the profile's) | KV cache, tokens "
        "| prefix cache, tokens | engine step (base + per sequence, at `time_scale` 1) | prefill per token | "
        + " | ".join(f"busy at saturation, {WORKLOAD_LABELS[w]}" for w in capacities)
        + " |",
        "|---|---|---:|---:|---:|---|---:|" + "---:|" * len(capacities),
    ]
    for r in FLEET:
        p = r.profile()
        busy = " | ".join(f"{c.busy.get(r.name, math.nan):.0%}" for c in capacities.values())
        out.append(
            f"| {r.name} | {r.gpu} | {p.max_num_seqs} | {p.kv_capacity_tokens:,} | "
            f"{p.prefix_cache_blocks * p.block_size:,} | {p.decode_base_s * 1000:g} + {p.decode_per_seq_s * 1000:g} ms "
            f"| {p.prefill_s_per_token * 1e6:g} µs | {busy} |"
        )
    return out


def _cpu_summary(results: Results, capacities: dict[str, Capacity]) -> str:
    runs = [r for c in results.cells.values() for r in c.runs]
    peak_fleet = max((r.cores.get("fleet", 0.0) for r in runs), default=math.nan)
    peak_ours = max((sum(v for k, v in r.cores.items() if k != "machine") for r in runs), default=math.nan)
    peak_machine = max((r.cores.get("machine", 0.0) for r in runs), default=math.nan)
    lag = max((r.run.max_lag_s for r in runs), default=math.nan)
    sat = "; ".join(
        f"{WORKLOAD_LABELS[w]}: fleet process {c.cores.get('fleet', 0):.2f} cores, all of this benchmark's "
        f"processes {sum(v for k, v in c.cores.items() if k != 'machine'):.2f}, the machine "
        f"{c.cores.get('machine', 0):.2f} of {os.cpu_count()}"
        for w, c in capacities.items()
    )
    return (
        "CPU check: the busy columns above are each replica's simulated step time over the wall time of the "
        "saturated window, 100% when its simulated GPU, not this machine's CPU, is what limits it. At "
        f"saturation ({sat}). Over every open-loop run: the fleet process (all replicas, one "
        f"event loop) used at most {peak_fleet:.2f} of a core, this benchmark's processes together at most "
        f"{peak_ours:.2f} cores, the whole machine (other jobs included) at most {peak_machine:.2f} of "
        f"{os.cpu_count()}; the load generator sent its requests at most {lag * 1000:.0f} ms behind schedule."
    )


# ----------------------------------------------------------------------------- the section


def render(cells: list[Cell], capacities: dict[str, Capacity], settings: Settings, plots: list[str]) -> str:
    results = Results(cells)
    out = [_setup_text(settings, capacities), ""]
    out += _fleet_table(capacities)
    out += ["", _cpu_summary(results, capacities), ""]
    out += ["### Targets", ""]
    out += _targets_table(results, capacities)
    out += ["", "### Results", ""]
    for workload in results.workloads:
        out += [f"**{WORKLOAD_LABELS[workload]}** ({_workload_text(workload, settings)})", ""]
        out += _cells_table(results, workload)
        out.append("")
    out += [
        "Machine CPU: cores busy during the cell's runs, whoever used them (other jobs share this machine; "
        f"before each cell the benchmark waited up to {settings.quiet_limits[0]:g} s for them to leave it "
        f"below one busy core, at most {settings.quiet_limits[1]:g} s in all, "
        f"{settings.quiet_wait_s:.0f} s in all this run). "
        f"{CONTENDED_MARK.strip()}: {CONTENDED:.0%} or more of the machine was busy, so that cell's latencies "
        "include waits for a CPU (the ext_proc, the fleet's event loop and Envoy all queue for one) and say "
        "less about routing.",
        "",
    ]
    out += [f"![{name}]({name})" for name in plots]
    out += ["", "Where the requests went (share of the requests each replica answered, finished or not):", ""]
    out += _distribution_table(results, capacities)
    out.append("")
    return "\n".join(out)


def _setup_text(settings: Settings, capacities: dict[str, Capacity]) -> str:
    quick = " `--quick`: fewer loads, one seed, fewer requests." if settings.quick else ""
    capacity = ", ".join(
        f"{WORKLOAD_LABELS[w]} {c.saturation.tokens_per_s:.0f} output tok/s, i.e. {c.requests_per_s:.1f} req/s"
        for w, c in capacities.items()
    )
    return "\n".join(
        [
            f"Machine: {machine_summary()}; 1-minute load average {settings.load[0]:.1f} when this section "
            f"started, {settings.load[1]:.1f} when it ended.{quick}",
            "",
            f"- **Fleet**: {len(FLEET)} simulated replicas of one model (fleet/, the table below): fast and slow "
            "GPUs, large and small KV caches, each with a prefix cache as large as its KV cache; the engine's "
            f"scheduler switches {', '.join(f'`{k}: {str(v).lower()}`' for k, v in SCHEDULER.items())} "
            "(docs/fleet.md); restarted fresh for every setup and workload.",
            "- **Setups**: the mesh's picker (an ext_proc round per request); the mesh's fast path (Envoy on "
            "the control plane's EDS weights: each replica's capacity, slots over decode step, discounted by "
            "its queue and KV); Envoy LEAST_REQUEST, ROUND_ROBIN and RANDOM: the "
            "fast-path mesh's own listener, routes and cluster from its config dump, made static (no ext_proc, "
            "no access logs, equal weights), the same Envoy binary, 1 worker. The picker runs twice: with the "
            "default scheduler profile and with a prefix-aware one (the default scorers plus `prefix-affinity` "
            f"and `ttft`, {_profile_text()}). Every request names the model, or its LoRA adapter, in `x-model-id` "
            "(the fast path routes on it; the default profile then needs no body, the prefix-aware one reads "
            "the prompt).",
            f"- **Capacity**, per workload: a closed loop of {settings.capacity_clients} clients through "
            f"LEAST_REQUEST, {settings.capacity_seconds:g} s after a warm-up ({capacity}). Loads are fractions "
            "of it, as open-loop Poisson arrivals; latencies count from the scheduled send time.",
            f"- **Cells**: {len(settings.seeds)} seed(s) x {settings.requests} streamed requests; before each "
            "seed the fleet is idle and its prefix caches are emptied (vLLM's `POST /reset_prefix_cache`). "
            "Percentiles pool the seeds; the p99 column also gives the seeds' own p99 range, the targets the "
            "seeds' own ratios (seed i is the same requests at the same times in every cell). A request that "
            f"got no token counts as infinitely slow (∞: more than 1% failed); what has not finished "
            f"{settings.grace_s:g} s after the last arrival is cancelled and counted as an error. Output "
            "tokens/s and req/s are what arrived between 10% of the schedule and its last arrival.",
        ]
    )


def _workload_text(workload: str, settings: Settings) -> str:
    prompt, output = settings.means[workload]
    tail = (
        f"; mean prompt {prompt:.0f}, mean output {output:.0f} tokens; the fleet at `time_scale` "
        f"{settings.time_scales[workload]:g}"
    )
    if workload == "lora":
        return (
            f"ShareGPT-like requests, {LORA_SHARE:.0%} of them for one of {len(ADAPTERS)} LoRA adapters of the "
            f"model, Zipf-like popularity (1/i: the most popular {adapter_weights(len(ADAPTERS))[0]:.0%} of the "
            f"adapter requests), the rest for the base model; every replica serves the {len(ADAPTERS)} adapters "
            f"with `max_loras` {MAX_LORAS} (distinct adapters per batch and on the GPU; loading one costs the "
            "profile's `adapter_load_s`, 0.25 s at `time_scale` 1)" + tail
        )
    if workload == "sharegpt":
        return (
            "ShareGPT's published lengths (vLLM paper: mean prompt 161, mean output 338 tokens), log-normal, "
            f"vLLM's benchmark filter, outputs at most 1,024 and then / {settings.output_scale:g}" + tail
        )
    return (
        f"{settings.tenants} tenants, each a {SYSTEM_PROMPT_MIN:,}-{SYSTEM_PROMPT_MAX:,}-token system prompt, "
        f"drawn uniformly; a short user turn per request; outputs as for ShareGPT" + tail
    )


def _profile_text() -> str:
    assert PICKER_PREFIX.scheduling is not None
    scorers = PROFILES[PICKER_PREFIX.scheduling]["scorers"]
    return "weights " + ", ".join(f"{s['type']} {s['weight']:g}" for s in scorers)
