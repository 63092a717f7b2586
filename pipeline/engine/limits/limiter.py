"""The rate cap: requests per minute, tokens per minute and a shared cool-down.

A bucket as large as the per-minute rate would allow a full minute's requests
in the first instant; strict providers answer such a start-up burst with 429s.
So the request bucket (:class:`RequestBucket`) holds two requests (a hundredth
of a second's worth at rates of 200/s and more) and leaks at the per-second
rate: arrivals are spread evenly. Two places absorb the event loop's timer
jitter, which would otherwise cost a few percent of the rate; the leak rate is
lowered by that one extra request per minute so that no 60-second window ever
holds more than ``requests_per_minute`` requests.

A cap that does not bind costs (almost) nothing: :meth:`RateLimiter.try_admit`
admits a request with a clock read and two comparisons, without a coroutine;
only a request that must wait takes :meth:`RateLimiter.acquire`. The token
cap is aiolimiter's leaky bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from aiolimiter import AsyncLimiter

if TYPE_CHECKING:
    from pipeline.providers.ratelimits import RateLimitInfo


class LimitSource(StrEnum):
    """Where the learned rate comes from."""

    NOT_REACHED = "not_reached"  # no 429 and no stated limit: the rate only rose
    MEASURED = "measured"  # from the answers counted before a 429
    STATED = "stated"  # the server said its limit


@dataclass(frozen=True, slots=True)
class LearnedRate:
    """What auto mode learned, for the progress bar and the summary (None: not auto, or not known)."""

    requests_per_minute: float | None  # the rate to pin; with NOT_REACHED, the highest rate run
    source: LimitSource | None
    tokens_per_minute: int | None  # a token limit the server stated
    current_requests_per_minute: float | None  # the rate of the moment (the progress bar)


# Shared by every request when nothing gates requests in flight (the client skips it: no coroutine).
NO_SLOT: AbstractAsyncContextManager[None] = contextlib.nullcontext()


def bucket_capacity(per_second: float) -> int:
    """Requests the bucket may hold: 1 below 2/s (strict spacing), 2 up to 200/s, then a hundredth of a second's.

    With capacity ``b`` and leak rate ``r`` per second, any window of ``w``
    seconds admits at most ``b - 1 + ceil(r * w)`` requests: one second stays
    within ``1.01 * r + 1``, and a burst of replies released together (a group
    commit frees their workers at once) is admitted without waiting when the
    cap is far above the rate achieved.
    """
    if per_second < 2:
        return 1
    return max(2, int(per_second // 100))


class RequestBucket:
    """A leaky bucket of requests (GCRA: the time the bucket is empty again), first come first served.

    :meth:`try_take` admits at once when there is room and nobody waits;
    :meth:`take` queues, sleeping to the moment the bucket has room.
    """

    def __init__(self, requests_per_minute: float) -> None:
        self.capacity = bucket_capacity(requests_per_minute / 60)
        leak_per_minute = requests_per_minute - (self.capacity - 1)
        # Seconds one request keeps in the bucket; a nanosecond more, so that float rounding
        # never lets the last request of a minute land a hair inside the 60-second window.
        self.interval = 60 / leak_per_minute + 1e-9
        self._tolerance = (self.capacity - 1) * self.interval
        self._empty_at = 0.0  # loop time at which every admitted request has leaked out
        self._waiting = 0
        self._lock = asyncio.Lock()

    def has_room(self, now: float) -> bool:
        return not self._waiting and self._empty_at - self._tolerance <= now

    def try_take(self, now: float) -> bool:
        """Admit one request now if the bucket has room and nobody waits (no coroutine)."""
        if self._waiting or self._empty_at - self._tolerance > now:
            return False
        self._empty_at = (self._empty_at if self._empty_at > now else now) + self.interval
        return True

    async def take(self) -> None:
        """Wait for room (behind earlier waiters), then admit one request."""
        loop = asyncio.get_running_loop()
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    now = loop.time()
                    delay = self._empty_at - self._tolerance - now
                    if delay <= 0:
                        break
                    await asyncio.sleep(delay)
                self._empty_at = max(self._empty_at, now) + self.interval
        finally:
            self._waiting -= 1


def request_bucket(requests_per_minute: float) -> RequestBucket:
    """A bucket that admits at most rpm requests in any minute, evenly spread."""
    return RequestBucket(requests_per_minute)


class RateLimiter:
    """Admits requests under the job's caps; a 429 pauses every worker.

    This is the fixed-cap limiter; :class:`pipeline.engine.limits.adaptive.AdaptiveLimiter`
    extends it for ``"auto"`` limits. :meth:`slot`, :meth:`observe` and
    :meth:`learned` are the hooks auto mode uses; here they do nothing.
    """

    def __init__(self, requests_per_minute: float, tokens_per_minute: int = 0, max_tokens: int = 0) -> None:
        self._requests = request_bucket(requests_per_minute) if requests_per_minute else None
        self._tokens: AsyncLimiter | None = None
        self._token_capacity = 0
        self._max_tokens = max_tokens
        if tokens_per_minute:
            self._set_token_cap(tokens_per_minute)
        self._paused_until = 0.0

    def _set_token_cap(self, tokens_per_minute: int) -> None:
        # Bucket: a tenth of a minute's tokens, but always room for a large request.
        capacity = min(tokens_per_minute, max(tokens_per_minute // 10, 2 * self._max_tokens + 2048))
        self._token_capacity = capacity
        self._tokens = AsyncLimiter(capacity, capacity * 60 / tokens_per_minute)

    async def acquire(self, prompt_tokens: int = 0) -> None:
        """Wait for a cool-down to pass, then for room under both caps.

        The token cap is charged the prompt plus ``max_tokens``: the most the
        request can use, which is what providers count against the limit.
        """
        if self._paused_until:
            await self._wait_cool_down()
        if self._tokens is not None:
            # A request larger than the bucket waits for an empty bucket.
            await self._tokens.acquire(min(prompt_tokens + self._max_tokens, self._token_capacity))
        while True:
            await self._acquire_request()
            if not self._paused_now():
                return
            # A 429 paused the job while we waited for this slot: wait the pause out
            # and queue for a fresh slot, so waiters leave spaced by the bucket
            # rather than all together when the pause ends.
            await self._wait_cool_down()

    def _paused_now(self) -> bool:
        return bool(self._paused_until) and self._paused_until > asyncio.get_running_loop().time()

    @property
    def unlimited(self) -> bool:
        """No cap at all and no pause now: ``acquire`` would return at once (the hot path skips it)."""
        return self._requests is None and self._tokens is None and not self._paused_now()

    def try_admit(self, prompt_tokens: int = 0) -> bool:
        """Admit a request now when nothing makes it wait: the hot path, no coroutine.

        False: the caller awaits :meth:`acquire` (a cool-down, a full bucket,
        earlier waiters, or a token cap, which always takes the full path).
        """
        if self._tokens is not None:
            return False
        if self._requests is None:
            return not self._paused_until or not self._paused_now()
        now = asyncio.get_running_loop().time()
        if self._paused_until > now:
            return False
        return self._requests.try_take(now)

    def ready(self, prompt_tokens: int = 0) -> bool:
        """True when ``acquire`` would not wait (no cool-down, room under both caps)."""
        if self._paused_until and self._paused_until > asyncio.get_running_loop().time():
            return False
        if self._tokens is not None and not self._tokens.has_capacity(
            min(prompt_tokens + self._max_tokens, self._token_capacity)
        ):
            return False
        return self._requests is None or self._requests.has_room(asyncio.get_running_loop().time())

    async def _acquire_request(self) -> None:
        if self._requests is not None:
            await self._requests.take()

    def slot(self) -> AbstractAsyncContextManager[None]:
        """Held around each request: nothing limits requests in flight here but the workers."""
        return NO_SLOT

    def observe(
        self, status: int | None, latency_s: float, info: RateLimitInfo | None, retry_after_s: float | None
    ) -> None:
        """Told about every attempt's answer; a fixed cap learns nothing from it."""

    def learned(self) -> LearnedRate | None:
        """What auto mode learned; None for fixed caps."""
        return None

    def cool_down(self, seconds: float) -> None:
        """Pause all new requests for ``seconds`` (after a 429: the whole job slows)."""
        loop = asyncio.get_running_loop()
        self._paused_until = max(self._paused_until, loop.time() + seconds)

    async def _wait_cool_down(self) -> None:
        # Sleeps to the deadline known now; acquire() checks again after its wait.
        delay = self._paused_until - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)


def fixed_rate(setting: int | str) -> int:
    """A ``[limits]`` rate as a fixed cap: ``"auto"`` has none fixed in advance (0)."""
    return setting if isinstance(setting, int) else 0


def estimated_duration_s(
    rows: int, requests_per_minute: int | str, tokens: int = 0, tokens_per_minute: int | str = 0
) -> float:
    """The least time the fixed caps allow for ``rows`` requests carrying ``tokens`` ("auto": no fixed cap)."""
    rpm, tpm = fixed_rate(requests_per_minute), fixed_rate(tokens_per_minute)
    by_requests = rows / rpm * 60 if rpm else 0.0
    by_tokens = tokens / tpm * 60 if tpm else 0.0
    return math.ceil(max(by_requests, by_tokens) * 10) / 10
