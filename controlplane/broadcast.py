"""A latest-value broadcaster: subscribers always get the newest value, never a backlog.

Used for the routing table and load reports streamed to ext_procs: a slow subscriber skips
intermediate values instead of buffering them, which is what a picker wants.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Latest(Generic[T]):
    def __init__(self) -> None:
        self._value: T | None = None
        self._sequence = 0
        self._changed = asyncio.Condition()

    @property
    def value(self) -> T | None:
        return self._value

    async def publish(self, value: T) -> None:
        async with self._changed:
            self._value = value
            self._sequence += 1
            self._changed.notify_all()

    async def subscribe(self) -> AsyncIterator[T]:
        seen = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._sequence > seen)
                seen, value = self._sequence, self._value
            yield value
