"""LoRA adapter slots of one simulated engine, shaped after vLLM's ``--max-loras``.

vLLM serves an adapter when a request names it as its ``model``. Two limits apply, both modelled
here:

* a batch holds at most ``max_loras`` distinct adapters: a request for another adapter is skipped
  by the scheduler (it stays waiting, the requests behind it may go first) until a sequence of
  one of those adapters finishes;
* the GPU holds at most ``max_loras`` adapters' weights. One that is not resident is loaded when
  its first request is admitted, which costs ``load_s`` before that request's prefill (the rest of
  the batch keeps decoding); a full GPU first evicts the least recently used adapter that no
  running sequence uses (there always is one, by the batch limit).

Recency follows the batches: every adapter of the running batch is touched once per step.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any


class LoraSlots:
    """The adapters resident on the GPU (least recently used first) and when each is ready."""

    def __init__(self, max_loras: int, load_s: float) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.max_loras = max_loras
        self.load_s = load_s  # already scaled by the fleet's time_scale
        self._resident: collections.OrderedDict[str, float] = collections.OrderedDict()  # name -> ready at
        self.loads = 0
        self.evictions = 0

    def admits(self, adapter: str, batch: set[str]) -> bool:
        """Whether a sequence of ``adapter`` may join a batch that uses the adapters ``batch``."""
        return adapter in batch or len(batch) < self.max_loras

    def acquire(self, adapter: str, batch: set[str], now: float) -> float:
        """Make ``adapter`` resident for a sequence admitted at ``now``; return when it is ready.

        Call only when ``admits(adapter, batch)``; ``batch``: the adapters the running sequences use
        (never evicted).
        """
        resident = self._resident
        ready_at = resident.get(adapter)
        if ready_at is not None:
            resident.move_to_end(adapter)
            return ready_at
        if len(resident) >= self.max_loras:
            victim = next(name for name in resident if name not in batch)
            del resident[victim]
            self.evictions += 1
        ready_at = resident[adapter] = now + self.load_s
        self.loads += 1
        return ready_at

    def touch(self, adapters: Iterable[str]) -> None:
        """The adapters one step used: the most recently used now."""
        for adapter in adapters:
            if adapter in self._resident:
                self._resident.move_to_end(adapter)

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        return list(self._resident)

    def loading(self, now: float) -> list[str]:
        return [name for name, ready_at in self._resident.items() if ready_at > now]

    def state(self, now: float) -> dict[str, Any]:
        return {
            "max_loras": self.max_loras,
            "resident": self.resident(),
            "loading": self.loading(now),
            "loads": self.loads,
            "evictions": self.evictions,
        }
