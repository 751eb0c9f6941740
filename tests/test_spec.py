"""The mesh spec: the shipped example is valid, and every error names file, field and expectation."""

from pathlib import Path

import pytest

from controlplane.model.mesh_model import MeshModelMemo, build_mesh_model
from controlplane.spec.diff import diff_specs
from controlplane.spec.schema import SpecError, dump_spec, load_spec, parse_spec
from controlplane.state.overrides import Overrides
from imesh.local_mesh import DEMO_SPEC

GOOD = """
pools: [{name: fast, tier: low-latency}]
models:
  - name: m
    versions:
      - {name: v1, weight: 90, endpoints: [{address: 127.0.0.1:9000, pool: fast}]}
      - {name: v2, weight: 10, endpoints: [{address: 127.0.0.1:9001, pool: fast}]}
"""


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, "mesh.yaml")
    return caught.value.problems


def test_demo_spec_is_valid_and_has_two_models_one_with_a_90_10_split():
    spec = load_spec(DEMO_SPEC)
    assert len(spec.models) >= 2
    weights = {v.name: v.weight for v in spec.model("llama-3-8b").versions}
    assert weights == {"v1": 90, "v2": 10}
    assert {p.tier for p in spec.pools} >= {"low-latency", "cost-effective"}


def test_unknown_field_is_named_with_its_path():
    assert errors(GOOD.replace("weight: 90", "wieght: 90")) == [
        "mesh.yaml: models[0].versions[0].wieght: unknown field (check the spelling)"
    ]


def test_bad_value_names_field_and_expectation():
    (problem,) = errors(GOOD.replace("weight: 90", "weight: -5"))
    assert problem.startswith("mesh.yaml: models[0].versions[0].weight: Input should be greater than or equal to 0")


def test_unknown_pool_and_hostname_addresses_are_rejected():
    (pool_problem,) = errors(GOOD.replace("pool: fast}]}\n      - {name: v2", "pool: nope}]}\n      - {name: v2"))
    assert "models[0].versions[0].endpoints[0].pool: unknown pool 'nope'" in pool_problem
    (address_problem,) = errors(GOOD.replace("127.0.0.1:9000", "replica-a:9000"))
    assert "models[0].versions[0].endpoints[0].address" in address_problem
    assert "IP address" in address_problem


def test_the_same_replica_cannot_serve_two_versions():
    (problem,) = errors(GOOD.replace("127.0.0.1:9001", "127.0.0.1:9000"))
    assert "127.0.0.1:9000 already serves m/v1" in problem


def test_malformed_yaml_and_wrong_top_level_say_where():
    (problem,) = errors("models: [")
    assert problem.startswith("mesh.yaml: line 1")
    assert errors("- a\n- b") == ["mesh.yaml: expected a mapping at the top level, got list"]


def test_missing_file_is_a_spec_error(tmp_path: Path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "absent.yaml")


def test_dump_and_parse_round_trip():
    spec = load_spec(DEMO_SPEC)
    assert parse_spec(dump_spec(spec)) == spec


def test_overrides_change_weights_and_drain_in_the_model():
    spec = parse_spec(GOOD)
    model = build_mesh_model(spec, Overrides(weights={"m": {"v2": 50}}, drained=frozenset({"127.0.0.1:9000"})))
    v1, v2 = model.model("m").versions
    assert (v1.weight, v2.weight) == (90, 50)
    assert v1.endpoints[0].drained and not v2.endpoints[0].drained
    assert v1.cluster == "m/v1" and v1.endpoints[0].tier == "low-latency"


def test_diff_is_keyed_by_name():
    old = parse_spec(GOOD)
    new = parse_spec(GOOD.replace("weight: 10", "weight: 20").replace("tier: low-latency", "tier: fast-tier"))
    assert diff_specs(old, new) == [
        "~ pools.fast.tier: 'low-latency' -> 'fast-tier'",
        "~ models.m.versions.v2.weight: 10 -> 20",
    ]
    assert diff_specs(old, old) == []


def test_mesh_model_reuses_unchanged_versions_and_matches_a_cold_build():
    spec = parse_spec(GOOD)
    memo = MeshModelMemo()
    first = build_mesh_model(spec, memo=memo)
    drained = build_mesh_model(spec, Overrides(drained=frozenset({"127.0.0.1:9001"})), memo=memo)
    v1, v2 = drained.model("m").versions
    assert v1 is first.model("m").versions[0]  # untouched: the very same object, endpoints not walked
    assert v2 is not first.model("m").versions[1] and v2.endpoints[0].drained
    reweighted = build_mesh_model(spec, Overrides(weights={"m": {"v1": 10}}), memo=memo)
    assert reweighted.model("m").versions[0].weight == 10
    cold = build_mesh_model(spec, Overrides(weights={"m": {"v1": 10}}))  # no memo: nothing reused
    assert cold == reweighted and cold.model("m").versions[1] is not reweighted.model("m").versions[1]
    # ... and a build without the memo (`imesh get routes`) leaves it as it was.
    again = build_mesh_model(spec, Overrides(weights={"m": {"v1": 10}}), memo=memo)
    assert all(a is b for a, b in zip(again.model("m").versions, reweighted.model("m").versions, strict=True))


# ---------------------------------------------------------------- scheduling profiles

SCHEDULED = (
    GOOD
    + """
scheduling:
  filters: [drop-drained, prefer-tiers, prefer-fresh, count-saturation, drop-saturated]
  scorers:
    - {type: queue, weight: 2}
    - {type: kv-cache, weight: 2}
    - {type: inflight, weight: 1}
    - {type: latency, weight: 2}
"""
)


def test_scheduling_profile_is_optional_and_filters_default_to_todays_chain():
    assert parse_spec(GOOD).scheduling is None and parse_spec(GOOD).models[0].scheduling is None
    spec = parse_spec(SCHEDULED)
    assert [s.type for s in spec.scheduling.scorers] == ["queue", "kv-cache", "inflight", "latency"]
    only_scorers = parse_spec(GOOD + "scheduling: {scorers: [{type: inflight}]}\n").scheduling
    assert only_scorers.filters == parse_spec(SCHEDULED).scheduling.filters and only_scorers.scorers[0].weight == 1
    assert parse_spec(GOOD + "scheduling: {filters: [drop-drained]}\n").scheduling.scorers is None  # default scorers
    assert parse_spec(dump_spec(spec)) == spec


def test_unknown_plugin_types_are_named_with_their_field_and_the_known_ones():
    (problem,) = errors(SCHEDULED.replace("{type: kv-cache,", "{type: kv-cash,"))
    assert problem.startswith("mesh.yaml: scheduling.scorers[1].type: unknown scorer type 'kv-cash'; known: [")
    assert "'kv-cache'" in problem and "'queue'" in problem
    (problem,) = errors(SCHEDULED.replace("prefer-fresh,", "prefer-frsh,"))
    assert problem.startswith("mesh.yaml: scheduling.filters[2]: unknown filter type 'prefer-frsh'; known: [")


def test_negative_weights_repeats_and_unknown_params_are_refused():
    (problem,) = errors(SCHEDULED.replace("{type: queue, weight: 2}", "{type: queue, weight: -1}"))
    assert problem.startswith("mesh.yaml: scheduling.scorers[0].weight: Input should be greater than or equal to 0")
    (problem,) = errors(SCHEDULED.replace("{type: latency,", "{type: queue,"))
    assert problem == "mesh.yaml: scheduling.scorers: each scorer may appear once, repeated: ['queue']"
    (problem,) = errors(SCHEDULED.replace("prefer-fresh,", "prefer-tiers,"))
    assert problem == "mesh.yaml: scheduling.filters: each filter may appear once, repeated: ['prefer-tiers']"
    (problem,) = errors(SCHEDULED.replace("{type: queue, weight: 2}", "{type: queue, params: {depth: '3'}}"))
    assert problem == "mesh.yaml: scheduling.scorers[0].params: scorer 'queue' has no parameter 'depth'; it takes none"
    (problem,) = errors(GOOD + "scheduling: {scorers: []}\n")
    assert problem.startswith("mesh.yaml: scheduling.scorers: needs at least one scorer")


def test_every_profile_keeps_drained_replicas_out():
    (problem,) = errors(GOOD + "scheduling: {filters: [prefer-fresh]}\n")
    assert (
        problem
        == "mesh.yaml: scheduling.filters: must include ['drop-drained'] (a drained replica receives no new requests)"
    )


def test_a_model_may_override_the_profile_and_its_errors_name_the_model():
    text = GOOD.replace("  - name: m\n", "  - name: m\n    scheduling: {scorers: [{type: inflight}]}\n")
    assert [s.type for s in parse_spec(text).models[0].scheduling.scorers] == ["inflight"]
    (problem,) = errors(text.replace("type: inflight", "type: prefix"))
    assert problem.startswith("mesh.yaml: models[0].scheduling.scorers[0].type: unknown scorer type 'prefix'")


PRECISE = GOOD.replace("  - name: m\n", "  - name: m\n    tokenizer: /models/m/tokenizer.json\n").replace(
    "{address: 127.0.0.1:9000, pool: fast}", "{address: 127.0.0.1:9000, pool: fast, kv_events: 'tcp://127.0.0.1:5557'}"
)


def test_kv_events_and_the_tokenizer_reach_the_routing_table():
    from controlplane.translate.table import translate_routing_table
    from extproc.routing_view import RoutingView

    routing = RoutingView.from_proto(translate_routing_table(build_mesh_model(parse_spec(PRECISE))))
    assert routing.kv_events == {"127.0.0.1:9000": "tcp://127.0.0.1:5557"}  # 9001 publishes none
    assert routing.models["m"].tokenizer == "/models/m/tokenizer.json"


def test_kv_events_need_a_zmq_tcp_endpoint_and_the_models_tokenizer():
    for bad in ("127.0.0.1:5557", "ipc:///tmp/kv", "tcp://replica-a:5557", "tcp://127.0.0.1:0"):
        (problem,) = errors(PRECISE.replace("tcp://127.0.0.1:5557", bad))
        assert "models[0].versions[0].endpoints[0].kv_events" in problem
    (problem,) = errors(PRECISE.replace("    tokenizer: /models/m/tokenizer.json\n", ""))
    assert "models[0]: endpoints with kv_events need the model's tokenizer" in problem
