"""`imesh`: the root group. Global options, the shared Context, errors as exit codes, and the
commands, each family in its own module under imesh/commands/.

Exit codes: 0 done, 1 the mesh said no or cannot be reached (``error: ...`` on stderr), 2 a usage
error (click's own).
"""

from __future__ import annotations

from typing import IO, Any

import click

from imesh.client import MeshError
from imesh.commands.apply import apply
from imesh.commands.canary import canary
from imesh.commands.completion import completion
from imesh.commands.describe import describe
from imesh.commands.endpoint import endpoint
from imesh.commands.get import get
from imesh.commands.status import status
from imesh.commands.top import top
from imesh.commands.up import up
from imesh.context import Context, root_options


class MeshCommandError(click.ClickException):
    """A MeshError as click reports errors: ``error: ...`` on stderr, exit code 1."""

    exit_code = 1

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class MeshGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MeshError as exc:
            raise MeshCommandError(str(exc)) from exc


@click.group(name="imesh", cls=MeshGroup, context_settings={"help_option_names": ["-h", "--help"]})
@root_options
@click.pass_context
def cli(ctx: click.Context, server: str, output: str) -> None:
    """inference-mesh: model-, priority- and load-aware routing for GPU fleets, on Envoy.

    --server and -o work before the command and after it (the one after wins).
    """
    ctx.obj = Context(server, output)


for _command in (up, apply, get, describe, status, top, canary, endpoint, completion):
    cli.add_command(_command)


def main() -> None:
    cli()
