"""The scheduler's plugins by name: what a spec's ``scheduling:`` section may name.

The catalogue is defined here, once. The ext_proc builds its profiles from it, and the control
plane's spec (controlplane/spec/schema.py) validates plugin names and parameters against it: the one
arrow from the control plane into extproc/. It points here rather than to a copy in protos/ because
a copy would make adding a plugin a two-place change that can drift. For that arrow to stay light,
this module imports only the standard library, and each entry names its plugin as
``"module:attribute"``, imported on first use: the control plane never loads scheduler code.

Adding a plugin: its own module under ``filters/`` or ``scorers/``, and one line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from extproc.scheduler.interfaces import Filter, Scorer


class Plugin(NamedTuple):
    """``target``: ``"module:attribute"`` (or, registered at run time, the factory itself), called
    as ``target(**params)`` for a filter and ``target(weight, **params)`` for a scorer.
    ``params``: the parameter names a spec may give it (values are strings)."""

    target: str | Callable[..., Any]
    params: tuple[str, ...] = ()


FILTERS: dict[str, Plugin] = {
    "drop-drained": Plugin("extproc.scheduler.filters.drained:DropDrained"),
    "prefer-tiers": Plugin("extproc.scheduler.filters.tiers:PreferTiers"),
    "prefer-fresh": Plugin("extproc.scheduler.filters.fresh:PreferFresh"),
    "count-saturation": Plugin("extproc.scheduler.filters.saturation:CountSaturation"),
    "drop-saturated": Plugin("extproc.scheduler.filters.saturation:DropSaturated"),
}

SCORERS: dict[str, Plugin] = {
    "queue": Plugin("extproc.scheduler.scorers.queue:QueueScorer"),
    "kv-cache": Plugin("extproc.scheduler.scorers.kv_cache:KVCacheScorer"),
    "inflight": Plugin("extproc.scheduler.scorers.inflight:InflightScorer"),
    "running": Plugin("extproc.scheduler.scorers.running:RunningScorer"),
    "latency": Plugin("extproc.scheduler.scorers.latency:LatencyScorer"),
    "ttft": Plugin("extproc.scheduler.scorers.ttft:TTFTScorer"),
    "gpu-util": Plugin("extproc.scheduler.scorers.gpu:GpuUtilScorer"),
    "prefix-affinity": Plugin(
        "extproc.scheduler.scorers.prefix_affinity:PrefixAffinityScorer",
        params=("block_chars", "max_blocks", "block_tokens", "ttl_s", "max_entries", "max_entries_per_replica"),
    ),
    "lora-affinity": Plugin("extproc.scheduler.scorers.lora_affinity:LoraAffinityScorer"),
}

# Today's filter chain, the default profile's: drained -> tier preference -> freshness -> (shed
# point) -> saturation. A spec's `scheduling.filters` defaults to it.
DEFAULT_FILTERS: tuple[str, ...] = (
    "drop-drained",
    "prefer-tiers",
    "prefer-fresh",
    "count-saturation",
    "drop-saturated",
)
# Every profile has these: a drained endpoint gets no new requests whatever the profile says.
REQUIRED_FILTERS: tuple[str, ...] = ("drop-drained",)


class UnknownPlugin(ValueError):
    """A name the registry does not have; the message lists the ones it has."""

    def __init__(self, kind: str, name: str, known: Mapping[str, Plugin]):
        self.kind, self.name = kind, name
        super().__init__(f"unknown {kind} type {name!r}; known: {sorted(known)}")


def filter_names() -> tuple[str, ...]:
    return tuple(FILTERS)


def scorer_names() -> tuple[str, ...]:
    return tuple(SCORERS)


def register_filter(name: str, target: str | Callable[..., Filter], params: tuple[str, ...] = ()) -> None:
    """Add (or replace) a filter at run time; the in-tree ones are the lines of ``FILTERS``."""
    FILTERS[name] = Plugin(target, params)


def register_scorer(name: str, target: str | Callable[..., Scorer], params: tuple[str, ...] = ()) -> None:
    """Add (or replace) a scorer at run time; the in-tree ones are the lines of ``SCORERS``."""
    SCORERS[name] = Plugin(target, params)


def require(kind: str, name: str) -> str:
    """``name`` if the registry has a ``kind`` ("filter" or "scorer") of that name, else UnknownPlugin."""
    table = _table(kind)
    if name not in table:
        raise UnknownPlugin(kind, name, table)
    return name


def check_params(kind: str, name: str, params: Mapping[str, str]) -> None:
    """ValueError naming the parameters ``params`` gives that the plugin does not take."""
    known = _table(kind)[name].params
    unknown = sorted(p for p in params if p not in known)
    if unknown:
        takes = f"it takes {list(known)}" if known else "it takes none"
        raise ValueError(f"{kind} {name!r} has no parameter {', '.join(map(repr, unknown))}; {takes}")


def make_filter(name: str, params: Mapping[str, str] | None = None) -> Filter:
    factory = _factory(FILTERS, "filter", name)
    filter_: Filter = factory(**(params or {}))
    return filter_


def make_scorer(name: str, weight: float, params: Mapping[str, str] | None = None) -> Scorer:
    factory = _factory(SCORERS, "scorer", name)
    scorer: Scorer = factory(weight, **(params or {}))
    return scorer


def _table(kind: str) -> dict[str, Plugin]:
    return FILTERS if kind == "filter" else SCORERS


def _factory(table: dict[str, Plugin], kind: str, name: str) -> Callable[..., Any]:
    entry = table.get(name)
    if entry is None:
        raise UnknownPlugin(kind, name, table)
    target = entry.target
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        table[name] = Plugin(target, entry.params)  # resolved once
    return target
