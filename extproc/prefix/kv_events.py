"""Precise mode: an engine's own KV-cache events feed the prefix index instead of our guesses.

The wire format (vLLM's ZMQ publisher, ``--kv-events-config``): each PUB message is three frames,
``topic``, an 8-byte big-endian sequence number, and a msgpack payload, one ``KVEventBatch``.
The batch is ``[ts, events]`` or ``[ts, events, data_parallel_rank]`` (older and current
releases encode it as an array), or a map with those keys. Each event is a tagged msgspec
struct, encoded either as a map whose ``type`` is the tag or, in older releases, as an array
whose first item is the tag, the fields following in declaration order:

* ``BlockStored``: block_hashes, parent_block_hash, token_ids, block_size, lora_id, then (newer)
  medium; map-encoded releases add lora_name, extra_keys, group_idx and more;
* ``BlockRemoved``: block_hashes, then (newer) medium; map-encoded releases add group_idx;
* ``AllBlocksCleared``: no fields.

A block hash is an int (64-bit with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) or bytes. Unknown
tags and unknown trailing fields are skipped, so a newer engine does not break the decoder.

**The hash mismatch.** vLLM hashes blocks of *token ids* (with its own hash function, a seed
that is random per process unless ``PYTHONHASHSEED`` is set, and extra keys such as LoRA and
multimodal hashes); the ext_proc hashes blocks of *characters* of its own rendering
(``blocks.py``). The two never coincide, so an engine's stored blocks would never match a
lookup. ``ReplicaFeed`` therefore takes a keying:

* ``EngineKeys``: the engine's hash is our key. Right for an engine that publishes events keyed
  by the ext_proc's own character-block hashes of the same request (the simulated fleet can:
  it sees the same body and can run ``prompt.py`` and ``blocks.py``);
* ``TokenKeys``: re-hash each BlockStored's ``token_ids`` with our own chain
  (``blocks.token_block_hashes``) and remember engine hash -> our hash, so BlockRemoved can be
  translated. Independent of vLLM's hash function and seed, but the lookup side must then hash
  the same token ids: the model's tokenizer and chat template in the ext_proc (not there yet).

Events and guesses share one index: a pick's ``record`` still makes the next request of a burst
stick before the engine has reported anything, events add the blocks other routers sent there
and remove what the engine evicted, and entries still expire by ttl. So when events stop, the
index degrades to the approximate one by itself; ``ReplicaFeed.live`` tells whether events are
flowing. ``subscriber.py`` runs the feeds: one ZMQ SUB socket per replica that publishes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from extproc.prefix.blocks import token_block_hashes
from extproc.prefix.index import BlockKey

# The media whose blocks count as cached: the GPU (None from engines that predate the field).
# A CPU or disk offload tier is a different, slower hit; its events are skipped for now.
GPU_MEDIA: frozenset[str | None] = frozenset({None, "GPU"})
_TAG_FIELD = "type"
_MAX_TOKEN_ID = (1 << 32) - 1


class IndexSink(Protocol):
    """Where a feed applies events: a ``PrefixIndex``, or every index of a ``PrefixIndexes``."""

    def record(self, address: str, hashes: Sequence[BlockKey], now: float) -> int: ...

    def remove(self, address: str, hashes: Iterable[BlockKey]) -> int: ...

    def clear(self, address: str) -> int: ...


class KVEventError(ValueError):
    """A payload that is not a KV event batch."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockKey, ...]
    parent_block_hash: BlockKey | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockKey, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    ts: float
    events: tuple[KVEvent, ...]
    data_parallel_rank: int | None = None
    unknown: int = 0  # events with a tag this decoder does not know, skipped


# ---- decoding ------------------------------------------------------------------------------

# Array-encoded events, by position after the tag (the releases that used arrays had no more).
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium")
_REMOVED_FIELDS = ("block_hashes", "medium")


def decode_message(frames: Sequence[bytes]) -> tuple[int, KVEventBatch]:
    """A PUB message's ``(sequence number, batch)`` from its three frames."""
    if len(frames) != 3 or len(frames[1]) != 8:
        raise KVEventError(f"expected 3 frames (topic, 8-byte seq, payload), got {len(frames)}")
    return int.from_bytes(frames[1], "big"), decode_payload(frames[2])


def decode_payload(payload: bytes) -> KVEventBatch:
    """One msgpack-encoded ``KVEventBatch``."""
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise KVEventError(f"not msgpack: {exc}") from None
    return decode_batch(obj)


def decode_batch(obj: object) -> KVEventBatch:
    """A batch from its msgpack-decoded form (array or map); raises ``KVEventError``."""
    if isinstance(obj, list | tuple) and len(obj) >= 2:
        ts, raw_events, rank = obj[0], obj[1], obj[2] if len(obj) > 2 else None
    elif isinstance(obj, Mapping) and "ts" in obj and "events" in obj:
        ts, raw_events, rank = obj["ts"], obj["events"], obj.get("data_parallel_rank")
    else:
        raise KVEventError("a batch is [ts, events, ...] or {ts, events, ...}")
    if not _is_number(ts) or not isinstance(raw_events, list | tuple) or not _is_optional_int(rank):
        raise KVEventError("batch: ts must be a number, events a list, data_parallel_rank an int or nil")
    events: list[KVEvent] = []
    unknown = 0
    for raw in raw_events:
        event = _decode_event(raw)
        if event is None:
            unknown += 1
        else:
            events.append(event)
    return KVEventBatch(float(ts), tuple(events), rank, unknown)


def _decode_event(raw: object) -> KVEvent | None:
    """One event, or None for an unknown tag."""
    fields: Mapping[str, Any]
    if isinstance(raw, list | tuple) and raw:
        tag, fields = raw[0], _positional(raw)
    elif isinstance(raw, Mapping):
        tag, fields = raw.get(_TAG_FIELD), raw
    else:
        raise KVEventError(f"an event is a tagged array or map, got {type(raw).__name__}")
    if tag == "BlockStored":
        return _stored(fields)
    if tag == "BlockRemoved":
        hashes = _hashes(fields.get("block_hashes"))
        return BlockRemoved(hashes, _opt_str(fields, "medium"), _opt_int(fields, "group_idx"))
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if not isinstance(tag, str):
        raise KVEventError(f"an event's tag must be a string, got {tag!r}")
    return None


def _positional(raw: Sequence[Any]) -> dict[str, Any]:
    """Name an array-encoded event's fields (its tag first, then declaration order)."""
    if raw[0] == "BlockStored":
        return dict(zip(_STORED_FIELDS, raw[1:], strict=False))
    if raw[0] == "BlockRemoved":
        return dict(zip(_REMOVED_FIELDS, raw[1:], strict=False))
    return {}


def _stored(fields: Mapping[str, Any]) -> BlockStored:
    hashes = _hashes(fields.get("block_hashes"))
    parent = fields.get("parent_block_hash")
    if parent is not None and not _is_key(parent):
        raise KVEventError(f"BlockStored.parent_block_hash must be an int, bytes or nil, got {parent!r}")
    token_ids = fields.get("token_ids", ())
    if not isinstance(token_ids, list | tuple) or not all(_is_token(t) for t in token_ids):
        raise KVEventError("BlockStored.token_ids must be a list of uint32")
    block_size = fields.get("block_size")
    if type(block_size) is not int or block_size < 1:
        raise KVEventError(f"BlockStored.block_size must be a positive int, got {block_size!r}")
    return BlockStored(
        hashes,
        parent,
        tuple(token_ids),
        block_size,
        _opt_int(fields, "lora_id"),
        _opt_str(fields, "medium"),
        _opt_str(fields, "lora_name"),
        _opt_int(fields, "group_idx"),
    )


def _hashes(value: object) -> tuple[BlockKey, ...]:
    if not isinstance(value, list | tuple) or not all(_is_key(h) for h in value):
        raise KVEventError("block_hashes must be a list of ints or bytes")
    return tuple(value)


def _is_key(value: object) -> bool:
    return type(value) is int or type(value) is bytes


def _is_token(value: object) -> bool:
    return type(value) is int and 0 <= value <= _MAX_TOKEN_ID


def _is_number(value: object) -> bool:
    return type(value) is float or type(value) is int


def _is_optional_int(value: object) -> bool:
    return value is None or type(value) is int


def _opt_int(fields: Mapping[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if not _is_optional_int(value):
        raise KVEventError(f"{name} must be an int or nil, got {value!r}")
    return value


def _opt_str(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is not None and type(value) is not str:
        raise KVEventError(f"{name} must be a string or nil, got {value!r}")
    return value


# ---- keying: engine hashes -> index keys ---------------------------------------------------


class Keying(Protocol):
    """Turns an engine's block hashes into the index's keys, for one replica."""

    def stored(self, event: BlockStored) -> Sequence[BlockKey]: ...

    def removed(self, hashes: Sequence[BlockKey]) -> Sequence[BlockKey]: ...

    def cleared(self) -> None: ...


class EngineKeys:
    """The engine's hashes are the index's keys (an engine hashing our character blocks)."""

    def stored(self, event: BlockStored) -> Sequence[BlockKey]:
        return event.block_hashes

    def removed(self, hashes: Sequence[BlockKey]) -> Sequence[BlockKey]:
        return hashes

    def cleared(self) -> None:
        return None


class TokenKeys:
    """Re-hash each stored block's token ids with our chain; translate removals through a map.

    The map (engine hash -> ours) is an LRU of at most ``max_blocks``; a block whose parent is
    not in it (its BlockStored was missed or evicted from the map) cannot be chained and is
    skipped, as are blocks with extra keys we cannot see (LoRA, multimodal, cache salt).
    """

    def __init__(self, max_blocks: int = 1 << 15):
        self.max_blocks = max_blocks
        self._ours: OrderedDict[BlockKey, int] = OrderedDict()
        self.unchained = 0

    def stored(self, event: BlockStored) -> Sequence[BlockKey]:
        parent: int | None = None
        if event.parent_block_hash is not None:
            parent = self._ours.get(event.parent_block_hash)
            if parent is None:
                self.unchained += len(event.block_hashes)
                return ()
        ours = token_block_hashes(event.token_ids, event.block_size, parent)
        if len(ours) != len(event.block_hashes):
            self.unchained += len(event.block_hashes)
            return ()
        for theirs, mine in zip(event.block_hashes, ours, strict=True):
            self._ours[theirs] = mine
            self._ours.move_to_end(theirs)
        while len(self._ours) > self.max_blocks:
            self._ours.popitem(last=False)
        return ours

    def removed(self, hashes: Sequence[BlockKey]) -> Sequence[BlockKey]:
        return [mine for theirs in hashes if (mine := self._ours.pop(theirs, None)) is not None]

    def cleared(self) -> None:
        self._ours.clear()


# ---- applying a replica's batches ----------------------------------------------------------


@dataclass(slots=True)
class Applied:
    """What one batch did to the index."""

    stored: int = 0
    removed: int = 0
    cleared: int = 0
    skipped: int = 0  # events of another medium, and unknown events


@dataclass
class ReplicaFeed:
    """One replica's event stream applied to the shared index, with its liveness and gaps.

    ``now`` is the index's monotonic clock at arrival, not the batch's ``ts`` (the engine's wall
    clock), so event entries age like guessed ones. A sequence number that goes back means the
    publisher restarted (PUB/SUB never repeats a message): its engine's cache is new, so the
    replica's entries are dropped and the count starts again.
    """

    index: IndexSink
    address: str
    keys: Keying = field(default_factory=EngineKeys)
    media: frozenset[str | None] = GPU_MEDIA
    last_seq: int | None = None
    last_batch_at: float | None = None
    batches: int = 0
    gaps: int = 0  # sequence numbers that never arrived (a replay request would recover them)
    restarts: int = 0  # sequence numbers that went back: the publisher started again

    def apply(self, batch: KVEventBatch, now: float, seq: int | None = None) -> Applied:
        if seq is not None:
            if self.last_seq is not None and seq > self.last_seq + 1:
                self.gaps += seq - self.last_seq - 1
            elif self.last_seq is not None and seq <= self.last_seq:
                self.restarts += 1
                self.keys.cleared()
                self.index.clear(self.address)
            self.last_seq = seq
        self.batches += 1
        self.last_batch_at = now
        applied = Applied(skipped=batch.unknown)
        for event in batch.events:
            if isinstance(event, AllBlocksCleared):
                self.keys.cleared()
                applied.cleared += self.index.clear(self.address)
            elif event.medium not in self.media:
                applied.skipped += 1
            elif isinstance(event, BlockStored):
                keys = self.keys.stored(event)
                self.index.record(self.address, keys, now)
                applied.stored += len(keys)
            else:
                applied.removed += self.index.remove(self.address, self.keys.removed(event.block_hashes))
        return applied

    def live(self, now: float, stale_after_s: float) -> bool:
        """Whether a batch arrived in the last ``stale_after_s`` seconds."""
        return self.last_batch_at is not None and now - self.last_batch_at <= stale_after_s
