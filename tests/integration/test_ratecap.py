"""The rate cap, measured where it matters: arrival times at the server.

End-to-end tests run the CLI against the loopback fake server. The 60-second
window property cannot be watched for minutes in a test, so the limiter's
arithmetic is checked on an event loop whose clock is virtual: it jumps to the
next timer whenever every task is waiting, so five simulated minutes take well
under a second.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pipeline.cli.app import main
from pipeline.engine.limits.limiter import RateLimiter, request_bucket
from pipeline.engine.tokens import counter_for
from tests.conftest import read_output, reviews, run_cli, write_job, write_parquet
from tests.fakes.server import FakeServer, max_per_window

T = TypeVar("T")
MODEL = "mistralai/ministral-8b"


def make_job(
    workdir: Path,
    server: FakeServer,
    n: int,
    *,
    limits: dict[str, Any],
    model: dict[str, Any] | None = None,
    data: dict[str, list[Any]] | None = None,
) -> Path:
    """``n`` review rows (or ``data``) and a job against ``server`` with ``limits``."""
    write_parquet(workdir / "data" / "in.parquet", data if data is not None else reviews(n))
    assert server.base_url is not None
    return write_job(workdir, server.base_url, limits=limits, model=model)


# ------------------------------------------------------------------ virtual time


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when every task waits on a timer.

    Then the clock jumps to the earliest pending timer (plus optional random
    lateness, as a busy real loop fires timers late). It always moves by at
    least a microsecond, as a real clock does between two loop iterations;
    without that, a timer rounded to "now" could be rescheduled for "now" forever.
    """

    TICK = 1e-6

    def __init__(self, lateness_s: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self._now = 0.0
        self._lateness = lateness_s
        self._rng = random.Random(seed)

    def time(self) -> float:
        return self._now

    def _run_once(self) -> None:
        # CPython's BaseEventLoop internals: _ready holds runnable callbacks,
        # _scheduled a heap of TimerHandles (cancelled ones linger until popped).
        ready: Any = self._ready  # type: ignore[attr-defined]
        scheduled: list[asyncio.TimerHandle] = self._scheduled  # type: ignore[attr-defined]
        if not ready:
            pending = [handle.when() for handle in scheduled if not handle.cancelled()]
            if pending:
                target = min(pending) + self._rng.uniform(0, self._lateness)
                self._now = max(self._now + self.TICK, target)
        super()._run_once()  # type: ignore[misc]


def run_virtual(factory: Callable[[], Awaitable[T]], lateness_s: float = 0.0) -> T:
    """Run ``factory()`` to completion on a fresh :class:`VirtualTimeLoop`."""
    loop = VirtualTimeLoop(lateness_s)
    try:
        return loop.run_until_complete(factory())
    finally:
        loop.close()


async def admitted_times(
    limiter: RateLimiter, horizon_s: float, workers: int = 32, off: list[tuple[float, float]] | None = None
) -> list[float]:
    """Virtual times at which ``workers`` greedy tasks got through ``limiter`` before ``horizon_s``.

    ``off`` lists (start, end) periods with no demand: workers wait them out, so the
    bucket drains, and demand comes back all at once.
    """
    loop = asyncio.get_running_loop()
    times: list[float] = []

    async def worker() -> None:
        while True:
            for start, end in off or ():
                if start <= loop.time() < end:
                    await asyncio.sleep(end - loop.time())
            if not limiter.try_admit():  # as the client does: the hot path first, then the wait
                await limiter.acquire()
            now = loop.time()
            if now >= horizon_s:
                return
            times.append(now)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return times


def off_periods(horizon_s: float, seed: int = 7) -> list[tuple[float, float]]:
    """Random idle periods (0.5-30 s) between busy ones (2-40 s) over ``horizon_s``."""
    rng = random.Random(seed)
    periods, t = [], rng.uniform(2, 40)
    while t < horizon_s:
        idle = rng.choice((rng.uniform(0.5, 3), rng.uniform(3, 30)))
        periods.append((t, t + idle))
        t += idle + rng.uniform(2, 40)
    return periods


def test_virtual_loop_skips_waiting() -> None:
    """The fake clock itself: sleeps take virtual, not real, time and keep their order."""
    order: list[tuple[str, float]] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()

        async def nap(name: str, s: float) -> None:
            await asyncio.sleep(s)
            order.append((name, loop.time()))

        await asyncio.gather(nap("late", 3600.0), nap("early", 60.0))
        return loop.time()

    assert run_virtual(main) == pytest.approx(3600.0, abs=1e-3)
    assert [name for name, _ in order] == ["early", "late"]
    assert order[0][1] == pytest.approx(60.0, abs=1e-3)


RPMS = (20, 60, 600, 6000)


@pytest.mark.parametrize("lateness_s", [0.0, 0.001], ids=["exact-timers", "late-timers"])
@pytest.mark.parametrize("rpm", RPMS)
def test_limiter_windows_over_five_simulated_minutes(rpm: int, lateness_s: float) -> None:
    """No 60-s window holds more than rpm, no 1-s window more than 1.5*rpm/60+1, and the rate is >= 97% of the cap."""
    horizon = 300.0
    times = run_virtual(lambda: admitted_times(RateLimiter(rpm), horizon), lateness_s)

    assert max_per_window(times, 60.0) <= rpm
    assert max_per_window(times, 1.0) <= 1.5 * rpm / 60 + 1
    assert len(times) >= 0.97 * rpm * horizon / 60
    assert times[0] < 1.0  # no slow start either


@pytest.mark.parametrize("rpm", RPMS)
def test_limiter_windows_with_stop_and_go_demand(rpm: int) -> None:
    """Demand that pauses and restarts (the bucket refills meanwhile) never gets a burst past the caps."""
    off = off_periods(300.0)
    times = run_virtual(lambda: admitted_times(RateLimiter(rpm), 300.0, workers=8, off=off))

    assert len(off) >= 5
    # The pauses happened: only requests already waiting at a pause's start get through in it.
    assert all(sum(start <= t < end for t in times) <= 8 for start, end in off)
    assert len(times) >= 2 * rpm  # several minutes' worth of windows were filled
    assert max_per_window(times, 60.0) <= rpm
    assert max_per_window(times, 1.0) <= 1.5 * rpm / 60 + 1


@pytest.mark.parametrize("rpm", [60_000, 1_000_000])
def test_limiter_high_rates_stay_within_the_cap(rpm: int) -> None:
    """Far above any rate a 2-core client achieves: 1-s windows within b - 1 + r, and the rate is met."""
    horizon = 3.0
    times = run_virtual(lambda: admitted_times(RateLimiter(rpm), horizon, workers=64), 0.0005)
    per_second = rpm / 60
    assert max_per_window(times, 1.0) <= request_bucket(rpm).capacity - 1 + math.ceil(per_second)
    assert max_per_window(times, 1.0) <= 1.01 * per_second + 1
    assert len(times) >= 0.97 * per_second * horizon


async def test_try_admit_takes_the_bucket_then_defers_to_waiters_and_pauses() -> None:
    """try_admit admits while the bucket has room, never ahead of a waiter, never in a cool-down."""
    limiter = RateLimiter(60_000)  # 1,000/s: a bucket of 10
    admitted = sum(limiter.try_admit() for _ in range(50))
    assert admitted == request_bucket(60_000).capacity == 10
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()
    await asyncio.sleep(0.005)  # room again, but the waiter is first
    assert waiter.done() or not limiter.try_admit()
    await waiter
    assert RateLimiter(0).try_admit()  # no cap: always
    paused = RateLimiter(0)
    paused.cool_down(5.0)
    assert not paused.try_admit()
    assert not RateLimiter(0, tokens_per_minute=100_000, max_tokens=64).try_admit()  # token caps wait in acquire


def test_fractional_rpm_is_a_job_error(workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """requests_per_minute is a whole number: 20.5 would let a 60-s window hold 21 requests."""
    write_parquet(workdir / "data/in.parquet", reviews(3))
    write_job(workdir, server.base_url, limits={"requests_per_minute": 20.5})
    assert main(["run", "job"]) == 2
    assert "requests_per_minute" in capsys.readouterr().err
    assert server.stats()["requests"] == 0


def test_request_bucket_shape() -> None:
    """Below 2 requests/s the bucket is strict (one at a time); above, it holds two, and from
    200/s on a hundredth of a second's requests."""
    assert request_bucket(60).capacity == 1
    assert request_bucket(600).capacity == 2
    assert request_bucket(12_000).capacity == 2
    assert request_bucket(60_000).capacity == 10
    assert request_bucket(1_000_000).capacity == 166


def test_cool_down_pauses_every_acquire() -> None:
    """cool_down(s) (a 429) holds back every later acquire until s seconds have passed."""

    async def main() -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        limiter = RateLimiter(60000)
        await limiter.acquire()
        start = loop.time()
        limiter.cool_down(5.0)
        limiter.cool_down(1.0)  # a shorter pause never cuts a longer one short
        times: list[float] = []

        async def one() -> None:
            await limiter.acquire()
            times.append(loop.time())

        await asyncio.gather(*(one() for _ in range(6)))
        return start, times

    start, times = run_virtual(main)
    assert len(times) == 6
    assert min(times) - start >= 5.0


# ------------------------------------------------------------------ end to end, at the server


def test_rpm_600_no_startup_burst(workdir: Path, server: FakeServer) -> None:
    """requests_per_minute = 600, concurrency 32, instant server: <= 16 arrivals in any second, ~10/s overall."""
    n = 40
    job = make_job(workdir, server, n, limits={"requests_per_minute": 600, "concurrency": 32})

    assert run_cli(str(job)) == 0

    arrivals = sorted(server.stats()["arrivals"])
    assert len(arrivals) == n
    assert max_per_window(arrivals, 1.0) <= 16
    # The first second after the first request, start-up included.
    assert sum(1 for t in arrivals if t < arrivals[0] + 1.0) <= 16
    rate = (n - 1) / (arrivals[-1] - arrivals[0])
    assert 8.5 <= rate <= 10.5, rate


def test_concurrency_caps_requests_in_flight(workdir: Path, server: FakeServer) -> None:
    """concurrency = 3 with a 0.2 s server: never more than 3 requests in flight, and 3 are reached."""
    server.config.latency_s = 0.2
    job = make_job(workdir, server, 12, limits={"concurrency": 3})

    assert run_cli(str(job)) == 0

    stats = server.stats()
    assert stats["max_in_flight"] == 3
    assert stats["ok"] == 12


def test_rpm_at_server_limit_gets_no_429(workdir: Path, server: FakeServer) -> None:
    """A server allowing 50 requests/s (one-second burst) never answers 429 to a job capped at 3000/min."""
    server.config.rps = 50
    n = 300
    job = make_job(workdir, server, n, limits={"requests_per_minute": 3000, "concurrency": 32})

    assert run_cli(str(job)) == 0

    stats = server.stats()
    assert 429 not in stats["status_counts"], stats["status_counts"]
    assert stats["rate_limited"] == 0
    assert stats["ok"] == n
    arrivals = sorted(stats["arrivals"])
    assert (n - 1) / (arrivals[-1] - arrivals[0]) >= 0.9 * 50  # and the cap is nearly reached
    table = read_output(workdir / "data" / "out" / "job.parquet")
    assert table.column("error").null_count == n


# ------------------------------------------------------------------ tokens per minute

TPM = 30_000  # 500 tokens/s
# The token bucket as limiter.py sizes it: a tenth of a minute's tokens, or 2 x max_tokens + 2048
# if larger. For both jobs below (max_tokens 16 and 64) that is 3,000 tokens: 6 s at the cap's rate.
BUCKET = min(TPM, max(TPM // 10, 2 * 64 + 2048))
RATE = TPM / 60


def _reviews(n: int, sentences: int) -> dict[str, list[Any]]:
    """Reviews of about 20 Tekken tokens per sentence."""
    text = "the parcel came late and the box was dented, but item {i} works well. "
    return {"id": list(range(n)), "text": [f"review {i}: " + text.format(i=i) * sentences for i in range(n)]}


def _token_run(
    workdir: Path, server: FakeServer, n: int, sentences: int, max_tokens: int
) -> tuple[list[float], list[int]]:
    """Run a token-capped job of ``n`` rows; return arrival times and the pipeline's prompt tokens per request."""
    job = make_job(
        workdir,
        server,
        n,
        data=_reviews(n, sentences),
        limits={"requests_per_minute": 60000, "tokens_per_minute": TPM, "concurrency": 8},
        model={"max_tokens": max_tokens},
    )
    assert run_cli(str(job)) == 0
    bodies = sorted(server.stats()["bodies"], key=lambda b: b["t"])
    assert len(bodies) == n
    counter = counter_for(MODEL)
    systems = [next((m["content"] for m in b["body"]["messages"] if m["role"] == "system"), None) for b in bodies]
    users = [b["body"]["messages"][-1]["content"] for b in bodies]
    return [b["t"] for b in bodies], counter.count_chat(systems, users)


def _worst_excess(times: list[float], tokens: list[int]) -> float:
    """Max over windows [t_i, t_j] of tokens sent minus what the (BUCKET, RATE) bucket allows."""
    worst = float("-inf")
    for i in range(len(times)):
        total = 0
        for j in range(i, len(times)):
            total += tokens[j]
            worst = max(worst, total - (BUCKET + RATE * (times[j] - times[i])))
    return worst


def test_tokens_per_minute_paces_long_prompts(workdir: Path, server: FakeServer) -> None:
    """Long prompts (max_tokens small): the prompt tokens reaching the server never outrun the token bucket."""
    max_tokens = 16
    times, prompt = _token_run(workdir, server, 12, sentences=20, max_tokens=max_tokens)
    assert sum(prompt) > 1.3 * BUCKET  # more than one burst: the steady rate is exercised
    assert _worst_excess(times, prompt) <= max(prompt)  # one request of timing slack
    # ... and the cap is used, not wasted: no slower than charging prompt + max_tokens would need.
    assert times[-1] - times[0] <= (sum(prompt) + len(prompt) * max_tokens - BUCKET) / RATE + 1.0


def test_tokens_per_minute_counts_max_tokens(workdir: Path, server: FakeServer) -> None:
    """Short prompts, max_tokens 64: prompt tokens + max_tokens per request (README: "charged each request's
    prompt tokens plus max_tokens") stay within the bucket's burst + rate x time at the server."""
    max_tokens = 64
    times, prompt = _token_run(workdir, server, 40, sentences=2, max_tokens=max_tokens)
    charged = [p + max_tokens for p in prompt]
    assert sum(charged) > 1.3 * BUCKET  # more than one burst: the steady rate is exercised
    assert _worst_excess(times, charged) <= max(charged)
