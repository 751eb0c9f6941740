"""`imesh apply -f FILE [--dry-run]`: validate a spec, show the diff, apply it live."""

from __future__ import annotations

from pathlib import Path

import click

from imesh.context import Context, mesh_options
from imesh.output import echo, render_document


@click.command()
@click.option("-f", "--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--dry-run", is_flag=True, help="Validate and show the diff; change nothing.")
@mesh_options
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
