"""Load-aware EDS weights for the fast path (``routing_mode: fast``).

On the fast path Envoy routes a request whose model its header or path names without asking the
ext_proc: the override_host policy finds no pick in the metadata and falls back to least-request,
which honours each host's ``load_balancing_weight``. This module turns the load monitor's readings
into those weights, and decides when they have changed enough to be worth an EDS push.

The weight of a replica is the picker's static score on a 1..100 scale:

    score = (queue_weight * S / (S + waiting) + kv_cache_weight * (1 - kv_cache)) / (queue_weight + kv_cache_weight)

with S = ``scoring.saturation_queue``. A saturated replica (queue >= S or KV >= saturation_kv)
gets 1, the least Envoy accepts; an unreachable one gets 1 too (outlier detection does the rest).
A replica with no reading, or a stale one, gets the neutral 50: missing data is neither good nor
bad news, as in the picker.

Hysteresis, so that EDS is not pushed on every 100 ms scrape:

* weights are rounded to steps of ``step`` (5), so jitter below that never shows;
* a new set is published only when some replica's weight moved by ``min_change`` (20) points or
  more, crossed the saturated/unsaturated line, or replicas came or went;
* and at most once per ``min_interval_s`` (1 s). A change held back by the interval goes out with
  the first report after it (reports arrive several times a second), so nothing is lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from controlplane.model.mesh_model import routing_mode
from controlplane.spec.schema import MeshSpec, ScoringSpec
from protos import mesh_pb2

MIN_WEIGHT = 1
MAX_WEIGHT = 100
NEUTRAL_WEIGHT = 50


def fast_path_addresses(spec: MeshSpec) -> list[str]:
    """Endpoints of the models on the fast path (drained ones too: Envoy skips DRAINING itself)."""
    return [e.address for m in spec.models if routing_mode(spec, m) == "fast" for v in m.versions for e in v.endpoints]


def endpoint_weight(load: mesh_pb2.EndpointLoad | None, scoring: ScoringSpec, step: int = 5) -> int:
    """One replica's weight, 1..100 (see the module docstring)."""
    if load is None or (load.reachable and not (math.isfinite(load.age_s) and load.age_s <= scoring.stale_after_s)):
        return NEUTRAL_WEIGHT  # no reading yet, or a stale one
    if not load.reachable:
        return MIN_WEIGHT
    waiting = max(0.0, load.waiting)
    kv = min(1.0, max(0.0, load.kv_cache))
    if waiting >= scoring.saturation_queue or kv >= scoring.saturation_kv:
        return MIN_WEIGHT
    s = scoring.saturation_queue
    total = scoring.queue_weight + scoring.kv_cache_weight
    if total <= 0:
        return NEUTRAL_WEIGHT
    score = (scoring.queue_weight * s / (s + waiting) + scoring.kv_cache_weight * (1.0 - kv)) / total
    weight = int(round(score * MAX_WEIGHT / step)) * step
    return max(MIN_WEIGHT + 1, min(MAX_WEIGHT, weight))  # 1 is kept for "saturated"


class LoadWeights:
    """Decides the fast path's EDS weights from each load report, with hysteresis.

    ``update(spec, report, now)`` returns the weights to publish (address -> weight), or None
    when the current ones should stay. ``current`` is what was last returned.
    """

    def __init__(self, min_interval_s: float = 1.0, min_change: int = 20, step: int = 5):
        self.min_interval_s = min_interval_s
        self.min_change = min_change
        self.step = step
        self.current: dict[str, int] = {}
        self.pushes = 0
        self._last_push = -math.inf
        self._spec: MeshSpec | None = None
        self._addresses: list[str] = []

    def compute(self, spec: MeshSpec, report: mesh_pb2.LoadReport) -> dict[str, int]:
        if spec is not self._spec:  # specs are immutable: the fast-path endpoints change with the spec only
            self._spec, self._addresses = spec, fast_path_addresses(spec)
        if not self._addresses:
            return {}
        readings = {e.address: e for e in report.endpoints}
        return {a: endpoint_weight(readings.get(a), spec.scoring, self.step) for a in self._addresses}

    def update(self, spec: MeshSpec, report: mesh_pb2.LoadReport, now: float) -> dict[str, int] | None:
        wanted = self.compute(spec, report)
        if not self._differs(wanted):
            return None
        if now - self._last_push < self.min_interval_s:
            return None  # held back; a later report re-evaluates
        self.current = wanted
        self._last_push = now
        self.pushes += 1
        return wanted

    def _differs(self, wanted: Mapping[str, int]) -> bool:
        current = self.current
        if wanted.keys() != current.keys():
            return True
        for address, weight in wanted.items():
            old = current[address]
            if abs(weight - old) >= self.min_change or (weight == MIN_WEIGHT) != (old == MIN_WEIGHT):
                return True
        return False
