"""The HTTP client: one request per row, retried with backoff and jitter.

The retry loop is written out rather than delegated to tenacity or stamina
because every attempt must pass the shared rate limiter, a 429 must pause the
whole job, and a graceful stop must cut a backoff short: these hooks are the
whole loop, so a library would add indirection without removing code.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from pipeline.engine.limits.inflight import InFlightWindow
from pipeline.engine.limits.limiter import NO_SLOT, RateLimiter
from pipeline.engine.transport import ChatTransport
from pipeline.engine.warmup import PREFIX_BYTES, PrefixWarmer, prefix_key
from pipeline.providers.base import Reply, ReplyKind
from pipeline.providers.dialect import Dialect

MAX_IN_FLIGHT = 4096  # [limits] concurrency's own maximum
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 60.0
RETRY_AFTER_CAP_S = 600.0
# Longer than this, a Retry-After ends the row's tries: settlement stops the run (come back later).
MAX_RETRY_AFTER_S = 300.0


class Stopper:
    """The run's stop flag: set by signals, auth failures or the budget."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None
        self.stopped = False  # read several times per request: a plain attribute, set with the event

    def stop(self, reason: str) -> None:
        if not self.stopped:
            self.reason = reason
            self.stopped = True
            self.event.set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless a stop comes first; True if the full time passed."""
        if self.event.is_set():
            return False
        try:
            await asyncio.wait_for(self.event.wait(), seconds)
        except TimeoutError:
            return True
        return False


@dataclass(slots=True)
class Attempted:
    """The final reply for a row and what it took to get it."""

    reply: Reply
    attempts: int
    latency_s: float
    cost: float  # billed across all attempts, when the server reports it
    costs: list[float] = field(default_factory=list)  # what each attempt was billed (0.0 where none was reported)


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff, never shorter than the server's Retry-After."""
    jitter = random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1)))
    if retry_after is not None:
        return min(RETRY_AFTER_CAP_S, retry_after) + jitter * 0.1
    return jitter


class ChatClient:
    """Sends chat requests for the runner; knows nothing of rows or journals."""

    def __init__(
        self,
        transport: ChatTransport,
        dialect: Dialect,
        limiter: RateLimiter,
        stopper: Stopper,
        max_attempts: int,
        timeout_s: float,
    ) -> None:
        self.transport = transport
        self.dialect = dialect
        self.limiter = limiter
        self.stopper = stopper
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.on_pause: Callable[[float], None] | None = None  # told of each server-requested pause
        # Requests in flight under the provider's in-flight budget: cut on its 402s, regrown on answers.
        self.window = InFlightWindow(MAX_IN_FLIGHT)
        # Requests sharing a start wait for the first of them to finish: it writes the prompt cache.
        self.warmer = PrefixWarmer()

    async def complete(self, body: bytes, tokens: int = 0) -> Attempted | None:
        """Send until success, a permanent error, or attempts run out.

        The first request of each shared start goes alone; the others with that
        start wait for its first attempt to finish, so they read the provider's
        prompt cache instead of all writing it. Returns None when the run is
        stopping before the first attempt went out.
        """
        start = self.dialect.messages_start(body, PREFIX_BYTES)
        if len(start) < PREFIX_BYTES:
            # Messages this short are no cacheable prefix (providers cache from about 1,024 tokens):
            # nothing to warm, no digest, no coroutine.
            return await self._complete(body, tokens, None)
        key = prefix_key(start)
        # A warm prefix (every row after the first of its start) needs no coroutine.
        warming = False if self.warmer.is_warm(key) else await self.warmer.enter(key)
        try:
            return await self._complete(body, tokens, key if warming else None)
        finally:
            if warming:
                self.warmer.leave(key)  # a no-op when the first attempt already let the others go

    async def _complete(self, body: bytes, tokens: int, warming: bytes | None) -> Attempted | None:
        costs: list[float] = []
        attempt = 0
        latency = 0.0
        reply: Reply | None = None
        window = self.window
        limiter = self.limiter
        while attempt < self.max_attempts and not self.stopper.stopped:
            # The slot (auto rate limits) bounds requests in flight, the wait for the rate included.
            # Waiting for it is not raced with a stop: a slot frees within one request's latency.
            slot = limiter.slot()
            # Nothing bounds requests in flight but the workers (no auto limits, no in-flight
            # budget refused yet): take the window's place without a coroutine.
            entered = slot is NO_SLOT and window.gate.try_acquire()
            if not entered:
                await self._enter(slot)
            try:
                # Without caps, or with room under them, nothing waits: no coroutine on every request.
                if not limiter.try_admit(tokens) and not await self._acquire(tokens):
                    break
                attempt += 1
                epoch = window.epoch
                started = time.perf_counter()
                reply = await self.transport.send(body)  # every outcome a reply, the key masked
                latency = time.perf_counter() - started
            finally:
                window.gate.release()
                if not entered:
                    await slot.__aexit__(None, None, None)
            if warming is not None:
                self.warmer.leave(warming)  # the first attempt finished: the prompt cache holds the start
                warming = None
            self.limiter.observe(reply.status, latency, reply.limits, reply.retry_after)
            costs.append(reply.cost or 0.0)
            if reply.credit is not None and reply.kind == ReplyKind.RETRY:
                window.refused(epoch)  # the in-flight budget is full: fewer at once
            elif reply.kind == ReplyKind.OK:
                window.answered()
            if reply.kind != ReplyKind.RETRY or attempt >= self.max_attempts or self._final(reply):
                return Attempted(reply, attempt, latency, sum(costs), costs)
            delay = backoff_delay(attempt, reply.retry_after)
            if reply.status == 429:
                self.limiter.cool_down(delay)
                if self.on_pause is not None:
                    self.on_pause(delay)
            if not await self.stopper.sleep(delay):
                return Attempted(reply, attempt, latency, sum(costs), costs)
        if reply is None:
            return None  # stopped before the first attempt went out
        return Attempted(reply, attempt, 0.0, sum(costs), costs)

    async def _enter(self, slot: AbstractAsyncContextManager[None]) -> None:
        """The slow way in: the limiter's slot, then a place in the in-flight window (either may wait)."""
        await slot.__aenter__()
        try:
            await self.window.gate.acquire()
        except BaseException:
            await slot.__aexit__(None, None, None)
            raise

    @staticmethod
    def _final(reply: Reply) -> bool:
        """A transient reply not to retry here: it was billed (another try is another charge the
        row's reservation does not cover: the row ends transient, and the next run's budget
        counts it), or it asks for a wait longer than a run should sit out (settlement stops)."""
        if reply.cost:
            return True
        return reply.retry_after is not None and reply.retry_after > MAX_RETRY_AFTER_S

    async def _acquire(self, tokens: int) -> bool:
        """Wait for the limiter, unless a stop comes first (False: do not send).

        Waiting for a slot holds no request in flight, so a stop must not wait
        for it: race the two only when the limiter would block at all.
        """
        if self.stopper.stopped:
            return False
        if self.limiter.ready(tokens):
            await self.limiter.acquire(tokens)
            return not self.stopper.stopped
        slot = asyncio.ensure_future(self.limiter.acquire(tokens))
        stop = asyncio.ensure_future(self.stopper.event.wait())
        await asyncio.wait((slot, stop), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not slot.done():
            slot.cancel()
            return False
        return not self.stopper.stopped


def request_headers(api_key: str | None, extra: dict[str, str]) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **extra}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers
