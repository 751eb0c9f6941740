"""`imesh describe model NAME`: one model's versions, weights, endpoints with live load, A/B options
and canary, gathered from the mesh API in one place."""

from __future__ import annotations

import click

from imesh import views
from imesh.client import MeshError
from imesh.commands.canary import _as_dict, describe_canary
from imesh.context import Context, mesh_options
from imesh.output import echo, render_document, table


@click.group()
def describe() -> None:
    """Show one object in detail."""


@describe.command()
@click.argument("name")
@mesh_options
@click.pass_obj
def model(obj: Context, name: str) -> None:
    """Versions, weights, endpoints with live load, A/B options and the canary of model NAME."""
    with obj.client() as client:
        status = client.status()
        entry = next((m for m in status.table.models if m.name == name), None)
        if entry is None:
            known = ", ".join(m.name for m in status.table.models) or "none"
            raise MeshError(f"unknown model {name!r} (models: {known})")
        canaries = client.canary_status(name).canaries
        routes = client.routes().routes
    versions = [r for r in views.version_rows(status)[0] if r["model"] == name]
    endpoints = [r for r in views.endpoint_rows(status)[0] if r["model"] == name]
    sticky = next((r.sticky_header for r in routes if r.name == name), "")
    ab = {
        "sticky_header": sticky or None,
        "allow_version_override": entry.allow_version_override,
        "version_header": status.table.version_header if entry.allow_version_override else None,
    }
    document = {
        "model": name,
        "config_version": status.config_version,
        "versions": versions,
        "endpoints": endpoints,
        "ab": ab,
        "canary": _as_dict(canaries[0]) if canaries else None,
    }
    text = render_document(document, obj.output)
    if text is not None:
        echo(text)
        return
    forced = f"allowed with header {ab['version_header']}" if ab["allow_version_override"] else "not allowed"
    sections = [
        f"model {name} (config version {status.config_version})",
        "VERSIONS\n" + table(versions, ["version", "weight", "percent", "engine", "context_window", "endpoints"]),
        "ENDPOINTS\n"
        + table(endpoints, ["address", "version", "pool", "state", "waiting", "running", "kv_cache", "age_s"]),
        f"A/B\n  sticky sessions  {('header ' + sticky) if sticky else 'off'}\n  forced version   {forced}",
        "CANARY\n" + (describe_canary(canaries[0]) if canaries else "  none"),
    ]
    echo("\n\n".join(sections))
