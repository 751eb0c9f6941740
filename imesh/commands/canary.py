"""`imesh canary set|start|promote|rollback|status`: canary weights live through xDS (docs/canary.md)."""

from __future__ import annotations

import datetime
import re

import click
from google.protobuf.json_format import MessageToDict

from imesh.context import Context, mesh_options
from imesh.output import echo, render_document
from protos import mesh_pb2

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``30s``, ``1.5m``, ``500ms``, ``2`` (seconds) -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (e.g. 30s, 2m, 500ms)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_percent(text: str) -> float:
    """``5``, ``5%``, ``0.5%`` -> 5.0, 5.0, 0.5 (a percentage, 0 to 100)."""
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage (e.g. 5 or 5%)") from None
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"{text!r} is not a percentage between 0 and 100")
    return value


class _Parsed(click.ParamType):
    def __init__(self, name: str, parse):
        self.name = name
        self._parse = parse

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


PERCENT = _Parsed("percent", parse_percent)
DURATION = _Parsed("duration", parse_duration)
STEPS = _Parsed("steps", lambda text: [parse_percent(s) for s in text.split(",") if s.strip()])


@click.group()
def canary() -> None:
    """Split a model's traffic between its versions: set, promote, roll back, or step it through gates."""


@canary.command("set")
@click.argument("model")
@click.argument("version")
@click.argument("percent", type=PERCENT)
@mesh_options
@click.pass_obj
def set_(obj: Context, model: str, version: str, percent: float) -> None:
    """Give VERSION PERCENT% of MODEL's traffic, live; the other versions share the rest as before.

    \b
    imesh canary set llama-3-8b v2 5      # 5% to v2, 95% to the others
    """
    with obj.client() as client:
        change = client.set_canary(model, version, percent)
    _show_change(obj, change, f"{model}: {version} at {percent:g}%")


@canary.command()
@click.argument("model")
@click.argument("version")
@click.option(
    "--steps",
    type=STEPS,
    default="5,25,50,100",
    show_default=True,
    help="Canary percentages, increasing; promotion follows the last.",
)
@click.option(
    "--interval",
    type=DURATION,
    default="30s",
    show_default=True,
    help="How long each step must pass its gates before the next.",
)
@click.option(
    "--max-error-rate",
    type=PERCENT,
    default="1%",
    show_default=True,
    help="Roll back when more of the canary's requests fail (5xx or upstream failure).",
)
@click.option(
    "--max-p99",
    type=DURATION,
    default="0",
    show_default=True,
    help="Roll back when the canary's p99 request duration exceeds this (0: no latency gate).",
)
@click.option(
    "--min-samples",
    type=click.IntRange(0),
    default=20,
    show_default=True,
    help="Canary requests a step needs before its gates are judged.",
)
@mesh_options
@click.pass_obj
def start(
    obj: Context,
    model: str,
    version: str,
    steps: list[float],
    interval: float,
    max_error_rate: float,
    max_p99: float,
    min_samples: int,
) -> None:
    """Progressive canary: step VERSION's share while its error rate and p99 stay inside the gates.

    It rolls back by itself when a gate fails, and says why (`imesh canary status`).

    \b
    imesh canary start llama-3-8b v2 --steps 5,25,50,100 --interval 30s --max-error-rate 1% --max-p99 2s
    """
    with obj.client() as client:
        change = client.start_canary(model, version, steps, interval, max_error_rate / 100.0, max_p99, min_samples)
    _show_change(obj, change, f"{model}: progressive canary of {version} started at {steps[0]:g}%")


@canary.command()
@click.argument("model")
@mesh_options
@click.pass_obj
def promote(obj: Context, model: str) -> None:
    """Make MODEL's canary version take 100% of the traffic."""
    with obj.client() as client:
        change = client.promote(model)
    _show_change(
        obj,
        change,
        f"{model}: {change.canary.version} promoted to 100% "
        f"(previous stable: {change.canary.previous_stable or 'none'})",
    )


@canary.command()
@click.argument("model")
@mesh_options
@click.pass_obj
def rollback(obj: Context, model: str) -> None:
    """Restore MODEL's weights from before its canary (also undoes a promotion)."""
    with obj.client() as client:
        change = client.rollback(model)
    _show_change(obj, change, f"{model}: rolled back; weights {_weights(change.canary.weights)}")


@canary.command()
@click.argument("model", required=False, default="")
@mesh_options
@click.pass_obj
def status(obj: Context, model: str) -> None:
    """Phase, step, gate readings and history of each canary (or MODEL's)."""
    with obj.client() as client:
        response = client.canary_status(model)
    document = {"canaries": [_as_dict(c) for c in response.canaries]}
    text = render_document(document, obj.output)
    if text is not None:
        echo(text)
        return
    if not response.canaries:
        echo("no canaries" + (f" for {model}" if model else ""))
        return
    echo("\n\n".join(describe_canary(c) for c in response.canaries))


# ---------------------------------------------------------------- rendering


def _show_change(obj: Context, change: mesh_pb2.CanaryChange, headline: str) -> None:
    text = render_document({"config_version": change.config_version, "canary": _as_dict(change.canary)}, obj.output)
    if text is not None:
        echo(text)
        return
    echo(f"{headline}\nweights: {_weights(change.canary.weights)}\nconfig version {change.config_version}")


def _as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _weights(weights) -> str:
    total = sum(weights.values())
    return ", ".join(f"{v} {100.0 * w / total:g}%" if total else f"{v} 0%" for v, w in sorted(weights.items()))


def _when(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


def describe_canary(c: mesh_pb2.CanaryState) -> str:
    """The human block `canary status` and `describe model` print for one canary."""
    lines = [f"{c.model}: canary {c.version}, {c.phase.replace('_', ' ')}, {c.percent:g}%"]
    if c.steps:
        lines[0] += (
            f", step {c.step + 1}/{len(c.steps)} of {','.join(f'{s:g}' for s in c.steps)} every {c.interval_s:g}s"
        )
    lines.append(f"  weights    {_weights(c.weights)}  (before the canary: {_weights(c.baseline_weights)})")
    if c.HasField("gates") and c.steps:
        g = c.gates
        p99 = f", p99 <= {g.max_p99_s:g}s" if g.max_p99_s > 0 else ""
        lines.append(
            f"  gates      error rate <= {g.max_error_rate:.2%}{p99}, at least {g.min_samples} requests per step"
        )
    for i, r in enumerate(c.readings):
        role = "canary" if i == 0 else "stable"
        p99 = f", p99 {r.p99_s:.3f}s" if r.samples else ""
        label = "readings" if i == 0 else ""
        lines.append(
            f"  {label:<10} {r.version} ({role}): {r.samples} requests, {r.errors} failed "
            f"({r.error_rate:.1%}){p99} over {r.window_s:.1f}s"
        )
    if c.waiting_for:
        lines.append(f"  waiting    {c.waiting_for}")
    if c.previous_stable:
        lines.append(f"  previous   {c.previous_stable}")
    if c.reason and c.phase == "rolled_back":
        lines.append(f"  reason     {c.reason}")
    if c.history:
        lines.append("  history")
        lines += [f"    {_when(e.at_unix_s)}  {e.message}" for e in c.history]
    return "\n".join(lines)
