"""What the two ADS variants (`sotw.py`, `delta.py`) share: one Envoy's stream as a loop.

Each variant composes a `StreamCore` and gives it two functions: `on_request` (update the
variant's state from one request; False when the request needs no answer) and `pump` (every
response needed now to move Envoy towards the cache's snapshot). The core owns the rest: the
queue that serializes Envoy's requests with the cache's wake-ups, the node's registration with
the cache (`connect` on the first request, `close` when the stream ends) and the nonces.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from controlplane.xds.cache import SnapshotCache, Watch

log = logging.getLogger("imesh.xds")

UNION, FINAL = "union", "final"  # the two CDS stages of make-before-break
CONTROL_PLANE_ID = "imesh-controlplane"  # the `control_plane.identifier` of every response

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")

_stream_ids = itertools.count(1)  # one sequence for both variants: nonces stay unique per process


class ProtocolError(ValueError):
    """Envoy broke the protocol (e.g. no node id on the first request): the stream is aborted."""


class _Signal(enum.Enum):
    CHANGED = "changed"  # the cache's target for this node moved
    END = "end"  # Envoy closed its side of the stream


class StreamCore(Generic[RequestT]):
    """One Envoy's stream, whichever the variant: its requests and wake-ups, node and nonces.

    `kind` names the variant in messages ("ADS", "delta ADS"); `api` is what the cache shows in the
    node's status ("sotw", "delta").
    """

    def __init__(self, cache: SnapshotCache, *, api: str, kind: str) -> None:
        self.cache = cache
        self.id = next(_stream_ids)
        self.api = api
        self.kind = kind
        self.node_id: str | None = None
        self._nonces = itertools.count(1)
        self._queue: asyncio.Queue[RequestT | _Signal | BaseException] = asyncio.Queue()
        self._change_queued = False
        self._watch: Watch | None = None

    @property
    def node(self) -> str:
        """The node id; only asked for once a request was handled, which registers it."""
        if self.node_id is None:
            raise RuntimeError(f"{self.kind} stream {self.id} has no node yet")
        return self.node_id

    def register(self, node_id: str, reported_version: str = "") -> None:
        """The first request: register its node with the cache, which wakes the stream on changes."""
        if not node_id:
            raise ProtocolError(f"the first {self.kind} request carries no node id")
        self.node_id = node_id
        self._watch = self.cache.connect(node_id, self.wake, reported_version, api=self.api)

    def next_nonce(self) -> str:
        return f"{self.id}-{next(self._nonces)}"

    def wake(self) -> None:
        """Have the loop pump again (once, however often the cache calls before it gets to it)."""
        if not self._change_queued:
            self._change_queued = True
            self._queue.put_nowait(_Signal.CHANGED)

    async def run(
        self,
        requests: AsyncIterator[RequestT],
        on_request: Callable[[RequestT], bool],
        pump: Callable[[], list[ResponseT]],
    ) -> AsyncIterator[ResponseT]:
        """Yield responses until Envoy closes the stream; cancellation (disconnect) cleans up too."""
        reader = asyncio.create_task(self._read(requests), name=f"ads-read-{self.id}")
        try:
            while True:
                item = await self._queue.get()
                if item is _Signal.END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item is _Signal.CHANGED:
                    self._change_queued = False
                elif not on_request(item):
                    continue
                for response in pump():
                    yield response
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            if self._watch is not None:
                self._watch.close()
            log.info("ADS stream %d of %s closed", self.id, self.node_id)

    async def _read(self, requests: AsyncIterator[RequestT]) -> None:
        try:
            async for request in requests:
                self._queue.put_nowait(request)
            self._queue.put_nowait(_Signal.END)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream broke: surface it in run()
            self._queue.put_nowait(error)
