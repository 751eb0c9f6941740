"""`imesh up`: the whole mesh on this machine, in the foreground, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from imesh.client import default_server
from imesh.ports import MeshPorts

# How long in-flight requests get to finish after Ctrl-C or SIGTERM, before the processes stop.
DRAIN_WINDOW_S = 30.0

if TYPE_CHECKING:
    from imesh.local_mesh import LocalMesh

DEFAULT_PORTS, EPHEMERAL_PORTS = "default", "ephemeral"
DEMO_MODEL = "llama-3-8b"  # the demo's chat model: `up --demo` waits for one completion of it

F = TypeVar("F", bound=Callable[..., Any])


def _port_options(command: F) -> F:
    """``--listener-port``, ``--admin-port``, ...: one option per MeshPorts port, each None unless given."""
    defaults = MeshPorts()
    for name in reversed(MeshPorts.port_names()):
        command = click.option(
            f"--{name.replace('_', '-')}-port",
            f"{name}_port",
            type=click.IntRange(1, 65535),
            help=f"[default: {getattr(defaults, name)}, or a free one with --ports {EPHEMERAL_PORTS}]",
        )(command)
    return command


@click.command()
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
@click.option(
    "--ports",
    "ports_mode",
    type=click.Choice([DEFAULT_PORTS, EPHEMERAL_PORTS]),
    default=DEFAULT_PORTS,
    show_default=True,
    help=f"{EPHEMERAL_PORTS}: free ports for the mesh and, with --demo, for its fleet too (a demo that starts"
    " from the demo spec each time, in WORKDIR/demo-ephemeral), so it runs beside another mesh."
    " The --*-port options still win.",
)
@_port_options
@click.option(
    "--envoy-concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Envoy worker threads."
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=DRAIN_WINDOW_S,
    show_default=True,
    help="seconds in-flight requests get to finish after Ctrl-C or SIGTERM (0: stop at once).",
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
    drain_timeout: float,
    spec: Path | None,
    workdir: Path,
    ports_mode: str,
    envoy_concurrency: int,
    extproc_workers: int,
    **port_options: int | None,
) -> None:
    """Run the whole mesh on this machine until Ctrl-C."""
    # Imported here: the process machinery (and its HTTP client) is not needed for `imesh --help`.
    from imesh.local_mesh import DEMO_FLEET, DEMO_SPEC, LocalMesh, demo_on_free_ports
    from imesh.processes import StartupError

    if not demo and spec is None:
        raise click.UsageError("give a spec with -f FILE, or --demo for the simulated fleet")
    ephemeral = ports_mode == EPHEMERAL_PORTS
    mesh = LocalMesh(
        spec=spec or DEMO_SPEC,
        workdir=workdir / ("mesh" if not demo else "demo-ephemeral" if ephemeral else "demo"),
        ports=choose_ports(ephemeral, port_options),
        fleet_config=DEMO_FLEET if demo else None,
        envoy_concurrency=envoy_concurrency,
        extproc_workers=extproc_workers,
    )
    if demo and ephemeral:
        # The fleet's addresses are new each run, so the last run's state would point at the old ones.
        shutil.rmtree(mesh.state_dir, ignore_errors=True)
        mesh.spec, mesh.fleet_config = demo_on_free_ports(mesh.workdir)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run the `finally` below on SIGTERM too
    try:
        click.echo("starting the mesh..." + (" (demo fleet)" if demo else ""))
        mesh.start()
        if demo:
            mesh.wait_for_completion(DEMO_MODEL)
        click.echo(welcome(mesh, demo))
        signal.pause()
    except StartupError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    finally:
        _drain_then_stop(mesh, drain_timeout)


def _drain_then_stop(mesh: LocalMesh, drain_timeout: float) -> None:
    """New requests are refused at once; those in flight get `drain_timeout` to finish. A second
    Ctrl-C or SIGTERM cuts the wait short; the processes are stopped either way."""
    try:
        if drain_timeout > 0:
            click.echo(
                f"draining: no new requests; up to {drain_timeout:g}s for those in flight (Ctrl-C again: stop now)"
            )
            left = mesh.drain(drain_timeout)
            if left:
                click.echo(f"{left} request(s) still in flight after {drain_timeout:g}s; stopping anyway", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping...")
        mesh.stop()


def choose_ports(ephemeral: bool, port_options: dict[str, int | None]) -> MeshPorts:
    """MeshPorts from the ``--*-port`` options given (keyed ``<port name>_port``); the rest are the
    defaults, or free ports when `ephemeral`."""
    given = {name: port for name in MeshPorts.port_names() if (port := port_options.get(f"{name}_port")) is not None}
    if ephemeral:
        return MeshPorts.ephemeral(**given)
    return MeshPorts().with_ports(given)


def welcome(mesh: LocalMesh, demo: bool) -> str:
    model = DEMO_MODEL if demo else "<model>"
    server = "" if mesh.control_plane_address == default_server() else f" --server {mesh.control_plane_address}"
    return f"""
inference-mesh is up.
  OpenAI / KServe endpoint  {mesh.url}
  Envoy admin               {mesh.admin_url}
  control plane (gRPC)      {mesh.control_plane_address}
  logs                      {mesh.workdir / "logs"}

Try:
  curl -s {mesh.url}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}' -i

  imesh status{server}
Ctrl-C stops everything."""
