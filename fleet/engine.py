"""The continuous-batching engine of one simulated replica.

It is a small discrete-time model of vLLM's scheduler, run on the event loop:

* requests wait in a FIFO queue; each step the scheduler (``fleet.scheduler``) reserves KV for
  the decodes (preempting the newest sequence when the cache runs out, with optimistic
  admission), runs the decodes, then prefill chunks under the step's token budget
  (``max_num_batched_tokens``, with chunked prefill), then admits waiting requests in order while
  a batch slot is free (``max_num_seqs``), budget is left and the KV cache can hold them;
* one engine step costs ``decode_base + decode_per_seq * batch`` plus the prefill of the prompt
  tokens computed in it (per *uncached* token), all multiplied by the fleet's ``time_scale`` and
  the replica's ``slowdown`` fault;
* at the end of each step every sequence whose prefill is complete emits one token (the step that
  completes a prefill also produces the first token);
* KV usage is the tokens the batch holds (prefilled so far + generated) over the capacity;
* a prefix cache of cumulatively hashed prompt blocks (bounded LRU) makes a repeated
  prompt prefix prefill at ~no cost; its stores, evictions and resets go to an optional
  ``cache_listener`` (``fleet.kv_publisher``: vLLM's KV events);
* a request for a LoRA adapter joins a batch only while the batch holds fewer than
  ``max_loras`` distinct adapters (else it is skipped, not blocking the queue, as in vLLM), and
  prefills once its adapter is on the GPU: loading one costs ``adapter_load_s`` while the rest of
  the batch keeps decoding (``fleet.lora``).

Steps are paced against a virtual deadline rather than by chained sleeps, so the event
loop's timer slack does not make a replica slower than its profile says.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Protocol

from fleet.faults import Faults
from fleet.lora import LoraSlots
from fleet.profiles import GpuProfile
from fleet.scheduler import Scheduler
from fleet.sequence import EngineStopped, Sequence

__all__ = ["Engine", "EngineListener", "EngineStopped", "RequestTooLarge", "Sequence"]

log = logging.getLogger(__name__)

# If the loop falls further behind than this, forget the debt instead of bursting steps.
MAX_LAG_S = 0.05


class RequestTooLarge(ValueError):
    """The request can never fit this replica (context length or KV capacity)."""


class EngineListener(Protocol):
    """Receives engine events; the metrics module implements it."""

    def on_prefill(self, model: str, prompt_tokens: int, cached_tokens: int) -> None: ...
    def on_first_token(self, model: str, ttft_s: float) -> None: ...
    def on_tokens(self, model: str, count: int) -> None: ...
    def on_finish(self, seq: Sequence) -> None: ...
    def on_preempt(self, seq: Sequence) -> None: ...


class PrefixCacheListener(Protocol):
    """Receives the prefix cache's changes (vLLM's KV events); ``fleet.kv_publisher`` implements it."""

    def on_stored(self, hashes: list[int], parent: int | None, token_ids: list[int], block_size: int) -> None: ...
    def on_removed(self, hashes: list[int]) -> None: ...
    def on_cleared(self) -> None: ...


class Engine:
    """A simulated vLLM engine: one per replica, driven by its own asyncio task."""

    def __init__(
        self,
        name: str,
        profile: GpuProfile,
        *,
        time_scale: float = 1.0,
        listener: EngineListener | None = None,
    ) -> None:
        self.name = name
        self.profile = profile
        self.time_scale = time_scale
        self.listener = listener
        self.cache_listener: PrefixCacheListener | None = None
        self.faults = Faults()
        self.lora = LoraSlots(profile.max_loras, profile.adapter_load_s * time_scale)
        self.scheduler = Scheduler(profile, self.lora, self._start_prefill)
        self._waiting = self.scheduler.waiting  # the scheduler's own queue and batch
        self._running = self.scheduler.running
        self._prefix: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._next_id = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Plain counters, for /sim/state and for tests.
        self.served = 0
        self.aborted = 0
        self.steps = 0
        self.busy_s = 0.0  # simulated step time spent, in (scaled) seconds
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.last_step_s = 0.0
        self.last_batch = 0

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine:{self.name}")

    async def stop(self) -> None:
        """Stop the loop and abort every queued or running request."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        now = asyncio.get_running_loop().time()
        for seq in [*self._waiting, *self._running]:
            seq._finish("abort", now)
            self.aborted += 1
        self._waiting.clear()
        self._running.clear()

    # ---- requests --------------------------------------------------------------------

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``RequestTooLarge`` if a request could never be served here."""
        need = prompt_tokens + max_tokens
        if need > self.profile.max_model_len:
            raise RequestTooLarge(
                f"This model's maximum context length is {self.profile.max_model_len} tokens. "
                f"However, you requested {need} tokens ({prompt_tokens} in the messages, "
                f"{max_tokens} in the completion)."
            )
        if need > self.profile.kv_capacity_tokens:
            raise RequestTooLarge(
                f"The request needs {need} KV-cache tokens but this replica holds at most "
                f"{self.profile.kv_capacity_tokens}."
            )

    def submit(
        self,
        model: str,
        prompt_tokens: int,
        block_hashes: list[int],
        max_tokens: int,
        *,
        limit_reason: str = "length",
        streaming: bool = False,
        adapter: str | None = None,
        token_ids: list[int] | None = None,
    ) -> Sequence:
        """Queue a request. ``max_tokens`` 0 means prefill only (embeddings, classifiers);
        ``adapter``: the LoRA adapter of ``model`` it runs with; ``token_ids``: the prompt's, for
        the ``cache_listener``."""
        if self._task is None:
            raise EngineStopped(f"engine {self.name} is not running")
        self.check_fits(prompt_tokens, max_tokens)
        self._next_id += 1
        seq = Sequence(
            self._next_id,
            model,
            prompt_tokens,
            block_hashes,
            max_tokens,
            limit_reason,
            asyncio.get_running_loop().time(),
            streaming,
            adapter,
            token_ids,
        )
        self._waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop a request (its client went away); frees its slot and KV at once."""
        if seq.finished:
            return
        if seq in self._running:
            self._running.remove(seq)
        else:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass
        self.aborted += 1
        seq._finish("abort", asyncio.get_running_loop().time())

    def reset_prefix_cache(self) -> int:
        """Forget every cached prompt block (vLLM's ``/reset_prefix_cache``); returns how many.

        Running sequences keep their KV: only reuse by later requests is lost.
        """
        dropped = len(self._prefix)
        self._prefix.clear()
        if self.cache_listener is not None:
            self.cache_listener.on_cleared()
        return dropped

    # ---- load signals ----------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Requests queued (without the ``extra_waiting`` fault)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def kv_tokens_held(self) -> int:
        return sum(s.kv_tokens for s in self._running)

    @property
    def kv_usage(self) -> float:
        """Fraction (0..1) of the KV cache the running batch holds."""
        return min(1.0, self.kv_tokens_held / self.profile.kv_capacity_tokens)

    @property
    def gpu_util(self) -> float:
        """Utilisation in percent, from batch occupancy (what DCGM would roughly show)."""
        return 100.0 * min(1.0, len(self._running) / self.profile.max_num_seqs)

    def counts_by_model(self) -> tuple[dict[str, int], dict[str, int]]:
        """(waiting, running) per model name."""
        waiting: dict[str, int] = collections.Counter(s.model for s in self._waiting)
        running: dict[str, int] = collections.Counter(s.model for s in self._running)
        return waiting, running

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """(running, waiting): the adapters with running (loading included) and with waiting
        sequences, each in order of first appearance, as vLLM's scheduler stats list them."""
        running = dict.fromkeys(s.adapter for s in self._running if s.adapter is not None)
        waiting = dict.fromkeys(s.adapter for s in self._waiting if s.adapter is not None)
        return list(running), list(waiting)

    def state(self) -> dict[str, Any]:
        """A JSON-ready snapshot, served at ``GET /sim/state``."""
        p = self.profile
        return {
            "name": self.name,
            "profile": p.name,
            "waiting": self.num_waiting,
            "waiting_reported": self.num_waiting + self.faults.extra_waiting,
            "running": self.num_running,
            "max_num_seqs": p.max_num_seqs,
            "kv_cache_usage": round(self.kv_usage, 6),
            "kv_tokens_held": self.kv_tokens_held,
            "kv_capacity_tokens": p.kv_capacity_tokens,
            "prefilling": sum(1 for s in self._running if s.started and not s.prefilled),
            "preemptions": self.preemptions,
            "gpu_util": round(self.gpu_util, 3),
            "served": self.served,
            "aborted": self.aborted,
            "steps": self.steps,
            "busy_s": round(self.busy_s, 6),
            "last_step_s": self.last_step_s,
            "last_batch": self.last_batch,
            "prefix_cache": {
                "queries": self.prefix_queries,
                "hits": self.prefix_hits,
                "blocks": len(self._prefix),
                "capacity_blocks": p.prefix_cache_blocks,
            },
            "lora": self._lora_state(),
            "time_scale": self.time_scale,
            "faults": self.faults.model_dump(),
        }

    def _lora_state(self) -> dict[str, Any]:
        running, waiting = self.adapters_in_use()
        now = asyncio.get_running_loop().time()
        return {**self.lora.state(now), "running_adapters": running, "waiting_adapters": waiting}

    # ---- the loop --------------------------------------------------------------------

    def _start_prefill(self, seq: Sequence) -> int:
        """A sequence's prefill begins: consult the prefix cache; return its cached tokens. Only a
        request's first prefill counts in the prompt and prefix-cache counters."""
        cached = self._lookup_prefix(seq)
        if seq.preemptions == 0:
            seq.cached_tokens = cached
            self.prefix_queries += seq.prompt_tokens
            self.prefix_hits += cached
            if self.listener is not None:
                self.listener.on_prefill(seq.model, seq.prompt_tokens, cached)
        return cached

    def _preempted(self, seqs: list[Sequence]) -> None:
        self.preemptions += len(seqs)
        if self.listener is not None:
            for seq in seqs:
                self.listener.on_preempt(seq)

    def _lookup_prefix(self, seq: Sequence) -> int:
        """Count the cached leading blocks and record this prompt's blocks (LRU)."""
        cache = self._prefix
        hits = 0
        for h in seq.block_hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            hits += 1
        for h in seq.block_hashes[hits:]:
            cache[h] = None
        evicted = []
        while len(cache) > self.profile.prefix_cache_blocks:
            evicted.append(cache.popitem(last=False)[0])
        if self.cache_listener is not None:
            self._publish_prefix(seq, hits, evicted)
        # vLLM always recomputes at least the last prompt token.
        return max(0, min(hits * self.profile.block_size, seq.prompt_tokens - 1))

    def _publish_prefix(self, seq: Sequence, hits: int, evicted: list[int]) -> None:
        """Tell the cache listener what one prompt stored (its blocks past the hits) and evicted."""
        listener, size = self.cache_listener, self.profile.block_size
        assert listener is not None
        stored = seq.block_hashes[hits:]
        if stored and seq.token_ids is not None:
            parent = seq.block_hashes[hits - 1] if hits else None
            listener.on_stored(stored, parent, seq.token_ids[hits * size : len(seq.block_hashes) * size], size)
        if evicted:
            listener.on_removed(evicted)

    def _step_seconds(self, batch: int, prefill_tokens: int) -> float:
        p = self.profile
        raw = p.decode_base_s + p.decode_per_seq_s * batch + p.prefill_s_per_token * prefill_tokens
        return raw * self.time_scale * self.faults.slowdown

    def _emit(self) -> None:
        """End of a step: every prefilled sequence gets one token; finished ones leave."""
        now = asyncio.get_running_loop().time()
        listener = self.listener
        done = False
        tokens: dict[str, int] = {}
        for seq in self._running:
            if not seq.prefilled:  # its prefill is under way, or its adapter is still loading
                continue
            if seq.max_tokens > 0:
                tokens[seq.model] = tokens.get(seq.model, 0) + 1
                seq.generated += 1
                seq.computed += 1
                if seq.generated == 1:
                    seq.first_token_at = now
                    if listener is not None:
                        listener.on_first_token(seq.model, now - seq.arrival)
                seq._emit(seq.generated - 1)
            if seq.generated >= seq.max_tokens:
                seq._finish(seq.limit_reason, now)
                self.served += 1
                done = True
                if listener is not None:
                    listener.on_finish(seq)
        if listener is not None:
            for model, count in tokens.items():
                listener.on_tokens(model, count)
        if done:
            self._running[:] = [s for s in self._running if not s.finished]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                deadline = loop.time()
            now = loop.time()
            plan = self.scheduler.plan(now)
            if plan.preempted:
                self._preempted(plan.preempted)
            batch = plan.batch
            if not batch:
                # Nothing admissible (cannot happen for requests that passed check_fits), or every
                # admitted sequence waits for its adapter: sleep until one is ready or a request comes.
                await self._idle_until(min((s.ready_at for s in self._running), default=None))
                deadline = loop.time()
                continue
            step = self._step_seconds(batch, plan.prefill_tokens)
            self.last_step_s = step
            self.last_batch = batch
            deadline += step
            now = loop.time()
            if deadline < now - MAX_LAG_S:
                deadline = now
            await asyncio.sleep(max(0.0, deadline - now))
            self.steps += 1
            self.busy_s += step
            try:
                self._emit()
            except Exception:  # never let one bad sequence kill the replica
                log.exception("engine %s: step failed", self.name)

    async def _idle_until(self, ready_at: float | None) -> None:
        """Wait for a new request, or until ``ready_at`` (loop time) when given."""
        self._wake.clear()
        if ready_at is None:
            await self._wake.wait()
            return
        delay = ready_at - asyncio.get_running_loop().time()
        if delay > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
