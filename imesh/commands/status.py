"""`imesh status`: config version, Envoy sync state, models and endpoints with live load."""

from __future__ import annotations

import click

from imesh import views
from imesh.context import Context, mesh_options
from imesh.output import echo, render_document


@click.command()
@mesh_options
@click.pass_obj
def status(obj: Context) -> None:
    """Config version, each Envoy's sync state, models and endpoints with live load."""
    with obj.client() as client:
        mesh_status = client.status()
    text = render_document(views.status_document(mesh_status), obj.output)
    echo(text if text is not None else views.status_text(mesh_status))
