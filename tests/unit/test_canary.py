"""The canary's judging logic (engine/canary.py), table-driven: no server, no journal."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pipeline.config.job import Job
from pipeline.engine.canary import (
    CanaryFailure,
    CanaryGate,
    CanarySettings,
    CanaryStatus,
    DispatchCanary,
    clip,
    judge,
)
from pipeline.engine.expectations import TokenFigures, expected_output_tokens, suggest_max_tokens
from pipeline.engine.recorder import Charge
from pipeline.engine.settlement import Settled, StopKind, Stops
from pipeline.providers.base import Reply, ReplyKind
from pipeline.secrets import Redactor
from pipeline.store.journal import Journal, JournalRow, RowStatus

KEY = "sk-or-v1-0123456789abcdef0123456789abcdef"


def row(
    status: RowStatus = RowStatus.OK,
    completion: str | None = "fine",
    finish: str | None = "stop",
    tokens: int | None = 5,
    cost: float | None = 1e-6,
    error: str | None = None,
    key: str = "k",
) -> JournalRow:
    return JournalRow(
        key,
        "h",
        status,
        completion=completion,
        finish_reason=finish,
        completion_tokens=tokens,
        cost_usd=cost,
        error=error,
    )


def settled(journal_row: JournalRow) -> Settled:
    """What settlement hands its observers for a committed reply."""
    return Settled(journal_row, Charge(journal_row.cost_usd or 0.0), Reply(ReplyKind.OK), 1)


def rows(n: int, **kwargs: object) -> list[JournalRow]:
    return [row(**kwargs) for _ in range(n)]  # type: ignore[arg-type]


OK = rows(20)
PLAIN_TEXT = rows(20, status=RowStatus.INVALID, completion="this is not json", error="invalid reply: not a label")
CUT = rows(20, completion="ok 1a2b", finish="length", tokens=3)
EMPTY = rows(20, completion="", tokens=0)
REFUSED = rows(20, status=RowStatus.FAILED, completion=None, finish=None, tokens=None, cost=None, error="HTTP 400")


@pytest.mark.parametrize(
    ("canary", "status", "failure", "share", "words"),
    [
        (OK, CanaryStatus.PASSED, None, None, []),
        (PLAIN_TEXT, CanaryStatus.FAILED, CanaryFailure.INVALID, 1.0, ["invalid", "20 of 20", "this is not json"]),
        (CUT, CanaryStatus.FAILED, CanaryFailure.TRUNCATED, 1.0, ["max_tokens = 3", "raise [model] max_tokens"]),
        (EMPTY, CanaryStatus.FAILED, CanaryFailure.FAILED, 1.0, ["empty", "an empty reply"]),
        (REFUSED, CanaryStatus.FAILED, CanaryFailure.FAILED, 1.0, ["refused", "HTTP 400"]),
        # At the threshold (50%) the canary fails; just under it, it passes.
        (rows(10) + PLAIN_TEXT[:10], CanaryStatus.FAILED, CanaryFailure.INVALID, 0.5, ["10 of 20 canary rows (50%)"]),
        (rows(11) + PLAIN_TEXT[:9], CanaryStatus.PASSED, None, None, []),
        (rows(10) + CUT[:10], CanaryStatus.FAILED, CanaryFailure.TRUNCATED, 0.5, ["max_tokens"]),
        (rows(11) + EMPTY[:4] + REFUSED[:5], CanaryStatus.PASSED, None, None, []),
        (rows(10) + EMPTY[:5] + REFUSED[:5], CanaryStatus.FAILED, CanaryFailure.FAILED, 0.5, ["10 of 20"]),
        # Cut-off replies are invalid too in a structured job: max_tokens is the thing to name.
        (rows(20, status=RowStatus.INVALID, finish="length"), CanaryStatus.FAILED, CanaryFailure.TRUNCATED, 1.0, []),
        # Transient errors are not answers: the shares are of the answered rows.
        (rows(15, status=RowStatus.TRANSIENT) + PLAIN_TEXT[:5], CanaryStatus.FAILED, CanaryFailure.INVALID, 1.0, []),
        (rows(20, status=RowStatus.TRANSIENT), CanaryStatus.UNJUDGED, None, None, []),
    ],
)
def test_judge(
    canary: list[JournalRow], status: CanaryStatus, failure: CanaryFailure | None, share: float | None, words: list[str]
) -> None:
    verdict = judge(canary, CanarySettings(), max_tokens=3 if canary is CUT else 64)
    assert (verdict.status, verdict.failure, verdict.share) == (status, failure, share)
    if status == CanaryStatus.FAILED:
        assert verdict.message is not None and "\n" not in verdict.message
        assert verdict.message.startswith("canary failed: ")
        for word in words:
            assert word in verdict.message
    else:
        assert verdict.message is None


@pytest.mark.parametrize(
    ("cost", "expected", "failure"),
    [
        (3.1e-6, 1e-6, CanaryFailure.COST),
        (2.9e-6, 1e-6, None),
        (1e-3, None, None),  # no price known: nothing to compare with
    ],
)
def test_cost_against_the_dry_run(cost: float, expected: float | None, failure: CanaryFailure | None) -> None:
    verdict = judge(rows(20, cost=cost), CanarySettings(), 64, expected_cost_per_row=expected)
    assert verdict.failure == failure
    if failure:
        assert verdict.message is not None and "3.1x" in verdict.message and "expected $0.000001" in verdict.message


def test_thresholds_come_from_the_settings() -> None:
    half_invalid = rows(10) + PLAIN_TEXT[:10]
    assert judge(half_invalid, CanarySettings(invalid_share=0.6), 64).status == CanaryStatus.PASSED
    assert judge(rows(18) + PLAIN_TEXT[:2], CanarySettings(invalid_share=0.1), 64).failure == CanaryFailure.INVALID
    assert judge(rows(20, cost=2e-6), CanarySettings(cost_factor=1.5), 64, 1e-6).failure == CanaryFailure.COST


def test_the_example_is_clipped_and_the_key_masked() -> None:
    reply = f"here is my key {KEY} " + "blah " * 100
    verdict = judge(
        rows(20, status=RowStatus.INVALID, completion=reply), CanarySettings(), 64, None, Redactor(KEY).redact
    )
    assert verdict.message is not None
    assert KEY not in verdict.message and KEY[:12] not in verdict.message
    assert "***" in verdict.message
    assert len(clip(reply, Redactor(KEY).redact)) == 60


@pytest.mark.parametrize(
    ("tokens", "max_tokens", "p50", "p95", "top", "suggested"),
    [
        ([], 256, None, None, None, None),
        ([5] * 19 + [8], 256, 5, 5, 8, 32),  # labels: far below 256, with room for padding
        (list(range(1, 101)), 1000, 50, 95, 100, 200),
        ([7, 8], 48, 7, 8, 8, None),  # 32 would not halve 48
        ([7, 8], 64, 7, 8, 8, 32),
        ([100] * 20, 256, 100, 100, 100, None),  # 200 would not halve 256
        ([100] * 20, 400, 100, 100, 100, 200),
    ],
)
def test_token_figures(
    tokens: list[int], max_tokens: int, p50: int | None, p95: int | None, top: int | None, suggested: int | None
) -> None:
    figures = TokenFigures.of(tokens, max_tokens)
    assert (figures.p50, figures.p95, figures.max, figures.suggested_max_tokens) == (p50, p95, top, suggested)


def test_no_suggestion_when_replies_were_cut() -> None:
    assert TokenFigures.of([3] * 20, 256, truncated=5).suggested_max_tokens is None
    assert suggest_max_tokens(0, 256) is None
    assert suggest_max_tokens(7, 64) == 32 and suggest_max_tokens(7, 63) is None
    assert suggest_max_tokens(45, 1000) == 96  # twice 45, rounded up to a multiple of 8


@pytest.mark.parametrize(
    ("setting", "to_send", "final", "size"),
    [
        (None, 99, True, 0),
        (None, 99, False, None),  # more rows may follow: decide later
        (None, 100, False, 20),
        (None, 3000, True, 20),
        (0, 3000, True, 0),
        (5, 6, True, 5),
        (5, 5, True, 0),  # no more rows than the canary: no canary
        (5, 5, False, None),
        (50, 51, False, 50),
    ],
)
def test_canary_size(setting: int | None, to_send: int, final: bool, size: int | None) -> None:
    assert CanarySettings(rows=setting).size(to_send, final) == size


def test_disabled_for_one_run() -> None:
    assert CanarySettings(enabled=False).size(10_000, False) == 0


def test_settings_from_the_job_file() -> None:
    job = Job.model_validate({"prompt": {"user": "{x}"}, "limits": {"canary_rows": 10, "canary_invalid_share": 0.3}})
    settings = CanarySettings.from_limits(job.limits)
    assert (settings.rows, settings.invalid_share) == (10, 0.3)
    assert CanarySettings.from_limits(Job.model_validate({"prompt": {"user": "{x}"}}).limits) == CanarySettings()


def test_gate_waits_for_every_canary_row_or_a_stop() -> None:
    async def scenario() -> tuple[bool, bool]:
        gate = CanaryGate(CanarySettings(), 64)
        stopped = asyncio.Event()
        gate.start(["a", "b"])
        waiter = asyncio.create_task(gate.wait(stopped))
        gate.observe(settled(row(key="x")))  # not a canary row
        gate.observe(settled(row(key="a")))
        await asyncio.sleep(0)
        first = waiter.done()
        gate.observe(settled(row(key="b")))
        done = await waiter
        other = CanaryGate(CanarySettings(), 64)
        other.start(["a"])
        waiting = asyncio.create_task(other.wait(stopped))
        stopped.set()
        return first or not done, await waiting

    early, after_stop = asyncio.run(scenario())
    assert not early
    assert not after_stop


def test_gate_verdict_uses_the_expected_cost_of_its_prompts() -> None:
    seen: list[tuple[float, float]] = []

    def expected(prompt_tokens: float, completion_tokens: float) -> float:
        seen.append((prompt_tokens, completion_tokens))
        return 1e-6

    gate = CanaryGate(CanarySettings(), 64, expected_cost=expected)
    gate.start([str(i) for i in range(4)], sample=[10, 20])
    for i in range(4):
        answered = row(key=str(i), cost=1e-5)
        answered.prompt_tokens = 100 + i
        gate.observe(settled(answered))
    verdict = gate.verdict()
    assert seen == [(101.5, 15.0)]  # the canary's mean prompt; the mean of rows answered before it
    assert verdict.failure == CanaryFailure.COST


def test_a_row_asked_again_is_judged_by_its_latest_answer() -> None:
    gate = CanaryGate(CanarySettings(), 64)
    gate.start(["a", "b"])
    gate.observe(settled(row(key="a", status=RowStatus.INVALID, completion="nope")))
    gate.observe(settled(row(key="a")))  # retry_invalid: the second answer fits
    assert not gate.settled.is_set()  # "b" has no answer yet
    gate.observe(settled(row(key="b")))
    assert gate.settled.is_set() and gate.verdict().status == CanaryStatus.PASSED


def test_split_holds_rows_until_the_size_is_known() -> None:
    gate = CanaryGate(CanarySettings(), 64)
    assert gate.split(list(range(50)), final=False) is None and gate.deciding
    assert gate.split(list(range(150)), final=False) == (list(range(20)), list(range(20, 150)))
    assert not gate.deciding
    small = CanaryGate(CanarySettings(), 64)
    assert small.split(list(range(50)), final=True) == ([], list(range(50)))


@pytest.mark.parametrize(("sample", "expected"), [([], 32.0), ([4, 6], 5.0), ([100, 100], 64)])
def test_expected_output_tokens_as_the_dry_run(sample: list[int], expected: float) -> None:
    assert expected_output_tokens(64, sample) == expected


@pytest.mark.parametrize(
    ("status", "room_after", "stopped"), [(RowStatus.OK, None, False), (RowStatus.INVALID, 0, True)]
)
def test_dispatch_canary_lets_its_rows_out_first_then_waits_for_the_verdict(
    tmp_path: Path, status: RowStatus, room_after: int | None, stopped: bool
) -> None:
    journal = Journal.open(tmp_path / "job.journal.sqlite", {"job": "canary"})
    try:
        stops = Stops()
        gate = CanaryGate(CanarySettings(), 64)
        canary = DispatchCanary(gate, stops, journal, 300, chosen=None, retry_failed=False)
        assert canary.room() == 20 and canary.cap(32) == 20
        for i in range(20):
            canary.sent(str(i))
        canary.sent("0")  # asked again for an invalid reply: not a new canary row
        assert canary.room() == 0 and canary.cap(32) == 0  # every canary row is out, none answered yet
        for i in range(20):
            gate.observe(settled(row(key=str(i), status=status, completion="x")))
        assert canary.room() == room_after
        assert stops.stopped is stopped
        if stopped:
            assert stops.reason is not None and stops.reason.kind == StopKind.CANARY
        else:
            assert canary.cap(32) == 32
    finally:
        journal.close()
