"""Warm a shared prompt prefix with one request before the rows that share it fan out.

Providers write a prompt to their cache when the request FINISHES, so
requests sent together before the first one finishes all miss and pay the
full prefix. :class:`PrefixWarmer` lets the first request of each prefix go
alone: others with the same prefix wait for it to finish (whatever its
answer), then go out together and read the prefix from the cache.

A prefix is named by the start of the request text (system prompt, then user
message): rows whose starts differ never wait for each other, so a job
without a shared prefix runs exactly as before.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["PREFIX_CHARS", "PrefixWarmer", "prefix_key"]

# OpenAI routes requests by a hash of about their first 256 tokens: about 1,000 characters.
PREFIX_CHARS = 1024


def prefix_key(system: str | None, user: str) -> bytes:
    """The name of the prefix a request starts with (a digest of its first ``PREFIX_CHARS`` characters)."""
    text = f"{system}\x00{user}" if system is not None else f"\x01{user}"
    return hashlib.blake2b(text[:PREFIX_CHARS].encode(), digest_size=12).digest()


class PrefixWarmer:
    """One request per prefix first; the rest of that prefix after it finishes."""

    def __init__(self) -> None:
        self._warm: set[bytes] = set()
        self._warming: dict[bytes, asyncio.Event] = {}

    @asynccontextmanager
    async def turn(self, key: bytes) -> AsyncIterator[None]:
        """Hold the request for ``key`` until its prefix is warm (or this request warms it)."""
        while key not in self._warm:
            event = self._warming.get(key)
            if event is None:
                event = self._warming[key] = asyncio.Event()
                try:
                    yield
                finally:
                    # Warm or not (an error, a stop), the others may go: one of them warms it then.
                    self._warm.add(key)
                    del self._warming[key]
                    event.set()
                return
            await event.wait()
        yield
