"""`imesh get KIND`: what the mesh serves, as rows, or the spec it serves, as YAML."""

from __future__ import annotations

import click
import yaml

from imesh import views
from imesh.client import MeshClient
from imesh.context import Context, mesh_options
from imesh.output import echo, render, render_document
from protos import mesh_pb2

ROUTES, SPEC = "routes", "spec"
KINDS = sorted([*views.GETTERS, ROUTES, SPEC])


@click.command()
@click.argument("kind", type=click.Choice(KINDS))
@mesh_options
@click.pass_obj
def get(obj: Context, kind: str) -> None:
    """List models, versions, pools, endpoints or routes, or print the spec.

    \b
    models, versions, pools, endpoints   from the live status, with load
    routes                               Envoy's routes, in match order, with the live split
    spec                                 the spec being served, as YAML (its config version
                                         on stderr, so stdout can be applied as it is);
                                         -o json|yaml: {config_version, spec}
    """
    with obj.client() as client:
        if kind == SPEC:
            show_spec(client.spec(), obj.output)
        else:
            rows, columns = _rows(client, kind)
            echo(render(rows, obj.output, columns))


def _rows(client: MeshClient, kind: str) -> views.Rows:
    if kind == ROUTES:
        return views.route_rows(client.routes())
    return views.GETTERS[kind](client.status())


def show_spec(document: mesh_pb2.SpecDocument, output: str) -> None:
    structured = {"config_version": document.config_version, "spec": yaml.safe_load(document.spec_yaml)}
    text = render_document(structured, output)
    if text is not None:
        echo(text)
        return
    click.echo(document.spec_yaml, nl=not document.spec_yaml.endswith("\n"))
    click.echo(f"config version {document.config_version}", err=True)
