"""`imesh`: run the mesh locally and operate a running one through the control plane's API."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from imesh import views
from imesh.client import SERVER_ENV, MeshClient, MeshError, default_server
from imesh.output import FORMATS, echo, render, render_document


class Context:
    def __init__(self, server: str, output: str):
        self.server = server
        self.output = output

    def client(self) -> MeshClient:
        return MeshClient(self.server)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    default=default_server,
    show_default=f"${SERVER_ENV} or 127.0.0.1:18000",
    help="Control plane gRPC address.",
)
@click.option("-o", "--output", type=click.Choice(FORMATS), default="table", help="Output format.")
@click.pass_context
def cli(ctx: click.Context, server: str, output: str) -> None:
    """inference-mesh: model-, priority- and load-aware routing for GPU fleets, on Envoy."""
    ctx.obj = Context(server, output)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except MeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


# ---------------------------------------------------------------- up


@cli.command()
@click.option("--demo", is_flag=True, help="Serve the demo spec on a simulated GPU fleet.")
@click.option(
    "-f",
    "--file",
    "spec",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Mesh spec to serve (used when the state directory holds no state yet).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".imesh"),
    show_default=True,
    help="State, logs and rendered Envoy config.",
)
@click.option("--listener-port", type=int, default=8080, show_default=True)
@click.option("--admin-port", type=int, default=9901, show_default=True)
@click.option("--control-plane-port", type=int, default=18000, show_default=True)
@click.option("--extproc-port", type=int, default=18001, show_default=True)
@click.option("--control-plane-metrics-port", type=int, default=9090, show_default=True)
@click.option("--extproc-metrics-port", type=int, default=9091, show_default=True)
@click.option(
    "--envoy-concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Envoy worker threads."
)
@click.option(
    "--extproc-workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="ext_proc processes (one core each).",
)
def up(
    demo: bool,
    spec: Path | None,
    workdir: Path,
    listener_port: int,
    admin_port: int,
    control_plane_port: int,
    extproc_port: int,
    control_plane_metrics_port: int,
    extproc_metrics_port: int,
    envoy_concurrency: int,
    extproc_workers: int,
) -> None:
    """Run the whole mesh on this machine until Ctrl-C."""
    from imesh.local_mesh import DEMO_FLEET, DEMO_SPEC, LocalMesh, MeshPorts
    from imesh.processes import StartupError

    if not demo and spec is None:
        raise click.UsageError("give a spec with -f FILE, or --demo for the simulated fleet")
    ports = MeshPorts(
        listener=listener_port,
        admin=admin_port,
        control_plane=control_plane_port,
        control_plane_metrics=control_plane_metrics_port,
        extproc=extproc_port,
        extproc_metrics=extproc_metrics_port,
    )
    mesh = LocalMesh(
        spec=spec or DEMO_SPEC,
        workdir=workdir / ("demo" if demo else "mesh"),
        ports=ports,
        fleet_config=DEMO_FLEET if demo else None,
        envoy_concurrency=envoy_concurrency,
        extproc_workers=extproc_workers,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the `finally` below on SIGTERM too
    try:
        click.echo("starting the mesh..." + (" (demo fleet)" if demo else ""))
        mesh.start()
        if demo:
            mesh.wait_for_completion("llama-3-8b")
        _print_welcome(mesh, demo)
        signal.pause()
    except StartupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping...")
        mesh.stop()


def _print_welcome(mesh, demo: bool) -> None:
    model = "llama-3-8b" if demo else "<model>"
    click.echo(f"""
inference-mesh is up.
  OpenAI / KServe endpoint  {mesh.url}
  Envoy admin               {mesh.admin_url}
  control plane (gRPC)      {mesh.control_plane_address}
  logs                      {mesh.workdir / "logs"}

Try:
  curl -s {mesh.url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}' -i

  imesh status
Ctrl-C stops everything.""")


# ---------------------------------------------------------------- apply / get / status


@cli.command()
@click.option("-f", "--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--dry-run", is_flag=True, help="Validate and show the diff; change nothing.")
@click.pass_obj
def apply(obj: Context, path: Path, dry_run: bool) -> None:
    """Validate a mesh spec, show what changes, and apply it."""
    with obj.client() as client:
        result = client.apply(path.read_text(), str(path), dry_run)
    document = {
        "changed": result.changed,
        "diff": list(result.diff),
        "config_version": result.config_version,
        "dry_run": dry_run,
    }
    text = render_document(document, obj.output)
    if text is not None:
        echo(text)
        return
    for line in result.diff:
        echo(line)
    if not result.changed:
        echo("no changes")
    elif dry_run:
        echo("(dry run: nothing applied)")
    else:
        echo(f"applied: config version {result.config_version}")


@cli.command()
@click.argument("kind", type=click.Choice(sorted([*views.GETTERS, "routes"])))
@click.pass_obj
def get(obj: Context, kind: str) -> None:
    """List models, versions, pools, endpoints or routes (Envoy's, in match order)."""
    with obj.client() as client:
        if kind == "routes":
            rows, columns = views.route_rows(client.routes())
        else:
            rows, columns = views.GETTERS[kind](client.status())
    echo(render(rows, obj.output, columns))


@cli.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Config version, each Envoy's sync state, models and endpoints with live load."""
    with obj.client() as client:
        mesh_status = client.status()
    text = render_document(views.status_document(mesh_status), obj.output)
    echo(text if text is not None else views.status_text(mesh_status))


# ---------------------------------------------------------------- canary, endpoint, describe, completion
# Groups that grew their own modules (imesh/commands/), registered here so `imesh --help` lists them.

from imesh.commands.canary import canary as _canary  # noqa: E402
from imesh.commands.completion import completion as _completion  # noqa: E402
from imesh.commands.describe import describe as _describe  # noqa: E402
from imesh.commands.endpoint import endpoint as _endpoint  # noqa: E402
from imesh.commands.top import top as _top  # noqa: E402

for _command in (_canary, _endpoint, _describe, _completion, _top):
    cli.add_command(_command)
