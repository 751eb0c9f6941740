"""The ext_proc's KV-event subscriber (extproc/prefix/subscriber.py) on real ZMQ: fed by the
simulated fleet's publisher into a real prefix index, keyed as the lookup side keys prompts, and
falling back to the picks' guesses when events stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.prefix.index import PrefixIndex, PrefixIndexes
from extproc.prefix.subscriber import KVEventSubscriber
from extproc.prefix.tokens import TokenizerCache
from extproc.scheduler.scorers.prefix_affinity import PrefixAffinityScorer
from extproc.telemetry import ExtprocMetrics
from fleet import FleetConfig, ReplicaConfig, RunningFleet, start_fleet
from imesh.ports import free_ports
from tests.kv_fixtures import words, write_tokenizer

MODEL = "llama-3-8b"
BLOCK = 4


class Clock:
    """The subscriber's monotonic clock, advanced by the test (liveness without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(check: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def tokenizer_path(tmp_path: Path) -> Path:
    return write_tokenizer(tmp_path / "tokenizer.json")


def _config(tokenizer: Path, events_port: int) -> FleetConfig:
    return FleetConfig(
        replicas=[
            ReplicaConfig(
                name="a",
                address="127.0.0.1:0",
                models=[MODEL],
                kv_events=f"tcp://127.0.0.1:{events_port}",
                tokenizer=str(tokenizer),
                overrides={"block_size": BLOCK},
            )
        ]
    )


async def _complete(url: str, prompt: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert resp.status_code == 200, resp.text


async def _joined(subscriber: KVEventSubscriber, address: str, url: str) -> None:
    """Poke the replica with new prompts until the subscription delivers (ZMQ's slow joiner)."""
    feed = subscriber.feed(address)
    assert feed is not None
    for i in range(100):
        await _complete(url, words(900 + i, 4))
        try:
            await eventually(lambda: feed.batches > 0, "a first batch", timeout_s=0.3)
            return
        except AssertionError:
            continue
    raise AssertionError("the subscriber never received a batch")


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_events_feed_the_index_in_the_lookup_sides_keys_and_reset_clears_it(tokenizer_path: Path):
    (port,) = free_ports(1)
    fleet: RunningFleet = await start_fleet(_config(tokenizer_path, port))
    replica = fleet["a"]
    indexes = PrefixIndexes()
    scorer = PrefixAffinityScorer(1.0, block_tokens=str(BLOCK))
    scorer.bind(indexes)
    index = scorer.index
    assert isinstance(index, PrefixIndex)
    registry = CollectorRegistry()
    metrics = ExtprocMetrics(registry)
    clock = Clock()
    subscriber = KVEventSubscriber(indexes, metrics=metrics, clock=clock, stale_after_s=5.0)
    metrics.watch_kv_events(subscriber.live, registry)
    address = replica.address
    try:
        subscriber.follow({address: f"tcp://127.0.0.1:{port}"})
        assert subscriber.live() == {address: False}  # nothing yet: approximate
        await _joined(subscriber, address, replica.url)
        tokenizer = TokenizerCache().get(str(tokenizer_path))
        body = {"model": MODEL, "prompt": words(0, 16)}
        hashes, block_tokens = scorer.prompt_blocks(body, tokenizer)
        assert len(hashes) == 4 and block_tokens == BLOCK
        # Sent to the replica directly, past any router: only its events can tell.
        await _complete(replica.url, body["prompt"])
        await eventually(lambda: index.match(hashes, [address], clock()) == {address: 4}, "the events' blocks")
        assert subscriber.live() == {address: True}
        samples = _scrape(registry)
        assert samples[("imesh_extproc_kv_events_applied_total", (("type", "BlockStored"),))] >= 2
        assert samples[("imesh_extproc_kv_events_feeds_live", ())] == 1
        assert samples[("imesh_extproc_kv_events_live", (("endpoint", address),))] == 1
        async with httpx.AsyncClient() as client:
            await client.post(f"{replica.url}/reset_prefix_cache")
        await eventually(lambda: index.entries(address) == 0, "the reset to clear the replica")
        assert _scrape(registry)[("imesh_extproc_kv_events_applied_total", (("type", "AllBlocksCleared"),))] == 1
        # Events stop (the replica is gone): the feed is not live, and the picks' guesses still work.
        await fleet.stop_replica("a")
        clock.now += 6.0
        assert subscriber.live() == {address: False}
        assert _scrape(registry)[("imesh_extproc_kv_events_live", (("endpoint", address),))] == 0
        index.record(address, hashes, clock())
        assert index.match(hashes, [address], clock()) == {address: 4}
        # It comes back on the same endpoint: ZMQ reconnects, the new sequence is a new cache.
        feed = subscriber.feed(address)
        assert feed is not None
        replica = await fleet.restart_replica("a")
        for i in range(100):
            await _complete(replica.url, words(700 + i, 4))
            if feed.restarts:
                break
            await asyncio.sleep(0.05)
        assert feed.restarts == 1
        assert index.match(hashes, [address], clock()) == {address: 0}  # the old guesses went with the old cache
    finally:
        await subscriber.close()
        await fleet.stop()


async def test_gaps_and_malformed_messages_are_counted():
    (port,) = free_ports(1)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"tcp://127.0.0.1:{port}")
    registry = CollectorRegistry()
    index = PrefixIndex()
    subscriber = KVEventSubscriber(index, metrics=ExtprocMetrics(registry))
    address = "127.0.0.1:9"

    def send(seq: int, payload: bytes) -> None:
        pub.send_multipart([b"", seq.to_bytes(8, "big"), payload])

    try:
        subscriber.follow({address: f"tcp://127.0.0.1:{port}"})
        feed = subscriber.feed(address)
        assert feed is not None
        stored = msgpack.packb([1.0, [["BlockStored", [1], None, [5, 6], 2, None, "GPU"]]])
        for _ in range(200):  # until the subscription is up
            send(0, stored)
            if feed.batches:
                break
            await asyncio.sleep(0.02)
        send(5, msgpack.packb([1.0, []]))
        send(6, b"\xc1 not msgpack")
        await eventually(lambda: feed.last_seq == 5 and _malformed(registry) == 1, "the gap and the bad message")
        assert feed.gaps == 4
        assert registry.get_sample_value("imesh_extproc_kv_events_gaps_total") == 4
        assert index.entries(address) == 1
        # A table that moves the replica's publisher: a fresh feed; one that drops it: unsubscribed.
        subscriber.follow({address: f"tcp://127.0.0.1:{port + 1}"})
        moved = subscriber.feed(address)
        assert moved is not None and moved is not feed and moved.batches == 0
        subscriber.follow({})
        assert subscriber.feed(address) is None and subscriber.live() == {}
    finally:
        await subscriber.close()
        pub.close(linger=0)
        ctx.term()


def _malformed(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("imesh_extproc_kv_events_applied_total", {"type": "malformed"}) or 0.0
