"""The simulated fleet publishes vLLM's KV-cache events (fleet/kv_publisher.py): real replicas,
real ZMQ, decoded by the ext_proc's decoder and by msgspec (the encoder vLLM itself uses)."""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import pytest
from tokenizers import Tokenizer

from extproc.prefix.blocks import token_block_hashes
from extproc.prefix.index import PrefixIndex
from extproc.prefix.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ReplicaFeed,
    TokenKeys,
    decode_message,
)
from fleet import FleetConfig, FleetConfigError, ReplicaConfig, RunningFleet, start_fleet
from fleet.text import block_hashes
from tests.kv_fixtures import Subscriber, words, write_tokenizer

MODEL = "llama-3-8b"
BLOCK = 4


# vLLM's structs as msgspec declares them, array-encoded (tag first, fields in order).
class _Batch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[_Stored | _Removed | _Cleared]
    data_parallel_rank: int | None = None


class _Event(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):
    pass


class _Stored(_Event, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class _Removed(_Event, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class _Cleared(_Event, tag="AllBlocksCleared"):
    pass


def _replica(tmp_path: Path, **overrides) -> ReplicaConfig:
    return ReplicaConfig(
        name="a",
        address="127.0.0.1:0",
        models=[MODEL],
        kv_events="tcp://127.0.0.1:0",
        tokenizer=str(write_tokenizer(tmp_path / "tokenizer.json")),
        overrides={"block_size": BLOCK, **overrides},
    )


async def _complete(client: httpx.AsyncClient, url: str, prompt: str) -> httpx.Response:
    resp = await client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1})
    assert resp.status_code == 200, resp.text
    return resp


@pytest.fixture
async def fleet(tmp_path: Path):
    running: RunningFleet = await start_fleet(FleetConfig(replicas=[_replica(tmp_path, prefix_cache_blocks=6)]))
    yield running
    await running.stop()


async def test_store_evict_and_reset_are_published_as_vllm_encodes_them(fleet: RunningFleet, tmp_path: Path):
    replica = fleet["a"]
    assert replica.kv_events is not None and not replica.kv_events.endpoint.endswith(":0")
    sub = Subscriber(replica.kv_events.endpoint)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await sub.joined(lambda i: _complete(client, replica.url, words(900 + i * 4, 4)))
            prompt = words(0, 10)  # ten tokens: two full blocks of 4 stored
            await _complete(client, replica.url, prompt)
            frames = await sub.frames()
            seq, batch = decode_message(frames)
            ids = tokenizer.encode(prompt).ids
            engine_hashes = block_hashes([f"#{i}" for i in ids], BLOCK)
            assert batch.events[0] == BlockStored(tuple(engine_hashes), None, tuple(ids[:8]), BLOCK, None, "GPU")
            # The same bytes through msgspec, as vLLM's own types.
            wire = msgspec.msgpack.decode(frames[2], type=_Batch)
            assert wire.events[0] == _Stored(engine_hashes, None, ids[:8], BLOCK, None, "GPU")
            assert wire.data_parallel_rank is None
            # The prompt extended by a block: only the new block, chained to its parent.
            await _complete(client, replica.url, words(0, 12))
            seq2, batch = decode_message(await sub.frames())
            assert seq2 == seq + 1
            stored = batch.events[0]
            assert isinstance(stored, BlockStored)
            assert stored.parent_block_hash == engine_hashes[1] and len(stored.block_hashes) == 1
            # Another prompt of three blocks overflows the six-block cache: the LRU front goes.
            await _complete(client, replica.url, words(100, 12))
            _, batch = decode_message(await sub.frames())
            kinds = [type(e).__name__ for e in batch.events]
            assert kinds == ["BlockStored", "BlockRemoved"]
            removed = batch.events[1]
            assert isinstance(removed, BlockRemoved) and removed.medium == "GPU" and removed.block_hashes
            await client.post(f"{replica.url}/reset_prefix_cache")
            frames = await sub.frames()
            assert decode_message(frames)[1].events == (AllBlocksCleared(),)
            assert msgspec.msgpack.decode(frames[2], type=_Batch).events == [_Cleared()]
        assert replica.state()["kv_events"]["seq"] >= seq2 + 3
    finally:
        sub.close()


async def test_token_keys_of_published_events_match_the_routers_hashes(fleet: RunningFleet, tmp_path: Path):
    """The ext_proc re-hashing the engine's token ids gets what it computes from the same tokenizer."""
    replica = fleet["a"]
    assert replica.kv_events is not None
    sub = Subscriber(replica.kv_events.endpoint)
    index = PrefixIndex()
    feed = ReplicaFeed(index, replica.address, keys=TokenKeys())
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            await sub.joined(lambda i: _complete(client, replica.url, words(900 + i * 4, 4)))
            for prompt in (words(0, 8), words(0, 16)):  # two blocks, then two more chained to them
                await _complete(client, replica.url, prompt)
                seq, batch = await sub.batch()
                feed.apply(batch, 0.0, seq)
        ours = token_block_hashes(tokenizer.encode(words(0, 16)).ids, BLOCK)
        assert index.match(ours[:4], [replica.address], 0.0) == {replica.address: 4}
    finally:
        sub.close()


async def test_a_replica_without_kv_events_publishes_nothing():
    running = await start_fleet(FleetConfig(replicas=[ReplicaConfig(name="a", address="127.0.0.1:0", models=[MODEL])]))
    try:
        assert running["a"].kv_events is None and running["a"].engine.cache_listener is None
        assert running["a"].state()["kv_events"] is None
    finally:
        await running.stop()


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/x", "tcp://10.0.0.1:5557", "tcp://127.0.0.1", "127.0.0.1:5557"])
def test_kv_events_endpoint_is_validated(endpoint: str):
    with pytest.raises(FleetConfigError, match="kv_events"):
        FleetConfig.from_dict(
            {"replicas": [{"name": "a", "address": "127.0.0.1:0", "models": [MODEL], "kv_events": endpoint}]}
        )


async def test_an_unloadable_tokenizer_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    config = FleetConfig(replicas=[ReplicaConfig(name="a", address="127.0.0.1:0", models=[MODEL], tokenizer=str(bad))])
    with pytest.raises(ValueError, match="replica a: cannot load tokenizer"):
        await start_fleet(config)
