"""The scheduler's plugin machinery: the registry, profiles from the routing table, per-model
overrides, the per-request scorer hook, and plugin timing. (The default profile's behaviour is
tests/test_picker.py's.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from controlplane.model.mesh_model import build_mesh_model
from controlplane.spec.schema import parse_spec
from controlplane.translate.table import translate_routing_table
from extproc.routing_view import LoadView, ProfileView, RoutingView, ScorerRef
from extproc.scheduler import registry
from extproc.scheduler.picker import Picker
from extproc.scheduler.profile import default_profile
from extproc.scheduler.results import Pick
from protos import mesh_pb2

NOW = 1000.0
PRIORITIES = [
    mesh_pb2.PriorityClass(name="critical", rank=0, preferred_tiers=["low-latency"]),
    mesh_pb2.PriorityClass(name="standard", rank=1),
]
INFLIGHT_ONLY = mesh_pb2.SchedulingProfile(scorers=[mesh_pb2.PluginRef(type="inflight", weight=1)])


def addr(n: int) -> str:
    return f"10.0.0.{n}:80"


def table(
    models: dict[str, list[int]],
    scheduling: mesh_pb2.SchedulingProfile | None = None,
    overrides: dict[str, mesh_pb2.SchedulingProfile] | None = None,
    tiers: dict[int, str] | None = None,
) -> RoutingView:
    """Models of one version each, on endpoints 10.0.0.<n>:80; ``overrides``: a model's own profile."""
    overrides, tiers = overrides or {}, tiers or {}
    return RoutingView.from_proto(
        mesh_pb2.RoutingTable(
            version=1,
            models=[
                mesh_pb2.Model(
                    name=name,
                    versions=[
                        mesh_pb2.ModelVersion(
                            name="v1",
                            weight=100,
                            cluster=f"{name}/v1",
                            endpoints=[
                                mesh_pb2.Endpoint(address=addr(n), pool="p", tier=tiers.get(n, "standard"))
                                for n in endpoints
                            ],
                        )
                    ],
                    scheduling=overrides.get(name),
                )
                for name, endpoints in models.items()
            ],
            priorities=PRIORITIES,
            default_priority="standard",
            scoring=mesh_pb2.Scoring(
                queue_weight=2, kv_cache_weight=2, inflight_weight=1, latency_weight=2, saturation_queue=5
            ),
            scheduling=scheduling,
        )
    )


def load(**waiting: float) -> LoadView:
    """load(e1=4): endpoint 10.0.0.1:80 reports 4 waiting; every reading fresh and otherwise idle."""
    report = mesh_pb2.LoadReport(sequence=1)
    for key, queue in waiting.items():
        report.endpoints.append(
            mesh_pb2.EndpointLoad(address=addr(int(key[1:])), waiting=queue, kv_cache=0.1, age_s=0.05, reachable=True)
        )
    return LoadView.from_proto(report, received_at=NOW)


def primary(picker: Picker, r: RoutingView, lv: LoadView, model: str, inflight: dict, **kw) -> str:
    result = picker.pick(r, lv, model, kw.pop("priority", None), inflight, now=NOW, **kw)
    assert isinstance(result, Pick), result
    return result.primary


# A long queue on 1, and one request of ours in flight on 2.
LONG_QUEUE_ON_1 = dict(e1=4, e2=0)
ONE_IN_FLIGHT_ON_2 = {addr(2): 1}


# ----------------------------------------------------------------------------- registry


def test_every_registered_plugin_builds_and_carries_its_registry_name():
    for name in registry.filter_names():
        assert registry.make_filter(name).name == name
    for name in registry.scorer_names():
        scorer = registry.make_scorer(name, 2.5)
        assert scorer.name == name and scorer.weight == 2.5
    assert set(registry.DEFAULT_FILTERS) <= set(registry.filter_names())
    assert set(registry.REQUIRED_FILTERS) <= set(registry.DEFAULT_FILTERS)


def test_register_and_look_up_a_scorer_and_unknown_names_list_the_known_ones(monkeypatch):
    monkeypatch.setattr(registry, "SCORERS", dict(registry.SCORERS))

    class Constant:
        name = "constant"

        def __init__(self, weight: float, value: str = "1"):
            self.weight, self.value = weight, float(value)

        def static(self, ctx, candidates):
            return [self.value] * len(candidates)

        def inflight(self, ctx, candidates):
            return None

    registry.register_scorer("constant", Constant, params=("value",))
    assert "constant" in registry.scorer_names()
    built = registry.make_scorer("constant", 3.0, {"value": "0.25"})
    assert isinstance(built, Constant) and built.weight == 3.0 and built.value == 0.25
    registry.check_params("scorer", "constant", {"value": "1"})
    with pytest.raises(ValueError, match="no parameter 'colour'; it takes \\['value'\\]"):
        registry.check_params("scorer", "constant", {"colour": "red"})
    with pytest.raises(registry.UnknownPlugin) as caught:
        registry.make_scorer("prefix-cache", 1.0)
    assert str(caught.value).startswith("unknown scorer type 'prefix-cache'; known: [")
    assert "'constant'" in str(caught.value) and "'queue'" in str(caught.value)
    with pytest.raises(registry.UnknownPlugin, match="unknown filter type 'nope'"):
        registry.make_filter("nope")


def test_the_control_plane_imports_only_the_registry_of_the_scheduler():
    code = "import controlplane.spec.schema, sys; print(sorted(m for m in sys.modules if m.startswith('extproc')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['extproc', 'extproc.scheduler', 'extproc.scheduler.registry']"


# ----------------------------------------------------------------------------- profiles from the table


def test_default_profile_prefers_the_short_queue_but_an_inflight_only_profile_ignores_it():
    lv = load(**LONG_QUEUE_ON_1)
    default = table({"m": [1, 2]})
    assert default.scheduling is None
    assert primary(Picker(), default, lv, "m", ONE_IN_FLIGHT_ON_2) == addr(2)
    # Only in-flight counts: the replica with the long queue has none of ours, so it wins.
    custom = table({"m": [1, 2]}, scheduling=INFLIGHT_ONLY)
    picker = Picker()
    assert primary(picker, custom, lv, "m", ONE_IN_FLIGHT_ON_2) == addr(1)
    profile = picker.profile_for(custom, custom.model("m"))
    assert [s.name for s in profile.scorers] == ["inflight"]
    assert [f.name for f in profile.filters] == list(registry.DEFAULT_FILTERS)  # filters left out: the default


def test_a_model_override_replaces_the_table_profile_for_that_model_only():
    lv = load(e1=4, e2=0, e3=4, e4=0)
    inflight = {addr(2): 1, addr(4): 1}
    r = table({"m": [1, 2], "n": [3, 4]}, overrides={"n": INFLIGHT_ONLY})
    picker = Picker()
    assert primary(picker, r, lv, "m", inflight) == addr(2)  # the default profile: short queue
    assert primary(picker, r, lv, "n", inflight) == addr(3)  # its own: in-flight only
    assert picker.profile_for(r, r.model("m")) is picker.profile
    # And the other way round: a table profile, and a model that overrides it with the default chain.
    default_like = mesh_pb2.SchedulingProfile(
        scorers=[mesh_pb2.PluginRef(type=t, weight=w) for t, w in (("queue", 2), ("kv-cache", 2), ("inflight", 1))]
    )
    r = table({"m": [1, 2], "n": [3, 4]}, scheduling=INFLIGHT_ONLY, overrides={"m": default_like})
    assert primary(picker, r, lv, "m", inflight) == addr(2)
    assert primary(picker, r, lv, "n", inflight) == addr(3)


def test_a_profile_without_prefer_tiers_lets_critical_requests_leave_their_tier():
    no_tiers = mesh_pb2.SchedulingProfile(filters=["drop-drained", "prefer-fresh"])
    tiers = {1: "low-latency", 2: "cost-effective"}
    lv = load(e1=3, e2=0)
    picker = Picker()
    r = table({"m": [1, 2]}, tiers=tiers)
    assert primary(picker, r, lv, "m", {}, priority="critical") == addr(1)
    r = table({"m": [1, 2]}, scheduling=no_tiers, tiers=tiers)
    assert primary(picker, r, lv, "m", {}, priority="critical") == addr(2)


def test_one_profile_is_built_per_distinct_profile_and_kept_across_tables():
    picker = Picker()
    lv = load(e1=0, e2=0, e3=0)
    r = table({"m": [1], "n": [2], "o": [3]}, overrides={"m": INFLIGHT_ONLY, "n": INFLIGHT_ONLY})
    for model in ("m", "n", "o"):
        primary(picker, r, lv, model, {})
    shared = picker.profile_for(r, r.model("m"))
    assert picker.profile_for(r, r.model("n")) is shared
    assert picker.profile_for(r, r.model("o")) is picker.profile is not shared
    later = table({"m": [1], "n": [2], "o": [3]}, overrides={"m": INFLIGHT_ONLY})
    primary(picker, later, lv, "m", {})
    assert picker.profile_for(later, later.model("m")) is shared


def test_a_profile_naming_a_plugin_this_process_lacks_falls_back_to_the_default(caplog):
    newer = mesh_pb2.SchedulingProfile(scorers=[mesh_pb2.PluginRef(type="from-the-future", weight=1)])
    r = table({"m": [1, 2]}, scheduling=newer)
    picker = Picker()
    with caplog.at_level("ERROR", logger="imesh.extproc"):
        assert primary(picker, r, load(**LONG_QUEUE_ON_1), "m", ONE_IN_FLIGHT_ON_2) == addr(2)
    assert "from-the-future" in caplog.text
    assert [s.name for s in picker.profile_for(r, r.model("m")).scorers] == [s.name for s in picker.profile.scorers]


def test_the_spec_profile_reaches_the_picker_through_the_routing_table():
    spec = parse_spec(
        """
pools: [{name: p}]
scheduling:
  scorers: [{type: queue, weight: 2}, {type: kv-cache, weight: 2}, {type: inflight, weight: 1}]
models:
  - name: m
    versions: [{name: v1, endpoints: [{address: 10.0.0.1:80, pool: p}, {address: 10.0.0.2:80, pool: p}]}]
    scheduling: {filters: [drop-drained, prefer-fresh], scorers: [{type: inflight}]}
  - name: n
    versions: [{name: v1, endpoints: [{address: 10.0.0.3:80, pool: p}]}]
""",
        "mesh.yaml",
    )
    r = RoutingView.from_proto(translate_routing_table(build_mesh_model(spec)))
    assert r.scheduling == ProfileView(
        registry.DEFAULT_FILTERS,
        (ScorerRef("queue", 2.0), ScorerRef("kv-cache", 2.0), ScorerRef("inflight", 1.0)),
    )
    assert r.model("m").scheduling == ProfileView(("drop-drained", "prefer-fresh"), (ScorerRef("inflight", 1.0),))
    assert r.model("n").scheduling is None
    assert primary(Picker(), r, load(**LONG_QUEUE_ON_1), "m", ONE_IN_FLIGHT_ON_2) == addr(1)
    # No `scheduling:` at all: no profile in the table, and the default profile with `scoring:`'s weights.
    plain = RoutingView.from_proto(
        translate_routing_table(build_mesh_model(spec.model_copy(update={"scheduling": None})))
    )
    assert plain.scheduling is None


# ----------------------------------------------------------------------------- the per-request hook


class AdapterAffinity:
    """A toy request scorer: 1 for the replicas that have the request's adapter loaded."""

    name = "adapter"

    def __init__(self, weight: float, loaded: str = ""):
        self.weight = weight
        self.loaded: dict[str, set[str]] = {}  # adapter -> addresses, from "address=adapter,..."
        for pair in filter(None, loaded.split(",")):
            address, _, adapter = pair.partition("=")
            self.loaded.setdefault(adapter, set()).add(address)
        self.prepared = 0

    def static(self, ctx, candidates):
        return None

    def inflight(self, ctx, candidates):
        return None

    def request(self, ctx, candidates):
        self.prepared += 1
        here = {c.address for c in candidates}
        by_adapter = {a: {x: 1.0 for x in addresses & here} for a, addresses in self.loaded.items()}
        return lambda request: by_adapter.get(request.adapter)


def test_a_request_scorer_rates_each_request_from_what_it_prepared_per_plan(monkeypatch):
    from extproc.scheduler.interfaces import SchedulingRequest

    monkeypatch.setattr(registry, "SCORERS", dict(registry.SCORERS))
    registry.register_scorer("adapter", AdapterAffinity, params=("loaded",))
    profile = mesh_pb2.SchedulingProfile(
        scorers=[
            mesh_pb2.PluginRef(type="inflight", weight=1),
            mesh_pb2.PluginRef(type="adapter", weight=3, params={"loaded": f"{addr(1)}=lora-a"}),
        ]
    )
    r = table({"m": [1, 2]}, scheduling=profile)
    lv = load(e1=0, e2=0)
    picker = Picker()
    busy_1 = {addr(1): 2}
    assert primary(picker, r, lv, "m", busy_1, request=SchedulingRequest(adapter="lora-a")) == addr(1)
    assert primary(picker, r, lv, "m", busy_1, request=SchedulingRequest(adapter="lora-b")) == addr(2)
    assert primary(picker, r, lv, "m", busy_1) == addr(2)  # no request input: the scorer abstains
    scorer = picker.profile_for(r, r.model("m")).scorers[1]
    assert isinstance(scorer, AdapterAffinity) and scorer.prepared == 1  # once per plan, not per request


# ----------------------------------------------------------------------------- plugin timing


class RecordingTimer:
    def __init__(self) -> None:
        self.plugins: list[tuple[str, str]] = []
        self.ranks = 0

    def plugin_time(self, plugin: str, extension_point: str, seconds: float) -> None:
        assert seconds >= 0
        self.plugins.append((plugin, extension_point))

    def rank_timer(self):
        def observe(seconds: float) -> None:
            assert seconds >= 0
            self.ranks += 1

        return observe


def test_each_plugin_is_timed_per_plan_and_the_ranking_per_request():
    timer = RecordingTimer()
    picker = Picker(timer=timer)
    r, lv = table({"m": [1, 2]}), load(e1=0, e2=1)
    for _ in range(5):
        primary(picker, r, lv, "m", {})
    profile = default_profile(r.scoring)
    expected = [(f.name, "filter") for f in profile.filters] + [(s.name, "scorer") for s in profile.scorers]
    assert timer.plugins == expected  # one plan, so each plugin once
    assert timer.ranks == 5
