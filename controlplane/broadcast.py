"""A latest-value broadcaster: subscribers always get the newest value, never a backlog.

Used for the routing table and load reports streamed to ext_procs: a slow subscriber skips
intermediate values instead of buffering them, which is what a picker wants.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class _Published(Generic[T]):
    sequence: int  # 1 for the first value published, +1 for each after it
    value: T


class Latest(Generic[T]):
    def __init__(self) -> None:
        self._latest: _Published[T] | None = None
        self._changed = asyncio.Condition()

    @property
    def value(self) -> T | None:
        return self._latest.value if self._latest is not None else None

    async def publish(self, value: T) -> None:
        async with self._changed:
            sequence = self._latest.sequence + 1 if self._latest is not None else 1
            self._latest = _Published(sequence, value)
            self._changed.notify_all()

    async def subscribe(self) -> AsyncIterator[T]:
        seen = 0
        while True:
            latest = await self._newer_than(seen)
            seen = latest.sequence
            yield latest.value

    async def _newer_than(self, seen: int) -> _Published[T]:
        """Wait for a value published after sequence number `seen`."""
        async with self._changed:
            while self._latest is None or self._latest.sequence <= seen:
                await self._changed.wait()
            return self._latest
