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
