"""The rows waiting for a worker, refilled a slice at a time.

``asyncio.Queue`` with a small ``maxsize`` wakes the producer once per row
taken; at thousands of requests a second that is an extra task step per
request. Here the producer waits until the queue runs low and then adds a
whole slice, so it wakes once per slice. Memory stays bounded by
``low_water`` plus one slice.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class WorkQueue(Generic[T]):
    def __init__(self, low_water: int) -> None:
        self._items: deque[T] = deque()
        self._low_water = low_water
        self._room = asyncio.Event()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    async def put_many(self, items: Sequence[T]) -> None:
        """Wait until the queue is at or below its low-water mark, then add ``items``."""
        while len(self._items) > self._low_water and not self._closed:
            self._room.clear()
            await self._room.wait()
        if not self._closed:
            self._items.extend(items)
            self._ready.set()

    async def get(self) -> T | None:
        """The next item, or None once the queue is closed and empty."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if len(self._items) <= self._low_water:
            self._room.set()
        return item

    def close(self, drop_pending: bool = False) -> None:
        """No more items: waiting workers get None (at once, with ``drop_pending``)."""
        if drop_pending:
            self._items.clear()
        self._closed = True
        self._ready.set()
        self._room.set()
