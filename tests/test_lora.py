"""LoRA adapter affinity in the mesh: the load signal, the spec, identity and the scorer.

vLLM names the adapters with running and waiting requests in the labels of
``vllm:lora_requests_info`` (and keeps earlier label sets, older timestamps as values); the load
monitor reads the newest into ``EndpointLoad.adapters``/``max_adapters``. A spec's model version
declares the adapters clients may name as ``model``; the mesh routes them to the base model and
the ``lora-affinity`` scorer prefers replicas where the adapter is active, then those with a free
adapter slot. The end-to-end test through real Envoy is tests/test_e2e_lora.py.
"""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

from controlplane.load.metrics_parsing import EngineLoad, parse_engine_load
from controlplane.load.monitor import LoadMonitor, ScrapeTarget
from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import SpecError, parse_spec
from controlplane.translate.envoy import translate_routes
from controlplane.translate.table import translate_routing_table
from extproc.identify import resolve_adapter
from extproc.mesh_view import MeshView
from extproc.routing_view import LoadView, ProfileView, RoutingView, ScoringView
from extproc.scheduler.candidates import Candidate, FilterContext
from extproc.scheduler.interfaces import SchedulingRequest
from extproc.scheduler.picker import Picker
from extproc.scheduler.profile import SchedulerProfile, build_profile, default_filters, default_profile
from extproc.scheduler.scorers.lora_affinity import LoraAffinityScorer
from extproc.service import ExternalProcessor
from fleet import FleetConfig, ReplicaConfig, start_fleet
from protos import mesh_pb2

VLLM_LORA = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
# HELP vllm:lora_requests_info Running stats on lora requests.
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.7598e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters="fin,sql"} 1.7599e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="chat",waiting_lora_adapters=""} 1.75985e+09
"""


# ---- the load signal --------------------------------------------------------------------------


def test_the_newest_lora_info_names_the_active_adapters_running_first():
    load = parse_engine_load(VLLM_LORA, "vllm")
    assert load.adapters == ("sql", "chat", "fin")  # running, then waiting; once each
    assert load.max_adapters == 2
    assert load.running == 3.0
    assert parse_engine_load(VLLM_LORA, "generic") == load  # generic probes vLLM first


def test_without_lora_info_no_adapters_are_known():
    assert parse_engine_load("vllm:num_requests_running 1\n", "vllm") == EngineLoad(running=1.0)
    # Other engines' pages are not read for vLLM's names.
    assert parse_engine_load(VLLM_LORA, "sglang").adapters == ()
    idle = VLLM_LORA.replace("1.7599e+09", "1.7e+09").replace("1.75985e+09", "1.71e+09")
    assert parse_engine_load(idle, "vllm").adapters == ()  # the newest says none is active
    odd = 'vllm:lora_requests_info{max_lora="",running_lora_adapters=" a , ,b"} 1.0\n'
    assert parse_engine_load(odd, "vllm") == EngineLoad(adapters=("a", "b"), max_adapters=0)


async def test_the_load_monitor_reports_a_replicas_active_adapters():
    fleet = await start_fleet(
        FleetConfig(
            replicas=[
                ReplicaConfig(
                    name="lora",
                    address="127.0.0.1:0",
                    models=["llama"],
                    adapters=["sql-lora"],
                    overrides={"max_loras": 3},
                )
            ]
        )
    )
    try:
        engine = fleet.engine("lora")
        seq = engine.submit("llama", 8, [], 100_000 // 20, adapter="sql-lora")
        address = fleet.addresses["lora"]
        async with LoadMonitor([ScrapeTarget(address, "vllm")], interval_s=0.05) as monitor:
            report = await monitor.wait_for_report()
            while not report.endpoints or not report.endpoints[0].adapters:
                report = await monitor.wait_for_report(report.sequence, timeout=30)
        engine.abort(seq)
    finally:
        await fleet.stop()
    (endpoint,) = report.endpoints
    assert (list(endpoint.adapters), endpoint.max_adapters) == (["sql-lora"], 3)


# ---- the spec, the mesh model and the routing table --------------------------------------------

SPEC = """
pools: [{name: p}]
models:
  - name: llama
    versions:
      - {name: v1, weight: 90, adapters: [sql-lora, chat-lora], endpoints: [{address: 10.0.0.1:8000, pool: p}]}
      - {name: v2, weight: 10, adapters: [chat-lora, new-lora], endpoints: [{address: 10.0.0.2:8000, pool: p}]}
      - {name: v3, weight: 0, adapters: [old-lora]}
  - name: bert
    versions: [{name: "1", endpoints: [{address: 10.0.0.3:8000, pool: p}]}]
"""


def spec_problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "mesh.yaml")
    return caught.value.problems


def test_an_adapter_named_like_a_model_or_of_two_models_is_a_spec_error():
    (clash,) = spec_problems(SPEC.replace("adapters: [sql-lora, chat-lora]", "adapters: [sql-lora, bert]"))
    assert clash == "mesh.yaml: <top>: models[0].versions[0].adapters[1]: adapter 'bert' is also the name of a model"
    shared = SPEC.replace('versions: [{name: "1", endpoints', 'versions: [{name: "1", adapters: [sql-lora], endpoints')
    (two,) = spec_problems(shared)
    assert "models[1].versions[0].adapters[0]: adapter 'sql-lora' is already an adapter of model 'llama'" in two
    (repeated,) = spec_problems(SPEC.replace("[sql-lora, chat-lora]", "[sql-lora, sql-lora]"))
    assert repeated.startswith("mesh.yaml: models[0].versions[0].adapters: each adapter may appear once")
    (bad,) = spec_problems(SPEC.replace("[sql-lora, chat-lora]", "['sql lora']"))
    assert bad.startswith("mesh.yaml: models[0].versions[0].adapters[0]: String should match pattern")


def test_an_adapter_goes_to_the_model_split_when_every_routed_version_serves_it_else_to_one_version():
    mesh = build_mesh_model(parse_spec(SPEC))
    llama = mesh.model("llama")
    assert llama is not None
    assert {a.name: a.version for a in llama.adapters} == {
        "sql-lora": "v1",  # only v1 serves it
        "chat-lora": "",  # v1 and v2 (v3 gets no traffic): the weighted split
        "new-lora": "v2",
        "old-lora": "v3",  # no routed version serves it: the one that declares it
    }
    table = translate_routing_table(mesh)
    assert [(a.name, a.version) for a in table.models[0].adapters][:2] == [("sql-lora", "v1"), ("chat-lora", "")]
    routing = RoutingView.from_proto(table)
    sql = resolve_adapter(routing, "sql-lora")
    assert sql is not None and (sql.name, sql.model, sql.version) == ("sql-lora", "llama", "v1")
    chat = resolve_adapter(routing, "chat-lora")
    assert chat is not None and (chat.model, chat.version) == ("llama", None)
    assert resolve_adapter(routing, "llama") is None and resolve_adapter(routing, "nope") is None


def test_models_list_adapters_with_their_parent_on_both_sides():
    mesh = build_mesh_model(parse_spec(SPEC))
    routing = RoutingView.from_proto(translate_routing_table(mesh))
    config = translate_routes(mesh)
    routes = {r.name: r for vhost in config.virtual_hosts for r in vhost.routes}
    listing = routes["models-list"].direct_response.body.inline_string
    assert listing.encode() == routing.models_list_body  # Envoy's route and the ext_proc's view, byte for byte
    entries = json.loads(listing)["data"]
    assert [(e["id"], e.get("parent")) for e in entries] == [
        ("llama", None),
        ("bert", None),
        ("sql-lora", "llama"),
        ("chat-lora", "llama"),
        ("new-lora", "llama"),
        ("old-lora", "llama"),
    ]
    assert "parent" not in entries[0]  # a model's entry is as before
    assert [json.loads(routing.entry_body(e["id"]) or b"") for e in entries] == entries  # GET /v1/models/{id}
    assert routing.entry_body("nope") is None


def test_the_fail_open_route_of_an_adapter_named_in_x_model_id_goes_to_the_base_models_clusters():
    mesh = build_mesh_model(parse_spec(SPEC))
    routes = {r.name: r for r in translate_routes(mesh).virtual_hosts[0].routes}
    order = list(routes)
    sql, chat = routes["llama/adapter/sql-lora"], routes["llama/adapter/chat-lora"]
    assert [(h.name, h.string_match.exact) for h in sql.match.headers] == [("x-model-id", "sql-lora")]
    assert sql.route.cluster == "llama/v1"  # the one version that serves it
    assert chat.route.weighted_clusters == routes["llama/header"].route.weighted_clusters  # the model's split
    assert {h.header.key: h.header.value for h in sql.response_headers_to_add}["x-imesh-model"] == "llama"
    assert order.index("llama/adapter/sql-lora") < order.index("unknown-model")


# ---- the ext_proc: an adapter named in the body or a header is routed as its base model ---------


def headers_message(headers: dict[str, str], end_of_stream: bool = False) -> ext.HttpHeaders:
    message = ext.HttpHeaders(end_of_stream=end_of_stream)
    for key, value in headers.items():
        message.headers.headers.add(key=key, raw_value=value.encode())
    return message


def set_headers(response: ext.ProcessingResponse) -> dict[str, str]:
    phase = response.WhichOneof("response")
    mutation = getattr(response, phase).response.header_mutation
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def test_the_extproc_routes_an_adapter_as_its_base_model_and_tells_the_scheduler():
    seen: list[SchedulingRequest | None] = []

    class Recording(Picker):
        def pick(self, *args, **kwargs):
            seen.append(kwargs.get("request"))
            return super().pick(*args, **kwargs)

    view = MeshView()
    view.apply_table(translate_routing_table(build_mesh_model(parse_spec(SPEC))))
    servicer = ExternalProcessor(view, Recording())
    chat = b'{"model": "sql-lora", "messages": [{"role": "user", "content": "hi"}]}'
    post = {":method": "POST", ":path": "/v1/chat/completions"}
    identity, asked = servicer.on_headers(headers_message(post))
    assert asked.request_headers.response.status == 0 and identity is not None and identity.needs_body
    by_body = servicer.on_body(identity, chat)
    assert set_headers(by_body) == {"x-imesh-model": "llama", "x-imesh-version": "v1"}  # pinned: only v1 has it
    _, by_header = servicer.on_headers(headers_message({**post, "x-model-id": "chat-lora"}))
    assert set_headers(by_header) == {"x-imesh-model": "llama"}  # the model's split
    _, plain = servicer.on_headers(headers_message({**post, "x-model-id": "llama"}))
    assert set_headers(plain) == {"x-imesh-model": "llama"}
    assert [r.adapter if r is not None else None for r in seen] == ["sql-lora", "chat-lora", None]
    _, entry = servicer.on_headers(headers_message({":method": "GET", ":path": "/v1/models/sql-lora"}))
    assert json.loads(entry.immediate_response.body)["parent"] == "llama"


# ---- the scorer ---------------------------------------------------------------------------------

NOW = 1000.0


def lora_routing(n: int, scheduling: mesh_pb2.SchedulingProfile | None = None) -> RoutingView:
    endpoints = [mesh_pb2.Endpoint(address=f"10.0.0.{i}:80", pool="p", tier="standard") for i in range(1, n + 1)]
    version = mesh_pb2.ModelVersion(name="v1", weight=100, cluster="m/v1", endpoints=endpoints)
    model = mesh_pb2.Model(name="m", versions=[version], adapters=[mesh_pb2.LoraAdapter(name="sql-lora")])
    table = mesh_pb2.RoutingTable(version=1, models=[model], default_priority="standard", scheduling=scheduling)
    return RoutingView.from_proto(table)


def lora_load(**endpoints: dict) -> LoadView:
    """lora_load(e1=dict(adapters=[...], max=2, waiting=0, age=0.05)); e<i> is 10.0.0.<i>:80."""
    report = mesh_pb2.LoadReport(sequence=1)
    for key, r in endpoints.items():
        report.endpoints.append(
            mesh_pb2.EndpointLoad(
                address=f"10.0.0.{key[1:]}:80",
                waiting=r.get("waiting", 0),
                gpu_util=-1,
                age_s=r.get("age", 0.05),
                reachable=True,
                adapters=r.get("adapters", []),
                max_adapters=r.get("max", 0),
            )
        )
    return LoadView.from_proto(report, received_at=NOW)


def candidates_of(routing: RoutingView, load: LoadView) -> tuple[FilterContext, list[Candidate]]:
    ctx = FilterContext(routing.scoring, routing.default_priority, NOW)
    endpoints = routing.model("m").versions[0].endpoints
    return ctx, [Candidate(e, load.get(e.address), routing.scoring, NOW) for e in endpoints]


def test_the_scorer_rates_active_adapters_then_free_slots_then_full_replicas():
    routing = lora_routing(5)
    load = lora_load(
        e1=dict(adapters=["chat-lora"], max=2),  # a free slot
        e2=dict(adapters=["sql-lora"], max=1),  # active (and full)
        e3=dict(adapters=["chat-lora", "fin-lora"], max=2),  # full of others
        e4=dict(adapters=["sql-lora"], max=2, age=60.0),  # a stale reading is no evidence
        # e5: no reading yet
    )
    term = LoraAffinityScorer(2.0).request(*candidates_of(routing, load))
    assert term is not None
    assert term(SchedulingRequest(adapter="sql-lora")) == {
        "10.0.0.1:80": 0.5,
        "10.0.0.2:80": 1.0,
        "10.0.0.4:80": 0.5,
        "10.0.0.5:80": 0.5,
    }  # e3 scores 0 (missing)
    assert term(SchedulingRequest(adapter="fin-lora"))["10.0.0.3:80"] == 1.0
    assert term(SchedulingRequest(adapter="new-lora")) == {"10.0.0.1:80": 0.5, "10.0.0.4:80": 0.5, "10.0.0.5:80": 0.5}
    assert term(SchedulingRequest()) is None  # no adapter: no bonus
    # Replicas that report nothing about LoRA (no metric, another engine): the scorer abstains.
    assert LoraAffinityScorer(2.0).request(*candidates_of(routing, lora_load(e1={}, e2={}))) is None


def test_an_adapter_request_goes_where_its_adapter_is_active_and_others_are_ranked_as_without_the_scorer():
    routing = lora_routing(3)
    load = lora_load(e1=dict(max=1), e2=dict(adapters=["sql-lora"], max=1), e3=dict(adapters=["chat-lora"], max=1))
    picker = Picker()
    adapter = SchedulingRequest(adapter="sql-lora")
    picks = [picker.pick(routing, load, "m", None, {}, now=NOW, request=adapter).hosts[0] for _ in range(6)]
    assert set(picks) == {"10.0.0.2:80"}
    new = SchedulingRequest(adapter="new-lora")
    assert {picker.pick(routing, load, "m", None, {}, now=NOW, request=new).hosts[0] for _ in range(6)} == {
        "10.0.0.1:80"  # the only free slot
    }
    # Without an adapter the default profile (which has lora-affinity) ranks as one without it.
    ours = default_profile(routing.scoring)
    theirs = SchedulerProfile(default_filters(), [s for s in ours.scorers if s.name != "lora-affinity"])
    assert len(theirs.scorers) == len(ours.scorers) - 1
    model, priority = routing.model("m"), routing.default_priority
    our_plan = ours.plan(routing, load, model, priority, None, NOW)
    their_plan = theirs.plan(routing, load, model, priority, None, NOW)
    assert our_plan.groups[0].entries == their_plan.groups[0].entries  # the same compiled scores
    for turn in range(6):
        expected = theirs.rank(their_plan, {}, turn).hosts
        assert ours.rank(our_plan, {}, turn).hosts == expected
        assert ours.rank(our_plan, {}, turn, SchedulingRequest()).hosts == expected


def test_lora_affinity_is_a_plugin_a_spec_may_name():
    spec = parse_spec(SPEC + "scheduling: {scorers: [{type: queue}, {type: lora-affinity, weight: 3}]}\n")
    table = translate_routing_table(build_mesh_model(spec))
    assert [(s.type, s.weight) for s in table.scheduling.scorers] == [("queue", 1.0), ("lora-affinity", 3.0)]
    profile = build_profile(ProfileView.from_proto(table.scheduling), ScoringView())
    assert isinstance(profile.scorers[1], LoraAffinityScorer) and profile.scorers[1].weight == 3.0
