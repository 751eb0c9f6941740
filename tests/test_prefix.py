"""Prefix-cache affinity core: prompt rendering, chained block hashes, the index, KV events."""

from __future__ import annotations

import os

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.prefix.blocks import BlockConfig, block_hashes, token_block_hashes
from extproc.prefix.index import IndexSettings, PrefixIndex, PrefixIndexes
from extproc.prefix.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    KVEventError,
    ReplicaFeed,
    TokenKeys,
    decode_batch,
    decode_message,
    decode_payload,
)
from extproc.prefix.prompt import prompt_text

# Hypothesis' deadline is a timing assertion: off. Few examples: the suite shares two cores.
PROPERTY = settings(deadline=None, max_examples=150)
SMALL = BlockConfig(block_chars=4, max_blocks=64)
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def _common_blocks(a: str, b: str, config: BlockConfig) -> int:
    common = len(os.path.commonprefix([a, b])) // config.block_chars
    return min(common, len(a) // config.block_chars, len(b) // config.block_chars, config.max_blocks)


# ---- prompt rendering ----------------------------------------------------------------------


def _chat(*messages: tuple[str, object], **extra: object) -> dict:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages], **extra}


def test_chat_renders_messages_in_order_system_first():
    text = prompt_text(_chat(("system", "be brief"), ("user", "hi")))
    assert text is not None
    assert text.index("system") < text.index("be brief") < text.index("user") < text.index("hi")


def test_chat_list_parts_render_like_the_string_and_images_differ():
    as_string = prompt_text(_chat(("user", "hello world")))
    as_parts = prompt_text(_chat(("user", [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}])))
    assert as_parts == as_string
    cat = prompt_text(_chat(("user", [{"type": "image_url", "image_url": {"url": "cat.png"}}])))
    dog = prompt_text(_chat(("user", [{"type": "image_url", "image_url": {"url": "dog.png"}}])))
    assert cat is not None and dog is not None and cat != dog


def test_chat_is_deterministic_and_separates_role_from_content():
    tools = [{"type": "function", "function": {"name": "f", "b": 1, "a": 2}}]
    body = _chat(("system", "s"), ("user", "u"), tools=tools)
    assert prompt_text(body) == prompt_text(body)
    # "user"+"x" and "use"+"rx" must not render alike.
    assert prompt_text(_chat(("user", "x"))) != prompt_text(_chat(("use", "rx")))


def test_tools_lead_and_change_the_prefix():
    plain = prompt_text(_chat(("user", "hi")))
    with_tools = prompt_text(_chat(("user", "hi"), tools=[{"type": "function", "function": {"name": "f"}}]))
    assert plain is not None and with_tools is not None
    assert with_tools.endswith(plain) and with_tools != plain


def test_assistant_tool_calls_render():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]}
    other = {**call, "tool_calls": [{"id": "2", "function": {"name": "g"}}]}
    first = prompt_text({"messages": [{"role": "user", "content": "q"}, call]})
    second = prompt_text({"messages": [{"role": "user", "content": "q"}, other]})
    assert first is not None and second is not None and first != second


@pytest.mark.parametrize(
    "body",
    [
        None,
        "text",
        [],
        {},
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]},  # KServe v2
        {"input": "embed me"},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": 1, "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": [{"no": "type"}]}]},
        {"messages": [{"role": "user", "content": [7]}]},
        {"messages": ["not a dict"]},
        {"prompt": 3},
        {"prompt": []},
        {"prompt": [1, "a"]},
        {"prompt": [[1, 2], []]},
        {"prompt": [True, False]},
        {"prompt": None},
    ],
)
def test_malformed_or_unsupported_bodies_give_none(body):
    assert prompt_text(body) is None


def test_completions_prompts():
    assert prompt_text({"prompt": "once upon"}) == "once upon"
    assert prompt_text({"prompt": ""}) == ""
    batch = prompt_text({"prompt": ["first", "second"]})
    assert batch is not None and batch.startswith("first") and "second" in batch
    ids = prompt_text({"prompt": [1, 2]})
    longer_id = prompt_text({"prompt": [1, 23]})
    nested = prompt_text({"prompt": [[1, 2], [3]]})
    assert ids is not None and longer_id is not None and nested is not None
    assert not longer_id.startswith(ids)  # every id is terminated: [1, 2] is no prefix of [1, 23]
    assert nested.startswith(ids)


def test_max_chars_truncates_and_stops_early():
    body = _chat(("system", "s" * 1000), ("user", "u" * 1000))
    full = prompt_text(body)
    capped = prompt_text(body, max_chars=100)
    assert full is not None and capped is not None
    assert len(capped) == 100 and full.startswith(capped)
    # Past the cap nothing is looked at, malformed or not.
    assert prompt_text({"messages": [{"role": "user", "content": "x" * 50}, "junk"]}, max_chars=10) is not None


_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=30)}),
    min_size=1,
    max_size=5,
)


@PROPERTY
@given(_messages, _messages)
def test_a_conversation_that_extends_another_renders_as_an_extension(head, tail):
    short = prompt_text({"messages": head})
    long = prompt_text({"messages": head + tail})
    assert short is not None and long is not None and long.startswith(short)


# ---- chained block hashes ------------------------------------------------------------------


def test_shared_prefix_gives_equal_leading_hashes_then_diverges():
    config = BlockConfig(block_chars=8, max_blocks=100)
    shared = "abcdefgh" * 3
    a = block_hashes(shared + "XXXXXXXX" + "tail0000", config)
    b = block_hashes(shared + "YYYYYYYY" + "tail0000", config)
    assert len(a) == len(b) == 5
    assert a[:3] == b[:3]
    # Chained: once they differ, every later block differs, even the identical "tail0000".
    assert all(x != y for x, y in zip(a[3:], b[3:], strict=True))


def test_partial_last_block_is_ignored():
    config = BlockConfig(block_chars=8, max_blocks=100)
    assert block_hashes("a" * 7, config) == []
    assert block_hashes("a" * 15, config) == block_hashes("a" * 8, config)
    assert len(block_hashes("a" * 16, config)) == 2


def test_block_cap_is_respected():
    config = BlockConfig(block_chars=4, max_blocks=10)
    hashes = block_hashes("x" * 1000, config)
    assert len(hashes) == 10
    assert hashes == block_hashes("x" * 40, config)
    assert config.max_chars == 40
    assert block_hashes("x" * 100, BlockConfig(block_chars=4, max_blocks=0)) == []


def test_hashes_are_stable_64_bit_and_seeded():
    hashes = block_hashes("z" * 128)
    assert hashes == block_hashes("z" * 128)
    assert all(0 <= h < 1 << 64 for h in hashes)
    assert block_hashes("z" * 128, seed=b"lora-a") != hashes


def test_an_ascii_prompt_and_one_with_other_characters_agree_on_their_shared_blocks():
    # All-ASCII text is encoded once and sliced; other text is cut by characters and encoded per
    # block. The same leading characters must give the same chain either way.
    ascii_only = block_hashes("a" * 128 + "b" * 64)
    accented = block_hashes("a" * 128 + "é" * 64)
    assert len(ascii_only) == len(accented) == 3
    assert ascii_only[:2] == accented[:2] and ascii_only[2] != accented[2]


def test_lone_surrogates_hash_instead_of_raising():
    assert len(block_hashes("\ud800" * 64)) == 1


def test_invalid_config_is_refused():
    with pytest.raises(ValueError):
        BlockConfig(block_chars=0)


@PROPERTY
@given(st.text(alphabet="ab", max_size=60), st.text(alphabet="ab", max_size=60))
def test_equal_leading_hashes_are_exactly_the_common_block_prefix(a, b):
    ha, hb = block_hashes(a, SMALL), block_hashes(b, SMALL)
    common = _common_blocks(a, b, SMALL)
    assert ha[:common] == hb[:common]
    if len(ha) > common and len(hb) > common:
        assert ha[common] != hb[common]


def test_token_blocks_chain_like_character_blocks():
    whole = token_block_hashes(list(range(8)), 4)
    assert len(whole) == 2 and token_block_hashes(list(range(9)), 4) == whole
    # Continuing from a parent gives the same chain as hashing everything at once.
    assert token_block_hashes(list(range(4, 8)), 4, parent=whole[0]) == whole[1:]


# ---- the index -----------------------------------------------------------------------------


def _index(**kwargs) -> PrefixIndex:
    return PrefixIndex(**{"ttl_s": 100.0, "max_entries": 10_000, "max_entries_per_replica": 1_000, **kwargs})


def test_match_gives_the_longest_prefix_per_replica():
    index = _index()
    index.record(A, [1, 2, 3, 4], now=0.0)
    index.record(B, [1, 2], now=0.0)
    index.record(C, [9, 2, 3], now=0.0)
    assert index.match([1, 2, 3, 5], [A, B, C, "10.0.0.9:8000"], now=1.0) == {
        A: 3,
        B: 2,
        C: 0,
        "10.0.0.9:8000": 0,
    }
    assert index.match([7], [A, B], now=1.0) == {A: 0, B: 0}
    assert index.match([], [A], now=1.0) == {A: 0}


def test_match_stops_at_the_first_miss():
    index = _index()
    index.record(A, [1, 3], now=0.0)  # block 2 missing: block 3 cannot be used
    assert index.match([1, 2, 3], [A], now=0.0) == {A: 1}


def test_entries_expire_after_ttl_and_are_evicted_lazily():
    index = _index(ttl_s=10.0)
    index.record(A, [1, 2], now=0.0)
    index.record(A, [5], now=8.0)
    assert index.match([1, 2], [A], now=10.0) == {A: 2}
    assert index.match([1, 2], [A], now=10.5) == {A: 0}
    stats = index.stats()
    assert stats.evicted_expired == 2 and stats.entries == 1
    # Recording again refreshes: the prefix counts anew.
    index.record(A, [1, 2], now=11.0)
    assert index.match([1, 2], [A], now=20.0) == {A: 2}


def test_sweep_expires_every_replica():
    index = _index(ttl_s=1.0)
    index.record(A, [1], now=0.0)
    index.record(B, [2], now=0.0)
    assert index.expire(now=5.0) == 2
    assert index.stats().entries == 0 and index.stats().hashes == 0


def test_clock_never_runs_backwards_per_replica():
    index = _index(ttl_s=10.0)
    index.record(A, [1], now=100.0)
    index.record(A, [2], now=50.0)  # a late caller: stamped 100, not 50
    assert index.match([2], [A], now=105.0) == {A: 1}


def test_lru_bound_evicts_the_tail_of_old_prompts_first():
    index = _index(max_entries_per_replica=4)
    index.record(A, [1, 2, 3], now=0.0)
    index.record(A, [7, 8], now=1.0)
    assert index.entries(A) == 4
    assert index.stats().evicted_lru == 1
    # The old prompt lost its last block, not its first.
    assert index.match([1, 2, 3], [A], now=1.0) == {A: 2}
    assert index.match([7, 8], [A], now=1.0) == {A: 2}


def test_global_bound_shares_entries_between_replicas():
    index = _index(max_entries=6, max_entries_per_replica=100)
    index.record(A, list(range(6)), now=0.0)
    assert index.entries(A) == 6
    index.record(B, list(range(100, 106)), now=1.0)
    assert index.entries(A) == 3 and index.entries(B) == 3
    assert index.stats().entries == 6 <= index.max_entries
    assert index.match(list(range(6)), [A], now=1.0) == {A: 3}


def test_stats_report_memory():
    index = _index()
    assert index.stats().approx_bytes == 0
    index.record(A, [1, 2, 3], now=0.0)
    index.record(B, [1, 2], now=0.0)
    stats = index.stats()
    assert (stats.entries, stats.hashes, stats.replicas) == (5, 3, 2)
    assert stats.approx_bytes > 0
    assert stats.max_entries == 10_000


def test_dropping_a_replica_forgets_it_and_frees_its_slot():
    index = _index()
    index.record(A, [1, 2], now=0.0)
    index.record(B, [1, 2], now=0.0)
    index.drop_replica(A)
    assert index.match([1, 2], [A, B], now=0.0) == {A: 0, B: 2}
    assert index.stats().replicas == 1 and index.stats().entries == 2
    index.record(C, [3], now=0.0)  # reuses A's slot: A's old blocks must not show up for C
    assert index.match([1, 2], [B, C], now=0.0) == {B: 2, C: 0}
    index.retain([C])
    assert index.stats().replicas == 1 and index.stats().hashes == 1


def test_record_tells_how_many_blocks_were_held_already():
    index = _index(ttl_s=10.0)
    assert index.record(A, [1, 2, 3], now=0.0) == 0
    assert index.record(A, [1, 2, 4, 5], now=1.0) == 2  # the shared prefix
    assert index.record(A, [1, 2], now=20.0) == 0  # expired: not held any more


def test_one_index_per_distinct_settings_retained_and_summed_together():
    indexes = PrefixIndexes()
    short, long = IndexSettings(ttl_s=1.0), IndexSettings(ttl_s=100.0)
    assert indexes.get(short) is indexes.get(IndexSettings(ttl_s=1.0)) is not indexes.get(long)
    indexes.get(short).record(A, [1, 2], now=0.0)
    indexes.get(long).record(B, [1, 2, 3], now=0.0)
    indexes.get(long).record(C, [4], now=0.0)
    stats = indexes.stats()
    assert (stats.entries, stats.replicas, stats.max_entries) == (6, 3, 2 * IndexSettings().max_entries)
    indexes.retain([A, B], now=5.0)  # C left the table; A's entries expired meanwhile
    stats = indexes.stats()
    assert (stats.entries, stats.replicas, stats.removed, stats.evicted_expired) == (3, 2, 1, 2)
    with pytest.raises(ValueError):
        IndexSettings(ttl_s=0.0)


def test_remove_and_clear():
    index = _index()
    index.record(A, [1, 2, 3], now=0.0)
    assert index.remove(A, [3, 99]) == 1
    assert index.match([1, 2, 3], [A], now=0.0) == {A: 2}
    assert index.clear(A) == 2
    assert index.match([1], [A], now=0.0) == {A: 0}
    assert index.stats().removed == 3 and index.stats().replicas == 1
    assert index.remove("10.9.9.9:1", [1]) == 0 and index.clear("10.9.9.9:1") == 0


def test_many_replicas_beyond_a_machine_word():
    index = _index(max_entries=100_000)
    addresses = [f"10.1.{i // 256}.{i % 256}:8000" for i in range(100)]
    for depth, address in enumerate(addresses):
        index.record(address, list(range(depth % 7)), now=0.0)
    assert index.match(list(range(10)), addresses, now=0.0) == {a: d % 7 for d, a in enumerate(addresses)}


_prompts = st.text(alphabet="ab", max_size=40)
_records = st.lists(st.tuples(st.sampled_from([A, B, C]), _prompts), max_size=12)


@PROPERTY
@given(_records, _prompts)
def test_match_is_the_longest_common_block_prefix_with_what_was_recorded(records, query):
    index = _index()
    for address, text in records:
        index.record(address, block_hashes(text, SMALL), now=0.0)
    expected = {
        address: max((_common_blocks(query, text, SMALL) for a, text in records if a == address), default=0)
        for address in (A, B, C)
    }
    assert index.match(block_hashes(query, SMALL), [A, B, C], now=0.0) == expected


_ops = st.lists(
    st.tuples(
        st.sampled_from(["record", "remove", "clear", "drop"]),
        st.sampled_from([A, B, C]),
        st.lists(st.integers(0, 12), max_size=8),
        st.floats(0, 5),
    ),
    max_size=30,
)


@PROPERTY
@given(_ops, st.lists(st.integers(0, 12), max_size=8))
def test_bounds_hold_and_one_match_equals_separate_matches(ops, query):
    index = PrefixIndex(ttl_s=3.0, max_entries=10, max_entries_per_replica=6)
    now = 0.0
    for op, address, keys, dt in ops:
        now += dt
        if op == "record":
            index.record(address, keys, now)
        elif op == "remove":
            index.remove(address, keys)
        elif op == "clear":
            index.clear(address)
        else:
            index.drop_replica(address)
        stats = index.stats()
        assert stats.entries == sum(index.entries(a) for a in (A, B, C)) <= 10
        assert all(index.entries(a) <= index.replica_cap() for a in (A, B, C))
    together = index.match(query, [A, B, C], now)
    assert together == {a: index.match(query, [a], now)[a] for a in (A, B, C)}


# ---- KV events -----------------------------------------------------------------------------


# vLLM's event types as it declares them for msgspec (map-encoded events in an array batch).
class _EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _BlockStored(_Event, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list | None = None
    group_idx: int | None = None


class _BlockRemoved(_Event, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class _AllBlocksCleared(_Event, tag="AllBlocksCleared"):
    pass


# The older releases' array-encoded events.
class _OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _OldBlockStored(_OldEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class _OldBlockRemoved(_OldEvent, tag="BlockRemoved"):
    block_hashes: list[int]


class _OldAllBlocksCleared(_OldEvent, tag="AllBlocksCleared"):
    pass


def _frames(seq: int, *events: msgspec.Struct) -> list[bytes]:
    payload = msgspec.msgpack.encode(_EventBatch(ts=1700000000.5, events=list(events), data_parallel_rank=0))
    return [b"kv", seq.to_bytes(8, "big"), payload]


def test_decodes_vllm_map_encoded_events():
    seq, batch = decode_message(
        _frames(
            7,
            _BlockStored([11, b"\x01\x02"], None, [1, 2, 3, 4], 2, None, "GPU", None, extra_keys=[None, None]),
            _BlockRemoved([11], "GPU"),
            _AllBlocksCleared(),
        )
    )
    assert seq == 7
    assert batch == KVEventBatch(
        ts=1700000000.5,
        events=(
            BlockStored((11, b"\x01\x02"), None, (1, 2, 3, 4), 2, None, "GPU"),
            BlockRemoved((11,), "GPU"),
            AllBlocksCleared(),
        ),
        data_parallel_rank=0,
    )


def test_decodes_older_array_encoded_events():
    payload = msgspec.msgpack.encode(
        _EventBatch(2.0, [_OldBlockStored([5, 6], 4, [1, 2], 1, None), _OldBlockRemoved([5]), _OldAllBlocksCleared()])
    )
    batch = decode_payload(payload)
    assert batch.events == (BlockStored((5, 6), 4, (1, 2), 1), BlockRemoved((5,)), AllBlocksCleared())
    assert batch.data_parallel_rank is None


def test_decodes_a_map_encoded_batch_and_skips_unknown_events():
    events = [{"type": "SomethingNew", "x": 1}, ["AlsoNew"], {"type": "AllBlocksCleared"}]
    batch = decode_batch({"ts": 3, "events": events})
    assert batch.ts == 3.0 and batch.events == (AllBlocksCleared(),) and batch.unknown == 2


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [1.0],
        ["ts", []],
        [1.0, "events"],
        [1.0, [], "rank"],
        {"ts": 1.0},
        [1.0, [5]],
        [1.0, [{"no": "tag"}]],
        [1.0, [[3, 1]]],
        [1.0, [{"type": "BlockRemoved", "block_hashes": "nope"}]],
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1.5]}]],
        [1.0, [{"type": "BlockRemoved", "block_hashes": [True]}]],
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": 3}]],
        [1.0, [["BlockStored", [1], None, [1], 0, None]]],
        [1.0, [["BlockStored", [1], None, [-1], 1, None]]],
        [1.0, [["BlockStored", [1], 2.5, [1], 1, None]]],
        [1.0, [["BlockStored", [1], None, [1], 1, "lora"]]],
    ],
)
def test_malformed_batches_raise_kv_event_error(obj):
    with pytest.raises(KVEventError):
        decode_batch(obj)


def test_malformed_payloads_and_frames_raise_kv_event_error():
    for payload in (b"", b"\xc1", msgpack.packb([1.0, []]) + b"\x00"):
        with pytest.raises(KVEventError):
            decode_payload(payload)
    with pytest.raises(KVEventError):
        decode_message([b"kv", b"\x00", msgpack.packb([1.0, []])])


def test_events_store_remove_and_clear_a_replicas_blocks():
    index = _index()
    feed = ReplicaFeed(index, A)
    index.record(B, [1, 2], now=0.0)
    stored = _BlockStored([1, 2, 3], None, [0] * 6, 2, None, "GPU", None)
    applied = feed.apply(decode_message(_frames(0, stored))[1], 1.0)
    assert applied.stored == 3
    assert index.match([1, 2, 3], [A, B], now=1.0) == {A: 3, B: 2}
    applied = feed.apply(decode_message(_frames(1, _BlockRemoved([2, 42], None)))[1], 2.0)
    assert applied.removed == 1
    assert index.match([1, 2, 3], [A], now=2.0) == {A: 1}
    applied = feed.apply(decode_message(_frames(2, _AllBlocksCleared()))[1], 3.0)
    assert applied.cleared == 2
    assert index.match([1, 2, 3], [A, B], now=3.0) == {A: 0, B: 2}  # only A's cache was reset


def test_events_of_another_medium_are_skipped():
    index = _index()
    feed = ReplicaFeed(index, A)
    applied = feed.apply(decode_batch([1.0, [["BlockStored", [1], None, [0], 1, None, "CPU"]]]), 0.0)
    assert (applied.stored, applied.skipped) == (0, 1)
    assert index.entries(A) == 0


def test_feed_tracks_gaps_and_liveness():
    feed = ReplicaFeed(_index(), A)
    assert not feed.live(now=0.0, stale_after_s=5.0)
    empty = KVEventBatch(ts=0.0, events=())
    feed.apply(empty, now=1.0, seq=3)
    feed.apply(empty, now=2.0, seq=4)
    feed.apply(empty, now=3.0, seq=8)
    assert (feed.last_seq, feed.gaps, feed.batches) == (8, 3, 3)
    assert feed.live(now=7.0, stale_after_s=5.0)
    assert not feed.live(now=9.0, stale_after_s=5.0)


def test_token_keys_rehash_engine_blocks_into_our_chain():
    index = _index()
    keys = TokenKeys()
    feed = ReplicaFeed(index, A, keys=keys)
    prompt_ids = list(range(100, 112))  # three blocks of 4
    ours = token_block_hashes(prompt_ids, 4)
    # The engine's own hashes are opaque; the prompt arrives as two stored events, chained.
    feed.apply(decode_batch([0.0, [["BlockStored", [b"e1", b"e2"], None, prompt_ids[:8], 4, None]]]), 0.0)
    feed.apply(decode_batch([0.0, [["BlockStored", [b"e3"], b"e2", prompt_ids[8:], 4, None]]]), 0.0)
    assert index.match(ours, [A], now=0.0) == {A: 3}
    feed.apply(decode_batch([0.0, [["BlockRemoved", [b"e2"]]]]), 0.0)
    assert index.match(ours, [A], now=0.0) == {A: 1}
    # A block whose parent was never seen cannot be chained.
    feed.apply(decode_batch([0.0, [["BlockStored", [b"e9"], b"unknown", [1, 2, 3, 4], 4, None]]]), 0.0)
    assert keys.unchained == 1
    feed.apply(decode_batch([0.0, [["AllBlocksCleared"]]]), 0.0)
    assert index.entries(A) == 0
    assert keys.removed([b"e1"]) == []


def test_token_keys_skip_an_event_whose_tokens_do_not_fill_its_blocks():
    keys = TokenKeys()
    assert keys.stored(BlockStored((b"e1", b"e2"), None, (1, 2, 3, 4, 5), 4)) == ()
    assert keys.unchained == 2
