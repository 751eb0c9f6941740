"""The prefix-affinity scorer (extproc/scheduler/scorers/prefix_affinity.py) and its wiring in the
servicer: the matched prefix fraction, sticky until saturated, spreading under load, the index
per process, and the body read only for models whose profile ranks on the prompt.
(The index, the hashes and the renderer themselves are tests/test_prefix.py's.)"""

from __future__ import annotations

import collections
import json
import time

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from prometheus_client import CollectorRegistry

from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import parse_spec
from controlplane.translate.table import translate_routing_table
from extproc.mesh_view import MeshView
from extproc.prefix.blocks import BlockConfig, block_hashes
from extproc.prefix.prompt import prompt_text
from extproc.routing_view import LoadView, RoutingView
from extproc.scheduler.candidates import Candidate
from extproc.scheduler.interfaces import SchedulingRequest
from extproc.scheduler.picker import Picker
from extproc.scheduler.results import Pick
from extproc.scheduler.scorers import NEUTRAL
from extproc.scheduler.scorers.prefix_affinity import PrefixAffinityScorer, headroom
from extproc.service import ExternalProcessor
from extproc.telemetry import ExtprocMetrics
from protos import mesh_pb2

NOW = 1000.0
DEFAULT_SCORERS = [("queue", 2), ("kv-cache", 2), ("inflight", 1), ("running", 1), ("latency", 2)]


def addr(n: int) -> str:
    return f"10.0.0.{n}:80"


def profile(weight: float = 3.0, filters: tuple[str, ...] = (), **params: str) -> mesh_pb2.SchedulingProfile:
    """The default profile's scorers plus prefix-affinity at ``weight``."""
    refs = [mesh_pb2.PluginRef(type=name, weight=w) for name, w in DEFAULT_SCORERS]
    refs.append(mesh_pb2.PluginRef(type="prefix-affinity", weight=weight, params=params))
    return mesh_pb2.SchedulingProfile(filters=list(filters), scorers=refs)


def table(
    endpoints: dict[str, list[int]] | list[int] = (1, 2, 3),
    scheduling: mesh_pb2.SchedulingProfile | None = None,
    weights: dict[str, int] | None = None,
    max_concurrency: int = 0,
) -> RoutingView:
    """Model m (versions of endpoints 10.0.0.<n>:80), with ``scheduling`` as its profile."""
    versions = endpoints if isinstance(endpoints, dict) else {"v1": list(endpoints)}
    weights = weights or {}
    return RoutingView.from_proto(
        mesh_pb2.RoutingTable(
            version=1,
            models=[
                mesh_pb2.Model(
                    name="m",
                    versions=[
                        mesh_pb2.ModelVersion(
                            name=v,
                            weight=weights.get(v, 100),
                            cluster=f"m/{v}",
                            endpoints=[
                                mesh_pb2.Endpoint(address=addr(n), pool="p", max_concurrency=max_concurrency)
                                for n in ns
                            ],
                        )
                        for v, ns in versions.items()
                    ],
                    scheduling=scheduling if scheduling is not None else profile(),
                )
            ],
            priorities=[mesh_pb2.PriorityClass(name="standard", rank=0)],
            default_priority="standard",
            scoring=mesh_pb2.Scoring(
                queue_weight=2, kv_cache_weight=2, inflight_weight=1, latency_weight=2, saturation_queue=5
            ),
        )
    )


def load(**readings: dict) -> LoadView:
    """load(e1=dict(waiting=2)): fresh readings, otherwise idle (kv 0, nothing running)."""
    report = mesh_pb2.LoadReport(sequence=1)
    for key, r in readings.items():
        report.endpoints.append(
            mesh_pb2.EndpointLoad(
                address=addr(int(key[1:])),
                waiting=r.get("waiting", 0),
                running=r.get("running", 0),
                kv_cache=r.get("kv", 0.0),
                age_s=0.05,
                reachable=True,
            )
        )
    return LoadView.from_proto(report, received_at=NOW)


IDLE3 = dict(e1={}, e2={}, e3={})
PROMPT = tuple(range(100, 108))  # eight chained block hashes


def scorer_of(picker: Picker, routing: RoutingView) -> PrefixAffinityScorer:
    scorer = picker.prompt_scorer(routing, "m")
    assert isinstance(scorer, PrefixAffinityScorer)
    return scorer


def pick(picker: Picker, routing: RoutingView, lv: LoadView, hashes=PROMPT, inflight=None) -> Pick:
    request = SchedulingRequest(prefix_hashes=hashes) if hashes else None
    result = picker.pick(routing, lv, "m", None, inflight or {}, now=NOW, request=request)
    assert isinstance(result, Pick), result
    return result


def cached_on(picker: Picker, routing: RoutingView, n: int, hashes=PROMPT) -> None:
    index = scorer_of(picker, routing).index
    assert index is not None  # bound by the picker
    index.record(addr(n), hashes, time.monotonic())


# ----------------------------------------------------------------------------- the score


def test_a_candidate_scores_the_fraction_of_the_request_blocks_it_holds_times_its_headroom():
    picker, routing = Picker(), table()
    cached_on(picker, routing, 1, PROMPT)  # all eight
    cached_on(picker, routing, 2, PROMPT[:2])  # the first two
    cached_on(picker, routing, 3, PROMPT[1:])  # no first block: nothing usable
    lv = load(e1={}, e2={"waiting": 1}, e3={})
    plan = picker.plan(routing, lv, routing.model("m"), routing.priority(None), now=NOW)
    (weight, term, discounted), *_ = plan.groups[0].terms
    assert weight == 3.0 and discounted
    scores = term(SchedulingRequest(prefix_hashes=PROMPT))
    assert scores == pytest.approx({addr(1): 1.0, addr(2): 2 / 8 * (1 - 1 / 5)})
    assert term(SchedulingRequest(prefix_hashes=PROMPT + (7, 8))) == pytest.approx({addr(1): 0.8, addr(2): 0.16})
    assert term(SchedulingRequest()) is None  # no prompt: the scorer abstains


def test_headroom_falls_to_zero_at_the_nearest_saturation_threshold():
    routing = table(max_concurrency=10)
    endpoint = routing.model("m").versions[0].endpoints[0]
    scoring = routing.scoring  # saturation_queue 5, saturation_kv 0.8

    def room(**reading) -> float:
        lv = load(e1=reading)
        return headroom(Candidate(endpoint, lv.readings[addr(1)], scoring, NOW), scoring)

    assert room() == 1.0
    assert room(waiting=1) == pytest.approx(0.8)
    assert room(kv=0.4) == pytest.approx(0.5)
    assert room(waiting=1, running=6) == pytest.approx(0.3)  # 7 of max_concurrency 10
    assert room(waiting=5) == room(kv=0.9) == room(running=10) == 0.0  # saturated
    assert headroom(Candidate(endpoint, None, scoring, NOW), scoring) == NEUTRAL  # no reading: no news


def test_a_request_goes_where_its_prefix_is_cached_and_the_pick_is_recorded():
    picker, routing, lv = Picker(), table(), load(**IDLE3)
    cached_on(picker, routing, 2)
    for _ in range(5):  # equal scores would take turns
        assert pick(picker, routing, lv).primary == addr(2)
    # What the servicer records after a pick: the prompt at each routed version's primary.
    scorer = scorer_of(picker, routing)
    other = tuple(range(200, 204))
    result = pick(picker, routing, lv, hashes=other)
    assert scorer.record(result, other, time.monotonic()) == 0.0  # nothing of it was cached yet
    assert scorer.record(result, other, time.monotonic()) == 4.0
    assert pick(picker, routing, lv, hashes=other).primary == result.primary


def test_with_a_split_each_versions_primary_is_recorded_weighted_by_its_share():
    picker = Picker()
    routing = table({"v1": [1, 2], "v2": [3, 4]}, weights={"v1": 75, "v2": 25})
    result = pick(picker, routing, load(e1={}, e2={}, e3={}, e4={}))
    scorer = scorer_of(picker, routing)
    scorer.record(result, PROMPT, time.monotonic())
    index = scorer.index
    assert index is not None
    assert {a for a, _ in result.primaries} == {a for a in map(addr, (1, 2, 3, 4)) if index.entries(a) == len(PROMPT)}
    assert scorer.record(result, PROMPT[:4], time.monotonic()) == pytest.approx(4.0)  # 0.75 * 4 + 0.25 * 4


# ----------------------------------------------------------------------------- sticky until saturated


def test_a_saturated_replica_gets_no_bonus_even_when_all_are_saturated():
    picker, routing = Picker(), table()
    cached_on(picker, routing, 1)
    everyone_saturated = load(e1={"waiting": 6}, e2={"waiting": 5}, e3={"waiting": 7})
    plan = picker.plan(routing, everyone_saturated, routing.model("m"), routing.priority(None), now=NOW)
    assert len(plan.groups[0].entries) == 3  # drop-saturated keeps all when all are saturated
    assert plan.groups[0].terms == ()  # and the scorer abstains: no bonus for anyone
    assert pick(picker, routing, everyone_saturated).primary == addr(2)  # the shortest queue


def test_without_drop_saturated_a_saturated_holder_still_gets_no_bonus():
    no_drop = profile(10.0, filters=("drop-drained", "prefer-fresh"))
    picker, routing = Picker(), table(scheduling=no_drop)
    cached_on(picker, routing, 1)
    assert pick(picker, routing, load(e1={"waiting": 1}, e2={}, e3={})).primary == addr(1)
    assert pick(picker, routing, load(e1={"waiting": 5}, e2={"waiting": 1}, e3={"waiting": 1})).primary != addr(1)


@pytest.mark.parametrize("weight", [1.0, 3.0, 5.0])
def test_a_prefix_holder_keeps_its_tenant_while_its_queue_is_short_and_loses_it_as_the_queue_grows(weight):
    picker, routing = Picker(), table(scheduling=profile(weight))
    cached_on(picker, routing, 1)
    assert pick(picker, routing, load(**IDLE3)).primary == addr(1)
    # The bonus fades with the queue (headroom) while the load scores fall: a peer wins well
    # before the holder saturates, whatever the weight.
    assert pick(picker, routing, load(e1={"waiting": 4}, e2={}, e3={})).primary != addr(1)


def test_one_tenant_spreads_once_its_replica_has_more_in_flight_than_the_bonus_is_worth():
    picker, routing, lv = Picker(), table(), load(**IDLE3)  # weight 3
    cached_on(picker, routing, 1)
    inflight: dict[str, float] = collections.Counter()
    served = collections.Counter()
    for _ in range(12):  # a burst of one tenant's requests, none finished yet
        primary = pick(picker, routing, lv, inflight=inflight).primary
        inflight[primary] += 1
        served[primary] += 1
    assert served[addr(1)] > max(served[addr(2)], served[addr(3)]), served  # the holder takes the most
    assert set(served) == {addr(1), addr(2), addr(3)}, served  # but not all of them
    assert served[addr(1)] - max(served[addr(2)], served[addr(3)]) <= 4, served


def test_without_a_prompt_the_scorer_abstains_and_requests_spread():
    picker, routing, lv = Picker(), table(), load(**IDLE3)
    cached_on(picker, routing, 1)
    served = collections.Counter(pick(picker, routing, lv, hashes=()).primary for _ in range(9))
    assert served == {addr(1): 3, addr(2): 3, addr(3): 3}


# ----------------------------------------------------------------------------- parameters and the index


def spec_table(scorer: dict) -> RoutingView:
    spec = {
        "apiVersion": "imesh/v1",
        "kind": "Mesh",
        "pools": [{"name": "p"}],
        "models": [
            {
                "name": "m",
                "versions": [{"name": "v1", "endpoints": [{"address": addr(n), "pool": "p"} for n in (1, 2)]}],
                "scheduling": {"scorers": [{"type": "inflight"}, scorer]},
            }
        ],
    }
    return RoutingView.from_proto(translate_routing_table(build_mesh_model(parse_spec(yaml.safe_dump(spec), "t"))))


def test_the_spec_params_reach_the_scorer_and_unknown_ones_are_refused():
    params = {"block_chars": "32", "max_blocks": "100", "ttl_s": "60", "max_entries": "1000"}
    routing = spec_table({"type": "prefix-affinity", "weight": 2, "params": params})
    scorer = scorer_of(Picker(), routing)
    assert scorer.weight == 2 and scorer.blocks == BlockConfig(32, 100)
    assert scorer.index is not None and scorer.index.ttl_s == 60 and scorer.index.max_entries == 1000
    with pytest.raises(ValueError, match="has no parameter 'block_size'"):
        spec_table({"type": "prefix-affinity", "params": {"block_size": "16"}})


def test_a_bad_parameter_value_falls_back_to_the_default_profile(caplog):
    routing = table(scheduling=profile(block_chars="sixty-four"))
    assert Picker().prompt_scorer(routing, "m") is None
    assert "using the default profile" in caplog.text


def test_the_index_is_the_processs_shared_across_profiles_and_forgets_replicas_the_table_drops():
    picker = Picker()
    first, other_weight = table(), table(scheduling=profile(4.0))
    assert scorer_of(picker, first) is not scorer_of(picker, other_weight)  # two profiles
    assert scorer_of(picker, first).index is scorer_of(picker, other_weight).index  # one index
    assert scorer_of(Picker(), first).index is not scorer_of(picker, first).index  # per process
    cached_on(picker, first, 1)
    cached_on(picker, first, 3)
    picker.plan(table([1, 2]), None, first.model("m"), first.priority(None))  # 10.0.0.3 left the table
    index = scorer_of(picker, first).index
    assert index is not None and index.entries(addr(1)) == len(PROMPT) and index.entries(addr(3)) == 0


def test_prefix_hashes_render_the_messages_in_order_system_prompt_first():
    scorer = PrefixAffinityScorer(1.0, block_chars="16")
    system = {"role": "system", "content": "You are a careful assistant. " * 4}
    first = {"messages": [system, {"role": "user", "content": "one " * 8}]}
    second = {"messages": [system, {"role": "user", "content": "two " * 8}]}
    a, b = scorer.prefix_hashes(first), scorer.prefix_hashes(second)
    assert a == tuple(block_hashes(prompt_text(first) or "", BlockConfig(16)))
    shared = len(prompt_text(first) or "") // 16 - 2  # all but the blocks where the user messages differ
    assert a[:shared] == b[:shared] and a[shared] != b[shared] and len(a) == len(b)
    assert scorer.prefix_hashes({"messages": [{"role": "user", "content": "hi"}]}) == ()  # under a block
    assert scorer.prefix_hashes({"input": "embeddings have no prompt to reuse"}) == ()


def test_with_a_tokenizer_completions_hash_token_blocks_and_chat_stays_on_characters(tmp_path):
    from extproc.prefix.blocks import token_block_hashes
    from extproc.prefix.tokens import TokenizerCache
    from tests.kv_fixtures import words, write_tokenizer

    cache = TokenizerCache()
    tokenizer = cache.get(str(write_tokenizer(tmp_path / "tokenizer.json")))
    assert tokenizer is not None and cache.get(str(tmp_path / "tokenizer.json")) is tokenizer  # loaded once
    scorer = PrefixAffinityScorer(1.0, block_tokens="4")
    ids = tokenizer.encode(words(0, 10)).ids
    want = (tuple(token_block_hashes(ids, 4)), 4.0)
    assert len(want[0]) == 2
    assert scorer.prompt_blocks({"prompt": words(0, 10)}, tokenizer) == want
    assert scorer.prompt_blocks({"prompt": ids}, tokenizer) == want  # token ids as they are
    assert scorer.prompt_blocks({"prompt": [words(0, 10), "another"]}, tokenizer) == want  # a batch: the first
    chat = {"messages": [{"role": "user", "content": words(0, 40)}]}
    assert scorer.prompt_blocks(chat, tokenizer) == (scorer.prefix_hashes(chat), 0.0)  # approximate
    assert scorer.prompt_blocks({"prompt": words(0, 10)}, None)[1] == 0.0  # no tokenizer: characters
    (tmp_path / "bad.json").write_text("{")
    assert cache.get(str(tmp_path / "bad.json")) is None and cache.get("") is None


# ----------------------------------------------------------------------------- the servicer


def mesh_with(profiles: dict[str, mesh_pb2.SchedulingProfile | None], max_body_bytes: int = 1 << 20) -> MeshView:
    """Models named by ``profiles``, each on its own 3 endpoints; the load: all idle."""
    view = MeshView()
    models = []
    for i, (name, scheduling) in enumerate(profiles.items()):
        endpoints = [mesh_pb2.Endpoint(address=addr(10 * i + n), pool="p") for n in (1, 2, 3)]
        models.append(
            mesh_pb2.Model(
                name=name,
                versions=[mesh_pb2.ModelVersion(name="v1", weight=100, cluster=f"{name}/v1", endpoints=endpoints)],
                scheduling=scheduling,
            )
        )
    view.apply_table(mesh_pb2.RoutingTable(version=1, models=models, max_body_bytes=max_body_bytes))
    report = mesh_pb2.LoadReport(sequence=1)
    assert view.routing is not None
    for address in view.routing.endpoints:
        # A latency this short: every earlier pick has finished, as when requests come one by one.
        report.endpoints.append(mesh_pb2.EndpointLoad(address=address, age_s=0.05, reachable=True, latency_s=1e-9))
    view.apply_load(report)
    return view


def headers(path: str = "/v1/chat/completions", method: str = "POST", end: bool = False, **more: str):
    items = {":path": path, ":method": method, **{k.replace("_", "-"): v for k, v in more.items()}}
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in items.items()]
    return ext.HttpHeaders(headers=base_pb2.HeaderMap(headers=values), end_of_stream=end)


def chat_body(tenant: str, question: str, model: str | None = None) -> bytes:
    system = {"role": "system", "content": f"{tenant} " * 200}
    body: dict = {"messages": [system, {"role": "user", "content": question}]}
    if model is not None:
        body["model"] = model
    return json.dumps(body).encode()


def hosts_of(response: ext.ProcessingResponse) -> str:
    return response.dynamic_metadata.fields["envoy.lb"].struct_value.fields["x-imesh-endpoint"].string_value


def asks_for_body(response: ext.ProcessingResponse) -> bool:
    return response.mode_override.request_body_mode == response.mode_override.BUFFERED


def test_a_header_named_model_with_prefix_affinity_is_routed_on_its_body_and_sticks():
    servicer = ExternalProcessor(mesh_with({"m": profile()}))
    served = []
    for i in range(6):
        identity, response = servicer.on_headers(headers(x_model_id="m"))
        assert asks_for_body(response) and not response.HasField("dynamic_metadata")
        routed = servicer.on_body(identity, chat_body("alpha", f"question {i}"))
        assert routed.request_body.response.clear_route_cache
        served.append(hosts_of(routed).split(",")[0])
    assert len(set(served)) == 1, served
    stats = servicer._picker.prefix.stats()
    assert stats.replicas == 1 and stats.entries > 0


def test_a_body_named_model_with_prefix_affinity_sticks_too():
    servicer = ExternalProcessor(mesh_with({"m": profile()}))
    served = set()
    for i in range(4):
        identity, response = servicer.on_headers(headers())
        assert asks_for_body(response)
        served.add(hosts_of(servicer.on_body(identity, chat_body("alpha", f"q{i}", model="m"))).split(",")[0])
    assert len(served) == 1


def test_requests_without_a_prefix_scorer_read_no_body_and_hash_nothing():
    servicer = ExternalProcessor(mesh_with({"plain": None, "m": profile()}, max_body_bytes=1000))
    cases = [
        headers(x_model_id="plain"),  # its profile has no prompt scorer
        headers(x_model_id="m", end=True),  # no body
        headers("/v1/embeddings", x_model_id="m"),  # no prompt to reuse
        headers(method="GET", x_model_id="m"),
        headers(x_model_id="m", content_length="5000"),  # over max_body_bytes: routed on its headers
    ]
    for message in cases:
        _, response = servicer.on_headers(message)
        assert not asks_for_body(response)
        assert response.request_headers.response.clear_route_cache and hosts_of(response)
    assert servicer._picker.prefix.stats().entries == 0


def test_a_body_that_is_not_json_costs_its_affinity_not_the_request():
    servicer = ExternalProcessor(mesh_with({"m": profile()}))
    identity, _ = servicer.on_headers(headers(x_model_id="m"))
    routed = servicer.on_body(identity, b"{not json")
    assert hosts_of(routed) and routed.request_body.response.clear_route_cache
    assert servicer._picker.prefix.stats().entries == 0


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


def test_the_index_memory_and_the_predicted_hits_are_exported():
    registry = CollectorRegistry()
    servicer = ExternalProcessor(
        mesh_with({"m": profile(block_chars="64", max_entries_per_replica="20")}),
        metrics=ExtprocMetrics(registry, index_publish_s=0.0),  # the index gauges after every request
    )
    blocks = []
    for i in range(3):
        identity, _ = servicer.on_headers(headers(x_model_id="m"))
        body = chat_body("alpha", f"question {i} " * 10)
        servicer.on_body(identity, body)
        blocks.append(len(block_hashes(prompt_text(json.loads(body)) or "")))
    stats = servicer._picker.prefix.stats()
    assert metric(registry, "imesh_extproc_prefix_blocks_total") == sum(blocks)
    # The second and third requests found the first's shared blocks (all but the last) cached.
    hits = metric(registry, "imesh_extproc_prefix_hit_blocks_total")
    assert 0 < hits <= sum(blocks[1:])
    assert metric(registry, "imesh_extproc_prefix_index_entries") == stats.entries == 20  # capped per replica
    assert metric(registry, "imesh_extproc_prefix_index_bytes") == stats.approx_bytes > 0
    assert metric(registry, "imesh_extproc_prefix_index_evictions_total", reason="lru") == stats.evicted_lru > 0
