"""Settlement: what happens to a reply, and every rule that stops a run.

One implementation for the realtime, batch and Ray drivers. The stages of one
reply, in order (each driver lists the ones it uses):

1. **failure**: before the first success, a reply that shows the job as a
   whole cannot work (an unreachable server, a model-level refusal) stops
   the run instead of failing every row; the row is not journaled;
2. **settle**: the recorder charges the reply and makes its journal row;
3. **commit**: the row and its cost are written to the journal (the one
   place a reply is awaited into the journal);
4. **account**: the budget is charged, the counters move, observers see the
   :class:`Settled` reply;
5. **again**: a reply that does not fit the schema is asked again while
   ``retry_invalid`` allows and the budget holds;
6. **close**: the row's reservation is released, the row counted done, and a
   refused key stops the run.

A stop is a typed :class:`StopReason` (its kind, its one-line message, its
exit code). :class:`Stops` keeps the first one and raises the stop flag every
sender watches; later reasons are ignored, as a later signal is.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ExitCode
from pipeline.providers.base import Reply, ReplyKind
from pipeline.store.journal import Journal, JournalRow, RowStatus

if TYPE_CHECKING:
    from pipeline.engine.admission import Ticket
    from pipeline.engine.budget import Budget
    from pipeline.engine.client import Attempted, Stopper
    from pipeline.engine.progress import Tracker
    from pipeline.engine.recorder import Charge, Recorder


class StopKind(StrEnum):
    """Why a run stopped early."""

    USER = "user"  # a front end asked (Ctrl-C, SIGTERM, Controls.stop)
    BUDGET = "budget"  # the next request's worst case would pass budget_usd
    KEY_REFUSED = "key_refused"  # 401/402/403 on the key: no request can succeed
    CREDIT_LIMIT = "credit_limit"  # a request too big for the in-flight budget, or a spent key budget
    JOB_REFUSED = "job_refused"  # 403/404 on the model before any success
    UNREACHABLE = "unreachable"  # every attempt of the first rows a connection error
    JOURNAL_WRITE = "journal_write"  # the journal cannot be written
    INPUT_ERROR = "input_error"  # a bad record deep in the input (exit 2)
    OUTPUT_WRITE = "output_write"  # the output file cannot be written
    BATCH_REFUSED = "batch_refused"  # the provider refused a batch (4xx)
    BATCH_SUBMIT = "batch_submit"  # a batch could not be submitted (after retries)
    BATCH_READ = "batch_read"  # a batch could not be polled or read (after retries)
    BATCHES_PENDING = "batches_pending"  # batch mode ended with batches still at the provider
    BATCH_STATUS = "batch_status"  # a batch in a status polling cannot end (unknown word, past expires_at)
    WORKER_FAILED = "worker_failed"  # a Ray worker failed (not died: an error in it)
    WORKERS_DIED = "workers_died"  # more Ray workers died than the run replaces
    RATE_LIMITED = "rate_limited"  # a Retry-After longer than a run should wait
    CANARY = "canary"  # the first rows' answers show the job does not work (engine/canary.py)
    CANARY_PENDING = "canary_pending"  # batch mode: the canary batch is still at the provider


@dataclass(frozen=True, slots=True)
class StopReason:
    """A stop: its kind, the line the user reads, and the exit code the run ends with."""

    kind: StopKind
    message: str
    exit_code: ExitCode = ExitCode.STOPPED
    # A budget stop's limit and the batches' reservation: its line is written again with the
    # final spend once replies in flight at the stop have settled (see ``final``).
    limit: float | None = None
    reserved_by_batches: float | None = None

    def final(self, spent: float) -> StopReason:
        """The stop as the run ends: a budget stop states what was spent in the end."""
        if self.kind != StopKind.BUDGET or self.limit is None:
            return self
        return StopReason.budget(spent, self.limit, self.reserved_by_batches)

    # The messages of every stop rule, in one place.

    @classmethod
    def user(cls, reason: str) -> StopReason:
        return cls(StopKind.USER, reason)

    @classmethod
    def budget(cls, spent: float, limit: float, reserved_by_batches: float | None = None) -> StopReason:
        if reserved_by_batches is None:
            message = (
                f"budget reached: ${usd(spent)} spent of budget_usd ${limit:g}; "
                "raise [limits] budget_usd and rerun to continue"
            )
        else:
            message = (
                f"budget reached: ${usd(spent)} spent and ${usd(reserved_by_batches)} reserved by "
                f"pending batches of budget_usd ${limit:g}; raise [limits] budget_usd and rerun"
            )
        return cls(StopKind.BUDGET, message, limit=limit, reserved_by_batches=reserved_by_batches)

    @classmethod
    def model_gone(cls, error: str | None, successes: int | None) -> StopReason:
        when = "while a batch ran" if successes is None else f"after {successes} answers"
        return cls(
            StopKind.JOB_REFUSED,
            f"the provider stopped serving the model {when}: {error}; "
            "the rows not answered were not sent (or not journaled): rerun later, or check [model] name",
        )

    @classmethod
    def come_back_later(cls, seconds: float, error: str | None) -> StopReason:
        when = time.strftime("%H:%M UTC", time.gmtime(time.time() + seconds))
        return cls(
            StopKind.RATE_LIMITED,
            f"the provider asks to wait {seconds:,.0f} s (Retry-After, until about {when}) before the next "
            f"request ({error}); come back then: rerun after {when} (nothing done is paid again)",
        )

    @classmethod
    def refused(cls, reply: Reply, max_tokens: int | None = None) -> StopReason:
        """An ``auth`` reply's stop: the credit limit it names (never "a refused key"), else a refused key."""
        if reply.credit is not None:
            return cls(StopKind.CREDIT_LIMIT, f"{reply.credit.advice(max_tokens)} ({reply.error})")
        return cls.key_refused(reply.error)

    @classmethod
    def key_refused(cls, error: str | None) -> StopReason:
        return cls(StopKind.KEY_REFUSED, f"the provider refused the key ({error}); fix the key or credits and rerun")

    @classmethod
    def job_refused(cls, error: str | None) -> StopReason:
        return cls(
            StopKind.JOB_REFUSED,
            f"the provider refused the job: {error}; check [model] name and the provider's "
            "model access or routing settings, then rerun",
        )

    @classmethod
    def unreachable(cls, url: str, error: str | None, attempts: int) -> StopReason:
        return cls(
            StopKind.UNREACHABLE,
            f"cannot reach the server at {url}: {error} ({attempts} attempts); "
            "check [model] base_url and the network, then rerun",
        )

    @classmethod
    def journal_write(cls, path: Path, exc: BaseException, batch_id: str | None = None) -> StopReason:
        after = f"batch {batch_id} was submitted" if batch_id else "free space or fix it and rerun"
        return cls(StopKind.JOURNAL_WRITE, f"cannot write the journal {path} ({exc}); {after}")

    @classmethod
    def input_error(cls, problem: object) -> StopReason:
        return cls(
            StopKind.INPUT_ERROR,
            f"{problem}; fix the input and rerun (rows done are not paid again)",
            ExitCode.USAGE,
        )

    @classmethod
    def output_write(cls, path: object, exc: BaseException) -> StopReason:
        return cls(
            StopKind.OUTPUT_WRITE,
            f"cannot write the output {path}: {exc}; every answer is in the journal: "
            "fix the cause and rerun (nothing is paid again)",
        )

    @classmethod
    def batch_refused(cls, error: str | None) -> StopReason:
        return cls(
            StopKind.BATCH_REFUSED,
            f"the provider refused the batch: {error}; check [model] name, batch_url and params, then rerun",
        )

    @classmethod
    def batch_submit(cls, error: str | None) -> StopReason:
        return cls(
            StopKind.BATCH_SUBMIT, f"cannot submit a batch: {error}; rerun to try again (nothing was paid for it)"
        )

    @classmethod
    def batch_read(cls, batch_id: str, tries: int, error: str | None) -> StopReason:
        return cls(
            StopKind.BATCH_READ,
            f"cannot read batch {batch_id} ({tries} tries): {error}; rerun to try again "
            "(the batch stays in the journal: its rows are not submitted again)",
        )

    @classmethod
    def batch_unknown_status(cls, batch_id: str, word: str) -> StopReason:
        return cls(
            StopKind.BATCH_STATUS,
            f"batch {batch_id} reports status {word!r}, which the provider never documented: polling stops. "
            "It stays in the journal (its rows are not submitted again); check it at the provider, then rerun",
        )

    @classmethod
    def batch_overdue(cls, batch_id: str, word: str, expires_at: float) -> StopReason:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires_at))
        return cls(
            StopKind.BATCH_STATUS,
            f"batch {batch_id} should have expired at {when} but still reports {word!r}: polling stops. "
            "It stays in the journal (its rows are not submitted again, it may still answer); "
            "check it at the provider, then rerun",
        )

    @classmethod
    def batches_pending(cls, batches: int, rows: int) -> StopReason:
        return cls(
            StopKind.BATCHES_PENDING,
            f"{batches} batches pending at the provider ({rows:,} rows); rerun to collect them",
        )

    @classmethod
    def worker_failed(cls, cause: str) -> StopReason:
        return cls(StopKind.WORKER_FAILED, f"a Ray worker failed: {cause}")

    @classmethod
    def worker_input(cls, cause: str) -> StopReason:
        return cls(
            StopKind.INPUT_ERROR, f"a Ray worker could not read the input: {cause}; fix it and rerun", ExitCode.USAGE
        )

    @classmethod
    def canary(cls, message: str) -> StopReason:
        """A failed canary: ``message`` is its one line (what failed, the share, an example, what to change)."""
        return cls(StopKind.CANARY, message)

    @classmethod
    def canary_pending(cls, batch_id: str) -> StopReason:
        return cls(
            StopKind.CANARY_PENDING,
            f"the canary batch {batch_id} is pending at the provider: rerun to judge its answers "
            "and submit the other rows (they are not submitted before it passes)",
        )

    @classmethod
    def workers_died(cls, died: int) -> StopReason:
        return cls(StopKind.WORKERS_DIED, f"{died} Ray workers died; rerun to continue (nothing done is paid again)")


def usd(amount: float) -> str:
    """Money as the user reads it: cents for dollars, six decimals below a dollar ($0.000382, not $0.0004)."""
    return f"{amount:,.2f}" if amount >= 100 else f"{amount:.4f}" if amount >= 1 else f"{amount:.6f}"


# OpenRouter's 404 when a model has no endpoint left (not "No endpoints found that support X",
# which is about one request's parameters or length).
_NO_ENDPOINTS = re.compile(r"no endpoints found(?! that)", re.IGNORECASE)


def model_level_failure(reply: Reply, successes: int) -> StopReason | None:
    """The stop for a reply that ends the job at any time: the model gone, or a Retry-After of hours."""
    from pipeline.engine.client import MAX_RETRY_AFTER_S  # loaded by then: a reply came through the client

    if reply.kind == ReplyKind.RETRY and reply.retry_after is not None and reply.retry_after > MAX_RETRY_AFTER_S:
        return StopReason.come_back_later(reply.retry_after, reply.error)
    if successes and reply.kind == ReplyKind.FATAL and reply.status == 404 and _NO_ENDPOINTS.search(reply.error or ""):
        return StopReason.model_gone(reply.error, successes)
    return None


def model_gone_in_batch(reply: Reply) -> StopReason | None:
    """The stop for a batch result saying the model has no endpoints left (the row is not at fault)."""
    if reply.kind == ReplyKind.FATAL and reply.status == 404 and _NO_ENDPOINTS.search(reply.error or ""):
        return StopReason.model_gone(reply.error, None)
    return None


def job_level_failure(reply: Reply, attempts: int, url: str) -> StopReason | None:
    """The stop for a reply that would fail every row the same way, else None.

    Judged only before the first success: an unreachable server (every
    attempt of a row a connection error) or a model-level refusal (404 no
    endpoints, 403 region or model access).
    """
    if reply.kind == ReplyKind.RETRY and reply.status is None and (reply.error or "").startswith("connection"):
        return StopReason.unreachable(url, reply.error, attempts)
    if reply.kind == ReplyKind.FATAL and reply.status in (403, 404):
        return StopReason.job_refused(reply.error)
    return None


class Stops:
    """The run's stop: the first reason wins and raises the flag every sender watches."""

    def __init__(self, stopper: Stopper | None = None) -> None:
        self._stopper = stopper
        self.reason: StopReason | None = None

    @property
    def stopper(self) -> Stopper:
        """The flag senders watch, made on first use: a rerun with nothing to send never loads the HTTP client."""
        if self._stopper is None:
            from pipeline.engine.client import Stopper

            self._stopper = Stopper()
        return self._stopper

    @property
    def stopped(self) -> bool:
        return self._stopper is not None and self._stopper.stopped

    def stop(self, reason: StopReason) -> None:
        if not self.stopped:
            self.reason = reason
        self.stopper.stop(reason.message)

    def current(self) -> StopReason | None:
        """The stop, if any (a stop raised on the bare flag counts as the user's)."""
        if self.reason is None and self.stopped:
            return StopReason.user(self.stopper.reason or "stopped")
        return self.reason


@dataclass(slots=True)
class Settled:
    """What settlement made of one reply: observers see this once it is committed."""

    row: JournalRow  # status, finish reason, cost (with earlier tries), error, tokens
    charge: Charge  # this reply's own cost
    reply: Reply
    requests: int  # requests the reply took (0 in batch mode: counted at submission)


Observer = Callable[[Settled], None]


class Settlement:
    """Settles replies into the journal, the budget and the counters; stops the run by its rules."""

    def __init__(
        self,
        recorder: Recorder,
        budget: Budget,
        tracker: Tracker,
        stops: Stops,
        journal: Journal,
        *,
        retry_invalid: int = 0,
        url: str = "",
    ) -> None:
        self.recorder = recorder
        self.budget = budget
        self.tracker = tracker
        self.stops = stops
        self.journal = journal
        self.retry_invalid = retry_invalid
        self.url = url  # the server, named when it cannot be reached (set once known)
        self.successes = 0  # replies that came back OK: the job as a whole works
        self.observers: list[Observer] = []  # called with every committed reply (e.g. a canary)

    def failure(self, attempted: Attempted) -> bool:
        """True (and the run stopped) when this reply shows the whole job cannot work."""
        reply = attempted.reply
        if reply.kind == ReplyKind.OK:
            self.successes += 1
            return False
        reason = model_level_failure(reply, self.successes)
        if reason is None and not self.successes:
            reason = job_level_failure(reply, attempted.attempts, self.url)
        if reason is None:
            return False
        self.stops.stop(reason)
        return True

    def settle(self, ticket: Ticket, attempted: Attempted, body: bytes | None = None) -> Settled:
        """Charge the reply and make its journal row (cost and attempts include the row's earlier tries)."""
        reply = attempted.reply
        charge = self.recorder.charge(reply, attempted.cost, ticket.tokens, body)
        row = self.recorder.record(
            ticket.key,
            ticket.prompt_hash,
            reply,
            attempts=attempted.attempts,
            latency_s=attempted.latency_s,
            charge=charge,
            prior_cost=ticket.prior_cost,
            prior_attempts=ticket.prior_attempts,
            tries=ticket.tries,
            attempt_costs=attempted.costs,
            prior_costs=ticket.prior_costs,
        )
        return Settled(row, charge, reply, attempted.attempts)

    async def commit(self, settled: Settled) -> bool:
        """Write the row and its cost to the journal; False (and the run stopped) when it cannot be written.

        Returns once the row is committed: rows share a commit (the journal's
        group commit, a few milliseconds), and the sender holds its concurrency
        slot until then, so a ``kill -9`` re-pays at most ``concurrency`` rows.
        Cancelling the senders (the end of a grace period) cancels their wait,
        not the commit: the group is committed by its timer or the journal's flush.
        """
        try:
            await self.journal.write(settled.row, settled.charge.usd)
        except sqlite3.Error as exc:
            self.stops.stop(StopReason.journal_write(self.journal.path, exc))
            return False
        return True

    def commit_now(self, settled: list[Settled]) -> bool:
        """Write several rows in one commit, now (a driver outside the event loop's write queue)."""
        try:
            self.journal.write_now([s.row for s in settled], sum(s.charge.usd for s in settled))
        except sqlite3.Error as exc:
            self.stops.stop(StopReason.journal_write(self.journal.path, exc))
            return False
        return True

    def account(self, settled: Settled) -> None:
        """Charge the budget and count the reply (every attempt, retries of invalid replies included)."""
        charge = settled.charge
        row = settled.row
        self.budget.settle(0.0, charge.usd)
        self.tracker.requests(settled.requests, charge.usd, row.prompt_tokens, row.completion_tokens)
        if row.cached_tokens:
            self.tracker.cached(row.cached_tokens, self.recorder.cache_saving(row.cached_tokens))
        if charge.estimated:
            self.tracker.counters.cost_estimated = True
        for observe in self.observers:
            observe(settled)

    def again(self, ticket: Ticket, settled: Settled) -> bool:
        """True when a reply that does not fit the schema is to be asked again (the ticket keeps its total)."""
        if settled.row.status != RowStatus.INVALID or ticket.tries >= self.retry_invalid or self.stops.stopped:
            return False
        # The row's reservation is still held, so it covers the new attempt.
        if not self.budget.within_limit():
            return False
        ticket.tries += 1
        ticket.prior_cost += settled.charge.usd
        ticket.prior_attempts += settled.requests
        ticket.prior_costs = json.loads(settled.row.attempt_costs) if settled.row.attempt_costs else []
        return True

    def close(self, ticket: Ticket, settled: Settled, *, done: bool = True) -> None:
        """The row is finished: release its reservation, count it (``done``), stop on a refused key."""
        self.release(ticket)
        if done:
            self.tracker.row_done(settled.row.status, settled.row.error)
        if settled.reply.kind == ReplyKind.AUTH:
            self.stops.stop(StopReason.refused(settled.reply, self.recorder.max_tokens))

    def release(self, ticket: Ticket, billed: float = 0.0) -> None:
        """Give back the row's reservation; ``billed``: what a reply that is not journaled cost."""
        if ticket.reserved:
            self.budget.settle(ticket.worst, billed)
            ticket.reserved, ticket.worst = False, 0.0
        elif billed:
            self.budget.settle(0.0, billed)
