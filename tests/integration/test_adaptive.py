"""Adaptive rate limits (``requests_per_minute = "auto"``).

Three layers:

- the controller alone, driven event by event on a hand-moved clock (table-driven);
- the real limiter and client against a simulated token-bucket server on a
  virtual clock (tests.integration.test_ratecap.VirtualTimeLoop): minutes of traffic in
  well under a second, so the learning itself is checked against the targets;
- the CLI against the loopback fake server with a strict cap the job is not
  told, with and without X-RateLimit-* headers, and a cap that drops mid-run.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from multidict import CIMultiDict
from pydantic import ValidationError

from pipeline.cli.app import main
from pipeline.cli.report import pinnable
from pipeline.config.job import LimitsSpec, describe_validation_error
from pipeline.engine.client import ChatClient, Stopper
from pipeline.engine.limits import adaptive
from pipeline.engine.limits.adaptive import (
    AdaptiveLimiter,
    AutoSettings,
    Gate,
    LimitSource,
    RateController,
    make_limiter,
)
from pipeline.engine.limits.limiter import RateLimiter
from pipeline.engine.tokens import counter_for
from pipeline.engine.transport import AiohttpTransport
from pipeline.providers import get_provider
from pipeline.providers.base import parse_response
from pipeline.providers.ratelimits import RateLimitInfo, key_rate_limit, parse_reset, rate_limit_info
from tests.conftest import reviews, run_cli, write_job, write_parquet
from tests.fakes.server import FakeServer, max_per_window
from tests.integration.test_ratecap import VirtualTimeLoop

# --------------------------------------------------------------------------- parsing

NOW = 1_800_000_000.0  # a fixed "time.time()" for reset parsing


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (str(int((NOW + 2.5) * 1000)), 2.5),  # OpenRouter: epoch milliseconds
        (str(int(NOW + 7)), 7.0),  # epoch seconds
        ("3", 3.0),  # seconds from now
        ("0.25", 0.25),
        ("6m0s", 360.0),  # OpenAI: a duration
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        (str(int((NOW - 5) * 1000)), 0.0),  # already past
        ("soon", None),
        ("6 m", None),
        ("-1", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_reset(value: str | None, expected: float | None) -> None:
    got = parse_reset(value, NOW)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-3))


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, None),
        # OpenRouter puts these on 429s only; on a 200 they are not read (their interval is unknown).
        (200, {"X-RateLimit-Limit": "100"}, None),
        (
            429,
            {
                "X-RateLimit-Limit": "2400",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(NOW * 1000) + 400),
            },
            RateLimitInfo(limit_requests=2400, remaining_requests=0, reset_s=0.4),
        ),
        # OpenAI-style headers count on every answer.
        (
            200,
            {
                "x-ratelimit-limit-requests": "500",
                "x-ratelimit-remaining-requests": "499",
                "x-ratelimit-reset-requests": "120ms",
                "x-ratelimit-limit-tokens": "30000",
                "x-ratelimit-remaining-tokens": "29000",
            },
            RateLimitInfo(500, 499, 0.12, 30000, 29000),
        ),
        (
            429,
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "12"},
            RateLimitInfo(None, 12, None, None, 0),
        ),
        # Garbage is no information, never an error.
        (429, {"X-RateLimit-Limit": "lots", "X-RateLimit-Remaining": "-3"}, RateLimitInfo()),
        (429, {"X-RateLimit-Limit": "0"}, RateLimitInfo()),
    ],
    ids=["none", "bare-on-200", "openrouter-429", "openai-200", "tokens-out", "garbage", "zero-limit"],
)
def test_rate_limit_info(status: int, headers: dict[str, str], expected: RateLimitInfo | None) -> None:
    got = rate_limit_info(CIMultiDict(headers), status, now=NOW)
    if expected is None or got is None:
        assert got == expected
        return
    assert replace(got, reset_s=None) == replace(expected, reset_s=None)
    assert got.reset_s == (None if expected.reset_s is None else pytest.approx(expected.reset_s, abs=2e-3))


def test_tokens_exhausted_and_retry_hint() -> None:
    assert RateLimitInfo(remaining_tokens=0, remaining_requests=5).tokens_exhausted
    assert RateLimitInfo(remaining_tokens=0).tokens_exhausted
    assert not RateLimitInfo(remaining_tokens=0, remaining_requests=0).tokens_exhausted
    assert RateLimitInfo(remaining_requests=0, reset_s=2.0).retry_after_s == 2.0
    assert RateLimitInfo(remaining_requests=3, reset_s=2.0).retry_after_s is None


def test_parse_response_carries_limits_and_uses_reset_without_retry_after() -> None:
    """A 429 stating X-RateLimit-* but no Retry-After waits until -Reset."""
    reset_ms = int((time.time() + 3.0) * 1000)
    headers = CIMultiDict(
        {"X-RateLimit-Limit": "600", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset_ms)}
    )
    reply = parse_response(429, b'{"error": {"code": 429, "message": "Rate limit exceeded"}}', headers)
    assert reply.limits is not None and reply.limits.limit_requests == 600
    assert reply.retry_after == pytest.approx(3.0, abs=0.1)
    # Retry-After, when present, wins.
    headers["Retry-After"] = "1"
    assert parse_response(429, b"{}", headers).retry_after == 1.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"data": {"rate_limit": {"requests": -1, "interval": "10s"}}}, None),  # deprecated: always -1 now
        ({"data": {"rate_limit": {"requests": 50, "interval": "10s"}}}, 300),
        ({"data": {"rate_limit": {"requests": 1000, "interval": "1h"}}}, 17),
        ({"data": {"rate_limit": {"requests": 5, "interval": "weekly"}}}, None),
        ({"data": {"rate_limit": None}}, None),
        ({"data": {}}, None),
        ([], None),
    ],
)
def test_key_rate_limit(body: Any, expected: int | None) -> None:
    info = key_rate_limit(body)
    assert (info.limit_requests if info else None) == expected


# ------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("limits", "local", "kind", "auto"),
    [
        ({}, False, AdaptiveLimiter, True),  # the default
        ({"requests_per_minute": "auto"}, False, AdaptiveLimiter, True),
        ({"requests_per_minute": 600}, False, RateLimiter, False),  # a number: today's exact cap
        ({"requests_per_minute": 0}, False, RateLimiter, False),  # 0: no cap
        ({"requests_per_minute": 600, "tokens_per_minute": "auto"}, False, AdaptiveLimiter, False),
        ({}, True, RateLimiter, False),  # a local server has no limit to learn
    ],
)
def test_make_limiter(limits: dict[str, Any], local: bool, kind: type, auto: bool) -> None:
    async def build() -> RateLimiter:
        return make_limiter(
            LimitsSpec(**limits), max_tokens=64, provider=get_provider("local" if local else "openrouter")
        )

    limiter = asyncio.run(build())
    assert type(limiter) is kind
    assert getattr(limiter, "requests_auto", False) is auto


def test_auto_is_the_default_and_numbers_stay_numbers() -> None:
    assert LimitsSpec().requests_per_minute == "auto"
    assert LimitsSpec().tokens_per_minute == 0
    assert LimitsSpec(requests_per_minute=2350).requests_per_minute == 2350


@pytest.mark.parametrize("value", ["600", 600.0, 20.5, -1, True, "fast", "AUTO", None])
@pytest.mark.parametrize("key", ["requests_per_minute", "tokens_per_minute"])
def test_rate_settings_are_a_whole_number_or_auto(key: str, value: Any) -> None:
    """Strict like every number in a job file; one line naming the key and both accepted forms."""
    with pytest.raises(ValidationError) as caught:
        LimitsSpec(**{key: value})
    message = describe_validation_error(caught.value)
    assert message.startswith(f'{key}: must be a whole number per minute (0: no cap) or "auto"')
    assert "more problems" not in message


@pytest.mark.parametrize(("rpm", "pin"), [(2356.4, 2350), (583.9, 583), (12_345.0, 12_300), (57.2, 57), (0.4, 1)])
def test_pinnable(rpm: float, pin: int) -> None:
    assert pinnable(rpm) == pin


# -------------------------------------------------------------- the controller alone


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(c: RateController, clock: Clock, seconds: float, per_s: float, answered: bool = True) -> None:
    """``per_s`` requests a second for ``seconds``, each answered at once."""
    n = round(seconds * per_s)
    for _ in range(n):
        clock.now += 1 / per_s
        c.on_sent()
        if answered:
            c.on_answer(0.05)


def controller(**settings: Any) -> tuple[RateController, Clock]:
    clock = Clock()
    return RateController(AutoSettings(**settings), clock), clock


def test_slow_start_grows_only_while_the_rate_is_used() -> None:
    c, clock = controller()
    for _ in range(5):  # keeping up with the rate: it grows ~10%/s
        feed(c, clock, 1.0, per_s=c.rpm / 60)
    assert 1.4 * 600 < c.rpm < 1.8 * 600
    before = c.rpm
    feed(c, clock, 5.0, per_s=2.0)  # demand far below the rate: no growth
    assert c.rpm == before
    assert c.learned().source == LimitSource.NOT_REACHED


@dataclass
class CutCase:
    name: str
    answers: int  # answered in the 2 s before the 429
    retry_after: float | None
    expected: float  # rpm after the cut
    target_kept: bool  # measured (probe near it) or blind (slow start again)


CUTS = [
    # 24 answers over 2 s + a 1 s pause -> 480/min measured -> 92% of it.
    CutCase("measured", 24, 1.0, 0.92 * 480, True),
    # No Retry-After: a one-second bucket is assumed (the same figure).
    CutCase("no-retry-after", 24, None, 0.92 * 480, True),
    # A fixed window: 20 answers, then "come back in 58 s": 20/min, but no more than halving at once.
    CutCase("window", 20, 58.0, 600 * 0.5, True),
    # Nothing answered: halve, and climb back in slow start.
    CutCase("blind", 0, 1.0, 600 * 0.5, False),
    CutCase("too-few", 4, 1.0, 600 * 0.5, False),
    # Measured above the rate: still a cut (to 95% of it).
    CutCase("never-up", 80, 0.0, 600 * 0.95, True),
]


@pytest.mark.parametrize("case", CUTS, ids=[c.name for c in CUTS])
def test_cut_on_429(case: CutCase) -> None:
    c, clock = controller()
    c.on_sent()
    for _ in range(case.answers):
        clock.now += 2.0 / case.answers
        c.on_answer(0.05)
    clock.now = 2.0
    c.on_limited(sent_at=1.99, info=None, retry_after_s=case.retry_after)
    assert c.rpm == pytest.approx(case.expected, rel=1e-3)
    assert c.learned().source == LimitSource.MEASURED
    assert (c._target is not None) is case.target_kept


def test_one_cut_per_episode_then_probing() -> None:
    """429s for requests sent before the cut change nothing; one sent after it cuts again."""
    c, clock = controller()
    feed(c, clock, 2.0, per_s=10)
    c.on_limited(sent_at=clock.now - 0.01, info=None, retry_after_s=1.0)
    after_cut = c.rpm
    c.on_limited(sent_at=clock.now - 0.02, info=None, retry_after_s=1.0)  # same storm
    assert c.rpm == after_cut
    feed(c, clock, 10.0, per_s=c.rpm / 60)  # probing: +1%/s of the learned rate
    assert after_cut < c.rpm < after_cut * 1.2
    c.on_limited(sent_at=clock.now, info=None, retry_after_s=1.0)
    assert c.rpm < after_cut * 1.2 * 0.95


def test_stated_limit_is_followed_and_probing_stops() -> None:
    c, clock = controller()
    feed(c, clock, 2.0, per_s=12)
    c.on_limited(clock.now, RateLimitInfo(limit_requests=720, remaining_requests=0), 1.0)
    assert c.rpm == pytest.approx(0.95 * 720)
    assert c.learned().source == LimitSource.STATED
    feed(c, clock, 30.0, per_s=c.rpm / 60)
    assert c.rpm == pytest.approx(0.95 * 720)  # no probing above what the server said
    # More 429s of the same episode (sent before) change nothing ...
    c.on_limited(clock.now - 40, RateLimitInfo(limit_requests=720), 1.0)
    assert c.rpm == pytest.approx(0.95 * 720)
    # ... but one at the stated rate means the statement is not the whole story.
    c.on_limited(clock.now, RateLimitInfo(limit_requests=720), 1.0)
    assert c.rpm < 0.95 * 720
    assert c.learned().source == LimitSource.MEASURED
    c.on_stated(RateLimitInfo(limit_requests=720))  # and it is not believed again
    assert c.learned().source == LimitSource.MEASURED


def test_stated_limit_contradicted_by_the_answers_is_ignored() -> None:
    """OpenRouter's X-RateLimit-Limit has no interval: 200 went through per 10 s, so 200 is not per minute."""
    c, clock = controller()
    feed(c, clock, 10.0, per_s=20)  # 1,200 per minute answered
    c.on_limited(clock.now, RateLimitInfo(limit_requests=200, remaining_requests=0), 1.0)
    assert c.learned().source == LimitSource.MEASURED
    assert c.rpm > 600


def test_token_limit_429_does_not_cut_the_request_rate() -> None:
    c, clock = controller()
    feed(c, clock, 2.0, per_s=10)
    before = c.rpm
    c.on_limited(clock.now, RateLimitInfo(limit_tokens=90_000, remaining_tokens=0, remaining_requests=40), 1.0)
    assert c.rpm == before
    assert c.token_limit == 90_000


def test_openai_style_limits_on_success_are_adopted() -> None:
    c, _ = controller()
    c.on_stated(RateLimitInfo(limit_requests=3500, remaining_requests=3499, limit_tokens=200_000))
    assert c.rpm == pytest.approx(0.95 * 3500)
    assert c.learned() == adaptive.LearnedRate(0.95 * 3500, LimitSource.STATED, 200_000, 0.95 * 3500)


@pytest.mark.parametrize(
    ("rpm", "latency_s", "concurrency", "expected"),
    [
        (600, None, 32, 32),  # no latency seen yet: the workers' number
        (600, 0.5, 32, 12),  # 10/s x 0.5 s x 2 + 2
        (6000, 0.5, 32, 32),  # never above concurrency
        (60, 0.01, 32, 3),
        (6000, 0.0, 32, 2),
    ],
)
def test_in_flight_follows_rate_and_latency(
    rpm: float, latency_s: float | None, concurrency: int, expected: int
) -> None:
    c, _ = controller(start_rpm=rpm)
    if latency_s is not None:
        c.on_answer(latency_s)
    assert c.in_flight_limit(concurrency) == expected


# --------------------------------------------------------------------------- the gate


def test_gate_resizes_and_survives_cancellation() -> None:
    async def scenario() -> None:
        gate = Gate(2)
        await gate.acquire()
        await gate.acquire()
        waiter = asyncio.ensure_future(gate.acquire())
        cancelled = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        cancelled.cancel()
        await asyncio.sleep(0)
        gate.resize(3)  # room for one more: the live waiter gets it
        await asyncio.sleep(0)
        assert waiter.done() and gate.in_use == 3
        gate.resize(1)  # shrinking never takes slots back; releases drain to the new size
        gate.release()
        gate.release()
        assert gate.in_use == 1
        late = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0)
        assert not late.done()
        gate.release()
        await asyncio.sleep(0)
        assert late.done() and gate.in_use == 1

    asyncio.run(scenario())


# ------------------------------------------- the limiter and client on a virtual clock


class BucketServer:
    """A strict token bucket (one second of burst) answering like OpenRouter, on the loop's clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cap_rpm: float, stated: bool, latency_s: float) -> None:
        self.headers: dict[str, str] = {}  # the client reads the session's headers (no key here)
        self.loop = loop
        self.cap_rpm = cap_rpm
        self.stated = stated
        self.latency_s = latency_s
        self.tokens = cap_rpm / 60
        self.t = loop.time()
        self.ok: list[float] = []
        self.limited = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rng = random.Random(3)

    def set_cap(self, cap_rpm: float) -> None:
        self._refill()
        self.cap_rpm = cap_rpm
        self.tokens = min(self.tokens, cap_rpm / 60)

    def _refill(self) -> None:
        now = self.loop.time()
        rate = self.cap_rpm / 60
        self.tokens = min(max(rate, 1.0), self.tokens + (now - self.t) * rate)
        self.t = now

    def post(self, url: str, data: bytes) -> _Exchange:
        return _Exchange(self)


class _Exchange:
    def __init__(self, server: BucketServer) -> None:
        self.server = server
        self.status = 200
        self.headers: CIMultiDict[str] = CIMultiDict()

    async def __aenter__(self) -> _Exchange:
        s = self.server
        s._refill()
        if s.tokens < 1:
            s.limited += 1
            self.status = 429
            self.headers["Retry-After"] = "1"
            if s.stated:
                self.headers["X-RateLimit-Limit"] = str(round(s.cap_rpm))
                self.headers["X-RateLimit-Remaining"] = "0"
            await asyncio.sleep(0.002)
            return self
        s.tokens -= 1
        s.in_flight += 1
        s.max_in_flight = max(s.max_in_flight, s.in_flight)
        await asyncio.sleep(s.latency_s * s.rng.uniform(0.5, 1.5))
        s.in_flight -= 1
        s.ok.append(s.loop.time())
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self) -> bytes:
        if self.status == 429:
            return b'{"error": {"code": 429, "message": "Rate limit exceeded"}}'
        return b'{"id": "gen-1", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}'


@dataclass
class Simulated:
    ok: list[float]
    limited: int
    requests: int
    limiter: AdaptiveLimiter
    server: BucketServer
    rates: list[float] = field(default_factory=list)

    def share(self, cap_rpm: float, first: int = 0) -> float:
        """Requests answered per minute, from answer ``first`` to the last, as a share of the cap."""
        t = sorted(self.ok)[first:]
        return (len(t) - 1) / (t[-1] - t[0]) * 60 / cap_rpm


@dataclass(frozen=True)
class Dialect:
    url: str = "http://sim/v1/chat/completions"

    def messages_start(self, body: bytes, size: int = 1024) -> bytes:
        return body[:size]


def simulate(
    rows: int,
    cap_rpm: float,
    *,
    stated: bool = False,
    latency_s: float = 0.3,
    concurrency: int = 64,
    drop: tuple[float, float] | None = None,
) -> Simulated:
    """A job of ``rows`` requests through the real client and limiter against :class:`BucketServer`."""

    async def job() -> Simulated:
        loop = asyncio.get_running_loop()
        limiter = AdaptiveLimiter(
            requests_per_minute=0,
            requests_auto=True,
            tokens_per_minute=0,
            tokens_auto=False,
            max_tokens=64,
            concurrency=concurrency,
        )
        server = BucketServer(loop, cap_rpm, stated, latency_s)
        transport = AiohttpTransport(server, "http://bucket/v1/chat/completions", 60)  # type: ignore[arg-type]
        client = ChatClient(transport, Dialect(), limiter, Stopper(), max_attempts=50, timeout_s=60)  # type: ignore[arg-type]
        todo = iter(range(rows))
        attempts = 0

        async def worker() -> None:
            nonlocal attempts
            for _ in todo:
                attempted = await client.complete(b"{}")
                assert attempted is not None and attempted.reply.status == 200
                attempts += attempted.attempts

        if drop is not None:
            loop.call_later(drop[0], server.set_cap, drop[1])
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Simulated(server.ok, server.limited, attempts, limiter, server)

    loop = VirtualTimeLoop()
    # The client times requests with perf_counter: on this loop, time is the loop's.
    try:
        with mock.patch("pipeline.engine.client.time", SimpleNamespace(perf_counter=loop.time)):
            return loop.run_until_complete(job())
    finally:
        loop.close()


SIM_CASES = [
    # (cap per minute, rows, the server states X-RateLimit-*) : the two servers, and others.
    (600, 1000, False),
    (2400, 4000, True),
    (2400, 4000, False),
    (1200, 2000, False),
    (300, 500, False),
]


@pytest.mark.parametrize(
    ("cap", "rows", "stated"), SIM_CASES, ids=[f"{c}-{'stated' if s else 'quiet'}" for c, _, s in SIM_CASES]
)
def test_learns_unknown_cap_on_virtual_clock(cap: int, rows: int, stated: bool) -> None:
    """Done-when targets: >= 85% of the cap over the second half, >= 80% overall, <= 5% 429s."""
    sim = simulate(rows, cap, stated=stated)
    assert len(sim.ok) == rows
    assert sim.share(cap, first=rows // 2) >= 0.85
    assert sim.share(cap) >= 0.80
    assert sim.limited / sim.requests <= 0.05
    learned = sim.limiter.learned()
    assert learned.source == (LimitSource.STATED if stated else LimitSource.MEASURED)
    assert learned.requests_per_minute is not None
    assert 0.8 * cap <= learned.requests_per_minute <= cap  # safe to pin


@pytest.mark.parametrize("stated", [False, True], ids=["quiet", "stated"])
def test_follows_a_cap_that_drops_mid_run(stated: bool) -> None:
    """From 6,000/min to 1,500/min after 20 s: the rate comes down to it and stays there."""
    sim = simulate(4000, 6000, stated=stated, latency_s=0.2, drop=(20.0, 1500))
    assert len(sim.ok) == 4000
    late = [t for t in sim.ok if t >= 60.0]
    assert len(late) > 500
    rate = (len(late) - 1) / (late[-1] - late[0]) * 60
    assert 0.85 * 1500 <= rate <= 1.05 * 1500
    assert sim.limited / sim.requests <= 0.02


def test_concurrency_follows_the_rate_on_virtual_clock() -> None:
    """600/min at 0.5 s latency needs ~5 in flight: the gate keeps it near that, not at 64."""
    sim = simulate(300, 600, latency_s=0.5, concurrency=64)
    assert sim.server.max_in_flight <= 14
    assert sim.share(600, first=150) >= 0.85


def test_no_burst_when_a_pause_ends() -> None:
    """Requests admitted during a cool-down would all leave at its end: the pacer holds them."""

    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = AdaptiveLimiter(
            requests_per_minute=0,
            requests_auto=True,
            tokens_per_minute=0,
            tokens_auto=False,
            max_tokens=0,
            concurrency=32,
            settings=AutoSettings(start_rpm=600, slow_start_per_s=0.0),
        )
        times: list[float] = []

        async def worker() -> None:
            while loop.time() < 6.0:
                await limiter.acquire()
                times.append(loop.time())

        async def pause() -> None:
            await asyncio.sleep(2.0)
            limiter.cool_down(2.0)

        await asyncio.gather(pause(), *(worker() for _ in range(32)))
        return times

    loop = VirtualTimeLoop()
    try:
        times = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert not [t for t in times if 2.01 < t < 4.0]  # the pause held
    assert max_per_window([t for t in times if t >= 4.0], 1.0) <= 10 + 2  # 10/s, one slot of slack


# ------------------------------------------------------------- end to end, loopback server


@pytest.fixture
def fast_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Runs start near the test server's cap, so each test takes seconds (the defaults are benchmarked)."""
    monkeypatch.setattr(adaptive, "DEFAULT_SETTINGS", AutoSettings(start_rpm=6000))
    yield


def auto_job(workdir: Path, server: FakeServer, n: int, **limits: Any) -> Path:
    write_parquet(workdir / "data" / "in.parquet", reviews(n))
    assert server.base_url is not None
    return write_job(
        workdir,
        server.base_url,
        limits={"requests_per_minute": "auto", "concurrency": 32, "max_attempts": 20, **limits},
    )


def run_json(job: Path) -> dict[str, Any]:
    """The run's --json summary."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["run", str(job), "--json"])
    summary = json.loads(out.getvalue())
    assert code == 0, summary
    return summary


def answer_rate(server: FakeServer, first: int = 0) -> float:
    """Completions per minute at the server, from completion ``first`` on."""
    ok_times = sorted(server.stats()["completed"])[first:]
    return (len(ok_times) - 1) / (ok_times[-1] - ok_times[0]) * 60


@pytest.mark.parametrize("stated", [True, False], ids=["x-ratelimit-headers", "retry-after-only"])
def test_unknown_cap_end_to_end(workdir: Path, server: FakeServer, fast_settings: None, stated: bool) -> None:
    """A strict 3,000/min server (bucket of one second) the job is not told: every row done, few 429s,
    and the summary reports a rate to pin, near the cap."""
    server.config.rps = 50
    server.config.rate_limit_headers = stated
    n = 200
    summary = run_json(auto_job(workdir, server, n))

    stats = server.stats()
    assert stats["ok"] == n
    assert summary["rows_ok"] == n
    assert stats["rate_limited"] <= 0.1 * n
    assert summary["learned_rate_source"] == ("stated" if stated else "measured")
    assert 0.8 * 3000 <= summary["learned_requests_per_minute"] <= 3000
    if stated:
        assert summary["learned_requests_per_minute"] == pytest.approx(0.95 * 3000)
    assert answer_rate(server, first=n // 2) >= 0.8 * 3000


def test_summary_says_what_to_pin(
    workdir: Path, server: FakeServer, fast_settings: None, capsys: pytest.CaptureFixture[str]
) -> None:
    server.config.rps = 50
    server.config.rate_limit_headers = True
    job = auto_job(workdir, server, 120)
    assert main(["run", str(job)]) == 0
    out = capsys.readouterr()
    assert "rate: the server allowed about 2,850 requests/min, as it stated " in out.out
    assert "(pin it with [limits] requests_per_minute = 2850)" in out.out


def test_cap_drops_mid_run_end_to_end(workdir: Path, server: FakeServer, fast_settings: None) -> None:
    """The server's cap falls from 3,000/min to 900/min after a second: the job follows it down."""
    server.config.rps = 50
    n = 150
    job = auto_job(workdir, server, n)
    dropped: list[float] = []

    def drop() -> None:
        server.config.rps = 15
        dropped.append(time.monotonic() - server._t0)  # the clock of the server's stats

    timer = threading.Timer(1.0, drop)
    timer.start()
    try:
        summary = run_json(job)
    finally:
        timer.cancel()
    stats = server.stats()
    assert stats["ok"] == n
    assert stats["rate_limited"] <= 0.15 * n
    assert summary["learned_rate_source"] == "measured"
    assert 0.7 * 900 <= summary["learned_requests_per_minute"] <= 1.05 * 900
    # A second after the drop: requests sent (429s included) near the new cap, answers not far below it.
    settled = dropped[0] + 1.0
    sent = [t for t in stats["arrivals"] if t >= settled]
    done = [t for t in stats["completed"] if t >= settled]
    assert len(done) >= 20
    assert (len(sent) - 1) / (max(sent) - min(sent)) * 60 <= 1.25 * 900
    assert (len(done) - 1) / (max(done) - min(done)) * 60 >= 0.7 * 900


def test_default_start_below_server_cap(workdir: Path, server: FakeServer) -> None:
    """With the real defaults: a 360/min server (below the 600/min start) costs a 429 or two, not a storm."""
    server.config.rps = 6
    n = 30
    summary = run_json(auto_job(workdir, server, n))
    stats = server.stats()
    assert stats["ok"] == n
    assert 1 <= stats["rate_limited"] <= 6
    assert 0.8 * 360 <= summary["learned_requests_per_minute"] <= 360


def test_concurrency_follows_the_rate_end_to_end(
    workdir: Path, server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0.4 s server at a steady 1,200/min needs ~8 in flight: far fewer than concurrency = 64."""
    monkeypatch.setattr(adaptive, "DEFAULT_SETTINGS", AutoSettings(start_rpm=1200, slow_start_per_s=0.0))
    server.config.latency_s = 0.4
    n = 60
    run_json(auto_job(workdir, server, n, concurrency=64))
    stats = server.stats()
    assert stats["ok"] == n
    assert 4 <= stats["max_in_flight"] <= 24


def test_openrouter_key_rate_limit_is_used(workdir: Path, server: FakeServer) -> None:
    """provider = "openrouter": a positive GET /key rate_limit is the stated limit from the start."""
    server.config.key_rate_limit = {"requests": 5, "interval": "1s"}  # 300/min
    n = 20
    write_parquet(workdir / "data" / "in.parquet", reviews(n))
    assert server.base_url is not None
    job = write_job(
        workdir,
        server.base_url,
        limits={"requests_per_minute": "auto"},
        model={"provider": "openrouter"},
    )
    summary = run_json(job)
    assert summary["learned_rate_source"] == "stated"
    assert summary["learned_requests_per_minute"] == pytest.approx(0.95 * 300)
    assert server.stats()["rate_limited"] == 0
    assert answer_rate(server, first=5) <= 300


def test_key_rate_limit_of_minus_one_is_ignored(workdir: Path, server: FakeServer) -> None:
    n = 10
    write_parquet(workdir / "data" / "in.parquet", reviews(n))
    assert server.base_url is not None
    job = write_job(workdir, server.base_url, limits={"requests_per_minute": "auto"}, model={"provider": "openrouter"})
    summary = run_json(job)
    assert summary["learned_rate_source"] == "not_reached"


def test_token_limit_stated_by_the_server_caps_tokens(workdir: Path, server: FakeServer) -> None:
    """tokens_per_minute = "auto": an OpenAI-style x-ratelimit-limit-tokens becomes the token cap (95% of it)."""
    server.config.stated_tpm = 30_000
    n, max_tokens = 45, 64
    job = auto_job(workdir, server, n, requests_per_minute=60000, tokens_per_minute="auto", concurrency=4)
    summary = run_json(job)
    assert summary["learned_tokens_per_minute"] == 30_000
    assert summary["learned_requests_per_minute"] is None  # the request cap was a number
    # What the limiter charged (prompt + max_tokens, prompts counted as the pipeline counts them)
    # beyond the first few requests (sent before any answer stated the limit) and the bucket
    # (a tenth of a minute's tokens) must have taken at least charged / rate.
    bodies = sorted(server.stats()["bodies"], key=lambda b: b["t"])
    counter = counter_for("mistralai/ministral-8b")
    systems = [b["body"]["messages"][0]["content"] for b in bodies]
    users = [b["body"]["messages"][-1]["content"] for b in bodies]
    charged = [t + max_tokens for t in counter.count_chat(systems, users)]
    rate = 0.95 * 30_000 / 60
    bucket = 0.95 * 30_000 / 10
    early = 4 * max(charged)  # at most concurrency requests before the first answer
    assert bodies[-1]["t"] - bodies[0]["t"] >= (sum(charged) - bucket - early - max(charged)) / rate


def test_fixed_number_keeps_exact_cap_and_reports_nothing_learned(workdir: Path, server: FakeServer) -> None:
    n = 20
    summary = run_json(auto_job(workdir, server, n, requests_per_minute=6000))
    assert summary["learned_requests_per_minute"] is None
    assert summary["learned_rate_source"] is None


def test_progress_bar_shows_learned_rate(workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    n = 10
    job = auto_job(workdir, server, n)
    assert main(["run", str(job)]) == 0
    assert "auto 6" in capsys.readouterr().err  # "auto 6xx/min" in the bar's last refresh
    assert run_cli(str(job)) == 0  # and a rerun is a no-op


def test_dry_run_with_auto_rate(workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """A dry run cannot know the server's limit: it gives the time at the starting rate and says so."""
    job = auto_job(workdir, server, 300)
    assert main(["run", str(job), "--dry-run"]) == 0
    assert 'time: 30 s at the starting 600 requests/min; requests_per_minute = "auto"' in capsys.readouterr().out
    assert main(["run", str(job), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["requests_per_minute"] == "auto"
    assert report["duration_s_min"] == 0.0
    assert server.stats()["requests"] == 0
