"""Convergence (issues #3 and #5): `imesh canary set` until Envoy serves the new split.

A small real mesh (`imesh.local_mesh.LocalMesh`: simulated fleet, control plane, ext_proc and Envoy
as separate processes on loopback) serves model `chat` with versions v1 and v2 on two replicas each.
The benchmark flips the canary with the same RPC `imesh canary set chat v2 PERCENT` uses
(MeshAdmin.SetCanary), alternating 100% and 0%, so every change is visible in every single request.
For each change it records, on one clock:

- the call: from sending the RPC to its return (the control plane answers once Envoy has ACKed);
- Envoy's admin: when `config_dump` first shows the route configuration of the returned config
  version (resource version "<config version>-<digest>" with delta xDS; the version_info with SotW);
- traffic: requests flow through Envoy's listener all along; when the first request *sent* after
  the call started comes back from the new version, with every later one agreeing.

"Convergence" is reported from the call's start (the CLI change until Envoy applied it) and from its
return (what issue #3 asks: "from `imesh canary set` returning to Envoy serving the new split"),
p50/p99 over every change, for a delta Envoy and a State-of-the-World Envoy in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from protos.wire import MODEL_ID_HEADER, VERSION_HEADER

TITLE = "Convergence: `imesh canary set` until Envoy serves the new split"
ORDER = 40

QUICK = os.environ.get("IMESH_BENCH_QUICK") == "1"
MODEL = "chat"
TARGET_P99_S = 0.150  # issue #3: return → Envoy serving the new split


@dataclass
class Change:
    percent: float
    sent: float  # perf_counter when the RPC went out
    returned: float
    config_version: int
    admin: float | None = None  # first config_dump showing the returned version's routes
    traffic: float | None = None  # send time of the first request served by the new version
    stragglers: int = 0  # requests sent after `traffic` still served by the old version


@dataclass
class Observer:
    """Requests through Envoy and config_dump polls, timestamped, running all along."""

    url: str
    admin_url: str
    responses: list[tuple[float, str]] = field(default_factory=list)  # (send time, x-imesh-version)
    routes: list[tuple[float, str]] = field(default_factory=list)  # (poll time, route config version)
    errors: int = 0
    stop: bool = False

    async def traffic(self, client: httpx.AsyncClient) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        while not self.stop:
            sent = time.perf_counter()
            try:
                response = await client.post(
                    f"{self.url}/v1/chat/completions", json=body, headers={MODEL_ID_HEADER: MODEL}
                )
                if response.status_code == 200:
                    self.responses.append((sent, response.headers.get(VERSION_HEADER, "")))
                else:
                    self.errors += 1
            except httpx.HTTPError:
                self.errors += 1
                await asyncio.sleep(0.01)

    async def admin(self, client: httpx.AsyncClient) -> None:
        last = None
        while not self.stop:
            t = time.perf_counter()
            try:
                raw = (await client.get(f"{self.admin_url}/config_dump?resource=dynamic_route_configs")).json()
                versions = sorted(c.get("version_info", "") for c in raw.get("configs", []))
                version = versions[0] if versions else ""
                if version != last:
                    self.routes.append((t, version))
                    last = version
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(0.002)


def _spec_and_fleet(workdir: Path) -> tuple[Path, Path]:
    from imesh.ports import free_ports

    ports = free_ports(4)
    replicas = [
        ("chat-v1-a", "v1", ports[0]),
        ("chat-v1-b", "v1", ports[1]),
        ("chat-v2-a", "v2", ports[2]),
        ("chat-v2-b", "v2", ports[3]),
    ]
    fleet = {
        "seed": 7,
        "time_scale": 0.01,
        "replicas": [
            {"name": n, "address": f"127.0.0.1:{p}", "models": [MODEL], "gpu": "h100"} for n, _, p in replicas
        ],
    }
    pools = [{"name": "fast", "tier": "low-latency", "locality": {"region": "r1", "zone": "a"}}]
    versions = [
        {
            "name": v,
            "weight": 100 if v == "v1" else 0,
            "context_window": 4096,
            "endpoints": [{"address": f"127.0.0.1:{p}", "pool": "fast"} for _, vv, p in replicas if vv == v],
        }
        for v in ("v1", "v2")
    ]
    spec = {"apiVersion": "imesh/v1", "kind": "Mesh", "pools": pools, "models": [{"name": MODEL, "versions": versions}]}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(fleet))
    (workdir / "mesh.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return workdir / "mesh.yaml", workdir / "fleet.yaml"


async def measure(api: str, changes: int, workdir: Path) -> dict:
    from imesh.client import MeshClient
    from imesh.local_mesh import LocalMesh
    from imesh.ports import MeshPorts

    spec, fleet = _spec_and_fleet(workdir)
    mesh = LocalMesh(spec=spec, workdir=workdir, ports=MeshPorts.ephemeral(), fleet_config=fleet, xds_api=api)
    await asyncio.to_thread(mesh.start, 90.0)
    observer = Observer(mesh.url, mesh.admin_url)
    results: list[Change] = []
    try:
        await asyncio.to_thread(mesh.wait_for_completion, MODEL, 30.0)
        client = MeshClient(mesh.control_plane_address, timeout_s=30.0)
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(timeout=10.0, limits=limits) as http:
            tasks = [asyncio.create_task(observer.traffic(http)) for _ in range(2)]
            tasks.append(asyncio.create_task(observer.admin(http)))
            await asyncio.sleep(1.0)
            for i in range(changes):
                percent = 100.0 if i % 2 == 0 else 0.0
                sent = time.perf_counter()
                reply = await asyncio.to_thread(client.set_canary, MODEL, "v2", percent)
                returned = time.perf_counter()
                results.append(Change(percent, sent, returned, int(reply.config_version)))
                await asyncio.sleep(0.35)  # let traffic show it, and stay clear of the debounce window
            await asyncio.sleep(0.3)
            observer.stop = True
            await asyncio.gather(*tasks, return_exceptions=True)
        client.close()
    finally:
        await asyncio.to_thread(mesh.stop)
    _attribute(results, observer)
    return {
        "api": api,
        "changes": [c.__dict__ for c in results],
        "requests": len(observer.responses),
        "errors": observer.errors,
    }


def _attribute(results: list[Change], observer: Observer) -> None:
    """When did admin and traffic first show each change (before the next change started)?"""
    for i, change in enumerate(results):
        end = results[i + 1].sent if i + 1 < len(results) else float("inf")
        want = "v2" if change.percent == 100.0 else "v1"
        for t, version in observer.routes:
            if t >= change.sent - 0.5 and version.split("-", 1)[0] == str(change.config_version):
                change.admin = t
                break
        window = [(t, v) for t, v in observer.responses if change.sent <= t < end]
        for j, (t, v) in enumerate(window):
            if v == want:
                change.traffic = t
                change.stragglers = sum(1 for _, later in window[j + 1 :] if later != want)
                break


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _series(round_: dict) -> dict[str, list[float]]:
    changes = [c for c in round_["changes"] if c["admin"] is not None and c["traffic"] is not None]
    return {
        "call (RPC sent → returned)": [c["returned"] - c["sent"] for c in changes],
        "return → admin shows it": [max(0.0, c["admin"] - c["returned"]) for c in changes],
        "return → traffic on the new split": [max(0.0, c["traffic"] - c["returned"]) for c in changes],
        "change → traffic on the new split": [c["traffic"] - c["sent"] for c in changes],
    }


def run(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("IMESH_BENCH_WORKDIR", "/tmp")) / f"imesh-bench-convergence-{uuid.uuid4().hex[:6]}"
    changes = 24 if QUICK else 60
    rounds = {api: asyncio.run(measure(api, changes, workdir / api)) for api in ("delta", "sotw")}
    (workdir / "convergence_results.json").write_text(json.dumps(rounds, indent=1))
    return render(out_dir, rounds)


def render(out_dir: Path, rounds: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    series = {api: _series(r) for api, r in rounds.items()}
    labels = {"delta": "delta", "sotw": "State-of-the-World"}
    fig, ax = plt.subplots(figsize=(9, 3.8))
    keys = list(next(iter(series.values())))
    width = 0.38
    for k, api in enumerate(series):
        data = [[v * 1e3 for v in series[api][key]] for key in keys]
        positions = [i + (k - 0.5) * width for i in range(len(keys))]
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, whis=(0, 100), patch_artist=True)
        for patch in box["boxes"]:
            patch.set_facecolor("tab:blue" if api == "delta" else "tab:orange")
        ax.plot([], [], color="tab:blue" if api == "delta" else "tab:orange", linewidth=8, label=labels[api])
    ax.axhline(TARGET_P99_S * 1e3, color="red", linestyle="--", linewidth=1, label="issue #3 target: p99 150 ms")
    ax.set_xticks(range(len(keys)), [k.replace(" → ", " →\n") for k in keys], fontsize=8)
    ax.set_ylabel("milliseconds")
    ax.set_title(f"`imesh canary set`: {len(rounds['delta']['changes'])} changes per Envoy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "convergence.png", dpi=110)
    plt.close(fig)

    delta = series["delta"]
    ret_traffic = delta["return → traffic on the new split"]
    ret_admin = delta["return → admin shows it"]
    ok = _pct(ret_traffic, 99) <= TARGET_P99_S and _pct(ret_admin, 99) <= TARGET_P99_S
    lines = [
        f"Mesh: model `{MODEL}`, v1 and v2 on two simulated replicas each; fleet, control plane, ext_proc and "
        f"Envoy as separate processes on loopback. Each change is `SetCanary(chat, v2, 100|0)` (what "
        f"`imesh canary set` sends); traffic (2 concurrent clients) runs through Envoy all along.",
        "",
        f"**Target (issue #3): p99 from `canary set` returning to Envoy serving the new split <= 150 ms: "
        f"{'met' if ok else 'missed'}** (delta: admin p99 {_pct(ret_admin, 99) * 1e3:.1f} ms, traffic p99 "
        f"{_pct(ret_traffic, 99) * 1e3:.1f} ms).",
        "",
        "| milliseconds | delta p50 | delta p99 | SotW p50 | SotW p99 |",
        "|---|---|---|---|---|",
    ]
    for key in keys:
        d, s = series["delta"][key], series["sotw"][key]
        lines.append(
            f"| {key} | {_pct(d, 50) * 1e3:.1f} | {_pct(d, 99) * 1e3:.1f} | "
            f"{_pct(s, 50) * 1e3:.1f} | {_pct(s, 99) * 1e3:.1f} |"
        )
    for api, r in rounds.items():
        seen = sum(1 for c in r["changes"] if c["admin"] is not None and c["traffic"] is not None)
        stragglers = sum(c["stragglers"] for c in r["changes"])
        lines.append("")
        lines.append(
            f"{labels[api]}: {seen} of {len(r['changes'])} changes observed on admin and in traffic; "
            f"{r['requests']} requests, {r['errors']} errors, {stragglers} requests served by the old "
            f"version after the new one was first seen."
        )
    lines += [
        "",
        "The call itself returns once every connected Envoy has ACKed the new config version "
        "(`ControlPlane._envoy_outcome`), so return → serving is what is left after the ACK: Envoy's "
        "workers picking up the new route table. The call's own time is the build, the push, Envoy's "
        "ACK and the control plane's bookkeeping after it (the state file, the ext_proc routing table); "
        "a change within `debounce_s` (100 ms) of the previous build also waits for the window (docs/xds.md).",
        "",
        "![convergence](convergence.png)",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--render":
        print(render(Path("bench/results"), json.loads(Path(sys.argv[2]).read_text())))
    else:
        print(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("bench/results")))
