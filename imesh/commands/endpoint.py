"""`imesh endpoint drain|undrain ADDR`: take one replica out of rotation live, and put it back."""

from __future__ import annotations

import click

from imesh.context import Context, mesh_options
from imesh.output import echo, render_document


@click.group()
def endpoint() -> None:
    """Drain or undrain one replica (by its ip:port)."""


@endpoint.command()
@click.argument("address")
@mesh_options
@click.pass_obj
def drain(obj: Context, address: str) -> None:
    """No new requests go to ADDRESS; requests already on it finish."""
    _set(obj, address, True)


@endpoint.command()
@click.argument("address")
@mesh_options
@click.pass_obj
def undrain(obj: Context, address: str) -> None:
    """ADDRESS takes new requests again."""
    _set(obj, address, False)


def _set(obj: Context, address: str, drained: bool) -> None:
    with obj.client() as client:
        result = client.set_drain(address, drained)
    document = {
        "address": address,
        "drained": drained,
        "changed": result.changed,
        "model": result.model,
        "version": result.version,
        "config_version": result.config_version,
    }
    text = render_document(document, obj.output)
    if text is not None:
        echo(text)
        return
    state = "drained" if drained else "undrained"
    if result.changed:
        echo(f"{address} ({result.model}/{result.version}) {state}: config version {result.config_version}")
    else:
        echo(f"{address} ({result.model}/{result.version}) was already {state}")
