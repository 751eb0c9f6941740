"""Endpoint picker: Gateway API Inference Extension-style filters and scorers, composed by a profile.

Per request the servicer calls ``Picker.pick`` and gets a ``Pick`` (hosts
for ``envoy.lb``), or a refusal whose ``error()`` is the ``RequestError`` to answer with:
``Shed`` 429, ``NoCapacity`` 503, ``TooLarge`` 413, ``NotFound`` 404.
"""

from extproc.picker.filters import (
    TRUSTED,
    UNKNOWN,
    UNREACHABLE,
    Candidate,
    CountSaturation,
    DropDrained,
    DropSaturated,
    FilterContext,
    PreferFresh,
    PreferTiers,
    default_filters,
)
from extproc.picker.profile import (
    NoCapacity,
    NotFound,
    Pick,
    Picker,
    PickResult,
    Plan,
    Refusal,
    SchedulerProfile,
    Shed,
    TooLarge,
    default_profile,
)
from extproc.picker.scorers import InflightScorer, KVCacheScorer, LatencyScorer, QueueScorer, RunningScorer

__all__ = [
    "TRUSTED",
    "UNKNOWN",
    "UNREACHABLE",
    "Candidate",
    "CountSaturation",
    "DropDrained",
    "DropSaturated",
    "FilterContext",
    "InflightScorer",
    "KVCacheScorer",
    "NoCapacity",
    "NotFound",
    "Pick",
    "PickResult",
    "Picker",
    "Plan",
    "PreferFresh",
    "PreferTiers",
    "QueueScorer",
    "Refusal",
    "RunningScorer",
    "LatencyScorer",
    "SchedulerProfile",
    "Shed",
    "TooLarge",
    "default_filters",
    "default_profile",
]
