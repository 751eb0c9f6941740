"""What every `imesh` command shares: the control plane it talks to and the output format.

Both are options of the root group (``imesh -o json get models``) and, through `mesh_options`, of
each command that talks to the control plane (``imesh get models -o json``), as kubectl's global
flags are. Given in both places, the one after the subcommand wins: its callback runs after the
root group's and overrides what the root set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from imesh.client import DEFAULT_SERVER, SERVER_ENV, MeshClient, default_server
from imesh.output import FORMATS

DEFAULT_OUTPUT = "table"
SERVER_HELP = "Control plane gRPC address."
OUTPUT_HELP = "Output format."
SERVER_DEFAULT_TEXT = f"${SERVER_ENV} or {DEFAULT_SERVER}"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Context:
    server: str = field(default_factory=default_server)
    output: str = DEFAULT_OUTPUT

    def client(self) -> MeshClient:
        return MeshClient(self.server)


def _server_option(**settings: Any) -> Callable[[F], F]:
    return click.option("--server", metavar="HOST:PORT", **settings)


def _output_option(**settings: Any) -> Callable[[F], F]:
    return click.option("-o", "--output", type=click.Choice(FORMATS), **settings)


def root_options(command: F) -> F:
    """`--server` and `-o` on the root group, with their defaults: they become the Context."""
    command = _output_option(default=DEFAULT_OUTPUT, show_default=True, help=OUTPUT_HELP)(command)
    return _server_option(default=default_server, show_default=SERVER_DEFAULT_TEXT, help=SERVER_HELP)(command)


def mesh_options(command: F) -> F:
    """`--server` and `-o` after the subcommand too; each overrides the root's only when given."""
    command = _output_option(
        default=None,
        expose_value=False,
        callback=_override,
        help=f"{OUTPUT_HELP}  [default: {DEFAULT_OUTPUT}]",
    )(command)
    return _server_option(
        default=None,
        expose_value=False,
        callback=_override,
        help=f"{SERVER_HELP}  [default: {SERVER_DEFAULT_TEXT}]",
    )(command)


def _override(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None and param.name is not None:
        setattr(ctx.ensure_object(Context), param.name, value)
