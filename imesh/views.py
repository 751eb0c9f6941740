"""Rows the CLI shows, derived from one MeshStatus so every view agrees with the others."""

from __future__ import annotations

from collections.abc import Callable

from imesh.output import table
from protos import mesh_pb2

Rows = tuple[list[dict], list[str]]


def _percent(weight: int, total: int) -> float:
    return round(100.0 * weight / total, 1) if total else 0.0


# ---------------------------------------------------------------- traffic (from Envoy's access log)

TRAFFIC_COLUMNS = ["rps", "p50_ms", "p99_ms", "errors"]


def _ms(seconds: float) -> float | None:
    return round(seconds * 1e3, 1) if seconds else None


def _traffic_cells(stats: mesh_pb2.TrafficStats | None, shed: bool = False) -> dict:
    """Request rate, latency and errors over the control plane's window; zeros when no traffic."""
    if stats is None:
        cells = {"rps": 0.0, "p50_ms": None, "p99_ms": None, "errors": 0}
    else:
        cells = {
            "rps": round(stats.rate_rps, 2),
            "p50_ms": _ms(stats.p50_s),
            "p99_ms": _ms(stats.p99_s),
            "errors": stats.errors,
        }
    if shed:
        cells["shed"] = stats.shed if stats is not None else 0
    return cells


def traffic_by_endpoint(status: mesh_pb2.MeshStatus) -> dict[str, mesh_pb2.TrafficStats]:
    return {t.endpoint: t for t in status.endpoint_traffic}


def traffic_by_version(status: mesh_pb2.MeshStatus) -> dict[tuple[str, str], mesh_pb2.TrafficStats]:
    return {(t.model, t.version): t for t in status.version_traffic}


def traffic_by_model(status: mesh_pb2.MeshStatus) -> dict[str, mesh_pb2.TrafficStats]:
    return {t.model: t for t in status.model_traffic}


def traffic_version_rows(status: mesh_pb2.MeshStatus) -> Rows:
    """Per model, a row for the whole model then one per version: weight share and live traffic."""
    by_version, by_model = traffic_by_version(status), traffic_by_model(status)
    rows = []
    for m in status.table.models:
        total = sum(v.weight for v in m.versions)
        rows.append(
            {
                "model": m.name,
                "version": "*",
                "percent": 100.0 if total else 0.0,
                "endpoints": sum(len(v.endpoints) for v in m.versions),
                **_traffic_cells(by_model.get(m.name), shed=True),
            }
        )
        for v in m.versions:
            rows.append(
                {
                    "model": m.name,
                    "version": v.name,
                    "percent": _percent(v.weight, total),
                    "endpoints": len(v.endpoints),
                    **_traffic_cells(by_version.get((m.name, v.name)), shed=True),
                }
            )
    return rows, ["model", "version", "percent", "endpoints", *TRAFFIC_COLUMNS, "shed"]


def model_rows(status: mesh_pb2.MeshStatus) -> Rows:
    rows = []
    for m in status.table.models:
        total = sum(v.weight for v in m.versions)
        rows.append(
            {
                "model": m.name,
                "versions": [f"{v.name}={_percent(v.weight, total):g}%" for v in m.versions],
                "endpoints": sum(len(v.endpoints) for v in m.versions),
            }
        )
    return rows, ["model", "versions", "endpoints"]


def version_rows(status: mesh_pb2.MeshStatus) -> Rows:
    rows = []
    for m in status.table.models:
        total = sum(v.weight for v in m.versions)
        for v in m.versions:
            rows.append(
                {
                    "model": m.name,
                    "version": v.name,
                    "weight": v.weight,
                    "percent": _percent(v.weight, total),
                    "engine": v.engine,
                    "context_window": v.context_window,
                    "endpoints": len(v.endpoints),
                }
            )
    return rows, ["model", "version", "weight", "percent", "engine", "context_window", "endpoints"]


def pool_rows(status: mesh_pb2.MeshStatus) -> Rows:
    pools: dict[str, dict] = {}
    for m in status.table.models:
        for v in m.versions:
            for e in v.endpoints:
                row = pools.setdefault(
                    e.pool,
                    {
                        "pool": e.pool,
                        "tier": e.tier,
                        "cost_per_hour": e.cost_per_hour,
                        "region": e.region,
                        "zone": e.zone,
                        "endpoints": 0,
                    },
                )
                row["endpoints"] += 1
    return list(pools.values()), ["pool", "tier", "cost_per_hour", "region", "zone", "endpoints"]


def endpoint_rows(status: mesh_pb2.MeshStatus) -> Rows:
    load = {e.address: e for e in status.load.endpoints}
    traffic = traffic_by_endpoint(status)
    rows = []
    for m in status.table.models:
        for v in m.versions:
            for e in v.endpoints:
                reading = load.get(e.address)
                rows.append(
                    {
                        "address": e.address,
                        "model": m.name,
                        "version": v.name,
                        "pool": e.pool,
                        "state": _endpoint_state(e, reading),
                        "waiting": reading.waiting if reading else None,
                        "running": reading.running if reading else None,
                        "kv_cache": f"{reading.kv_cache:.0%}" if reading else None,
                        "age_s": round(reading.age_s, 2) if reading else None,
                        **_traffic_cells(traffic.get(e.address)),
                    }
                )
    return rows, [
        "address",
        "model",
        "version",
        "pool",
        "state",
        "waiting",
        "running",
        "kv_cache",
        "age_s",
        *TRAFFIC_COLUMNS,
    ]


def _endpoint_state(endpoint: mesh_pb2.Endpoint, reading: mesh_pb2.EndpointLoad | None) -> str:
    if endpoint.drained:
        return "drained"
    if reading is None:
        return "unknown"
    if not reading.reachable:
        return "unreachable"
    if reading.ejected:
        return "ejected"
    return "not ready" if reading.not_ready else "ready"


GETTERS: dict[str, Callable[[mesh_pb2.MeshStatus], Rows]] = {
    "models": model_rows,
    "versions": version_rows,
    "pools": pool_rows,
    "endpoints": endpoint_rows,
}


def node_rows(status: mesh_pb2.MeshStatus) -> Rows:
    rows = [
        {
            "envoy": n.node_id,
            "connected": "yes" if n.connected else "no",
            "acked_version": n.acked_version,
            "synced": "yes" if n.acked_version == str(status.config_version) else "no",
            "last_nack": f"v{n.last_nack_version} {n.last_nack_type.rsplit('.', 1)[-1]}: {n.last_nack_message}"
            if n.last_nack_message
            else None,
        }
        for n in status.nodes
    ]
    return rows, ["envoy", "connected", "acked_version", "synced", "last_nack"]


def status_document(status: mesh_pb2.MeshStatus) -> dict:
    return {
        "config_version": status.config_version,
        "envoys": node_rows(status)[0],
        "models": version_rows(status)[0],
        "endpoints": endpoint_rows(status)[0],
        "traffic": {"window_s": status.traffic_window_s, "models": traffic_version_rows(status)[0]},
    }


def status_text(status: mesh_pb2.MeshStatus) -> str:
    sections = [
        f"config version {status.config_version}",
        "ENVOYS\n" + table(*node_rows(status)),
        f"MODELS (traffic over the last {status.traffic_window_s:g}s)\n" + table(*traffic_version_rows(status)),
        "ENDPOINTS\n" + table(*endpoint_rows(status)),
    ]
    return "\n\n".join(sections)


def route_rows(routes: mesh_pb2.RoutesResponse) -> Rows:
    """Envoy's routes in match order: what the control plane pushes over RDS right now."""
    rows = [
        {"route": r.name, "match": r.match, "destination": r.destination, "sticky": r.sticky_header or None}
        for r in routes.routes
    ]
    return rows, ["route", "match", "destination", "sticky"]
