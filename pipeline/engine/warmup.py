"""Warm a shared prompt prefix with one request before the rows that share it fan out.

Providers write a prompt to their cache when the request FINISHES, so
requests sent together before the first one finishes all miss and pay the
full prefix. :class:`PrefixWarmer` lets the first request of each prefix go
alone: others with the same prefix wait for its first attempt to finish
(whatever its answer), then go out together and read the prefix from the
cache. The client (``engine/client.py``) holds one, so every driver that
sends chat requests (realtime, Ray workers) warms the same way.

A prefix is named by the start of the request's messages (the system
prompt, then the user message): rows whose starts differ never wait for each
other, so a job without a shared prefix runs as before.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["MAX_WARM", "PREFIX_BYTES", "PrefixWarmer", "prefix_key"]

# OpenAI routes requests by a hash of about their first 256 tokens: about 1,000 bytes.
PREFIX_BYTES = 1024
# Warm prefixes remembered at most. Rows whose starts all differ (long documents after a short
# system prompt) would otherwise keep one key each: about 80 MB at a million rows. Forgetting
# the oldest half costs a shared prefix one more lone request when it next comes.
MAX_WARM = 65_536


def prefix_key(start: bytes) -> bytes:
    """The name of the prefix a request starts with: a digest of its first ``PREFIX_BYTES`` bytes."""
    return hashlib.blake2b(start[:PREFIX_BYTES], digest_size=12).digest()


class PrefixWarmer:
    """One request per prefix first; the rest of that prefix after it finishes."""

    def __init__(self) -> None:
        self._warm: dict[bytes, None] = {}  # ordered: the oldest are forgotten first
        self._warming: dict[bytes, asyncio.Event] = {}

    def is_warm(self, key: bytes) -> bool:
        """True when ``key``'s prefix is warm already: :meth:`enter` would return False at once."""
        return key in self._warm

    async def enter(self, key: bytes) -> bool:
        """Wait while another request warms ``key``; True when this request is the one to warm it."""
        while key not in self._warm:
            event = self._warming.get(key)
            if event is None:
                self._warming[key] = asyncio.Event()
                return True
            await event.wait()
        return False

    def leave(self, key: bytes) -> None:
        """The warming request finished (answered, failed or stopped): the others may go."""
        event = self._warming.pop(key, None)
        warm = self._warm
        warm[key] = None
        if len(warm) > MAX_WARM:
            for old in list(warm)[: MAX_WARM // 2]:
                del warm[old]
        if event is not None:
            event.set()

    @asynccontextmanager
    async def turn(self, key: bytes) -> AsyncIterator[None]:
        """Hold a request for ``key`` until its prefix is warm (or this request warms it)."""
        warming = await self.enter(key)
        try:
            yield
        finally:
            if warming:
                self.leave(key)
