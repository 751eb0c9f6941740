"""Precise mode's transport: one ZMQ SUB socket per replica that publishes its KV events.

The routing table names each replica's publisher (``Endpoint.kv_events``, from the spec);
``KVEventSubscriber.follow`` is called with every new table and connects to the new endpoints,
disconnects from those gone, and starts afresh where a replica's endpoint changed. ZMQ itself
reconnects a SUB socket whose publisher went away and came back, and re-sends the subscription;
a restarted publisher's sequence numbers start again, which the feed takes as a new, empty
cache (``kv_events.ReplicaFeed``).

Each message is decoded (``kv_events.decode_message``), re-keyed with ``TokenKeys`` (the engine's
token ids re-hashed with our chain: the keys the lookup side computes with the model's tokenizer,
``tokens.py``) and applied to the worker's prefix indexes, the same ones the picks record into.
A malformed message is counted and skipped. Nothing here runs on the request path: receiving and
applying happen on the worker's event loop between requests, a few microseconds a block.

Fallback: a replica whose events stop (none for ``stale_after_s``, or none yet) is simply not
*live*; its entries from events age out by the index's ttl, its engine's evictions are no longer
seen, and the picks' own ``record`` guesses keep the index working: approximate mode, by itself.
``live`` reports per replica which mode it is in (the metrics show it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import zmq
import zmq.asyncio

from extproc.prefix.kv_events import (
    IndexSink,
    Keying,
    KVEventBatch,
    KVEventError,
    ReplicaFeed,
    TokenKeys,
    decode_message,
)

log = logging.getLogger("imesh.extproc.kv_events")

STALE_AFTER_S = 30.0  # no batch for this long: the replica's feed is not live
RECEIVE_HWM = 10_000  # messages ZMQ queues for this worker before it drops (seen as gaps)
RECONNECT_MAX_S = 1.0  # ZMQ's reconnect backoff cap, to a publisher that is down
EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


class KVEventMetrics(Protocol):
    """What the subscriber counts (extproc/telemetry.py implements it)."""

    def kv_events(self, kind: str, count: int) -> None: ...

    def kv_gaps(self, count: int) -> None: ...


@dataclass
class _Subscription:
    endpoint: str
    feed: ReplicaFeed
    task: asyncio.Task[None] | None = None
    malformed: int = 0


class KVEventSubscriber:
    """The worker's subscriptions, one per publishing replica, applied to ``sink``."""

    def __init__(
        self,
        sink: IndexSink,
        *,
        metrics: KVEventMetrics | None = None,
        keys: Callable[[], Keying] = TokenKeys,
        stale_after_s: float = STALE_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._sink = sink
        self._metrics = metrics
        self._keys = keys
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._ctx = zmq.asyncio.Context()
        self._subs: dict[str, _Subscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # receivers, cancelled ones until they end

    def follow(self, endpoints: Mapping[str, str]) -> None:
        """Subscribe to exactly ``endpoints`` (replica address -> ZMQ endpoint); call on each table."""
        for address in [a for a, sub in self._subs.items() if endpoints.get(a) != sub.endpoint]:
            self._unsubscribe(address)
        for address, endpoint in endpoints.items():
            if address not in self._subs:
                sub = _Subscription(endpoint, ReplicaFeed(self._sink, address, keys=self._keys()))
                sub.task = asyncio.get_running_loop().create_task(self._receive(sub), name=f"kv-events:{address}")
                self._tasks.add(sub.task)
                sub.task.add_done_callback(self._tasks.discard)
                self._subs[address] = sub
                log.info("subscribed to the KV events of %s at %s", address, endpoint)

    def feed(self, address: str) -> ReplicaFeed | None:
        sub = self._subs.get(address)
        return sub.feed if sub is not None else None

    def live(self) -> dict[str, bool]:
        """Per subscribed replica: whether its events are flowing (precise) or not (approximate)."""
        now = self._clock()
        return {a: sub.feed.live(now, self.stale_after_s) for a, sub in self._subs.items()}

    async def close(self) -> None:
        for address in list(self._subs):
            self._unsubscribe(address)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ctx.destroy(linger=0)

    # ---- internals -------------------------------------------------------------------------

    def _unsubscribe(self, address: str) -> None:
        sub = self._subs.pop(address)
        if sub.task is not None:
            sub.task.cancel()
        log.info("unsubscribed from the KV events of %s at %s", address, sub.endpoint)

    async def _receive(self, sub: _Subscription) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(RECONNECT_MAX_S * 1000))
        sock.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: a replica publishes one stream
        try:
            sock.connect(sub.endpoint)
            while True:
                self._apply(sub, await sock.recv_multipart())
        except zmq.ZMQError as exc:
            log.error("KV events of %s at %s: %s; that replica stays approximate", sub.feed.address, sub.endpoint, exc)
        finally:
            sock.close(linger=0)

    def _apply(self, sub: _Subscription, frames: list[bytes]) -> None:
        try:
            seq, batch = decode_message(frames)
        except KVEventError as exc:
            sub.malformed += 1
            if sub.malformed == 1:
                log.warning("malformed KV event message from %s: %s", sub.endpoint, exc)
            if self._metrics is not None:
                self._metrics.kv_events("malformed", 1)
            return
        feed = sub.feed
        gaps = feed.gaps
        feed.apply(batch, self._clock(), seq)
        if self._metrics is not None:
            _count(self._metrics, batch)
            if feed.gaps > gaps:
                self._metrics.kv_gaps(feed.gaps - gaps)


def _count(metrics: KVEventMetrics, batch: KVEventBatch) -> None:
    counts = dict.fromkeys(EVENT_TYPES, 0)
    for event in batch.events:
        counts[type(event).__name__] += 1
    for kind, count in counts.items():
        if count:
            metrics.kv_events(kind, count)
    if batch.unknown:
        metrics.kv_events("unknown", batch.unknown)
