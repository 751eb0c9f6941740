"""Precise prefix affinity end to end: real Envoy, control plane, ext_proc (subscribed over real
ZMQ to the replicas' KV events) and simulated fleet, both sides on one HF tokenizer.

What only precise mode can know, because the requests that change the replicas' caches go to
them directly, past the mesh, so the ext_proc's own picks cannot have guessed it:

* a long prefix warmed on one replica draws the mesh's next request with that prefix there;
* after that replica resets its cache (AllBlocksCleared) or evicts the prefix (BlockRemoved),
  the mesh goes to another replica that holds part of the prefix, where without the events the
  index would still send it to the first (the pick's own guess there holds all of it).

Asserted: where requests went (x-imesh-endpoint). The sync points are the ext_proc's own
counters of the events it applied, not sleeps.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.text import WORDS
from tests.harness import Replica, make_mesh, wait_until
from tests.kv_fixtures import words, write_tokenizer

MODEL = "precise"
SCHEDULING = {
    "scorers": [
        {"type": "queue", "weight": 2},
        {"type": "kv-cache", "weight": 2},
        {"type": "inflight", "weight": 1},
        {"type": "running", "weight": 1},
        {"type": "prefix-affinity", "weight": 3},  # block_tokens 16: the fleet's block size
    ]
}
CACHE_BLOCKS = 40  # per replica, 16-token blocks
PREFIX_TOKENS = 320  # 20 blocks: half a replica's cache


def prefix(lead: str, k: int, tokens: int = PREFIX_TOKENS) -> str:
    """``tokens`` tokens: ``lead`` (a word of its own per test, so no two tests share a prefix),
    then distinct words; a shorter one is a prefix of the longer one of the same lead and k."""
    return f"{lead} " + words(k * 330, tokens - 1)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("precise")
    tokenizer = str(write_tokenizer(workdir / "tokenizer.json"))
    fleet = [
        Replica(
            f"{MODEL}-{i}",
            MODEL,
            "v1",
            overrides={"prefix_cache_blocks": CACHE_BLOCKS},
            kv_events=True,
            tokenizer=tokenizer,
        )
        for i in (1, 2, 3)
    ]
    test_mesh = make_mesh(workdir, fleet)
    (model,) = test_mesh.spec["models"]
    model["scheduling"] = SCHEDULING
    model["tokenizer"] = tokenizer
    test_mesh.save_spec()
    with test_mesh.mesh:
        test_mesh.mesh.wait_for_completion(MODEL)
        yield test_mesh


def extproc_samples(mesh) -> dict[tuple[str, str], float]:
    ports = mesh.mesh.ports
    text = httpx.get(f"http://{ports.host}:{ports.extproc_metrics}/metrics", timeout=5).text
    return {
        (s.name, s.labels.get("type") or s.labels.get("endpoint") or ""): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def applied(mesh, kind: str) -> float:
    return extproc_samples(mesh).get(("imesh_extproc_kv_events_applied_total", kind), 0.0)


def direct(replica: Replica, prompt: str) -> None:
    """A completion sent to the replica itself, past the mesh."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    response = httpx.post(f"http://{replica.address}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text


def through_mesh(mesh, prompt: str) -> str:
    """A completion through Envoy; returns the name of the replica that served it."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
    response = httpx.post(f"{mesh.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return {r.address: r.name for r in mesh.replicas}[response.headers["x-imesh-endpoint"]]


def warm(mesh, replica: Replica, prompt: str, event: str = "BlockStored") -> None:
    """Send ``prompt`` to ``replica`` directly and wait until the ext_proc applied its event."""
    before = applied(mesh, event)
    direct(replica, prompt)
    wait_until(lambda: applied(mesh, event) > before, what=f"the ext_proc applying {replica.name}'s {event}")


@pytest.fixture(scope="module")
def live(mesh):
    """Every replica's events flowing into the ext_proc (past ZMQ's slow joiner)."""
    pokes = iter(range(10_000))
    for replica in mesh.replicas:

        def is_live(replica: Replica = replica) -> bool:
            direct(replica, f"{WORDS[0]} " + words(next(pokes) % 1000, 20))
            return extproc_samples(mesh).get(("imesh_extproc_kv_events_live", replica.address)) == 1.0

        wait_until(is_live, what=f"{replica.name}'s KV events reaching the ext_proc")
    return mesh


def test_a_prefix_warmed_directly_on_a_replica_draws_the_mesh_there(live):
    for k, replica in enumerate(live.replicas):
        warm(live, replica, prefix("hello", k))
        assert through_mesh(live, prefix("hello", k) + " w999") == replica.name


def test_after_a_reset_the_mesh_stops_preferring_the_replica(live):
    first, second, _ = live.replicas
    warm(live, first, prefix("world", 0))
    assert through_mesh(live, prefix("world", 0) + " w998") == first.name  # the pick's guess: all 20 blocks
    before = applied(live, "AllBlocksCleared")
    httpx.post(f"http://{first.address}/reset_prefix_cache", timeout=5).raise_for_status()
    wait_until(lambda: applied(live, "AllBlocksCleared") > before, what="the ext_proc applying the reset")
    warm(live, second, prefix("world", 0, PREFIX_TOKENS // 2))  # half of the prefix on another replica
    assert through_mesh(live, prefix("world", 0) + " w997") == second.name


def test_after_an_eviction_the_mesh_stops_preferring_the_replica(live):
    first, _, third = live.replicas
    warm(live, third, prefix("yes", 2))
    assert through_mesh(live, prefix("yes", 2) + " w996") == third.name
    # Two other prompts of 25 blocks each push the prefix out of third's 40-block cache.
    for j in (1, 2):
        warm(live, third, f"{WORDS[j]} " + words(0, 399), event="BlockRemoved")
    state = httpx.get(f"http://{third.address}/sim/state", timeout=5).json()["prefix_cache"]
    assert state["blocks"] <= CACHE_BLOCKS
    warm(live, first, prefix("yes", 2, PREFIX_TOKENS // 2))  # half of it on another replica
    assert through_mesh(live, prefix("yes", 2) + " w995") == first.name
