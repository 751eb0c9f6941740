"""What each feature of the mesh's Envoy configuration costs on the fast path, by static-config ablation.

The fast path (``routing_mode: fast``) is Envoy alone deciding: no ext_proc stream, so what it costs
beyond a plain proxy is the mesh's Envoy configuration itself. This module measures that cost
feature by feature, as Envoy CPU time per request:

* start the static upstream (bench/_common.py, 4 "replicas") and a mesh with one fast-path model
  on them; wait until it routes and take Envoy's ``/config_dump?include_eds``;
* turn the dump into a static bootstrap: the listener with its route configuration inline, the
  EDS clusters made STATIC with the load assignment (the load-aware weights) the control plane
  last sent; the mesh's control plane and ext_proc keep running (the gRPC access log goes to the
  control plane), the mesh's own Envoy is stopped (SIGSTOP) while measuring;
* every round, start one Envoy (1 worker) per variant, each a copy of that bootstrap with one
  feature removed (``VARIANTS``), and "Envoy alone" (a router and a round-robin cluster of the
  same upstreams); fresh processes each round, because two Envoys running the same configuration
  can differ by several µs per request for as long as they run;
* measure them interleaved (only the one measured runs, the others are SIGSTOPped): wrk (1 thread)
  at ``SATURATION`` connections for ``SECONDS``, CPU of Envoy, the upstream and the control plane
  over the requests served; medians over ``ROUNDS`` rounds.

``python -m bench.envoy_features`` prints the report; ``python -m bench`` puts it in docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from bench._common import (
    CHAT_BODY,
    _envoy,
    cpu_seconds,
    lua_script,
    machine_summary,
    scratch_dir,
    start_plain_proxy,
    start_upstream,
    wrk,
)
from imesh.local_mesh import LocalMesh
from imesh.ports import MeshPorts, free_ports
from imesh.processes import ManagedProcess
from protos.wire import INTERNAL_HEADER_PREFIX, MODEL_ID_HEADER

TITLE = "Envoy on the fast path: what each feature of the mesh's configuration costs"
ORDER = 12

QUICK = os.environ.get("IMESH_BENCH_QUICK") == "1"
ROUNDS = 2 if QUICK else 5
SECONDS = 2 if QUICK else 3
SATURATION = 32
MODEL = "bench-fast"
PATH = "/v1/chat/completions"
PLOT = "bench-envoy-features.png"


def _spec(addresses: list[str]) -> dict:
    return {
        "apiVersion": "imesh/v1",
        "kind": "Mesh",
        "pools": [{"name": "p", "tier": "standard"}],
        "models": [
            {
                "name": MODEL,
                "routing_mode": "fast",
                "versions": [
                    {"name": "v1", "weight": 100, "endpoints": [{"address": a, "pool": "p"} for a in addresses]}
                ],
            }
        ],
    }


# ----------------------------------------------------------------------------- config dump -> static bootstrap


def _kind(message: dict) -> str:
    return message.get("@type", "").rsplit(".", 1)[-1]


def _routed_dump(mesh: LocalMesh, endpoints: int, timeout_s: float = 30) -> dict:
    """Envoy's config dump once a fast-path request succeeds and EDS carries every endpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(mesh.url + PATH, content=CHAT_BODY, headers={MODEL_ID_HEADER: MODEL}, timeout=2)
            if r.status_code == 200:
                dump = httpx.get(mesh.admin_url + "/config_dump", params={"include_eds": ""}, timeout=5).json()
                eds = next(c for c in dump["configs"] if _kind(c) == "EndpointsConfigDump")
                have = sum(
                    len(loc.get("lb_endpoints", []))
                    for e in eds.get("dynamic_endpoint_configs", [])
                    for loc in e["endpoint_config"].get("endpoints", [])
                )
                if have >= endpoints:
                    return dump
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the mesh did not route {MODEL} to all {endpoints} endpoints in {timeout_s:.0f} s")


def _static_assignment(cla: dict) -> dict:
    """A ClusterLoadAssignment as EDS sent it, made acceptable inline in a STATIC cluster."""
    cla = copy.deepcopy(cla)
    cla.pop("@type", None)
    for locality in cla.get("endpoints", []):
        locality.pop("locality", None)  # the dump's empty locality
        locality.pop("load_balancing_weight", None)  # 0 in the dump; a static config wants >= 1 or none
        for lb_endpoint in locality.get("lb_endpoints", []):
            lb_endpoint.pop("health_status", None)
            lb_endpoint.get("endpoint", {}).pop("health_check_config", None)
    return cla


def static_bootstrap(dump: dict) -> tuple[dict, list[str]]:
    """The running Envoy's configuration as one static bootstrap (admin address and listener port
    still to be set), and notes on what could not be carried over."""
    configs = {_kind(c): c for c in dump["configs"]}
    boot = configs["BootstrapConfigDump"]["bootstrap"]
    notes = []
    routes = {
        r["route_config"]["name"]: r["route_config"]
        for r in configs["RoutesConfigDump"].get("dynamic_route_configs", [])
    }
    assignments = {
        e["endpoint_config"]["cluster_name"]: e["endpoint_config"]
        for e in configs["EndpointsConfigDump"].get("dynamic_endpoint_configs", [])
    }

    listeners = []
    for entry in configs["ListenersConfigDump"].get("dynamic_listeners", []):
        listener = copy.deepcopy(entry["active_state"]["listener"])
        listener.pop("@type", None)
        for hcm in _hcms_of(listener):
            if "rds" in hcm:
                route_config = copy.deepcopy(routes[hcm.pop("rds")["route_config_name"]])
                route_config.pop("@type", None)
                hcm["route_config"] = route_config
        listeners.append(listener)
    if len(listeners) != 1:
        raise RuntimeError(f"expected one dynamic listener in the mesh's Envoy, found {len(listeners)}")

    clusters = list(copy.deepcopy(boot.get("static_resources", {}).get("clusters", [])))
    for entry in configs["ClustersConfigDump"].get("dynamic_active_clusters", []):
        cluster = copy.deepcopy(entry["cluster"])
        cluster.pop("@type", None)
        if cluster.get("type") == "EDS" or "eds_cluster_config" in cluster:
            cluster.pop("eds_cluster_config", None)
            cluster["type"] = "STATIC"
            cluster["load_assignment"] = _static_assignment(assignments[cluster["name"]])
        clusters.append(cluster)

    out = {
        k: copy.deepcopy(v)
        for k, v in boot.items()
        if k not in ("node", "admin", "static_resources", "dynamic_resources")
    }
    out["node"] = {k: v for k, v in boot["node"].items() if k in ("id", "cluster", "metadata", "locality")}
    if "layered_runtime" in out:  # an RTDS layer would need the ADS stream a static Envoy does not have
        layers = out["layered_runtime"].get("layers", [])
        kept = [layer for layer in layers if "rtds_layer" not in layer]
        if len(kept) != len(layers):
            notes.append(f"{len(layers) - len(kept)} RTDS runtime layer(s) dropped (no ADS in a static config)")
        out["layered_runtime"]["layers"] = kept
    out["static_resources"] = {"listeners": listeners, "clusters": clusters}
    return out, notes


# ----------------------------------------------------------------------------- the variants


def _hcms_of(listener: dict) -> Iterator[dict]:
    for chain in listener.get("filter_chains", []):
        for network_filter in chain.get("filters", []):
            typed = network_filter.get("typed_config", {})
            if _kind(typed) == "HttpConnectionManager":
                yield typed


def _listeners(b: dict) -> list[dict]:
    return b["static_resources"]["listeners"]


def _hcms(b: dict) -> Iterator[dict]:
    for listener in _listeners(b):
        yield from _hcms_of(listener)


def _virtual_hosts(b: dict) -> Iterator[dict]:
    for hcm in _hcms(b):
        yield from hcm.get("route_config", {}).get("virtual_hosts", [])


def _routes(b: dict) -> Iterator[dict]:
    for vhost in _virtual_hosts(b):
        yield from vhost.get("routes", [])


def _access_log_holders(b: dict) -> Iterator[dict]:
    """Everything that can carry an ``access_log`` list: listeners and connection managers."""
    yield from _listeners(b)
    yield from _hcms(b)


_LOCAL_LOGGERS = ("FileAccessLog", "StdoutAccessLog", "StderrAccessLog")


def _is_local_log(log: dict) -> bool:
    return _kind(log.get("typed_config", {})) in _LOCAL_LOGGERS or log.get("name", "").endswith(
        (".file", ".stdout", ".stderr")
    )


def without_file_log(b: dict) -> None:
    for holder in _access_log_holders(b):
        if "access_log" in holder:
            holder["access_log"] = [log for log in holder["access_log"] if not _is_local_log(log)]


def without_access_log(b: dict) -> None:
    for holder in _access_log_holders(b):
        holder.pop("access_log", None)
    for hcm in _hcms(b):
        for http_filter in hcm.get("http_filters", []):
            http_filter.get("typed_config", {}).pop("upstream_log", None)  # the router's, if any


def without_header_strip(b: dict) -> None:
    for hcm in _hcms(b):
        hcm["http_filters"] = [
            f
            for f in hcm.get("http_filters", [])
            if _kind(f.get("typed_config", {})) != "HeaderMutation" and "header_mutation" not in f.get("name", "")
        ]


def without_response_headers(b: dict) -> None:
    """No ``x-imesh-*`` response headers, at every level they can be set."""

    def strip(holder: dict) -> None:
        if "response_headers_to_add" in holder:
            kept = [
                h
                for h in holder["response_headers_to_add"]
                if not h.get("header", {}).get("key", "").lower().startswith(INTERNAL_HEADER_PREFIX)
            ]
            if kept:
                holder["response_headers_to_add"] = kept
            else:
                del holder["response_headers_to_add"]

    for hcm in _hcms(b):
        strip(hcm.get("route_config", {}))
    for vhost in _virtual_hosts(b):
        strip(vhost)
    for route in _routes(b):
        strip(route)
        for weighted in route.get("route", {}).get("weighted_clusters", {}).get("clusters", []):
            strip(weighted)


def without_retries(b: dict) -> None:
    for vhost in _virtual_hosts(b):
        vhost.pop("retry_policy", None)
    for route in _routes(b):
        route.get("route", {}).pop("retry_policy", None)


def without_session_hash(b: dict) -> None:
    for route in _routes(b):
        action = route.get("route", {})
        action.pop("hash_policy", None)
        action.get("weighted_clusters", {}).pop("use_hash_policy", None)


def round_robin(b: dict) -> None:
    """Every cluster with a load-balancing policy extension (override_host) gets plain ROUND_ROBIN."""
    for cluster in b["static_resources"]["clusters"]:
        if cluster.pop("load_balancing_policy", None) is not None:
            cluster["lb_policy"] = "ROUND_ROBIN"


_FEATURES = (without_header_strip, without_response_headers, without_retries, without_session_hash, round_robin)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    edits: tuple[Callable[[dict], None], ...]
    baseline: str | None  # the variant this one removes a feature from: "saves" is measured against it


VARIANTS = [
    Variant("configured", "the mesh as configured", (), None),
    Variant("no-file-log", "without the JSON file access log", (without_file_log,), "configured"),
    Variant("no-log", "without any access log", (without_access_log,), "configured"),
    Variant(
        "no-strip",
        "no access log, without the header strip (header_mutation)",
        (without_access_log, without_header_strip),
        "no-log",
    ),
    Variant(
        "no-resp-headers",
        "no access log, without the x-imesh-* response headers",
        (without_access_log, without_response_headers),
        "no-log",
    ),
    Variant("no-retries", "no access log, without retries", (without_access_log, without_retries), "no-log"),
    Variant(
        "no-hash",
        "no access log, without the session hash policy",
        (without_access_log, without_session_hash),
        "no-log",
    ),
    Variant(
        "round-robin",
        "no access log, ROUND_ROBIN instead of override_host",
        (without_access_log, round_robin),
        "no-log",
    ),
    Variant("bare", "no access log and none of the five above", (without_access_log, *_FEATURES), "no-log"),
]
ALONE = Variant("alone", "Envoy alone (router + round-robin cluster)", (), None)


def variant_config(base: dict, variant: Variant) -> dict:
    b = copy.deepcopy(base)
    for edit in variant.edits:
        edit(b)
    return b


# ----------------------------------------------------------------------------- measuring


@dataclass
class Cell:
    """One variant's results; its Envoy is a fresh process every round."""

    variant: Variant
    envoy: list[float] = field(default_factory=list)  # Envoy CPU µs per request, per round
    upstream: list[float] = field(default_factory=list)
    controlplane: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    errors: int = 0

    def median(self, attr: str) -> float:
        values = getattr(self, attr)
        return statistics.median(values) if values else float("nan")


@dataclass
class Proxy:
    process: ManagedProcess
    url: str
    admin_url: str | None


def _signal(process: ManagedProcess, sig: int) -> None:
    if process.running:
        try:
            os.kill(process.popen.pid, sig)
        except ProcessLookupError:
            pass


def _start_variant(workdir: Path, base: dict, variant: Variant, live: list[ManagedProcess]) -> Proxy:
    config = variant_config(base, variant)
    admin, port = free_ports(2)
    config["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}}
    _listeners(config)[0]["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    process = _envoy(workdir, f"variant-{variant.key}", yaml.safe_dump(config, sort_keys=False)).start()
    live.append(process)
    url = f"http://127.0.0.1:{port}"

    def serves() -> bool:
        return httpx.post(url + PATH, content=CHAT_BODY, headers={MODEL_ID_HEADER: MODEL}, timeout=1).status_code == 200

    process.wait_until(serves, 30)
    return Proxy(process, url, f"http://127.0.0.1:{admin}")


def _start_proxies(workdir: Path, base: dict, addresses: list[str], live: list[ManagedProcess]) -> dict[str, Proxy]:
    proxies = {v.key: _start_variant(workdir, base, v, live) for v in VARIANTS}
    alone, url = start_plain_proxy(workdir, addresses)
    live.append(alone)
    proxies[ALONE.key] = Proxy(alone, url, None)
    return proxies


def _ext_proc_streams(proxy: Proxy) -> int:
    """ext_proc streams this Envoy opened (0 on the fast path: the routes switch the filter off)."""
    if proxy.admin_url is None:
        return 0
    text = httpx.get(proxy.admin_url + "/stats", params={"filter": r"ext_proc\.streams_started$"}, timeout=5).text
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


def _measure(cell: Cell, url: str, script: Path, pids: dict[str, int]) -> None:
    wrk(url + PATH, script, 4, 1)  # warm: connections to the upstreams, fresh after the SIGSTOP
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    result = wrk(url + PATH, script, SATURATION, SECONDS)
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    cell.errors += result.errors + result.non2xx
    if not result.requests:
        return
    per = 1e6 / result.requests
    cell.envoy.append((after["envoy"] - before["envoy"]) * per)
    cell.upstream.append((after["upstream"] - before["upstream"]) * per)
    cell.controlplane.append((after["controlplane"] - before["controlplane"]) * per)
    cell.rps.append(result.rps)


def _stop(processes: list[ManagedProcess]) -> None:
    for process in processes:
        _signal(process, signal.SIGCONT)  # a stopped process would sit on its SIGTERM
    for process in reversed(processes):
        process.stop()
    processes.clear()


def _measure_all(workdir: Path) -> tuple[list[Cell], dict]:
    infra: list[ManagedProcess] = []  # the upstream
    live: list[ManagedProcess] = []  # this round's Envoys
    mesh: LocalMesh | None = None
    cells = [Cell(v) for v in [*VARIANTS, ALONE]]
    info: dict = {"load": [os.getloadavg()[0]], "ext_proc_streams": 0}
    try:
        upstream, addresses = start_upstream(workdir, replicas=4)
        infra.append(upstream)
        spec = workdir / "mesh.yaml"
        spec.write_text(yaml.safe_dump(_spec(addresses), sort_keys=False))
        mesh = LocalMesh(spec=spec, workdir=workdir / "mesh", ports=MeshPorts.ephemeral())
        mesh.start()
        dump = _routed_dump(mesh, len(addresses))
        base, info["notes"] = static_bootstrap(dump)
        info["access_logs"] = [
            (log.get("name", "?"), "filter" in log)
            for holder in _access_log_holders(base)
            for log in holder.get("access_log", [])
        ]
        script = lua_script(workdir, "fast", CHAT_BODY, {MODEL_ID_HEADER: MODEL})
        _signal(mesh.processes["envoy"], signal.SIGSTOP)  # the mesh's own Envoy sits idle, out of the way
        pids = {"upstream": upstream.popen.pid, "controlplane": mesh.processes["controlplane"].popen.pid}
        for round_ in range(ROUNDS):
            # Fresh Envoys every round: then the round-to-round spread includes what differs between
            # two processes running the same configuration, not only what differs between two runs.
            proxies = _start_proxies(workdir / f"round{round_ + 1}", base, addresses, live)
            for cell in cells if round_ % 2 == 0 else list(reversed(cells)):
                proxy = proxies[cell.variant.key]
                for other in proxies.values():
                    if other is not proxy:
                        _signal(other.process, signal.SIGSTOP)
                _signal(proxy.process, signal.SIGCONT)
                time.sleep(0.2)
                _measure(cell, proxy.url, script, {**pids, "envoy": proxy.process.popen.pid})
            for proxy in proxies.values():
                _signal(proxy.process, signal.SIGCONT)
            info["ext_proc_streams"] += sum(_ext_proc_streams(p) for p in proxies.values())
            _stop(live)
            print(
                f"bench: envoy_features round {round_ + 1}/{ROUNDS}: "
                + ", ".join(f"{c.variant.key} {c.envoy[-1]:.0f}" for c in cells if c.envoy)
                + " µs/req",
                flush=True,
            )
    finally:
        _stop(live)
        if mesh is not None:
            if "envoy" in mesh.processes:
                _signal(mesh.processes["envoy"], signal.SIGCONT)
            mesh.stop()
        _stop(infra)
    info["load"].append(os.getloadavg()[0])
    return cells, info


# ----------------------------------------------------------------------------- report


def _pooled_sd(rows: list[list[float]], relative: bool = False) -> float:
    """Round-to-round standard deviation pooled over the rows (relative to each row's mean if asked)."""
    variances = [statistics.variance(v) / (statistics.fmean(v) ** 2 if relative else 1.0) for v in rows if len(v) > 1]
    return statistics.fmean(variances) ** 0.5 if variances else float("nan")


def _plot(out_dir: Path, cells: list[Cell]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in cells if c.envoy]
    alone = next(c for c in cells if c.variant.key == "alone")
    labels = [c.variant.label.replace(", ", ",\n", 1) for c in shown]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    y = range(len(shown))
    colors = ["#4c72b0" if c.variant.key == "alone" else "#55a868" for c in shown]
    ax1.barh(y, [c.median("envoy") for c in shown], color=colors, alpha=0.8)
    for i, c in enumerate(shown):
        ax1.plot(c.envoy, [i] * len(c.envoy), "k.", ms=4)
        ax1.text(max(c.envoy) + 3, i, f"{c.median('envoy'):.0f}", va="center", fontsize=8)
    ax1.axvline(alone.median("envoy"), color="grey", ls="--", lw=0.8)
    ax1.set_yticks(list(y), labels, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlabel(f"Envoy CPU µs per request at {SATURATION} connections (bar: median; dots: rounds)")
    ax1.set_title("Envoy CPU per request")
    base = alone.median("rps")
    ax2.barh(y, [c.median("rps") / base for c in shown], color=colors, alpha=0.8)
    for i, c in enumerate(shown):
        ax2.plot([r / base for r in c.rps], [i] * len(c.rps), "k.", ms=4)
    ax2.axvline(1.0, color="grey", ls="--", lw=0.8)
    ax2.set_xlabel(f"req/s at {SATURATION} connections relative to Envoy alone (bar: median; dots: rounds)")
    ax2.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(out_dir / PLOT, dpi=110)
    plt.close(fig)
    return PLOT


def _report(cells: list[Cell], info: dict, plot: str) -> str:
    by = {c.variant.key: c for c in cells}
    alone = by["alone"]
    a_envoy, a_rps = alone.median("envoy"), alone.median("rps")
    logs = ", ".join(f"`{name}`{' (with a filter)' if filtered else ''}" for name, filtered in info["access_logs"])
    out = [
        f"Machine: {machine_summary()}; 1-minute load average {info['load'][0]:.1f} when this section started, "
        f"{info['load'][-1]:.1f} when it ended. A mesh with one fast-path model on the static upstream (4 "
        f"replicas); its Envoy's configuration, taken from `/config_dump?include_eds` once it routed, run as "
        f"static bootstraps by {len(cells) - 1} Envoys (1 worker each), one per variant, plus Envoy alone over "
        f"the same 4 upstreams. The mesh's control plane and ext_proc keep running (the gRPC access log goes to "
        f"the control plane); the mesh's own Envoy is stopped. wrk 1 thread, {SATURATION} connections, POST "
        f"`{PATH}` with `{MODEL_ID_HEADER}`; {ROUNDS} interleaved rounds of {SECONDS} s, only the measured Envoy "
        f"running (the others SIGSTOPped), fresh Envoys every round (so the spread over rounds includes "
        f"the difference between two processes with the same configuration); medians. CPU per request is "
        f"user + system time over the requests served; the control plane's includes its load scraping (see "
        f"its figure in the Envoy alone row).",
        "",
        f"Access logs in the mesh's configuration (kept as configured, only removed): {logs or 'none'}. "
        'Below "no access log", each row removes one more feature from that; "saves" is the Envoy CPU per '
        "request of the row it removes the feature from minus its own.",
        "",
        "| configuration | Envoy µs/req | saves | vs Envoy alone | Envoy µs/req by round | upstream µs/req "
        "| control plane µs/req | req/s | vs Envoy alone | errors |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if not c.envoy:
            out.append(f"| {c.variant.label} | n/a | | | | | | | | {c.errors} |")
            continue
        envoy = c.median("envoy")
        saves = f"{by[c.variant.baseline].median('envoy') - envoy:+.1f}" if c.variant.baseline else "—"
        vs = "—" if c is alone else f"{envoy - a_envoy:+.1f}"
        rounds = " ".join(f"{v:.0f}" for v in c.envoy)
        out.append(
            f"| {c.variant.label} | {envoy:.1f} | {saves} | {vs} | {rounds} | {c.median('upstream'):.1f} "
            f"| {c.median('controlplane'):.1f} | {c.median('rps'):,.0f} | {c.median('rps') / a_rps:.0%} "
            f"| {c.errors} |"
        )
    out.append("")
    out.append(f"![{plot}]({plot})")
    out.append("")

    measured = [c for c in cells if len(c.envoy) > 1]
    if measured:
        cpu_cv = _pooled_sd([c.envoy for c in measured], relative=True)
        rps_cv = _pooled_sd([c.rps for c in measured], relative=True)
        sd = _pooled_sd([c.envoy for c in measured])
        rounds = min(len(c.envoy) for c in measured)
        # Two standard deviations of the difference of two medians of `rounds` values (a median's
        # standard error is about 1.25 times a mean's).
        noise = 2 * 1.25 * sd * (2 / rounds) ** 0.5
        steadier = (
            "steadier than req/s"
            if cpu_cv < 0.8 * rps_cv
            else "about as steady as req/s in this run"
            if cpu_cv < 1.25 * rps_cv
            else "less steady than req/s in this run"
        )
        out.append(
            f"How to read it: Envoy CPU per request is what a feature costs Envoy, and on this shared "
            f"{os.cpu_count()}-core machine it was {steadier} (round-to-round standard deviation "
            f"{cpu_cv:.1%} of the mean for CPU per request, {rps_cv:.1%} for req/s, pooled over the rows). "
            f"One round of a row scatters by about {sd:.1f} µs (standard deviation), so between two rows' "
            f"medians of {rounds} rounds a difference below about {noise:.0f} µs is within noise (two standard "
            "deviations)."
        )
        singles = [c for c in cells if c.variant.baseline == "no-log" and c.variant.key != "bare" and c.envoy]
        if "bare" in by and by["bare"].envoy and by["no-log"].envoy and singles:
            each = sum(by["no-log"].median("envoy") - c.median("envoy") for c in singles)
            together = by["no-log"].median("envoy") - by["bare"].median("envoy")
            out[-1] += (
                f" A check on that: the {len(singles)} single-feature savings add up to {each:.0f} µs, "
                f"removing all {len(singles)} at once saves {together:.0f} µs."
            )
    else:
        out.append("One round only: no round-to-round spread to judge the noise by.")
    checks = [
        f"ext_proc streams opened by these Envoys during the run: {info.get('ext_proc_streams', 'n/a')} "
        "(0 expected: the fast-path routes switch the ext_proc filter off)."
    ]
    checks += info.get("notes", [])
    out.append("")
    out.extend(checks)
    return "\n".join(out) + "\n"


def run(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = scratch_dir("envoy-features")
    try:
        cells, info = _measure_all(workdir)
    finally:
        if os.environ.get("IMESH_BENCH_KEEP") != "1":  # the JSON access log of every request
            shutil.rmtree(workdir, ignore_errors=True)
    plot = _plot(out_dir, cells)
    return _report(cells, info, plot)


if __name__ == "__main__":
    print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")))
