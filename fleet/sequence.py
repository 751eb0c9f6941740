"""One request inside a simulated engine, and how far its prefill has come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class EngineStopped(RuntimeError):
    """The engine was stopped while the request was queued or running."""


class Sequence:
    """One request inside the engine. Await ``wait()`` or iterate ``stream()``.

    Its prefill covers ``target`` tokens: the prompt, plus the tokens it had generated when a
    preemption made it start over (vLLM recomputes them). ``computed`` counts the tokens whose KV
    it holds: prefix-cache hits and prefill chunks, then one per generated token.
    """

    __slots__ = (
        "id",
        "model",
        "adapter",
        "prompt_tokens",
        "block_hashes",
        "token_ids",
        "max_tokens",
        "limit_reason",
        "arrival",
        "admitted_at",
        "first_token_at",
        "finished_at",
        "generated",
        "cached_tokens",
        "finish_reason",
        "ready_at",
        "started",
        "target",
        "computed",
        "preemptions",
        "_queue",
        "_done",
    )

    def __init__(
        self,
        seq_id: int,
        model: str,
        prompt_tokens: int,
        block_hashes: list[int],
        max_tokens: int,
        limit_reason: str,
        arrival: float,
        streaming: bool,
        adapter: str | None = None,
        token_ids: list[int] | None = None,
    ) -> None:
        self.id = seq_id
        self.model = model  # the base model (the metrics' model_name), also for an adapter's request
        self.adapter = adapter  # the LoRA adapter it runs with, if any
        self.prompt_tokens = prompt_tokens
        self.block_hashes = block_hashes
        self.token_ids = token_ids  # the prompt's token ids, for KV events (None: no listener)
        self.max_tokens = max_tokens
        self.limit_reason = limit_reason  # finish_reason reported when max_tokens is reached
        self.arrival = arrival
        self.admitted_at: float | None = None  # its first admission (a preemption does not reset it)
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.generated = 0
        self.cached_tokens = 0  # prefix-cache hits of its first prefill
        self.finish_reason: str | None = None
        self.ready_at = 0.0  # when admitted: the time its adapter is on the GPU (may prefill from then)
        self.started = False  # its prefill has begun (the prefix cache was consulted)
        self.target = 0  # tokens its current prefill must cover (set on admission)
        self.computed = 0  # tokens whose KV it holds
        self.preemptions = 0
        self._queue: asyncio.Queue[int | None] | None = asyncio.Queue() if streaming else None
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilled(self) -> bool:
        """Its (current) prefill is complete: it decodes from now on."""
        return self.started and self.computed >= self.target

    @property
    def kv_tokens(self) -> int:
        """Tokens this sequence holds in the KV cache right now (none before its prefill)."""
        return self.computed

    def admit(self, now: float) -> None:
        """Joins the running batch: its prefill is to cover the prompt and what it generated so far."""
        if self.admitted_at is None:
            self.admitted_at = now
        self.target = self.prompt_tokens + self.generated
        self.started = False
        self.computed = 0

    def preempt(self) -> None:
        """Leaves the batch and frees its KV (recompute preemption); ``admit`` starts it over."""
        self.preemptions += 1
        self.started = False
        self.computed = 0
        self.target = 0
        self.ready_at = 0.0

    async def wait(self) -> Sequence:
        """Wait until the sequence finishes; raises ``EngineStopped`` if it was aborted."""
        await asyncio.shield(self._done)
        if self.finish_reason == "abort":
            raise EngineStopped("request aborted")
        return self

    async def stream(self) -> AsyncIterator[int]:
        """Yield each generated token's index as the engine emits it."""
        assert self._queue is not None, "submit(..., streaming=True) to stream"
        while (index := await self._queue.get()) is not None:
            yield index
        if self.finish_reason == "abort":
            raise EngineStopped("request aborted")

    def _emit(self, index: int) -> None:
        if self._queue is not None:
            self._queue.put_nowait(index)

    def _finish(self, reason: str, now: float) -> None:
        self.finish_reason = reason
        self.finished_at = now
        if self._queue is not None:
            self._queue.put_nowait(None)
        if not self._done.done():
            self._done.set_result(None)
