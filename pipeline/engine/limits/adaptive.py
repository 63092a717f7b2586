"""Adaptive rate limits: learn the server's request rate from its answers.

``[limits] requests_per_minute = "auto"`` (the default) starts at
:data:`START_RPM` and:

- before the first 429, raises the rate by a share of itself each second
  while the job uses it (a slow start, as TCP's), so a fast server is found
  in seconds;
- on a 429, measures how many requests the server answered over the last
  seconds (the rate it really allowed), sets the rate a little below that
  (at least a multiplicative cut), and the whole job pauses for the
  ``Retry-After`` as with a fixed rate;
- then probes again additively, slowly near the learned limit, so a limit
  that rises is found and one that drops is met by the next 429;
- when the server states its limit (``X-RateLimit-Limit`` on a 429,
  OpenAI-style ``x-ratelimit-limit-requests``, OpenRouter's ``GET /key``),
  runs just below it and stops probing until a 429 says otherwise.

:class:`RateController` is the pure part (events in, a rate out, time from an
injected clock) so tests drive it on a virtual clock; :class:`AdaptiveLimiter`
wraps it for the run's workers, with a :class:`Gate` that keeps about
rate x latency requests in flight (never more than ``concurrency``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, TypeGuard

from pipeline.config.job import AUTO, LimitsSpec
from pipeline.engine.limits.limiter import LearnedRate, LimitSource, RateLimiter, fixed_rate
from pipeline.providers.provider import Provider
from pipeline.providers.ratelimits import RateLimitInfo

if TYPE_CHECKING:
    import aiohttp  # the stated limit's session only: the lean chat client runs without aiohttp

START_RPM = 600.0


@dataclass(frozen=True, slots=True)
class AutoSettings:
    """The controller's constants (tests and benchmarks may vary them)."""

    start_rpm: float = START_RPM
    min_rpm: float = 1.0
    max_rpm: float = 1_000_000.0
    # Before the first 429: +10% of the rate per second (x2 in about 7 s).
    slow_start_per_s: float = 0.10
    # After it: +1% of the learned limit per second, faster (a fifth of the gap
    # per second) while well below it, as after a cut.
    probe_per_s: float = 0.01
    catch_up_per_s: float = 0.20
    # On a 429: a bit below the measured rate, and never less than halving.
    below_measured: float = 0.92
    backoff: float = 0.5
    most_after_cut: float = 0.95
    window_s: float = 20.0
    min_answers: int = 5
    # A 429 without Retry-After: assume a bucket refilled in this time.
    default_pause_s: float = 1.0
    # Below a stated limit: windows and clocks never line up exactly.
    stated_margin: float = 0.95
    # A stated limit is believed unless more than this times it went through per minute.
    stated_tolerance: float = 1.25
    # The rate rises only while at least this share of it is used.
    busy_share: float = 0.75
    step_s: float = 0.25
    # In flight: about rate x latency x this, plus a few.
    flight_margin: float = 2.0
    flight_extra: int = 2


# What runs use; tests swap it for quicker ramps (the defaults are measured in benchmarks/).
DEFAULT_SETTINGS = AutoSettings()


class RateController:
    """Events in (sent, answered, 429, stated limits, pauses), a request rate out."""

    def __init__(self, settings: AutoSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or AutoSettings()
        self._clock = clock
        self.rpm = self.settings.start_rpm
        self.source = LimitSource.NOT_REACHED
        self.settled_rpm: float | None = None  # the rate set by the last 429 or stated limit
        # What probing climbs back to: set by a measured or stated limit. A blind
        # cut (too few answers to measure) leaves it unset, so the rate climbs
        # back in slow start, as TCP does after a timeout.
        self._target: float | None = None
        self.token_limit: int | None = None
        self._stated: int | None = None  # the stated limit being followed
        self._distrusted: int | None = None  # a stated limit the server did not keep to
        self.latency_s: float | None = None
        self._answers: deque[float] = deque()
        self._last_cut = -math.inf
        self._resume_at = -math.inf
        self._first_sent: float | None = None
        self._step_at: float | None = None
        self._sent_in_step = 0

    # -- events ------------------------------------------------------------------------

    def on_sent(self) -> None:
        """A request was admitted; the rate may grow if it is being used."""
        now = self._clock()
        if self._first_sent is None:
            self._first_sent = now
        self._sent_in_step += 1
        if self._step_at is None:
            self._step_at = now
            return
        elapsed = now - self._step_at
        if elapsed >= self.settings.step_s:
            self._grow(now, elapsed)

    def on_answer(self, latency_s: float) -> None:
        """The server answered (anything but a 429): count it toward the measured rate."""
        now = self._clock()
        self._answers.append(now)
        self._trim(now)
        self.latency_s = latency_s if self.latency_s is None else 0.9 * self.latency_s + 0.1 * latency_s

    def on_limited(self, sent_at: float, info: RateLimitInfo | None, retry_after_s: float | None) -> None:
        """A 429 for a request sent at ``sent_at`` (the controller's clock)."""
        now = self._clock()
        if info is not None:
            self._note_tokens(info)
            if info.tokens_exhausted:
                return  # the token limit ran out, not the request limit
        stale = sent_at < self._last_cut  # sent at the rate already cut: one cut per episode
        pause = self.settings.default_pause_s if retry_after_s is None else retry_after_s
        measured = self._measured_rpm(now, pause)
        stated = info.limit_requests if info is not None else None
        if stated and self._believable(stated, measured):
            if stated != self._stated:
                self._adopt(stated, now)
                return
            if stale:
                return
            # Refused while under the limit it stated: the statement is not the whole story.
            self._distrusted = stated
        elif stale:
            return
        self._cut(now, measured)

    def on_stated(self, info: RateLimitInfo) -> None:
        """Limits stated on an answer that was not a 429 (OpenAI-style servers send them on every answer)."""
        self._note_tokens(info)
        stated = info.limit_requests
        if stated and stated != self._stated and stated != self._distrusted:
            self._adopt(stated, self._clock())

    def on_pause(self, until: float) -> None:
        """The job pauses until ``until``: answers before it do not describe the new rate."""
        self._resume_at = max(self._resume_at, until)

    # -- outputs -----------------------------------------------------------------------

    def in_flight_limit(self, concurrency: int) -> int:
        """Requests in flight needed to sustain the rate at the observed latency."""
        if self.latency_s is None:
            return concurrency
        s = self.settings
        wanted = math.ceil(self.rpm / 60 * self.latency_s * s.flight_margin) + s.flight_extra
        return max(1, min(concurrency, wanted))

    def learned(self) -> LearnedRate:
        if self.source is LimitSource.NOT_REACHED or self.settled_rpm is None:
            return LearnedRate(self.rpm, LimitSource.NOT_REACHED, self.token_limit, self.rpm)
        return LearnedRate(self.settled_rpm, self.source, self.token_limit, self.rpm)

    # -- internals ---------------------------------------------------------------------

    def _note_tokens(self, info: RateLimitInfo) -> None:
        if info.limit_tokens:
            self.token_limit = info.limit_tokens

    def _believable(self, stated: int, measured: float | None) -> bool:
        """A stated limit (read as per minute) the answers counted do not contradict.

        OpenRouter does not say over what interval ``X-RateLimit-Limit``
        counts: if far more than it went through per minute, it is not per minute.
        """
        too_many = measured is not None and measured > stated * self.settings.stated_tolerance
        return stated != self._distrusted and not too_many

    def _adopt(self, stated: int, now: float) -> None:
        """Run just below a stated limit, without probing above it."""
        rate = max(self.settings.min_rpm, stated * self.settings.stated_margin)
        self.rpm = self.settled_rpm = self._target = rate
        self.source = LimitSource.STATED
        self._stated = stated
        self._last_cut = now

    def _cut(self, now: float, measured: float | None) -> None:
        """A bit below what the server was measured to allow, but no more than halving at once."""
        s = self.settings
        estimate = None if measured is None else s.below_measured * measured
        new = max(self.rpm * s.backoff, estimate or 0.0)
        self.rpm = max(s.min_rpm, min(new, self.rpm * s.most_after_cut))
        self.settled_rpm = self.rpm if estimate is None else min(self.rpm, estimate)
        # Nothing measured: climb back in slow start, as TCP does after a timeout.
        self._target = estimate
        self.source = LimitSource.MEASURED
        self._stated = None
        self._last_cut = now

    def _grow(self, now: float, elapsed: float) -> None:
        used = self._sent_in_step / (self.rpm / 60 * elapsed)
        self._step_at = now
        self._sent_in_step = 0
        if used < self.settings.busy_share or self.source is LimitSource.STATED or now < self._resume_at:
            return
        self.rpm = min(self.settings.max_rpm, self.rpm + self._growth_per_s() * elapsed)

    def _growth_per_s(self) -> float:
        s = self.settings
        if self._target is None:
            return self.rpm * s.slow_start_per_s
        return max(s.probe_per_s * self._target, s.catch_up_per_s * (self._target - self.rpm))

    def _measured_rpm(self, now: float, pause_s: float) -> float | None:
        """The rate the server allowed: answers since the window's start, per (time + the pause it asks).

        Counting from the last cut, pause or first request, a server's bucket
        started full; a bucket refilled in ``pause_s`` held ``rate x pause_s``,
        so answers / (span + pause) is its rate, and a fixed window's limit per
        window (its Retry-After runs to the window's end) comes out the same.
        None when too few answers were counted to tell.
        """
        first = now if self._first_sent is None else self._first_sent
        start = min(now, max(now - self.settings.window_s, self._last_cut, self._resume_at, first))
        count = sum(1 for t in self._answers if t >= start)
        if count < self.settings.min_answers:
            return None
        return count / (now - start + pause_s) * 60

    def _trim(self, now: float) -> None:
        horizon = now - self.settings.window_s
        answers = self._answers
        while answers and answers[0] < horizon:
            answers.popleft()


class Gate:
    """A semaphore whose size can change: the requests allowed in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as we were cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def try_acquire(self) -> bool:
        """Take a place now if one is free and nobody waits (no coroutine); False: await :meth:`acquire`."""
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class AdaptiveLimiter(RateLimiter):
    """The run's limiter in auto mode: paces at the controller's rate, gates requests in flight.

    ``requests_auto`` False keeps a fixed request cap (or none) and learns only
    a token limit; ``tokens_auto`` False keeps the job's token cap.
    """

    def __init__(
        self,
        *,
        requests_per_minute: float,
        requests_auto: bool,
        tokens_per_minute: int,
        tokens_auto: bool,
        max_tokens: int,
        concurrency: int,
        settings: AutoSettings | None = None,
    ) -> None:
        super().__init__(0 if requests_auto else requests_per_minute, tokens_per_minute, max_tokens)
        loop = asyncio.get_running_loop()
        self.controller = RateController(settings, loop.time)
        self.requests_auto = requests_auto
        self._tokens_auto = tokens_auto
        self._token_limit: int | None = None
        self._concurrency = concurrency
        self._gate = Gate(concurrency) if requests_auto else None
        self._pace_lock = asyncio.Lock()
        self._next_at = 0.0

    @property
    def unlimited(self) -> bool:
        return False  # the pacer and the gate are the limit, whatever the fixed caps

    def try_admit(self, prompt_tokens: int = 0) -> bool:
        # Pacing at the learned rate always goes through acquire (it counts what is sent).
        return False if self.requests_auto else super().try_admit(prompt_tokens)

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self._gate if self._gate is not None else super().slot()

    def observe(
        self, status: int | None, latency_s: float, info: RateLimitInfo | None, retry_after_s: float | None
    ) -> None:
        """Feed one exchange to the controller (client.py calls this after every attempt)."""
        controller = self.controller
        if status == 429:
            sent_at = asyncio.get_running_loop().time() - latency_s
            controller.on_limited(sent_at, info, retry_after_s)
        elif status is not None:
            controller.on_answer(latency_s)
            if info is not None:
                controller.on_stated(info)
        if self._tokens_auto and controller.token_limit != self._token_limit and controller.token_limit:
            self._token_limit = controller.token_limit
            self._set_token_cap(math.floor(controller.token_limit * controller.settings.stated_margin))
        if self._gate is not None:
            self._gate.resize(controller.in_flight_limit(self._concurrency))

    def ready(self, prompt_tokens: int = 0) -> bool:
        """True when ``acquire`` would not wait: no cool-down, token room, and the pacer's slot is due."""
        if not super().ready(prompt_tokens):
            return False
        if not self.requests_auto:
            return True
        now = asyncio.get_running_loop().time()
        return not self._pace_lock.locked() and self._next_at - 60 / self.controller.rpm <= now

    def cool_down(self, seconds: float) -> None:
        super().cool_down(seconds)
        self.controller.on_pause(self._paused_until)

    def learned(self) -> LearnedRate:
        learned = self.controller.learned()
        if self.requests_auto:
            return learned
        return LearnedRate(None, None, self._token_limit, None)

    async def _acquire_request(self) -> None:
        if not self.requests_auto:
            await super()._acquire_request()
            return
        await self._pace()
        self.controller.on_sent()

    async def _pace(self) -> None:
        """Space admissions 60 / rpm apart at the rate of the moment.

        One waiter at a time sleeps to the next slot (FIFO, one wake-up per
        request), and it sits out a cool-down here, holding the others back:
        requests admitted during a pause would all leave together at its end,
        a burst into a server that just refused us. One slot of slack, like
        the fixed cap's bucket of two, absorbs the event loop's timer lateness.
        """
        async with self._pace_lock:
            loop = asyncio.get_running_loop()
            while True:
                now = loop.time()
                delay = max(self._paused_until, self._next_at - 60 / self.controller.rpm) - now
                if delay <= 0:
                    break
                await asyncio.sleep(delay)
            self._next_at = max(self._next_at, self._paused_until, now) + 60 / self.controller.rpm


def make_limiter(limits: LimitsSpec, max_tokens: int, provider: Provider) -> RateLimiter:
    """The run's limiter: fixed caps as set, or :class:`AdaptiveLimiter` where a limit is "auto".

    A provider without rate limits (``provider = "local"``) has nothing to learn: "auto" means no cap there.
    """
    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    requests_auto = rpm == AUTO and provider.rate_limited
    tokens_auto = tpm == AUTO and provider.rate_limited
    if not (requests_auto or tokens_auto):
        return RateLimiter(fixed_rate(rpm), fixed_rate(tpm), max_tokens)
    return AdaptiveLimiter(
        requests_per_minute=fixed_rate(rpm),
        requests_auto=requests_auto,
        tokens_per_minute=fixed_rate(tpm),
        tokens_auto=tokens_auto,
        max_tokens=max_tokens,
        concurrency=limits.concurrency,
        settings=DEFAULT_SETTINGS,
    )


def wants_stated_limit(limiter: RateLimiter) -> TypeGuard[AdaptiveLimiter]:
    """True when :func:`read_stated_limit` would ask the provider (auto request limits only)."""
    return isinstance(limiter, AdaptiveLimiter) and limiter.requests_auto


async def read_stated_limit(
    limiter: RateLimiter, session: aiohttp.ClientSession, base_url: str, provider: Provider
) -> None:
    """Best effort, once per run: a limit the provider states outside replies (OpenRouter's GET /key)."""
    if not wants_stated_limit(limiter):
        return
    try:
        info = await provider.stated_rate_limit(session, base_url)
    except Exception:  # a hint, never a reason to fail the run (this task shares the run's TaskGroup)
        return
    if info is not None:
        limiter.controller.on_stated(info)
