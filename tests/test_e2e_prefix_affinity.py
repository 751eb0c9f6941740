"""Prefix-cache affinity end to end: real Envoy, control plane, ext_proc and simulated fleet.

  sticky  v1 (sticky-1..3): load scorers (SCORERS) plus prefix-affinity at weight 3
  plain   v1 (plain-1..3):  the same load scorers without it

Both get the same traffic, one request at a time: four tenants, each with its own long system
prompt and a new question per request (tenants A and B name the model in x-model-id, C and D in
the body), and as many requests without any shared prefix. Each simulated replica's prefix cache
holds about two tenants' prompts, so a replica that serves every tenant in turn keeps evicting
them, and one that serves one or two keeps hitting. Then requests without a shared prefix alone,
and a tenant whose replica's queue grows.

What is asserted is counts, not timing: where each request went (x-imesh-endpoint), and the
fleet's own prefix-cache counters (/sim/state).
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import httpx
import pytest

from tests.harness import Replica, make_mesh, wait_for_queues

# The default scorers but latency: the simulated replicas' latencies are a millisecond or two at
# this time scale, so one slower request swings the latency score; that noise is not under test.
SCORERS = [
    {"type": "queue", "weight": 2},
    {"type": "kv-cache", "weight": 2},
    {"type": "inflight", "weight": 1},
    {"type": "running", "weight": 1},
]
STICKY = {"scorers": [*SCORERS, {"type": "prefix-affinity", "weight": 3}]}
PLAIN = {"scorers": SCORERS}
CACHE_BLOCKS = 40  # per replica: about two tenants' system prompts (16-token blocks)
TENANTS = ("A", "B", "C", "D")
HEADER_NAMED = {"A", "B"}
ROUNDS = 15


def replicas(model: str) -> list[Replica]:
    overrides = {"prefix_cache_blocks": CACHE_BLOCKS}
    return [Replica(f"{model}-{i}", model, "v1", overrides=dict(overrides)) for i in (1, 2, 3)]


def system_prompt(tenant: str) -> str:
    # ~250 four-character words: ~250 simulated tokens, ~16 cache blocks, ~20 of the ext_proc's blocks.
    return " ".join(f"{tenant.lower()}{i:03d}" for i in range(250))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prefix")
    test_mesh = make_mesh(workdir, replicas("sticky") + replicas("plain"))
    for model in test_mesh.spec["models"]:
        model["scheduling"] = STICKY if model["name"] == "sticky" else PLAIN
    test_mesh.save_spec()
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion("sticky")
        test_mesh.mesh.wait_for_completion("plain")
        yield test_mesh


def send(client: httpx.Client, model: str, tenant: str | None, i: int) -> str:
    """One request; returns the replica name that served it."""
    if tenant is None:  # no shared prefix: a few blocks of its own
        messages = [{"role": "user", "content": " ".join(f"{i:03d}{j}" for j in range(40))}]
    else:
        messages = [
            {"role": "system", "content": system_prompt(tenant)},
            {"role": "user", "content": f"question {i} from {tenant}"},
        ]
    body: dict = {"messages": messages, "max_tokens": 2}
    headers = {}
    if tenant in HEADER_NAMED:
        headers["x-model-id"] = model
    else:
        body["model"] = model
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.headers["x-imesh-endpoint"]


def prefix_cache(mesh, model: str) -> tuple[int, int]:
    """The model's replicas' prefix-cache (hits, queries), in tokens, summed."""
    hits = queries = 0
    for r in mesh.replicas:
        if r.model == model:
            state = httpx.get(f"http://{r.address}/sim/state", timeout=5).json()["prefix_cache"]
            hits, queries = hits + state["hits"], queries + state["queries"]
    return hits, queries


class Traffic(NamedTuple):
    served: dict[str, dict[str | None, list[str]]]  # model -> tenant (None: no shared prefix) -> replicas, in order
    prefix_cache: dict[str, tuple[int, int]]  # model -> its replicas' prefix-cache (hits, queries) after it


@pytest.fixture(scope="module")
def traffic(mesh) -> Traffic:
    names = {r.address: r.name for r in mesh.replicas}
    served: dict[str, dict[str | None, list[str]]] = {
        model: collections.defaultdict(list) for model in ("sticky", "plain")
    }
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        for i in range(ROUNDS):
            for model in ("sticky", "plain"):
                for tenant in (*TENANTS, None):
                    served[model][tenant].append(names[send(client, model, tenant, i)])
    return Traffic(served, {model: prefix_cache(mesh, model) for model in served})


def home(served: list[str]) -> tuple[str, float]:
    """The replica that served the first request, and the share of the requests it served."""
    first = served[0]
    return first, served.count(first) / len(served)


def test_each_tenant_sticks_to_the_replica_that_first_served_it(traffic):
    sticky = traffic.served["sticky"]
    for tenant in TENANTS:
        replica, share = home(sticky[tenant])
        assert share >= 0.8, (tenant, replica, sticky[tenant])


def test_the_tenants_do_not_all_pile_onto_one_replica(traffic):
    homes = {home(traffic.served["sticky"][tenant])[0] for tenant in TENANTS}
    assert len(homes) >= 2, homes


def test_with_affinity_the_fleet_hits_its_prefix_cache_more(traffic):
    sticky_hits, sticky_queries = traffic.prefix_cache["sticky"]
    plain_hits, plain_queries = traffic.prefix_cache["plain"]
    assert sticky_queries == plain_queries  # the same prompts, token for token
    # Without affinity each tenant visits every replica and the small caches keep evicting it.
    assert sticky_hits >= 2 * plain_hits, (sticky_hits, plain_hits, sticky_queries)


def test_requests_without_a_shared_prefix_stay_balanced(mesh, traffic):
    names = {r.address: r.name for r in mesh.replicas}
    with httpx.Client(base_url=mesh.url, timeout=30) as client:
        counts = collections.Counter(names[send(client, "sticky", None, 1000 + i)] for i in range(30))
    assert len(counts) == 3 and max(counts.values()) <= 18, counts


def test_a_tenant_leaves_its_replica_when_the_queue_there_grows_short_of_saturation(mesh, traffic):
    tenant = "A"
    replica, _ = home(traffic.served["sticky"][tenant])
    names = {r.address: r.name for r in mesh.replicas}
    mesh.set_faults(replica, extra_waiting=4)  # saturation_queue is 5: loaded, not saturated
    try:
        wait_for_queues(mesh, {replica: 4})
        with httpx.Client(base_url=mesh.url, timeout=30) as client:
            served = [names[send(client, "sticky", tenant, 2000 + i)] for i in range(10)]
    finally:
        mesh.set_faults(replica, extra_waiting=0)
    assert served.count(replica) <= 2, (replica, served)
