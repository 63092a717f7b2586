"""The global limiter's schedule (no Ray needed): spacing, margin, tokens, cool-down."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.engine.drivers.ray.worker import GRANT_BATCH, LimiterActor, RemoteLimiter, RowWorker, WorkerSpec
from pipeline.engine.limits.global_limiter import Grant, Schedule, effective_per_minute
from tests.fakes.server import max_per_window


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (3000, 2940.0),  # 2% below
        (600, 588.0),
        (50, 49.0),  # at least one request a minute
        (10, 9.0),
        (1, 0.5),  # never below half the cap
    ],
)
def test_effective_rate_keeps_a_margin(cap: int, expected: float) -> None:
    assert effective_per_minute(cap) == pytest.approx(expected)


@pytest.mark.parametrize("cap", [60, 600, 3000, 6000])
def test_no_minute_exceeds_the_cap_whatever_the_batches(cap: int) -> None:
    """Workers ask in batches of any size at any moment: times stay evenly spaced under the cap."""
    clock = FakeClock()
    schedule = Schedule(cap, clock=clock)
    rng = random.Random(cap)
    times: list[float] = []
    while len(times) < 3 * cap:
        clock.now += rng.uniform(0, 0.5)
        times += schedule.grant([0] * rng.randint(1, 16)).times
    assert times == sorted(times)
    assert max_per_window(times, 60.0) <= cap
    gaps = {round(b - a, 9) for a, b in itertools.pairwise(times) if b - a > 1e-9}
    assert min(gaps) == pytest.approx(60 / effective_per_minute(cap))


def test_grants_never_start_in_the_past() -> None:
    clock = FakeClock()
    schedule = Schedule(600, clock=clock)
    assert schedule.grant([0]).times == [1000.0]
    clock.now = 2000.0  # idle for a long time: no burst of saved-up slots
    times = schedule.grant([0, 0, 0]).times
    assert times[0] == 2000.0
    assert times[2] - times[0] == pytest.approx(2 * 60 / 588)


def test_tokens_per_minute_charges_prompt_plus_max_tokens() -> None:
    clock = FakeClock()
    # 60,000 tokens a minute, 1,000 per request (900 prompt + 100 max_tokens): about 59 a minute.
    schedule = Schedule(0, tokens_per_minute=60_000, max_tokens=100, clock=clock)
    times = schedule.grant([900] * 300).times
    assert max_per_window(times, 60.0) * 1000 <= 60_000 + schedule.capacity
    # After the initial bucket, requests are spaced by their token cost at the reduced rate.
    assert times[-1] - times[-2] == pytest.approx(1000 * 60 / effective_per_minute(60_000))


def test_cool_down_moves_every_later_grant() -> None:
    clock = FakeClock()
    schedule = Schedule(600, clock=clock)
    schedule.grant([0, 0])
    until = schedule.cool_down(5.0)
    assert until == 1005.0
    grant = schedule.grant([0, 0])
    assert grant.paused_until == 1005.0
    assert all(t >= 1005.0 for t in grant.times)


def test_worker_reads_the_key_from_its_own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key never travels through Ray: a node without it names the variable."""
    monkeypatch.delenv("PIPELINE_TEST_KEY", raising=False)
    spec = WorkerSpec.__new__(WorkerSpec)
    object.__setattr__(spec, "api_key_env", "PIPELINE_TEST_KEY")
    worker = RowWorker.__new__(RowWorker)
    worker.spec = spec
    with pytest.raises(RuntimeError, match="PIPELINE_TEST_KEY is not set on this Ray node"):
        worker._read_key()
    monkeypatch.setenv("PIPELINE_TEST_KEY", "sk-node")
    assert worker._read_key() == "sk-node"


class _Method:
    """``actor.method.remote(...)`` for an object in this process: awaitable, like a Ray call."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(self.fn(*args))
        return future


class _Handle:
    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self._target, name))


async def test_a_429_on_one_worker_pauses_every_worker() -> None:
    """The cool-down goes through the limiter actor to every worker, and later grants wait for it."""
    actor = LimiterActor(6000, 0, 0)
    first, second = RemoteLimiter(_Handle(actor)), RemoteLimiter(_Handle(actor))
    actor.register(_Handle(first))
    actor.register(_Handle(second))
    await first.acquire()
    await second.acquire()

    first.cool_down(0.5)  # what ChatClient does on a 429
    started = time.monotonic()
    assert second.paused_until_s >= time.time() + 0.4  # told at once, before asking for anything
    await second.acquire()
    assert time.monotonic() - started >= 0.45
    assert actor.schedule.next_request >= actor.schedule.paused_until


async def test_remote_limiter_asks_for_waiting_requests_in_batches() -> None:
    calls: list[int] = []
    actor = LimiterActor(60_000, 0, 0)

    class Counting(LimiterActor):
        def grant(self, prompt_tokens: list[int]) -> Grant:
            calls.append(len(prompt_tokens))
            return actor.grant(prompt_tokens)

    limiter = RemoteLimiter(_Handle(Counting(60_000, 0, 0)))
    await asyncio.gather(*(limiter.acquire() for _ in range(40)))
    assert sum(calls) == 40 and max(calls) <= GRANT_BATCH and len(calls) < 40
