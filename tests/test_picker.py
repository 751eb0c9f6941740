"""The endpoint picker: filters, scorers, shedding, versions and the context window."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from extproc.routing_view import LoadView, RoutingView
from extproc.scheduler.picker import Picker
from extproc.scheduler.profile import SchedulerProfile, default_filters, default_profile
from extproc.scheduler.results import NoCapacity, NotFound, Pick, Shed, TooLarge
from extproc.scheduler.scorers.inflight import InflightScorer
from extproc.scheduler.scorers.kv_cache import KVCacheScorer
from extproc.scheduler.scorers.queue import QueueScorer
from extproc.scheduler.scorers.running import RunningScorer
from protos import mesh_pb2

NOW = 1000.0

PRIORITIES = [
    mesh_pb2.PriorityClass(name="critical", rank=0, preferred_tiers=["low-latency"]),
    mesh_pb2.PriorityClass(name="standard", rank=1),
    mesh_pb2.PriorityClass(name="batch", rank=2, preferred_tiers=["cost-effective"], shed_threshold=1.0),
    mesh_pb2.PriorityClass(name="sheddable", rank=3, preferred_tiers=["cost-effective"], shed_threshold=0.5),
    mesh_pb2.PriorityClass(name="pinned-fast", rank=4, preferred_tiers=["low-latency"], strict_tiers=True),
]


def ep(address: str, tier: str = "standard", drained: bool = False, max_concurrency: int = 0) -> mesh_pb2.Endpoint:
    return mesh_pb2.Endpoint(address=address, pool=tier, tier=tier, drained=drained, max_concurrency=max_concurrency)


def routing(versions: dict[str, list[mesh_pb2.Endpoint]] | list[mesh_pb2.Endpoint], *, weights=None, windows=None):
    if isinstance(versions, list):
        versions = {"v1": versions}
    weights = weights or {}
    windows = windows or {}
    table = mesh_pb2.RoutingTable(
        version=1,
        models=[
            mesh_pb2.Model(
                name="m",
                versions=[
                    mesh_pb2.ModelVersion(
                        name=name,
                        weight=weights.get(name, 100),
                        cluster=f"m/{name}",
                        context_window=windows.get(name, 0),
                        endpoints=eps,
                    )
                    for name, eps in versions.items()
                ],
            )
        ],
        priorities=PRIORITIES,
        default_priority="standard",
        scoring=mesh_pb2.Scoring(
            queue_weight=2,
            kv_cache_weight=2,
            inflight_weight=1,
            saturation_queue=5,
            saturation_kv=0.8,
            stale_after_s=2,
            latency_weight=2,
        ),
    )
    return RoutingView.from_proto(table)


def load(**readings) -> LoadView:
    """load(a=dict(waiting=.., kv=.., running=.., age=.., reachable=..)); keys are '10.0.0.<key>:80'."""
    report = mesh_pb2.LoadReport(sequence=1)
    for key, r in readings.items():
        report.endpoints.append(
            mesh_pb2.EndpointLoad(
                address=addr(key),
                waiting=r.get("waiting", 0),
                running=r.get("running", 0),
                kv_cache=r.get("kv", 0.0),
                gpu_util=-1,
                age_s=r.get("age", 0.05),
                reachable=r.get("reachable", True),
                latency_s=r.get("latency", 0.0),
            )
        )
    return LoadView.from_proto(report, received_at=NOW)


def addr(key) -> str:
    return f"10.0.0.{str(key).lstrip('e')}:80"


def eps(*keys, tier="standard", **kw):
    return [ep(addr(k), tier, **kw) for k in keys]


def pick(r, lv, priority=None, inflight=None, picker=None, **kw):
    return (picker or Picker()).pick(r, lv, "m", priority, inflight or {}, now=kw.pop("now", NOW), **kw)


IDLE = dict(waiting=0, kv=0.05, running=1)
BUSY = dict(waiting=4, kv=0.7, running=30)
FULL = dict(waiting=9, kv=0.95, running=60)


# ----------------------------------------------------------------------------- basics


def test_drained_endpoint_is_never_picked_even_when_idle():
    r = routing(eps(1, 2) + [ep(addr(3), drained=True)])
    lv = load(e1=BUSY, e2=BUSY, e3=IDLE)
    picker = Picker()
    for _ in range(50):
        result = pick(r, lv, picker=picker)
        assert isinstance(result, Pick)
        assert addr(3) not in result.hosts


def test_all_drained_is_no_capacity():
    r = routing([ep(addr(1), drained=True)])
    result = pick(r, load(e1=IDLE))
    assert isinstance(result, NoCapacity)
    err = result.error()
    assert err.status == 503 and err.retry_after is not None
    assert json.loads(err.envelope())["error"]["type"] == "service_unavailable"


def test_no_endpoints_is_no_capacity_and_unknown_model_is_not_found():
    r = routing([])
    assert isinstance(pick(r, None), NoCapacity)
    result = Picker().pick(r, None, "nope", None, {})
    assert isinstance(result, NotFound) and result.error().status == 404
    assert isinstance(pick(r, None, version="v9"), NotFound)


def test_loaded_replica_ranked_below_idle_one():
    r = routing(eps(1, 2, 3))
    # Queue alone, KV alone, and both.
    for slow in (dict(waiting=4, kv=0.05), dict(waiting=0, kv=0.75), BUSY):
        lv = load(e1=slow, e2=IDLE, e3=slow)
        result = pick(r, lv)
        assert result.hosts[0] == addr(2), slow
        assert result.hosts[-1] != addr(2)


def test_saturated_replica_avoided_while_others_are_not():
    r = routing(eps(1, 2))
    for _ in range(6):
        result = pick(r, load(e1=FULL, e2=BUSY))
        assert result.primary == addr(2)


def test_inflight_changes_the_ranking():
    r = routing(eps(1, 2))
    lv = load(e1=IDLE, e2=IDLE)
    assert pick(r, lv, inflight={addr(1): 4}).primary == addr(2)
    assert pick(r, lv, inflight={addr(2): 4}).primary == addr(1)


def test_ties_rotate_instead_of_always_taking_the_first():
    r = routing(eps(1, 2, 3, 4))
    lv = load(e1=IDLE, e2=IDLE, e3=IDLE, e4=IDLE)
    picker = Picker()
    primaries = Counter(pick(r, lv, picker=picker).primary for _ in range(40))
    assert len(primaries) == 4


def test_idle_replica_gets_more_traffic_than_loaded_one_with_inflight_feedback():
    r = routing(eps(1, 2))
    lv = load(e1=IDLE, e2=BUSY)
    picker = Picker()
    inflight: Counter = Counter()
    for _ in range(200):
        result = pick(r, lv, inflight=inflight, picker=picker)
        inflight[result.primary] += 1
    # The idle one gets clearly more, and the loaded one still gets some (the load spreads).
    assert inflight[addr(1)] > 1.5 * inflight[addr(2)]
    assert inflight[addr(2)] > 0


def test_slow_replica_ranked_below_an_equally_loaded_fast_one():
    r = routing(eps(1, 2))
    lv = load(e1=dict(IDLE, latency=2.0), e2=dict(IDLE, latency=0.1))
    assert pick(r, lv).primary == addr(2)
    # Without latency readings the two are equal again, and the ties rotate.
    unknown = load(e1=IDLE, e2=IDLE)
    picker = Picker()
    assert {pick(r, unknown, picker=picker).primary for _ in range(20)} == {addr(1), addr(2)}


def test_hosts_are_ranked_and_limited_per_version():
    r = routing(eps(1, 2, 3, 4, 5))
    lv = load(e1=dict(waiting=3), e2=dict(waiting=0), e3=dict(waiting=1), e4=dict(waiting=2), e5=dict(waiting=4))
    result = pick(r, lv)
    assert result.hosts == (addr(2), addr(3), addr(4))
    assert result.header_value == f"{addr(2)},{addr(3)},{addr(4)}"


def test_a_fresh_picker_prefers_the_idle_replica():
    r = routing(eps(1, 2))
    result = Picker().pick(r, load(e1=BUSY, e2=IDLE), "m", "critical", {}, now=NOW)
    assert result.primary == addr(2)


# ----------------------------------------------------------------------------- staleness


def test_stale_and_unreachable_readings_are_not_trusted_when_fresh_ones_exist():
    r = routing(eps(1, 2, 3))
    # 1 and 3 look idle but their readings are stale / unreachable; 2 is fresh and busy.
    lv = load(e1=dict(IDLE, age=10), e2=BUSY, e3=dict(IDLE, reachable=False))
    result = pick(r, lv)
    assert result.hosts == (addr(2),)


def test_stale_readings_do_not_cause_failure():
    r = routing(eps(1, 2))
    # Every reading stale and claiming saturation: still a pick, and the shed class is not shed.
    lv = load(e1=dict(FULL, age=30), e2=dict(FULL, age=30))
    for priority in ("standard", "sheddable"):
        result = pick(r, lv, priority)
        assert isinstance(result, Pick) and set(result.hosts) == {addr(1), addr(2)}
    # No load report at all, and a replica never scraped: still picks.
    assert isinstance(pick(r, None), Pick)
    assert isinstance(pick(r, load(e1=IDLE)), Pick)
    # All unreachable: the version is still routed (Envoy's health checks have the last word).
    assert isinstance(pick(r, load(e1=dict(reachable=False), e2=dict(reachable=False))), Pick)


def test_reading_turns_stale_with_time_without_a_new_report():
    r = routing(eps(1, 2))
    lv = load(e1=IDLE, e2=BUSY)
    picker = Picker()
    assert pick(r, lv, picker=picker, now=NOW).hosts == (addr(1), addr(2))
    # 5 s later, same report: no reading is trusted, both are candidates on equal terms.
    later = Counter(pick(r, lv, picker=picker, now=NOW + 5).primary for _ in range(10))
    assert set(later) == {addr(1), addr(2)}


# ----------------------------------------------------------------------------- priority tiers


def tiered():
    return routing(eps(1, 2, tier="low-latency") + eps(3, 4, tier="cost-effective"))


def test_critical_prefers_its_tier_even_over_an_idler_other_tier():
    r = tiered()
    lv = load(e1=BUSY, e2=BUSY, e3=IDLE, e4=IDLE)
    result = pick(r, lv, "critical")
    assert set(result.hosts) == {addr(1), addr(2)}
    # The standard class has no preference: the idle cheap replicas win.
    assert pick(r, lv, "standard").primary in (addr(3), addr(4))


def test_critical_falls_back_when_its_tier_is_saturated():
    r = tiered()
    lv = load(e1=FULL, e2=FULL, e3=BUSY, e4=IDLE)
    result = pick(r, lv, "critical")
    assert result.primary == addr(4)
    assert addr(1) not in result.hosts and addr(2) not in result.hosts


def test_strict_tiers_never_fall_back():
    r = tiered()
    lv = load(e1=FULL, e2=FULL, e3=IDLE, e4=IDLE)
    result = pick(r, lv, "pinned-fast")
    assert isinstance(result, Pick) and set(result.hosts) == {addr(1), addr(2)}
    # A strict class whose tiers have no endpoint at all has no capacity.
    only_cheap = routing(eps(3, 4, tier="cost-effective"))
    assert isinstance(pick(only_cheap, lv, "pinned-fast"), NoCapacity)


# ----------------------------------------------------------------------------- shedding


def test_sheddable_is_shed_while_critical_still_gets_a_pick():
    r = routing(eps(1, 2, 3, 4))
    lv = load(e1=FULL, e2=FULL, e3=FULL, e4=IDLE)  # 3 of 4 saturated
    shed = pick(r, lv, "sheddable")
    assert isinstance(shed, Shed)
    err = shed.error()
    assert err.status == 429 and err.retry_after == "1"
    assert json.loads(err.envelope())["error"]["type"] == "rate_limit_error"
    assert isinstance(pick(r, lv, "critical"), Pick)
    assert isinstance(pick(r, lv, "standard"), Pick)
    # batch sheds only when every candidate is saturated.
    assert pick(r, lv, "batch").primary == addr(4)
    everything = load(e1=FULL, e2=FULL, e3=FULL, e4=FULL)
    assert isinstance(pick(r, everything, "batch"), Shed)
    critical = pick(r, everything, "critical")
    assert isinstance(critical, Pick) and len(critical.hosts) == 3


def test_no_shedding_below_threshold():
    r = routing(eps(1, 2, 3, 4))
    assert pick(r, load(e1=FULL, e2=IDLE, e3=IDLE, e4=IDLE), "sheddable").primary in (addr(2), addr(3), addr(4))


# ----------------------------------------------------------------------------- versions


def two_versions(**kw):
    return routing({"stable": eps(1, 2, 3, 4), "canary": eps(5, 6)}, weights={"stable": 90, "canary": 10}, **kw)


def test_hosts_of_every_version_are_included():
    r = two_versions()
    lv = load(e1=BUSY, e2=IDLE, e3=BUSY, e4=BUSY, e5=BUSY, e6=IDLE)
    result = pick(r, lv)
    assert result.version is None and result.cluster is None
    assert result.primary_by_version == {"stable": addr(2), "canary": addr(6)}
    assert result.hosts[:2] == (addr(2), addr(6))  # every version's best first
    assert len(result.hosts) == 5  # top 3 of stable + both canary hosts
    assert dict(result.primaries) == {addr(2): pytest.approx(0.9), addr(6): pytest.approx(0.1)}


def test_version_pinned_by_path_gets_only_its_hosts():
    r = two_versions()
    result = pick(r, load(), version="canary")
    assert set(result.hosts) == {addr(5), addr(6)}
    assert result.version == "canary" and result.cluster == "m/canary"


def test_version_without_routable_hosts_pins_the_other():
    r = routing({"stable": eps(1, 2), "canary": eps(5, drained=True)}, weights={"stable": 90, "canary": 10})
    result = pick(r, load())
    assert result.version == "stable" and set(result.hosts) == {addr(1), addr(2)}


# ----------------------------------------------------------------------------- context window


def test_context_window_413():
    r = routing(eps(1, 2), windows={"v1": 4096})
    assert isinstance(pick(r, load(), tokens=4000), Pick)
    too_large = pick(r, load(), tokens=5000)
    assert isinstance(too_large, TooLarge)
    err = too_large.error()
    assert err.status == 413 and err.code == "context_length_exceeded"
    assert "4096" in err.message


def test_context_window_pins_the_version_that_fits():
    r = two_versions(windows={"stable": 4096, "canary": 32768})
    result = pick(r, load(), tokens=10000)
    assert result.version == "canary" and set(result.hosts) == {addr(5), addr(6)}
    assert isinstance(pick(r, load(), tokens=40000), TooLarge)
    # Pinned by the request to a version too small: 413, no silent re-route.
    assert isinstance(pick(r, load(), tokens=10000, version="stable"), TooLarge)


# ----------------------------------------------------------------------------- profile


def test_scorer_weights_decide_between_queue_and_kv():
    r = routing(eps(1, 2))
    lv = load(e1=dict(waiting=0, kv=0.7), e2=dict(waiting=3, kv=0.0))

    def only(scorer):
        return Picker(lambda scoring: SchedulerProfile(default_filters(), [scorer], hosts_per_version=1))

    by_queue = only(QueueScorer(1.0))
    assert by_queue.profile is None  # built from the first routing view it sees
    res = by_queue.pick(r, lv, "m", None, {}, now=NOW)
    assert res.hosts == (addr(1),)
    assert isinstance(by_queue.profile, SchedulerProfile)
    assert only(KVCacheScorer(1.0)).pick(r, lv, "m", None, {}, now=NOW).hosts == (addr(2),)
    assert only(InflightScorer(1.0)).pick(r, lv, "m", None, {addr(1): 1}, now=NOW).hosts == (addr(2),)
    # Running batch: the smaller batch wins.
    lv = load(e1=dict(running=40), e2=dict(running=2))
    assert only(RunningScorer(1.0)).pick(r, lv, "m", None, {}, now=NOW).hosts == (addr(2),)
    # default_profile takes the table's weights.
    assert default_profile(r.scoring).scorers[0].weight == 2


def test_plans_are_cached_until_the_load_changes():
    r = routing(eps(1, 2))
    picker = Picker()
    lv = load(e1=IDLE, e2=BUSY)
    first = picker.plan(r, lv, r.model("m"), r.priority(None), now=NOW)
    assert picker.plan(r, lv, r.model("m"), r.priority(None), now=NOW + 0.1) is first
    lv2 = load(e1=BUSY, e2=IDLE)
    assert picker.plan(r, lv2, r.model("m"), r.priority(None), now=NOW) is not first
    assert pick(r, lv2, picker=picker).primary == addr(2)


def test_max_concurrency_counts_as_saturation():
    r = routing([ep(addr(1), max_concurrency=8), ep(addr(2))])
    lv = load(e1=dict(waiting=1, running=7, kv=0.1), e2=dict(waiting=2, running=40, kv=0.5))
    assert pick(r, lv).hosts == (addr(2),)


def test_profiles_with_more_inflight_terms_still_rank():
    class Latency:
        """A third in-flight term: a replica's own scale, unlike the others'."""

        name = "latency"
        weight = 1.0

        def static(self, ctx, candidates):
            return None

        def inflight(self, ctx, candidates):
            return [(3.0, 0.0) for _ in candidates]

    def factory(scoring):
        base = default_profile(scoring)
        return SchedulerProfile(base.filters, (*base.scorers, Latency()), hosts_per_version=2)

    r = routing(eps(1, 2, 3))
    lv = load(e1=IDLE, e2=BUSY, e3=IDLE)
    picker = Picker(factory)
    result = picker.pick(r, lv, "m", None, {addr(1): 3}, now=NOW)
    assert result.hosts == (addr(3), addr(1))
    assert picker.plan(r, lv, r.model("m"), r.priority(None), now=NOW).groups[0].extended
