"""Load-aware EDS weights for the fast path (``routing_mode: fast``).

On the fast path Envoy routes a request whose model its header or path names without asking the
ext_proc: the override_host policy finds no pick in the metadata and falls back to least-request,
which honours each host's ``load_balancing_weight``. This module turns the load monitor's readings
into those weights, and decides when they have changed enough to be worth an EDS push.

The weight of a replica is its capacity relative to its version's fastest replica, discounted by
its load, on a 1..100 scale:

    weight = 100 x capacity / the version's largest capacity x headroom
    capacity = slots / decode step    (requests the replica advances per second with a full batch)
    headroom = (queue_weight * S / (S + waiting) + kv_cache_weight * (1 - kv_cache)) / (queue_weight + kv_cache_weight)

with S = ``scoring.saturation_queue``. Capacity is what makes an idle slow replica weigh less than
an idle fast one: with equal weights Envoy's least-request gives a replica with a quarter of the
slots and a third of the speed as many requests as a fast one until its queue shows. The slots are
vLLM's ``max_num_seqs`` (``EndpointLoad.slots``), the step the recent time per output token
(``decode_step_s``). A replica whose capacity is not known yet (no slots exported, no request
finished) counts as the version's median known capacity; when none is known, capacity is left out
(every replica 100 x headroom). A saturated replica (queue >= S or KV >= saturation_kv)
gets 1, the least Envoy accepts; an unreachable one gets 1 too (outlier detection does the rest).
A replica with no reading, or a stale one, gets the neutral 50 times its relative capacity:
missing load data is neither good nor bad news, as in the picker, but a replica's capacity is
what it was when last measured (it does not change with load), so a slow replica whose reading
is late does not weigh as much as an idle fast one, nor a fast one less than a loaded slow one.

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


def fast_path_versions(spec: MeshSpec) -> list[list[str]]:
    """The fast path's endpoints by model version: capacities are compared within a version (one
    Envoy cluster), whose replicas serve the same model."""
    return [
        [e.address for e in v.endpoints] for m in spec.models if routing_mode(spec, m) == "fast" for v in m.versions
    ]


def capacity(load: mesh_pb2.EndpointLoad | None) -> float | None:
    """Requests a replica advances per second with its batch full (slots / decode step); None when
    it does not say its slots or has finished no request yet."""
    if load is None or load.slots <= 0 or load.decode_step_s <= 0:
        return None
    return load.slots / load.decode_step_s


def relative_capacities(capacities: Mapping[str, float | None]) -> dict[str, float]:
    """Each replica's capacity over the largest of the group, 0..1; an unknown one (None) counts as
    the group's median known capacity (see the module docstring)."""
    known = {a: c for a, c in capacities.items() if c is not None}
    if not known:
        return dict.fromkeys(capacities, 1.0)
    ordered = sorted(known.values())
    median = ordered[len(ordered) // 2]
    top = ordered[-1]
    return {a: known.get(a, median) / top for a in capacities}


def endpoint_weight(
    load: mesh_pb2.EndpointLoad | None, scoring: ScoringSpec, step: int = 5, relative_capacity: float = 1.0
) -> int:
    """One replica's weight, 1..100 (see the module docstring); ``relative_capacity``: its capacity
    over its version's largest (``relative_capacities``)."""
    relative_capacity = min(1.0, max(0.0, relative_capacity))
    if load is None or (load.reachable and not (math.isfinite(load.age_s) and load.age_s <= scoring.stale_after_s)):
        neutral = int(round(NEUTRAL_WEIGHT * relative_capacity / step)) * step  # no reading yet, or a stale one
        return max(MIN_WEIGHT + 1, neutral)
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
    score *= relative_capacity
    weight = int(round(score * MAX_WEIGHT / step)) * step
    return max(MIN_WEIGHT + 1, min(MAX_WEIGHT, weight))  # 1 is kept for "saturated"


def _usable(load: mesh_pb2.EndpointLoad | None, scoring: ScoringSpec) -> mesh_pb2.EndpointLoad | None:
    """The reading if it is fresh and reachable: a stale or down replica's capacity is not compared."""
    if load is None or not load.reachable or not (math.isfinite(load.age_s) and load.age_s <= scoring.stale_after_s):
        return None
    return load


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
        self._versions: list[list[str]] = []
        self._capacities: dict[str, float] = {}  # address -> its last measured capacity

    def compute(self, spec: MeshSpec, report: mesh_pb2.LoadReport) -> dict[str, int]:
        if spec is not self._spec:  # specs are immutable: the fast-path endpoints change with the spec only
            self._spec, self._versions = spec, fast_path_versions(spec)
            kept = {a for addresses in self._versions for a in addresses}
            self._capacities = {a: c for a, c in self._capacities.items() if a in kept}
        if not self._versions:
            return {}
        readings = {e.address: e for e in report.endpoints}
        out: dict[str, int] = {}
        for addresses in self._versions:
            for a in addresses:
                measured = capacity(_usable(readings.get(a), spec.scoring))
                if measured is not None:
                    self._capacities[a] = measured
            relative = relative_capacities({a: self._capacities.get(a) for a in addresses})
            for a in addresses:
                out[a] = endpoint_weight(readings.get(a), spec.scoring, self.step, relative[a])
        return out

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
