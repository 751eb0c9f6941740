"""vLLM's KV-cache events, published as a real vLLM publishes them (``--kv-events-config``).

A replica configured with ``kv_events: tcp://127.0.0.1:PORT`` binds a ZMQ PUB socket there and
publishes its prefix cache's changes: ``BlockStored`` when a prompt's new full blocks are cached
(their hashes, the parent block's hash, their token ids, the block size), ``BlockRemoved`` when
the LRU evicts blocks, ``AllBlocksCleared`` on ``POST /reset_prefix_cache``.

The wire format, vLLM's: each message is three frames, the topic (empty by default, as vLLM's),
an 8-byte big-endian sequence number, and a msgpack ``KVEventBatch``; msgspec's array encoding
of vLLM's structs, so the batch is ``[ts, events]`` and each event a tagged array, its tag first
and its fields in declaration order (``["BlockStored", block_hashes, parent_block_hash,
token_ids, block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes, medium]``,
``["AllBlocksCleared"]``). The medium is ``"GPU"``; block hashes are the engine's own 64-bit
ints (``fleet.text.block_hashes``), opaque to subscribers, as vLLM's are.

The engine never waits on it: events accumulate in a list and are sent once per event-loop turn
(one batch per engine step, as vLLM batches per step) with a non-blocking send. A PUB socket
drops a message for a subscriber whose queue is at the high-water mark (a slow or stuck one);
its sequence number is spent all the same, so that subscriber sees the gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

log = logging.getLogger(__name__)

MEDIUM = "GPU"
SEND_HWM = 10_000  # messages queued per subscriber before sends drop
EPHEMERAL_PORT = "0"  # in a config: bind any free port (ZMQ's "*")


class KVEventPublisher:
    """One replica's PUB socket and pending batch; ``endpoint`` is the bound one (port resolved)."""

    def __init__(self, endpoint: str, topic: bytes = b"", hwm: int = SEND_HWM) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        host, _, port = endpoint.rpartition(":")
        try:
            self._sock.bind(f"{host}:{'*' if port == EPHEMERAL_PORT else port}")
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(exc.errno, f"cannot bind KV events on {endpoint}: {exc}") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic = topic
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self._pending: list[list[Any]] = []
        self._flush_scheduled = False

    # ---- the engine's hooks (fleet.engine.PrefixCacheListener) ----------------------------

    def on_stored(self, hashes: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int) -> None:
        self._add(["BlockStored", list(hashes), parent, list(token_ids), block_size, None, MEDIUM])

    def on_removed(self, hashes: Sequence[int]) -> None:
        self._add(["BlockRemoved", list(hashes), MEDIUM])

    def on_cleared(self) -> None:
        self._add(["AllBlocksCleared"])

    # ---- sending -------------------------------------------------------------------------

    def _add(self, event: list[Any]) -> None:
        self._pending.append(event)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a synchronous caller): send now
                self.flush()

    def flush(self) -> None:
        """Send the pending events as one batch, now; never blocks."""
        self._flush_scheduled = False
        if not self._pending or self._sock.closed:
            return
        events, self._pending = self._pending, []
        payload = msgpack.packb([time.time(), events])
        seq, self.seq = self.seq, self.seq + 1
        try:
            self._sock.send_multipart([self.topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self._pending = []
        if not self._sock.closed:
            self._sock.close(linger=0)
        self._ctx.term()

    def state(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "seq": self.seq, "sent": self.sent, "dropped": self.dropped}
