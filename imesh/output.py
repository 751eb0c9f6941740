"""Human tables by default, `-o json|yaml` for scripts: the same rows either way."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click
import yaml

FORMATS = ("table", "json", "yaml")


def render(rows: Sequence[dict], fmt: str = "table", columns: Sequence[str] | None = None) -> str:
    if fmt == "json":
        return json.dumps(list(rows), indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(list(rows), sort_keys=False).rstrip()
    return table(rows, columns)


def render_document(document: dict, fmt: str) -> str | None:
    """A single structured document for json/yaml; None tells the caller to print its own table."""
    if fmt == "json":
        return json.dumps(document, indent=2)
    if fmt == "yaml":
        return yaml.safe_dump(document, sort_keys=False).rstrip()
    return None


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    return str(value)


def echo(text: str) -> None:
    click.echo(text)
