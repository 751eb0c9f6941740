"""`imesh completion bash|zsh|fish`: print the shell completion script (click's own).

Equivalent to ``_IMESH_COMPLETE=bash_source imesh``; install with e.g.
``imesh completion bash > ~/.local/share/bash-completion/completions/imesh``
or ``eval "$(imesh completion zsh)"`` in ~/.zshrc.
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


@click.command()
@click.argument("shell", type=click.Choice(SHELLS))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish)."""
    completion_class = get_completion_class(shell)
    if completion_class is None:  # SHELLS lists only shells click has a class for
        raise click.BadParameter(f"no completion for {shell}", param_hint="SHELL")
    completer = completion_class(ctx.find_root().command, {}, "imesh", "_IMESH_COMPLETE")
    click.echo(completer.source())
