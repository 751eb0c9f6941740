"""A spec-defined scheduling profile, end to end: real Envoy, control plane, ext_proc and fleet.

  plain  v1 (plain-fast pool fast, plain-cheap pool cheap): the spec's top-level profile (today's)
  flat   v1 (flat-fast pool fast, flat-cheap pool cheap): its own profile, without prefer-tiers and
         scored on in-flight requests only

The default priority classes send `critical` to the low-latency tier (pool fast) while it has a
healthy replica; a profile without `prefer-tiers` does not.
"""

from __future__ import annotations

import collections

import httpx
import pytest

from tests.harness import Replica, chat, make_mesh

REPLICAS = [
    Replica("plain-fast", "plain", "v1", pool="fast"),
    Replica("plain-cheap", "plain", "v1", pool="cheap"),
    Replica("flat-fast", "flat", "v1", pool="fast"),
    Replica("flat-cheap", "flat", "v1", pool="cheap"),
]
TOP_LEVEL = {
    "filters": ["drop-drained", "prefer-tiers", "prefer-fresh", "count-saturation", "drop-saturated"],
    "scorers": [
        {"type": "queue", "weight": 2},
        {"type": "kv-cache", "weight": 2},
        {"type": "inflight", "weight": 1},
        {"type": "latency", "weight": 2},
    ],
}
FLAT = {
    "filters": ["drop-drained", "prefer-fresh", "count-saturation", "drop-saturated"],
    "scorers": [{"type": "inflight"}],
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("scheduling")
    test_mesh = make_mesh(workdir, [Replica(**vars(r)) for r in REPLICAS], scheduling=TOP_LEVEL)
    for model in test_mesh.spec["models"]:
        if model["name"] == "flat":
            model["scheduling"] = FLAT
    test_mesh.save_spec()
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion("plain")
        test_mesh.mesh.wait_for_completion("flat")
        yield test_mesh


def pools_serving_critical(mesh, model: str, n: int = 30) -> collections.Counter:
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        responses = [
            client.post("/v1/chat/completions", headers={"x-priority": "critical"}, json=chat(model)) for _ in range(n)
        ]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    by_address = mesh.by_address()
    assert {by_address[r.headers["x-imesh-endpoint"]].model for r in responses} == {model}
    return collections.Counter(r.headers["x-imesh-pool"] for r in responses)


def test_the_top_level_profile_keeps_critical_work_on_the_low_latency_tier(mesh):
    pools = pools_serving_critical(mesh, "plain")
    assert set(pools) == {"fast"}, pools


def test_a_model_profile_without_tier_preference_spreads_critical_work_over_both_tiers(mesh):
    # In-flight only, and ties take turns: both replicas serve, whatever their tier.
    pools = pools_serving_critical(mesh, "flat")
    assert set(pools) == {"fast", "cheap"}, pools
