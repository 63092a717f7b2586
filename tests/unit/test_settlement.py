"""Table-driven tests of settlement: the stop rules, and a reply's way into the journal, the budget and the counters."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine.admission import Ticket
from pipeline.engine.budget import Budget
from pipeline.engine.client import Attempted, Stopper
from pipeline.engine.pricing import ModelInfo
from pipeline.engine.progress import Tracker
from pipeline.engine.recorder import Recorder
from pipeline.engine.settlement import Settled, Settlement, StopKind, StopReason, Stops, job_level_failure
from pipeline.errors import ExitCode
from pipeline.providers.base import Reply, ReplyKind
from pipeline.store.journal import Journal, RowStatus

PRICED = ModelInfo("m", 1.0, 1.0, 1000, "test")  # a dollar per million tokens either way
URL = "http://127.0.0.1:9/v1/chat/completions"


def ok(content: str = "yes", cost: float | None = 0.01) -> Reply:
    return Reply(
        ReplyKind.OK, 200, content=content, finish_reason="stop", prompt_tokens=3, completion_tokens=2, cost=cost
    )


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (Reply(ReplyKind.RETRY, None, error="connection refused"), StopKind.UNREACHABLE),
        (Reply(ReplyKind.RETRY, None, error="timeout after 5 s"), None),  # slow, not unreachable
        (Reply(ReplyKind.RETRY, 503, error="connection reset by the provider"), None),  # it answered
        (Reply(ReplyKind.FATAL, 404, error="HTTP 404: No endpoints found"), StopKind.JOB_REFUSED),
        (Reply(ReplyKind.FATAL, 403, error="HTTP 403: not available in your region"), StopKind.JOB_REFUSED),
        (Reply(ReplyKind.FATAL, 400, error="HTTP 400: bad"), None),  # this row's problem
        (Reply(ReplyKind.AUTH, 401, error="HTTP 401"), None),  # the key: settled, then stops (close)
        (ok(), None),
    ],
)
def test_job_level_failure_rules(reply: Reply, kind: StopKind | None) -> None:
    reason = job_level_failure(reply, 3, URL)
    assert (reason.kind if reason else None) == kind
    if kind == StopKind.UNREACHABLE:
        assert reason is not None and URL in reason.message and "(3 attempts)" in reason.message


@pytest.mark.parametrize(
    ("reason", "kind", "code"),
    [
        (StopReason.user("interrupted by SIGINT"), StopKind.USER, ExitCode.STOPPED),
        (StopReason.budget(0.5, 1.0), StopKind.BUDGET, ExitCode.STOPPED),
        (StopReason.budget(0.5, 1.0, reserved_by_batches=0.4), StopKind.BUDGET, ExitCode.STOPPED),
        (StopReason.key_refused("HTTP 401"), StopKind.KEY_REFUSED, ExitCode.STOPPED),
        (StopReason.input_error("in.csv: row 11: bad"), StopKind.INPUT_ERROR, ExitCode.USAGE),
        (StopReason.worker_input("bad file"), StopKind.INPUT_ERROR, ExitCode.USAGE),
        (StopReason.output_write("out.parquet", OSError("disk full")), StopKind.OUTPUT_WRITE, ExitCode.STOPPED),
        (StopReason.journal_write(Path("j"), OSError("x"), "b1"), StopKind.JOURNAL_WRITE, ExitCode.STOPPED),
        (StopReason.batches_pending(2, 1000), StopKind.BATCHES_PENDING, ExitCode.STOPPED),
        (StopReason.workers_died(3), StopKind.WORKERS_DIED, ExitCode.STOPPED),
    ],
)
def test_stop_reasons_carry_kind_and_exit_code(reason: StopReason, kind: StopKind, code: ExitCode) -> None:
    assert (reason.kind, reason.exit_code) == (kind, code)
    assert reason.message and "\n" not in reason.message


def test_the_first_stop_wins_and_a_bare_flag_is_the_users() -> None:
    stops = Stops()
    assert stops.current() is None and not stops.stopped
    stops.stop(StopReason.budget(1.0, 1.0))
    stops.stop(StopReason.key_refused("HTTP 401"))
    assert stops.current() == StopReason.budget(1.0, 1.0) and stops.stopper.reason == stops.current().message  # type: ignore[union-attr]
    bare = Stopper()
    bare.stop("interrupted by SIGTERM")
    assert Stops(bare).current() == StopReason.user("interrupted by SIGTERM")


class Harness:
    """A settlement over a real journal, budget and tracker."""

    def __init__(self, tmp_path: Path, *, limit: float | None = None, retry_invalid: int = 0, structured: Any = None):
        self.journal = Journal.open(tmp_path / "j.sqlite", {"id": 1})
        self.budget = Budget(limit, 0.0)
        self.tracker = Tracker(1, quiet=True)
        self.stops = Stops()
        recorder = Recorder(PRICED, structured, lambda: None)  # type: ignore[arg-type,return-value]
        self.settlement = Settlement(
            recorder, self.budget, self.tracker, self.stops, self.journal, retry_invalid=retry_invalid, url=URL
        )
        self.seen: list[Settled] = []
        self.settlement.observers.append(self.seen.append)

    def ticket(self, worst: float = 0.0) -> Ticket:
        ticket = Ticket("k", "h", 3, worst=worst, reserved=True)
        self.budget.reserved += worst
        return ticket

    async def row(self, ticket: Ticket, replies: list[Reply]) -> None:
        """What a realtime worker does with a row's replies."""
        for reply in replies:
            attempted = Attempted(reply, 1, 0.01, reply.cost or 0.0)
            if self.settlement.failure(attempted):
                self.settlement.release(ticket, attempted.cost)
                return
            settled = self.settlement.settle(ticket, attempted)
            if not await self.settlement.commit(settled):
                return
            self.settlement.account(settled)
            if not self.settlement.again(ticket, settled):
                break
        self.settlement.close(ticket, settled)


class Labels:
    """A structured spec whose only valid reply is "yes"."""

    def parse(self, content: str | None, finish_reason: str | None) -> tuple[dict[str, Any] | None, str | None]:
        return ({"label": "yes"}, None) if content == "yes" else (None, "invalid: not a label")


@pytest.mark.parametrize(
    ("replies", "retry_invalid", "status", "requests", "cost", "stop"),
    [
        ([ok()], 0, RowStatus.OK, 1, 0.01, None),
        ([ok("no"), ok("yes")], 1, RowStatus.OK, 2, 0.02, None),  # asked again, the row keeps the total
        ([ok("no"), ok("no")], 1, RowStatus.INVALID, 2, 0.02, None),  # retries used up
        ([ok("no")], 0, RowStatus.INVALID, 1, 0.01, None),
        ([Reply(ReplyKind.FATAL, 400, error="HTTP 400: bad")], 0, RowStatus.FAILED, 1, 0.0, None),
        ([Reply(ReplyKind.AUTH, 401, error="HTTP 401: no key")], 0, RowStatus.TRANSIENT, 1, 0.0, StopKind.KEY_REFUSED),
    ],
)
def test_a_row_settles_into_journal_budget_and_counters(
    tmp_path: Path,
    replies: list[Reply],
    retry_invalid: int,
    status: RowStatus,
    requests: int,
    cost: float,
    stop: StopKind | None,
) -> None:
    h = Harness(tmp_path, limit=1.0, retry_invalid=retry_invalid, structured=Labels())
    ticket = h.ticket(worst=0.1)
    h.settlement.successes = 1  # past the first success: no job-level judgement
    asyncio.run(h.row(ticket, replies))
    row = h.journal.results(["k"])["k"]
    assert row.status == status and row.attempts == requests and row.invalid_tries == requests - 1
    assert (row.cost_usd or 0.0) == pytest.approx(cost)
    assert h.journal.spent() == pytest.approx(cost) and h.budget.spent == pytest.approx(cost)
    assert h.budget.reserved == pytest.approx(0.0) and not ticket.reserved
    assert h.tracker.counters.requests == requests and h.tracker.counters.cost_usd == pytest.approx(cost)
    assert len(h.seen) == requests  # observers see every committed reply
    current = h.stops.current()
    assert (current.kind if current else None) == stop
    h.journal.close()


def test_no_retry_of_an_invalid_reply_past_the_budget(tmp_path: Path) -> None:
    h = Harness(tmp_path, limit=0.105, retry_invalid=3, structured=Labels())
    h.settlement.successes = 1
    ticket = h.ticket(worst=0.1)
    asyncio.run(h.row(ticket, [ok("no", cost=0.01), ok("yes")]))  # 0.01 spent + 0.1 held > 0.105
    assert h.journal.results(["k"])["k"].status == RowStatus.INVALID and h.tracker.counters.requests == 1
    h.journal.close()


@pytest.mark.parametrize(
    ("reply", "stop"),
    [
        (Reply(ReplyKind.RETRY, None, error="connection refused", cost=None), StopKind.UNREACHABLE),
        (Reply(ReplyKind.FATAL, 404, error="HTTP 404: No endpoints found", cost=0.002), StopKind.JOB_REFUSED),
    ],
)
def test_a_job_level_failure_is_not_journaled_but_its_cost_is_counted(
    tmp_path: Path, reply: Reply, stop: StopKind
) -> None:
    h = Harness(tmp_path, limit=1.0)
    ticket = h.ticket(worst=0.1)
    asyncio.run(h.row(ticket, [reply]))
    assert h.journal.results(["k"]) == {}  # a plain rerun sends the row again
    assert h.stops.current().kind == stop  # type: ignore[union-attr]
    assert h.budget.reserved == pytest.approx(0.0) and h.budget.spent == pytest.approx(reply.cost or 0.0)
    h.journal.close()


def test_after_a_success_failures_are_the_rows_own(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    asyncio.run(h.row(h.ticket(), [ok()]))
    ticket = Ticket("k2", "h", 3, reserved=True)
    asyncio.run(h.row(ticket, [Reply(ReplyKind.FATAL, 404, error="HTTP 404: gone")]))
    assert h.journal.results(["k2"])["k2"].status == RowStatus.FAILED and not h.stops.stopped
    h.journal.close()


def test_a_journal_that_cannot_be_written_stops_the_run(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.settlement.successes = 1
    h.journal.conn.close()
    ticket = h.ticket()
    asyncio.run(h.row(ticket, [ok()]))
    assert h.stops.current().kind == StopKind.JOURNAL_WRITE  # type: ignore[union-attr]
    assert h.tracker.counters.requests == 0 and h.seen == []
    assert not h.settlement.commit_now([h.settlement.settle(ticket, Attempted(ok(), 1, 0.0, 0.01))])


def test_commit_now_writes_several_rows_in_one_commit(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    settled = [h.settlement.settle(Ticket(k, "h", 3), Attempted(ok(), 1, 0.0, 0.01)) for k in ("a", "b")]
    assert h.settlement.commit_now(settled)
    assert set(h.journal.results(["a", "b"])) == {"a", "b"} and h.journal.spent() == pytest.approx(0.02)
    h.journal.close()


def test_stop_run_left_the_public_surface_but_still_resolves() -> None:
    import pipeline
    from pipeline.errors import StopRun

    assert "StopRun" not in pipeline.__all__
    with pytest.warns(DeprecationWarning, match="never raised"):
        assert pipeline.StopRun is StopRun
    with pytest.raises(AttributeError):
        pipeline.NoSuchThing  # noqa: B018
