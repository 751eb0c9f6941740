"""The ``ttft`` scorer (a time-to-first-token estimate in seconds) and the ``gpu-util`` scorer: their
scores from load readings, through the picker's profile, and from a spec through the routing table.

The replicas are shaped after the fleet's h100 and l4 profiles: the fast one prefills 20000
computed tokens a second and steps in 10 ms, the slow one 5000 and 40 ms; requests there have
computed 1000 prompt tokens on average. A typical request's estimate is then

    fast: (waiting x 1000 + 1000) / 20000 + 0.01 = 0.05 x waiting + 0.06 s
    slow: (waiting x 1000 + 1000) / 5000 + 0.04  = 0.2 x waiting + 0.24 s

so an idle slow replica beats the fast one from 4 requests queued there (0.26 s > 0.24 s).
"""

from __future__ import annotations

import time

import pytest

from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import parse_spec
from controlplane.translate.table import translate_routing_table
from extproc.routing_view import LoadView, ProfileView, RoutingView, ScorerRef, ScoringView
from extproc.scheduler import registry
from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.interfaces import SchedulingRequest
from extproc.scheduler.picker import Picker
from extproc.scheduler.profile import default_profile
from extproc.scheduler.results import Pick
from extproc.scheduler.scorers import NEUTRAL
from extproc.scheduler.scorers.gpu import GpuUtilScorer
from extproc.scheduler.scorers.ttft import TTFTScorer, slot_wait
from protos import mesh_pb2

NOW = 1000.0
FAST, SLOW = "10.0.0.1:80", "10.0.0.2:80"
SPEEDS = {
    FAST: dict(prefill_tokens_per_s=20000.0, prefill_tokens_mean=1000.0, decode_step_s=0.01),
    SLOW: dict(prefill_tokens_per_s=5000.0, prefill_tokens_mean=1000.0, decode_step_s=0.04),
}
UNMEASURED: dict[str, float] = {}  # a replica that has finished no request yet
TTFT_ONLY = mesh_pb2.SchedulingProfile(scorers=[mesh_pb2.PluginRef(type="ttft", weight=1)])


def report(waiting: dict[str, float], speeds: dict | None = None, **common) -> mesh_pb2.LoadReport:
    speeds = SPEEDS if speeds is None else speeds
    out = mesh_pb2.LoadReport(sequence=1)
    for address, queue in waiting.items():
        fields = dict(address=address, waiting=queue, age_s=0.05, reachable=True, **speeds.get(address, {}))
        out.endpoints.append(mesh_pb2.EndpointLoad(**(fields | common)))
    return out


def load(waiting: dict[str, float], speeds: dict | None = None, **common) -> LoadView:
    return LoadView.from_proto(report(waiting, speeds, **common), received_at=NOW)


def routing(scheduling: mesh_pb2.SchedulingProfile | None = TTFT_ONLY) -> RoutingView:
    """One model, one version on FAST and SLOW; a queue of 50 before a replica counts as saturated,
    so that only the scorer decides."""
    version = mesh_pb2.ModelVersion(
        name="v1",
        weight=100,
        cluster="m/v1",
        endpoints=[mesh_pb2.Endpoint(address=a, pool="p") for a in (FAST, SLOW)],
    )
    return RoutingView.from_proto(
        mesh_pb2.RoutingTable(
            version=1,
            models=[mesh_pb2.Model(name="m", versions=[version])],
            scoring=mesh_pb2.Scoring(saturation_queue=50),
            scheduling=scheduling,
        )
    )


def pick(lv: LoadView, inflight: dict | None = None, request: SchedulingRequest | None = None, r=None) -> str:
    r = r if r is not None else routing()
    result = Picker().pick(r, lv, "m", None, inflight or {}, now=NOW, request=request)
    assert isinstance(result, Pick), result
    return result.primary


def candidates(lv: LoadView, addresses=(FAST, SLOW)) -> tuple[FilterContext, list[Candidate]]:
    r = routing()
    endpoints = {e.address: e for e in r.model("m").versions[0].endpoints}
    ctx = FilterContext(r.scoring, r.default_priority, NOW)
    return ctx, [Candidate(endpoints[a], lv.get(a), r.scoring, NOW) for a in addresses]


def idle_scores(scorer: TTFTScorer, lv: LoadView) -> list[float]:
    """Each candidate's score with nothing in flight: scale / (scale + base)."""
    ctx, cs = candidates(lv)
    return [scale / (scale + base) for scale, base in scorer.inflight(ctx, cs)]


# ----------------------------------------------------------------------------- ttft


def test_a_fast_prefill_replica_with_a_short_queue_beats_a_slow_idle_one():
    lv = load({FAST: 2, SLOW: 0})
    fast, slow = idle_scores(TTFTScorer(1.0), lv)
    assert fast == 1.0  # the fastest estimate scores 1
    assert slow == pytest.approx(0.16 / 0.24)  # 0.05 x 2 + 0.06 against 0.24 s
    assert pick(lv) == FAST


@pytest.mark.parametrize(("queued_on_fast", "winner"), [(0, FAST), (3, FAST), (4, SLOW), (10, SLOW)])
def test_a_long_queue_on_the_fast_replica_hands_over_where_the_estimates_cross(queued_on_fast, winner):
    # 0.05 x 3 + 0.06 = 0.21 s < 0.24 s; 0.05 x 4 + 0.06 = 0.26 s > 0.24 s.
    assert pick(load({FAST: queued_on_fast, SLOW: 0})) == winner


def test_requests_sent_since_the_reading_count_as_queued_work():
    lv = load({FAST: 3, SLOW: 0})
    assert pick(lv) == FAST
    assert pick(lv, inflight={FAST: 1}) == SLOW  # as if 4 were queued there
    assert pick(lv, inflight={FAST: 1, SLOW: 1}) == FAST  # 0.26 s against 0.44 s


def test_the_request_own_prompt_moves_the_point_where_the_slow_replica_wins():
    lv = load({FAST: 1, SLOW: 0})
    assert pick(lv) == FAST  # a typical request: 0.11 s against 0.24 s
    # 100 tokens: (1000 + 100) / 20000 + 0.01 = 0.065 s against 100 / 5000 + 0.04 = 0.06 s.
    assert pick(lv, request=SchedulingRequest(tokens=100)) == SLOW
    # A long prompt makes prefill speed count for more: 4000 tokens on 10 queued still go fast.
    assert pick(load({FAST: 10, SLOW: 0}), request=SchedulingRequest(tokens=4000)) == FAST
    assert pick(load({FAST: 10, SLOW: 0})) == SLOW


def test_a_cached_prefix_weighs_against_a_queue_in_the_same_seconds(monkeypatch):
    # Two replicas of one speed, 5000 tokens/s, 40 ms steps, 500 tokens a queued request; the first
    # holds 900 of this request's 1000 prompt tokens.
    same = dict(prefill_tokens_per_s=5000.0, prefill_tokens_mean=500.0, decode_step_s=0.04)
    speeds = {FAST: same, SLOW: same}

    def cached_tokens(request, addresses):
        assert set(addresses) == {FAST, SLOW}
        return {FAST: 900}

    monkeypatch.setattr(registry, "SCORERS", dict(registry.SCORERS))
    registry.register_scorer("ttft", lambda weight: TTFTScorer(weight, overlap=cached_tokens))
    request = SchedulingRequest(tokens=1000, prefix_hashes=(1, 2, 3))
    # One queued and cached: (500 + 100) / 5000 + 0.04 = 0.16 s against the idle one's 0.24 s.
    assert pick(load({FAST: 1, SLOW: 0}, speeds), request=request) == FAST
    # Two queued: 0.26 s. The cache saves 0.18 s, less than two queued requests' 0.2 s.
    assert pick(load({FAST: 2, SLOW: 0}, speeds), request=request) == SLOW
    # Without prefix hashes the seam is not asked, nothing counts as cached: 0.34 s against 0.24 s.
    assert pick(load({FAST: 1, SLOW: 0}, speeds), request=SchedulingRequest(tokens=1000)) == SLOW


def test_an_unmeasured_or_untrusted_replica_scores_neutral():
    scorer = TTFTScorer(1.0)
    # Not measured yet (no request finished there): neutral beside a measured one.
    assert idle_scores(scorer, load({FAST: 0, SLOW: 0}, {FAST: SPEEDS[FAST]})) == [1.0, NEUTRAL]
    # Nothing measured: everyone neutral, and no request changes that.
    lv = load({FAST: 0, SLOW: 0}, UNMEASURED)
    assert idle_scores(scorer, lv) == [NEUTRAL, NEUTRAL]
    ctx, cs = candidates(lv)
    assert scorer.request(ctx, cs) is None
    # A stale reading says nothing, however fast it once was.
    stale = load({FAST: 0, SLOW: 0}, age_s=60.0)
    assert idle_scores(scorer, stale) == [NEUTRAL, NEUTRAL]
    # A measured slow replica ranks below an unmeasured one (neutral is not "fast").
    assert idle_scores(scorer, load({FAST: 0, SLOW: 0}, {FAST: SPEEDS[FAST], SLOW: SPEEDS[SLOW]}))[1] < NEUTRAL


def test_the_request_term_is_rank_neutral_for_a_typical_request_and_bounded():
    lv = load({FAST: 1, SLOW: 0})
    ctx, cs = candidates(lv)
    term = TTFTScorer(1.0).request(ctx, cs)
    assert term is not None
    assert term(SchedulingRequest()) is None  # says nothing: the plan's typical request stands
    assert term(SchedulingRequest(tokens=1000)) == {}  # is the typical request
    short = term(SchedulingRequest(tokens=100))
    assert set(short) == {SLOW} and 0.0 < short[SLOW] <= 1.0


def test_slot_wait_counts_the_queue_relative_to_the_slots_and_the_time_per_request():
    assert slot_wait(3, 8, 0, 1.0) == (0.0, 0.0)  # slots unknown: no term
    assert slot_wait(3, 8, 8, 0.0) == (0.0, 0.0)  # no latency measured yet
    assert slot_wait(0, 6, 8, 0.8) == (0.0, 0.1)  # a free slot: no wait, each more request 0.8/8
    # Two queued on 2 busy slots: 3 requests to finish before a slot, one every 2 s / 2.
    assert slot_wait(2, 2, 2, 2.0) == (3.0, 1.0)
    # The same two queued on 8 busy slots that take 0.5 s: a slot every 1/16 s.
    assert slot_wait(2, 8, 8, 0.5) == (pytest.approx(3 / 16), 1 / 16)


def test_a_full_small_batch_loses_to_a_fast_replica_with_a_queue_once_slots_are_known():
    # One prefill speed; the big replica has a request queued on its 8 full slots, the small one
    # none on its 2 full slots, but a request takes it 2 s against 0.5 s. Without the slots the
    # small replica's empty queue wins (0.14 s against 0.24 s); with them the big one does (a slot
    # there in 2/16 s, on the small one in 1 s).
    same = dict(prefill_tokens_per_s=5000.0, prefill_tokens_mean=500.0, decode_step_s=0.04)
    big = dict(same, running=8.0, latency_s=0.5)
    small = dict(same, running=2.0, latency_s=2.0)
    assert pick(load({FAST: 1, SLOW: 0}, {FAST: big, SLOW: small})) == SLOW
    known = {FAST: dict(big, slots=8.0), SLOW: dict(small, slots=2.0)}
    lv = load({FAST: 1, SLOW: 0}, known)
    assert pick(lv) == FAST
    ctx, cs = candidates(lv)
    (big_scale, _), (small_scale, _) = TTFTScorer(1.0).inflight(ctx, cs)
    assert big_scale > small_scale  # a request sent to the small replica costs it more


# ----------------------------------------------------------------------------- gpu-util


def test_gpu_util_scores_spare_compute_and_unknown_as_neutral():
    scorer = GpuUtilScorer(1.0)
    # -1: nothing on its scrape reports it.
    ctx, cs = candidates(load({FAST: 0, SLOW: 0}, {FAST: {"gpu_util": 0.9}, SLOW: {"gpu_util": -1.0}}))
    assert scorer.static(ctx, cs) == [pytest.approx(0.1), NEUTRAL]
    ctx, cs = candidates(load({FAST: 0, SLOW: 0}, UNMEASURED, gpu_util=0.0, age_s=60.0))  # stale: not evidence
    assert scorer.static(ctx, cs) == [NEUTRAL, NEUTRAL]
    gpu_only = mesh_pb2.SchedulingProfile(scorers=[mesh_pb2.PluginRef(type="gpu-util", weight=1)])
    busy_fast = load({FAST: 0, SLOW: 0}, {FAST: {"gpu_util": 0.9}, SLOW: {"gpu_util": 0.2}})
    assert pick(busy_fast, r=routing(gpu_only)) == SLOW
    assert (
        pick(load({FAST: 0, SLOW: 0}, {FAST: {"gpu_util": 0.2}, SLOW: {"gpu_util": 0.9}}), r=routing(gpu_only)) == FAST
    )


def test_neither_scorer_is_in_the_default_profile():
    names = {s.name for s in default_profile(ScoringView()).scorers}
    assert "ttft" not in names and "gpu-util" not in names
    assert {"ttft", "gpu-util"} <= set(registry.scorer_names())


# ----------------------------------------------------------------------------- from the spec


def test_a_ttft_profile_in_the_spec_reaches_the_picker_through_the_routing_table():
    spec = parse_spec(
        f"""
pools: [{{name: p}}]
scheduling:
  scorers: [{{type: ttft, weight: 1}}]
models:
  - name: m
    versions: [{{name: v1, endpoints: [{{address: "{FAST}", pool: p}}, {{address: "{SLOW}", pool: p}}]}}]
""",
        "mesh.yaml",
    )
    r = RoutingView.from_proto(translate_routing_table(build_mesh_model(spec)))
    assert r.scheduling == ProfileView(registry.DEFAULT_FILTERS, (ScorerRef("ttft", 1.0),))
    # Under the spec's default saturation (5 queued): 3 queued on the fast one still go there.
    assert pick(load({FAST: 3, SLOW: 0}), r=r) == FAST
    assert pick(load({FAST: 3, SLOW: 0}), inflight={FAST: 1}, r=r) == SLOW
    # The default profile weighs queues without speeds: it sends this one to the idle slow replica.
    plain = RoutingView.from_proto(
        translate_routing_table(build_mesh_model(spec.model_copy(update={"scheduling": None})))
    )
    assert pick(load({FAST: 3, SLOW: 0}), r=plain) == SLOW


def test_in_a_profile_with_prefix_affinity_ttft_counts_the_indexed_overlap_in_seconds():
    # prefix-affinity at a weight too small to matter (weight 0 would leave it out of the profile):
    # ttft ranks, reading its overlap from the prefix index the Picker binds (CacheAware). Same
    # speeds as above; a 1000-token prompt, 1 request queued on FAST.
    same = dict(prefill_tokens_per_s=5000.0, prefill_tokens_mean=500.0, decode_step_s=0.04)
    lv = load({FAST: 1, SLOW: 0}, {FAST: same, SLOW: same})
    both = mesh_pb2.SchedulingProfile(
        scorers=[mesh_pb2.PluginRef(type="ttft", weight=1), mesh_pb2.PluginRef(type="prefix-affinity", weight=0.001)]
    )
    r = routing(both)
    picker = Picker()
    prompt = picker.prompt_scorer(r, "m")
    assert prompt is not None
    body = {"model": "m", "messages": [{"role": "system", "content": "x" * 4000}]}
    hashes = prompt.prefix_hashes(body)
    request = SchedulingRequest(tokens=1000, prefix_hashes=hashes)

    def primary() -> str:
        result = picker.pick(r, lv, "m", None, {}, now=NOW, request=request)
        assert isinstance(result, Pick), result
        return result.primary

    # Nothing indexed: (500 + 1000) / 5000 + 0.04 = 0.34 s queued on FAST against 0.24 s idle.
    assert primary() == SLOW
    # FAST holds the whole prompt: (500 + ~8) / 5000 + 0.04 = 0.14 s.
    assert prompt.index is not None
    prompt.index.record(FAST, hashes, time.monotonic())
    assert primary() == FAST
