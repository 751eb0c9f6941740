"""What one engine step computes: admission, prefill chunks and preemption, after vLLM V1.

Each step, in this order:

KV is claimed in ``block_size``-token blocks, as vLLM allocates it.

1. **KV for the decodes.** Every prefilled sequence will hold one more token after the step. With
   ``optimistic_admission``, while the running batch would then need more KV than the cache holds,
   the most recently admitted running sequence is preempted: it frees its KV and goes back to the
   front of the queue, to be prefilled again (prompt and the tokens it already generated; the
   prefix cache may skip the prompt's blocks), as vLLM's recompute preemption does.
2. **Decodes first**: each prefilled sequence takes one token of the step's budget
   (``max_num_batched_tokens`` with ``enable_chunked_prefill``, unbounded without).
3. **Prefill chunks** of the running sequences whose prefill is under way, in admission order,
   each as much of what is left as the budget allows.
4. **Admission**, unless this step preempted: in FIFO order while a batch slot is free, the budget
   is not spent and the KV cache can hold the request: its prompt (optimistic) or its prompt plus
   ``max_tokens`` (otherwise); the head of the queue blocks the rest. A LoRA request the batch has
   no adapter room for only skips its turn. An admitted sequence whose adapter is ready starts its
   prefill in the same step, with the budget left.

A sequence emits its first token in the step that completes its prefill (``fleet.engine``).
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from fleet.lora import LoraSlots
from fleet.profiles import GpuProfile
from fleet.sequence import Sequence

UNBOUNDED = sys.maxsize  # the step budget without chunked prefill


@dataclass
class StepPlan:
    """One step's work: the sequences in it, the prompt tokens it computes, who was preempted."""

    batch: int = 0  # sequences in the step (decodes and prefill chunks)
    prefill_tokens: int = 0  # uncached prompt (and recomputed) tokens computed this step
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    """The waiting queue and the running batch of one engine, and the rules of a step."""

    def __init__(self, profile: GpuProfile, lora: LoraSlots, start_prefill: Callable[[Sequence], int]) -> None:
        self.profile = profile
        self.lora = lora
        self._start_prefill = start_prefill  # consults the prefix cache; returns the cached tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first

    # ---- KV accounting, in blocks as vLLM allocates it ---------------------------------

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.profile.block_size)

    @property
    def capacity_blocks(self) -> int:
        """Rounded up, so that any request within ``kv_capacity_tokens`` fits alone."""
        return self.blocks(self.profile.kv_capacity_tokens)

    def kv_need(self, seq: Sequence) -> int:
        """KV blocks a running sequence claims through the coming step."""
        if not self.profile.optimistic_admission:
            return self.blocks(seq.prompt_tokens + seq.max_tokens)  # the whole request, up front
        if seq.prefilled:
            return self.blocks(seq.computed + 1)  # with the token this step generates
        return self.blocks(seq.target)  # its prompt (and recomputed tokens), claimed on admission

    def kv_claimed(self) -> int:
        return sum(self.kv_need(s) for s in self.running)

    # ---- one step ----------------------------------------------------------------------

    def plan(self, now: float) -> StepPlan:
        """Decide the step starting at ``now``; mutates the queue and the batch."""
        p = self.profile
        step = StepPlan(preempted=self._make_room())
        budget = p.max_num_batched_tokens if p.enable_chunked_prefill else UNBOUNDED
        decodes = sum(1 for s in self.running if s.prefilled)
        step.batch = decodes
        budget = max(0, budget - decodes)
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilled and seq.ready_at <= now:
                budget -= self._chunk(seq, budget, step)
        if not step.preempted:
            self._admit(now, budget, step)
        return step

    def _make_room(self) -> list[Sequence]:
        """Preempt the newest running sequences until the batch's KV fits the cache."""
        if not self.profile.optimistic_admission:
            return []
        preempted = []
        capacity = self.capacity_blocks
        # check_fits keeps any one request within the cache, so the oldest always stays.
        while len(self.running) > 1 and self.kv_claimed() > capacity:
            victim = self.running.pop()
            victim.preempt()
            self.waiting.appendleft(victim)
            preempted.append(victim)
        return preempted

    def _chunk(self, seq: Sequence, budget: int, step: StepPlan) -> int:
        """Compute the next chunk of ``seq``'s prefill; return the budget it used."""
        if not seq.started:
            seq.started = True
            seq.computed = self._start_prefill(seq)
        n = min(seq.target - seq.computed, budget)
        seq.computed += n
        step.batch += 1
        step.prefill_tokens += n
        return n

    def _admit(self, now: float, budget: int, step: StepPlan) -> None:
        p = self.profile
        waiting = self.waiting
        batch = {s.adapter for s in self.running if s.adapter is not None}
        skipped: list[Sequence] = []
        claimed = self.kv_claimed()
        while waiting and len(self.running) < p.max_num_seqs and budget > 0:
            seq = waiting[0]
            adapter = seq.adapter
            if adapter is not None and not self.lora.admits(adapter, batch):
                skipped.append(waiting.popleft())  # vLLM skips it and keeps its place in the queue
                continue
            need = self.blocks(seq.prompt_tokens + (seq.generated if p.optimistic_admission else seq.max_tokens))
            if claimed + need > self.capacity_blocks:
                break  # head-of-line blocks, as vLLM's FCFS scheduler does
            waiting.popleft()
            seq.admit(now)
            claimed += need
            if adapter is not None:
                seq.ready_at = self.lora.acquire(adapter, batch, now)
                batch.add(adapter)
            self.running.append(seq)
            if seq.ready_at <= now:
                budget -= self._chunk(seq, budget, step)
        waiting.extendleft(reversed(skipped))
        if batch:
            self.lora.touch(batch)
