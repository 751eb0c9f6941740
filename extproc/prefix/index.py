"""Which replicas probably hold which prompt blocks in their prefix cache.

``PrefixIndex`` keeps, per replica (address), a bounded LRU of block hashes (``blocks.py``)
recently routed there (``record`` after a pick) or reported stored by the engine
(``kv_events.py``), each stamped with the time it was last touched.

Structure, chosen so that ``match`` is O(blocks) whatever the number of replicas:

* each replica holds a *slot*, a small integer; ``_owners`` maps a block hash to the bit mask of
  the slots holding it. ``match`` walks the prompt's hashes from the first, ANDing masks, and
  stops at the first block no candidate still matching holds: one dict lookup and one integer AND
  per block, and a chained hash means a hit on block ``i`` implies blocks ``< i`` matched too;
* each replica's ``OrderedDict`` (hash -> last touched) is its LRU. ``record`` touches a
  prompt's blocks last to first, so the first block is the most recent and eviction takes a
  prompt's tail first, as an engine's cache does: what stays is a prefix, which is what matches.

Expiry: an entry touched more than ``ttl_s`` ago does not count. Touching moves an entry to the
LRU's end, so the expired entries are always at its front, and they are dropped lazily, a few
O(1) pops, whenever that replica is recorded into or matched. ``now`` must come from one
monotonic clock (``time.monotonic()``); a replica's clock is clamped so it never runs backwards.

Bounds: a replica holds at most ``min(max_entries_per_replica, max_entries // replicas)``
entries, so the whole index never exceeds ``max_entries``. A new replica lowers everyone's
share, and the others are trimmed at once (their LRU fronts evicted).

Thread-safety: none, by design. The ext_proc runs one asyncio loop per worker process and
every call here is synchronous, so no two calls interleave; each worker has its own index.

``PrefixIndexes`` is one worker's set of indexes, one per distinct ``IndexSettings`` (a spec
usually has one): the scheduler's ``Picker`` owns it, and the prefix-affinity scorers of its
profiles share it, so an index outlives the profiles built on it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

# A block key: our own hashes are ints; an engine's (vLLM ExternalBlockHash) may be bytes too.
BlockKey = int | bytes

# Approximate CPython cost of one entry (per-replica OrderedDict slot and node, the key's int)
# and of one distinct hash in the owners map (dict slot, and the mask's int past 8 replicas).
# Measured with tracemalloc on 64-bit CPython 3.11 (docs/prefix-affinity.md).
BYTES_PER_ENTRY = 112
BYTES_PER_HASH = 48

DEFAULT_TTL_S = 300.0
DEFAULT_MAX_ENTRIES = 1 << 18  # the whole index: about 40 MB at most (docs/prefix-affinity.md)
DEFAULT_MAX_ENTRIES_PER_REPLICA = 1 << 15


@dataclass(frozen=True, slots=True)
class IndexStats:
    """What ``PrefixIndex.stats`` reports (gauges and counters since creation)."""

    entries: int
    hashes: int
    replicas: int
    evicted_lru: int
    evicted_expired: int
    removed: int
    approx_bytes: int
    max_entries: int


class _Replica:
    __slots__ = ("bit", "blocks", "clock")

    def __init__(self, bit: int):
        self.bit = bit
        self.blocks: OrderedDict[BlockKey, float] = OrderedDict()
        self.clock = float("-inf")


class PrefixIndex:
    """Per-replica LRUs of block hashes with expiry and global bounds; see the module doc."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_entries_per_replica: int = DEFAULT_MAX_ENTRIES_PER_REPLICA,
    ):
        _check_bounds(ttl_s, max_entries, max_entries_per_replica)
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_entries_per_replica = max_entries_per_replica
        self._replicas: dict[str, _Replica] = {}
        self._owners: dict[BlockKey, int] = {}
        self._free_bits: list[int] = []
        self._next_bit = 1
        self._entries = 0
        self._evicted_lru = 0
        self._evicted_expired = 0
        self._removed = 0

    # ---- queries ---------------------------------------------------------------------------

    def match(self, hashes: Sequence[BlockKey], addresses: Iterable[str], now: float) -> dict[str, int]:
        """Per candidate address: how many leading blocks of ``hashes`` it holds (0 if none)."""
        result = dict.fromkeys(addresses, 0)
        by_bit: dict[int, str] = {}
        for address in result:
            replica = self._replicas.get(address)
            if replica is not None:
                self._expire(replica, now)
                if replica.blocks:
                    by_bit[replica.bit] = address
        alive = sum(by_bit)
        if not alive:
            return result
        owners = self._owners
        depth = 0
        for key in hashes:
            mask = owners.get(key, 0) & alive
            if mask != alive:
                _settle(result, by_bit, alive & ~mask, depth)
                alive = mask
                if not alive:
                    return result
            depth += 1
        _settle(result, by_bit, alive, depth)
        return result

    def entries(self, address: str) -> int:
        """How many entries the replica at ``address`` holds (expired ones not yet dropped too)."""
        replica = self._replicas.get(address)
        return 0 if replica is None else len(replica.blocks)

    def replica_cap(self) -> int:
        """The entries each replica may hold now: its share of ``max_entries``, at most its own cap."""
        return min(self.max_entries_per_replica, self.max_entries // max(1, len(self._replicas)))

    def stats(self) -> IndexStats:
        hashes = len(self._owners)
        return IndexStats(
            entries=self._entries,
            hashes=hashes,
            replicas=len(self._replicas),
            evicted_lru=self._evicted_lru,
            evicted_expired=self._evicted_expired,
            removed=self._removed,
            approx_bytes=self._entries * BYTES_PER_ENTRY + hashes * BYTES_PER_HASH,
            max_entries=self.max_entries,
        )

    # ---- updates ---------------------------------------------------------------------------

    def record(self, address: str, hashes: Sequence[BlockKey], now: float) -> int:
        """Note that ``hashes`` (a prompt's chain, first block first) are now cached at ``address``.

        Returns how many of them it held already (unexpired): the blocks this request will
        probably find cached there, since what a replica holds of a chain is a prefix of it."""
        replica = self._replica(address)
        now = self._expire(replica, now)
        blocks = replica.blocks
        owners = self._owners
        bit = replica.bit
        added = 0
        held = len(hashes)
        # Last to first: the first block ends up most recent, so the tail is evicted first.
        for key in reversed(hashes):
            if key in blocks:
                blocks.move_to_end(key)
            else:
                owners[key] = owners.get(key, 0) | bit
                added += 1
            blocks[key] = now
        self._entries += added
        self._evicted_lru += self._trim(replica, self.replica_cap())
        return held - added

    def remove(self, address: str, hashes: Iterable[BlockKey]) -> int:
        """Forget ``hashes`` at ``address`` (an engine evicted them); returns how many were held."""
        replica = self._replicas.get(address)
        if replica is None:
            return 0
        removed = 0
        for key in hashes:
            if replica.blocks.pop(key, None) is not None:
                self._disown(key, replica.bit)
                removed += 1
        self._entries -= removed
        self._removed += removed
        return removed

    def clear(self, address: str) -> int:
        """Forget everything at ``address`` but keep its slot (an engine reset its cache)."""
        replica = self._replicas.get(address)
        if replica is None:
            return 0
        count = len(replica.blocks)
        for key in replica.blocks:
            self._disown(key, replica.bit)
        replica.blocks.clear()
        self._entries -= count
        self._removed += count
        return count

    def drop_replica(self, address: str) -> None:
        """Forget a replica that left the fleet, and free its slot."""
        if address in self._replicas:
            self.clear(address)
            self._free_bits.append(self._replicas.pop(address).bit)

    def retain(self, addresses: Iterable[str]) -> None:
        """Drop every replica not in ``addresses`` (call on a new routing snapshot)."""
        keep = set(addresses)
        for address in [a for a in self._replicas if a not in keep]:
            self.drop_replica(address)

    def expire(self, now: float) -> int:
        """Drop every expired entry now (optional: expiry is lazy); returns how many."""
        before = self._evicted_expired
        for replica in self._replicas.values():
            self._expire(replica, now)
        return self._evicted_expired - before

    # ---- internals -------------------------------------------------------------------------

    def _replica(self, address: str) -> _Replica:
        replica = self._replicas.get(address)
        if replica is None:
            if self._free_bits:
                bit = self._free_bits.pop()
            else:
                bit, self._next_bit = self._next_bit, self._next_bit << 1
            replica = self._replicas[address] = _Replica(bit)
            cap = self.replica_cap()
            for other in self._replicas.values():
                self._evicted_lru += self._trim(other, cap)
        return replica

    def _expire(self, replica: _Replica, now: float) -> float:
        """Pop the replica's expired LRU front; returns ``now`` clamped to the replica's clock."""
        if now < replica.clock:
            now = replica.clock
        replica.clock = now
        horizon = now - self.ttl_s
        blocks = replica.blocks
        expired = 0
        while blocks:
            key, touched = next(iter(blocks.items()))
            if touched >= horizon:
                break
            del blocks[key]
            self._disown(key, replica.bit)
            expired += 1
        self._entries -= expired
        self._evicted_expired += expired
        return now

    def _trim(self, replica: _Replica, cap: int) -> int:
        blocks = replica.blocks
        evicted = 0
        while len(blocks) > cap:
            key, _ = blocks.popitem(last=False)
            self._disown(key, replica.bit)
            evicted += 1
        self._entries -= evicted
        return evicted

    def _disown(self, key: BlockKey, bit: int) -> None:
        mask = self._owners.get(key, 0) & ~bit
        if mask:
            self._owners[key] = mask
        else:
            self._owners.pop(key, None)


def _check_bounds(ttl_s: float, max_entries: int, max_entries_per_replica: int) -> None:
    if not ttl_s > 0 or max_entries < 0 or max_entries_per_replica < 0:
        raise ValueError("ttl_s must be > 0 and the bounds >= 0")


@dataclass(frozen=True, slots=True)
class IndexSettings:
    """An index's expiry and bounds (``PrefixIndex``'s keyword arguments), hashable."""

    ttl_s: float = DEFAULT_TTL_S
    max_entries: int = DEFAULT_MAX_ENTRIES
    max_entries_per_replica: int = DEFAULT_MAX_ENTRIES_PER_REPLICA

    def __post_init__(self) -> None:
        _check_bounds(self.ttl_s, self.max_entries, self.max_entries_per_replica)


class PrefixIndexes:
    """One process's prefix indexes, one per distinct ``IndexSettings``, created on first use.

    ``retain`` forgets, in every index, the replicas a new routing table lacks (and sweeps their
    expired entries, so an index no profile uses any more empties within ``ttl_s``); ``stats`` is
    their sum. The index count is bounded by the distinct settings a spec names.
    """

    def __init__(self) -> None:
        self._indexes: dict[IndexSettings, PrefixIndex] = {}

    def get(self, settings: IndexSettings) -> PrefixIndex:
        index = self._indexes.get(settings)
        if index is None:
            index = self._indexes[settings] = PrefixIndex(
                ttl_s=settings.ttl_s,
                max_entries=settings.max_entries,
                max_entries_per_replica=settings.max_entries_per_replica,
            )
        return index

    def indexes(self) -> list[PrefixIndex]:
        return list(self._indexes.values())

    # Engine events apply to every index (``kv_events.IndexSink``): each holds the replica's cache.
    def record(self, address: str, hashes: Sequence[BlockKey], now: float) -> int:
        return max((index.record(address, hashes, now) for index in self._indexes.values()), default=0)

    def remove(self, address: str, hashes: Iterable[BlockKey]) -> int:
        keys = list(hashes)
        return max((index.remove(address, keys) for index in self._indexes.values()), default=0)

    def clear(self, address: str) -> int:
        return max((index.clear(address) for index in self._indexes.values()), default=0)

    def retain(self, addresses: Iterable[str], now: float) -> None:
        keep = set(addresses)
        for index in self._indexes.values():
            index.retain(keep)
            index.expire(now)

    def stats(self) -> IndexStats:
        parts = [index.stats() for index in self._indexes.values()]
        if len(parts) == 1:
            return parts[0]
        return IndexStats(*(sum(getattr(p, f.name) for p in parts) for f in fields(IndexStats)))


def _settle(result: dict[str, int], by_bit: dict[int, str], mask: int, depth: int) -> None:
    """Give ``depth`` to the candidates whose slots are set in ``mask`` (each settles once)."""
    while mask:
        low = mask & -mask
        result[by_bit[low]] = depth
        mask ^= low
