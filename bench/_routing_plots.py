"""The routing benchmark's plots: latency percentiles and throughput against load, prefix-cache hits."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from bench._routing_report import WORKLOAD_LABELS, fmt_s
from bench._routing_results import Cell, Results
from bench._routing_setups import SETUPS, TRIAL_SETUPS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LATENCY_PLOT = "bench-routing-latency.png"
THROUGHPUT_PLOT = "bench-routing-throughput.png"

COLORS = ("#4c72b0", "#dd8452", "#937860", "#55a868", "#c44e52", "#8172b3", "#da8bc3", "#8c8c8c", "#ccb974")
LOAD_AXIS = "offered load, % of measured fleet capacity"


def plots(out_dir: Path, cells: list[Cell]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = Results(cells)
    colors = {s.key: c for s, c in zip((*SETUPS, *TRIAL_SETUPS), COLORS, strict=True)}
    workloads = results.workloads
    rows = (("ttft_p50", "TTFT p50"), ("ttft_p90", "TTFT p90"), ("ttft_p99", "TTFT p99"))
    fig, axes = plt.subplots(len(rows), len(workloads), figsize=(6.5 * len(workloads), 4 * len(rows)), squeeze=False)
    for col, workload in enumerate(workloads):
        for row, (metric, label) in enumerate(rows):
            _latency_panel(axes[row][col], results, workload, metric, colors)
            axes[row][col].set_title(f"{WORKLOAD_LABELS[workload]}: {label} (bars: the seeds' range)")
    fig.tight_layout()
    fig.savefig(out_dir / LATENCY_PLOT, dpi=90)
    plt.close(fig)

    x = [load * 100 for load in results.loads]
    fig, axes = plt.subplots(1, len(workloads) + 1, figsize=(6 * (len(workloads) + 1), 4.5), squeeze=False)
    for col, workload in enumerate(workloads):
        ax = axes[0][col]
        for setup in results.setups:
            ys = [_metric(results, setup.key, workload, load, "tokens_per_s") for load in results.loads]
            ax.plot(x, ys, marker="o", label=setup.label, color=colors[setup.key])
        ax.set_ylim(bottom=0)
        ax.set_xticks(x)
        ax.set_xlabel(LOAD_AXIS)
        ax.set_ylabel("output tokens/s while requests arrive")
        ax.set_title(f"{WORKLOAD_LABELS[workload]}: output throughput")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    workload = "shared-prefix" if "shared-prefix" in workloads else workloads[0]
    width = 0.8 / max(1, len(results.setups))
    tallest = 0.0
    for i, setup in enumerate(results.setups):
        ys = [_metric(results, setup.key, workload, load, "hit_rate") * 100 for load in results.loads]
        offset = (i - (len(results.setups) - 1) / 2) * width
        ax.bar([j + offset for j in range(len(ys))], ys, width, label=setup.label, color=colors[setup.key])
        tallest = max([tallest, *(y for y in ys if math.isfinite(y))])
    ax.set_xticks(range(len(results.loads)), [f"{load:.0%}" for load in results.loads])
    ax.set_ylim(0, max(1.0, tallest) * 1.45)  # room for the legend above the bars
    ax.set_xlabel(LOAD_AXIS)
    ax.set_ylabel("prefix-cache hit rate, % of prompt tokens")
    ax.set_title(f"{WORKLOAD_LABELS[workload]}: prefix-cache hits the replicas report")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_dir / THROUGHPUT_PLOT, dpi=90)
    plt.close(fig)
    return [LATENCY_PLOT, THROUGHPUT_PLOT]


def _latency_panel(ax: Axes, results: Results, workload: str, metric: str, colors: dict[str, str]) -> None:
    """One latency percentile against load, a line per setup; ∞ drawn on a dotted line at the top."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    x = [load * 100 for load in results.loads]
    top = _plot_top(results, workload, metric)
    for setup in results.setups:
        ys, lows, highs = [], [], []
        for load in results.loads:
            s = results.get(setup.key, workload, load)
            value = min(s.metric(metric), top) if s else math.nan
            seeds = [min(v, top) for v in s.by_seed(metric)] if s and s.by_seed(metric) else [value]
            ys.append(value)
            lows.append(value - min(seeds))
            highs.append(max(seeds) - value)
        ax.errorbar(x, ys, yerr=[lows, highs], marker="o", capsize=3, label=setup.label, color=colors[setup.key])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_s(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    if _any_infinite(results, workload, metric):
        ax.axhline(top, color="grey", ls=":", lw=0.8)
        ax.text(x[0], top, " ∞ (failed requests)", va="bottom", fontsize=7, color="grey")
    ax.set_xticks(x)
    ax.set_xlabel(LOAD_AXIS)
    ax.legend(fontsize=7)


def _any_infinite(results: Results, workload: str, metric: str) -> bool:
    return any(
        math.isinf(v)
        for (_, w, _), s in results.stats.items()
        if w == workload
        for v in [s.metric(metric), *s.by_seed(metric)]
    )


def _metric(results: Results, setup: str, workload: str, load: float, metric: str) -> float:
    s = results.get(setup, workload, load)
    return s.metric(metric) if s else math.nan


def _plot_top(results: Results, workload: str, metric: str) -> float:
    """Where an infinite value is drawn: above every finite one."""
    finite = [
        v
        for (_, w, _), s in results.stats.items()
        if w == workload
        for v in [s.metric(metric), *s.by_seed(metric)]
        if math.isfinite(v)
    ]
    return 2 * max(finite) if finite else 1.0
