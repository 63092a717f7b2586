"""Batch mode: rows go through the provider's batch API, into the same journal and output.

A run selects rows exactly as realtime mode does (``RowSelector``), leaves out
rows already waiting in a provider batch, and submits the rest in batches of at
most the provider's request and byte limits, reserving each batch's worst case
against ``budget_usd`` first. Each batch id and its rows are committed to the
journal in the transaction that marks those rows ``not_run: pending in batch
...``: from then on a rerun, after any crash, polls the batch instead of
submitting its rows again. A kill between the provider accepting a batch and
that commit loses the id, not the batch: submissions carry metadata, and the
next run adopts the listed batch that matches what it is about to submit.

The run then polls its pending batches every ``batch_poll_s`` seconds and
journals each terminal batch's results page by page, each page in one
transaction that also marks its rows collected, so a rerun that reads a page
again skips what it already has. Rows a batch never answered (it expired,
failed or was cancelled) are journaled as transient errors and submitted again
in a new batch; so are results that carry a transient error. A result
without ``usage`` is charged from counted tokens. An undocumented status
word, or a batch running past its ``expires_at``, ends polling with one line.
With ``wait=False`` (``--no-wait``) the run submits, collects what has
finished, writes the output and ends with exit code 3 while batches are pending.

No chat request is ever sent in this mode, and rate caps do not apply: batches
do not count against the providers' rate limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import aiohttp

from pipeline.engine.admission import Ticket, count_keys
from pipeline.engine.canary import BatchCanary
from pipeline.engine.client import Attempted, backoff_delay, request_headers
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.selection import RowSelector
from pipeline.engine.session import Session
from pipeline.engine.settlement import Settled, StopReason, model_gone_in_batch
from pipeline.errors import InputError, JobError, UserError
from pipeline.providers.base import Reply, ReplyKind
from pipeline.providers.batches import (
    BatchAdapter,
    BatchApiError,
    BatchRequest,
    BatchResult,
    BatchState,
    BatchStatus,
    best_results,
    custom_id_for,
    find_orphans,
    submission_metadata,
)
from pipeline.store.batches import BatchRow, BatchStore, KnownBatch, SubmittedRow
from pipeline.store.journal import Journal, JournalRow, RowStatus
from pipeline.store.meta import Meta

if TYPE_CHECKING:
    from pipeline.engine.plan import Plan
    from pipeline.engine.session import Controls, RunOptions, RunResult

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0  # a provider may take a while to accept a 200 MB batch
ENVELOPE_BYTES = 4096  # room for the submission's own fields around the requests
# A batch still running this long after its expires_at is not going to end by itself.
EXPIRY_GRACE_S = 900.0


def make_adapter(plan: Plan) -> BatchAdapter:
    """The batch API of the job's provider; a JobError for a provider without one."""
    from pipeline.providers import batch_providers

    adapter = plan.provider.batches(plan.job.model, plan.model_name)
    if adapter is None:
        raise JobError(
            f'[model] mode = "batch" needs a provider with a batch API ({", ".join(batch_providers())}), '
            f"not {plan.provider.name}"
        )
    return adapter


# ----------------------------------------------------------------------------- the journal's batch tables


@dataclass(slots=True)
class Queued:
    """A row waiting for the batch being assembled."""

    key: str
    prompt_hash: str
    request: BatchRequest
    tokens: int  # prompt tokens when counted (budget), else 0


def pending_error(batch_id: str, submitted: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(submitted))
    return f"not_run: pending in batch {batch_id} (submitted {when}); rerun the job to collect it"


# ----------------------------------------------------------------------------- the run


class BatchRun:
    """One batch-mode execution of a plan: submit, poll, collect, in a loop."""

    def __init__(self, plan: Plan, journal: Journal, options: RunOptions, controls: Controls) -> None:
        self.plan = plan
        self.journal = journal
        self.options = options
        self.job = plan.job
        self.spec = plan.job.model
        self.store = BatchStore(journal)
        self.sent: dict[str, int] = {}  # batches each row was submitted in by this run
        # Admission as realtime mode does it, less rows waiting in a provider batch (or sent
        # max_attempts times by this run); counting every prompt only for a budget (no rate caps here).
        session = self.session = Session(
            plan,
            journal,
            options,
            controls,
            count_all=self.job.limits.budget_usd is not None,
            selector=RowSelector(journal.seen, retry_failed=options.retry_failed),
            price_factor=self.spec.batch_discount,
            hold=self._held,
            track_resumed=False,  # the input is read again after each collection: counted once, below
        )
        self.stops = session.stops
        self.stopper = session.stops.stopper
        self.tracker = session.tracker
        self.budget = session.budget
        self.admission = session.admission
        self.settlement = session.settlement
        self.canary = BatchCanary(session.canary, self.store, journal)
        if self.budget.limit is not None:
            # Batches of earlier runs still hold their worst case until collected.
            self.budget.reserved = sum(b.worst_usd for b in self.store.pending())
        self.dialect = plan.dialect()
        self.adapter = make_adapter(plan)
        self.batches_submitted = 0
        self.transient: dict[str, str] = {}  # rows whose last result was transient: key -> error
        self.collected: set[str] = set()  # rows this run journaled a final result for
        self._scan = True  # rows may need submitting: read the input (again)
        self._counted_upto = 0  # input rows whose resumed rows the bar has counted
        self._poll_failures: dict[str, int] = {}
        self._budget_blocked = False  # a batch waits for pending batches to release their reservations
        self._orphans: dict[str, str] | None = None  # rows digest -> id of batches no journal knows
        # Names this job's journal at the provider: its identity and when the journal was created,
        # so a journal started over (--fresh) never adopts the batches of the one set aside.
        tag = f"{plan.identity_hash}:{journal.get_meta(Meta.CREATED)}"
        self._journal_tag = hashlib.sha256(tag.encode()).hexdigest()[:24]

    def _held(self, keys: list[str]) -> set[str]:
        """Rows not to submit now: waiting in a pending batch, or submitted max_attempts times by this run."""
        held = self.store.pending_keys(keys)
        most = self.job.limits.max_attempts
        return held | {k for k in keys if self.sent.get(k, 0) >= most} if self.sent else held

    async def execute(self) -> None:
        limits = self.job.limits
        # No session-wide Content-Type: file uploads are multipart.
        headers = {
            k: v for k, v in request_headers(self.plan.api_key, self.spec.headers).items() if k != "Content-Type"
        }
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=min(CONNECT_TIMEOUT_S, limits.timeout_s),
            sock_read=max(limits.timeout_s, READ_TIMEOUT_S),
        )
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            while True:
                await self._collect_finished(session)
                self._judge_canary()
                if self._scan and not self.stopper.stopped and self.canary.batch_id is None:
                    self._scan = False
                    await self._submit_new(session)
                pending = self.store.pending()
                self._show(pending)
                if not pending or self.stopper.stopped or not self.options.wait:
                    break
                await self.stopper.sleep(self.spec.batch_poll_s)
        if self.canary.batch_id is not None:
            self.stops.stop(StopReason.canary_pending(self.canary.batch_id))
        for error in self.transient.values():
            self.tracker.row_done(RowStatus.TRANSIENT, error)  # not answered, and not submitted again
        self.tracker.close()

    def _show(self, pending: list[KnownBatch]) -> None:
        rows = sum(b.rows for b in pending)
        self.tracker.set_note(f"{len(pending)} batches pending ({rows:,} rows)" if pending else "")

    def _judge_canary(self) -> None:
        """Once the canary batch is collected: judge it; the rest is submitted only if it passes."""
        if self.stopper.stopped or (verdict := self.canary.judge(self.store.pending())) is None:
            return
        if verdict.failed:
            self.stops.stop(StopReason.canary(verdict.message or "canary failed"))
        self._scan = not verdict.failed

    # -- submitting ---------------------------------------------------------------------

    async def _submit_new(self, session: aiohttp.ClientSession) -> None:
        """Read the input and submit every row that needs a request and is in no pending batch.

        With a canary, its rows go alone in a small batch: the rest follows once it is collected and passes.
        """
        chunk: list[Queued] = []
        size = 0
        offset = 0
        held: list[Queued] = []  # rows read while the canary's size is not known yet
        gate = self.canary.gate
        limit = self.adapter.max_bytes - ENVELOPE_BYTES
        most = min(self.adapter.max_requests, self.spec.batch_max_requests or self.adapter.max_requests)

        async def add(items: list[Queued]) -> bool:
            nonlocal chunk, size
            for item in items:
                item_size = self.adapter.request_size(item.request)
                if chunk and (len(chunk) >= most or size + item_size > limit):
                    if not await self._submit(session, chunk):
                        return False
                    chunk, size = [], 0
                chunk.append(item)
                size += item_size
            return True

        try:
            for batch, keys, rendered in self.plan.batches():
                items = await self._batch_items(keys, rendered, offset)
                offset += batch.num_rows
                if gate.deciding:
                    held += items
                    if (split := gate.split(held, final=False)) is None:
                        continue
                    (canary, items), held = split, []
                    if canary:
                        return await self._submit_canary(session, canary)
                if not await add(items) or self.stopper.stopped:
                    return
            split = gate.split(held, final=True) if gate.deciding else None
            canary, held = split or ([], held)
            if canary:
                return await self._submit_canary(session, canary)
            if await add(held) and chunk:
                await self._submit(session, chunk)
        except InputError as exc:
            self.stops.stop(StopReason.input_error(exc))

    async def _submit_canary(self, session: aiohttp.ClientSession, chunk: list[Queued]) -> None:
        if not await self._submit(session, chunk, canary=True) and self.canary.batch_id is None:
            self.canary.gate.deciding = True  # not submitted (the budget waits for pending batches): decide again

    async def _batch_items(self, keys: list[str], rendered: RenderedBatch, offset: int) -> list[Queued]:
        """Admission decides what still needs a request; the transport's part is the batch request."""
        admitted = await self.admission.admit(keys, rendered, offset)
        if offset >= self._counted_upto and admitted.selection is not None:
            # Done before this run, counted once per input row however often the input is
            # read; rows this run collected already count in the bar.
            looked_at = set(admitted.selection.todo) | set(admitted.selection.blank)
            fresh = sum(1 for i, key in enumerate(keys) if i not in looked_at and key in self.collected)
            self.tracker.resumed(admitted.done - fresh)
            self._counted_upto = offset + len(keys)
        hashes = admitted.hashes
        chat_body = self.dialect.chat_body
        return [
            Queued(
                keys[i],
                hashes[i],
                BatchRequest(custom_id_for(keys[i]), chat_body(rendered.system(i), rendered.users[i])),
                t,
            )
            for i, t in zip(admitted.todo, admitted.tokens, strict=True)
        ]

    async def _submit(self, session: aiohttp.ClientSession, chunk: list[Queued], canary: bool = False) -> bool:
        """Submit one batch and journal it; False when the run must submit no more."""
        # The most a batch can cost: every prompt plus a full max_tokens reply, at the batch price.
        worst = self.admission.reserve_batch([q.tokens for q in chunk], self.spec.batch_discount)
        if worst is None:
            if self.store.pending():
                # Pending batches hold their worst case until collected (they usually cost far
                # less): try again once one is collected.
                self._budget_blocked = True
                return False
            budget = self.budget
            self.stops.stop(StopReason.budget(budget.spent, budget.limit or 0.0, reserved_by_batches=budget.reserved))
            return False
        requests = [q.request for q in chunk]
        metadata = submission_metadata(self._journal_tag, [r.custom_id for r in requests])
        batch_id = await self._orphan(session, metadata["pipeline_rows"])
        attempt = 0
        while batch_id is None:
            attempt += 1
            try:
                batch_id = await self.adapter.submit(session, requests, metadata)
                break
            except BatchApiError as exc:
                reply = exc.reply
                retry = reply.kind == ReplyKind.RETRY and attempt < self.job.limits.max_attempts
                # A stop cuts the backoff short: the run ends without this batch.
                if retry and await self.stopper.sleep(backoff_delay(attempt, reply.retry_after)):
                    continue
                self.budget.settle(worst, 0.0)
                self._submission_failed(reply)
                return False
        counts = self.store.submissions([q.key for q in chunk])
        now = time.time()
        error = pending_error(batch_id, now)
        markers = [
            JournalRow(q.key, q.prompt_hash, RowStatus.TRANSIENT, attempts=counts.get(q.key, 0) + 1, error=error)
            for q in chunk
        ]
        for row in markers:
            row.updated = now
        try:
            submitted = [SubmittedRow(q.request.custom_id, q.key, q.prompt_hash) for q in chunk]
            self.store.record_submission(batch_id, self.adapter.name, submitted, worst, markers, canary)
        except sqlite3.Error as exc:
            self.stops.stop(StopReason.journal_write(self.journal.path, exc, batch_id))
            return False
        for q in chunk:
            self.sent[q.key] = self.sent.get(q.key, 0) + 1
            self.transient.pop(q.key, None)
        self.batches_submitted += 1
        if canary:
            self.canary.submitted(batch_id, len(chunk))
        self.tracker.requests(len(chunk), 0.0, None, None)
        return not self.stopper.stopped  # a stop (Ctrl-C) during the upload: submit nothing more

    async def _orphan(self, session: aiohttp.ClientSession, rows_digest: str) -> str | None:
        """A batch of exactly these rows that the provider accepted but no journal recorded (a crash).

        The provider's recent batches are listed once per run, on the first
        submission; a listing that fails (a provider without the route) finds none.
        """
        if self._orphans is None:
            self._orphans = await find_orphans(self.adapter, session, self.store.known_ids(), self._journal_tag)
        batch_id = self._orphans.pop(rows_digest, None)
        if batch_id is not None:
            self.store.note_adopted(batch_id)
        return batch_id

    def _submission_failed(self, reply: Reply) -> None:
        if reply.kind == ReplyKind.AUTH:
            self.stops.stop(StopReason.refused(reply, self.plan.job.model.max_tokens))
        elif reply.kind == ReplyKind.FATAL and reply.status is not None and 400 <= reply.status < 500:
            self.stops.stop(StopReason.batch_refused(reply.error))
        else:
            self.stops.stop(StopReason.batch_submit(reply.error))

    # -- collecting ---------------------------------------------------------------------

    async def _collect_finished(self, session: aiohttp.ClientSession) -> None:
        for known in self.store.pending():
            if self.stopper.stopped:
                return
            try:
                state = await self.adapter.poll(session, known.id)
            except BatchApiError as exc:
                self._poll_failed(known, exc.reply)
                continue
            self._poll_failures.pop(known.id, None)
            if state.provider_status != known.status:
                self.store.set_status(known.id, state.provider_status)
            if state.status.terminal:
                await self._collect(session, known, state)
            elif state.status == BatchStatus.UNKNOWN:
                self.stops.stop(StopReason.batch_unknown_status(known.id, state.provider_status))
            elif state.expires_at is not None and time.time() > state.expires_at + EXPIRY_GRACE_S:
                self.stops.stop(StopReason.batch_overdue(known.id, state.provider_status, state.expires_at))

    def _poll_failed(self, known: KnownBatch, reply: Reply) -> None:
        failures = self._poll_failures.get(known.id, 0) + 1
        self._poll_failures[known.id] = failures
        if reply.kind == ReplyKind.AUTH:
            self.stops.stop(StopReason.refused(reply, self.plan.job.model.max_tokens))
        elif failures >= self.job.limits.max_attempts:
            self.stops.stop(StopReason.batch_read(known.id, failures, reply.error))

    async def _collect(self, session: aiohttp.ClientSession, known: KnownBatch, state: BatchState) -> None:
        """Journal a terminal batch's results, page by page; then settle its unanswered rows."""
        rows = self.store.rows_of(known.id)
        attempts = self.store.submissions(list({r.key for r in rows.values()}))
        try:
            async for page in self.adapter.results(session, state, known.cursor):
                tokens = await self._prompt_tokens(page.results, rows)
                self._journal_page(known, rows, attempts, page.results, page.next_cursor, tokens)
        except BatchApiError as exc:
            self._poll_failed(known, exc.reply)
            return  # the next poll reads on from the saved cursor
        except sqlite3.Error as exc:
            self.stops.stop(StopReason.journal_write(self.journal.path, exc))
            return
        reason = f"not answered: batch {known.id} ended {state.provider_status}"
        if state.error:
            reason += f" ({state.error})"
        reason += "; it is submitted again"
        now = time.time()
        unanswered = [
            JournalRow(
                r.key, r.prompt_hash, RowStatus.TRANSIENT, attempts=attempts.get(r.key, 1), error=reason, updated=now
            )
            for r in rows.values()
            if not r.collected
        ]
        self.store.finish(known.id, state.provider_status, state.error, unanswered)
        self.budget.settle(known.worst_usd, 0.0)
        if self._budget_blocked:
            self._budget_blocked, self._scan = False, True
        for row in unanswered:
            self._transient(row.key, reason)

    def _journal_page(
        self,
        known: KnownBatch,
        rows: dict[str, BatchRow],
        attempts: dict[str, int],
        results: list[BatchResult],
        cursor: str | None,
        tokens: dict[str, int] | None = None,
    ) -> None:
        """Settle one page of results: one commit with the batch tables, then the counters and stops."""
        settlement = self.settlement
        settled: list[tuple[Ticket, Settled]] = []
        custom_ids: list[str] = []
        now = time.time()
        for result, billed in best_results(results):
            ref = rows.get(result.custom_id)
            if ref is None or ref.collected:
                continue  # not ours, or journaled before (a rerun reading the page again)
            ref.collected = True
            reply = result.reply
            if gone := model_gone_in_batch(reply):  # not the row's fault: it is left for a rerun
                reply = replace(reply, kind=ReplyKind.RETRY)
                self.stops.stop(gone)
            ticket = Ticket(ref.key, ref.prompt_hash, (tokens or {}).get(ref.key, 0))
            attempted = Attempted(reply, attempts.get(ref.key, 1), max(0.0, now - known.submitted), billed)
            one = settlement.settle(ticket, attempted)
            one.requests = 0  # the batch's requests were counted when it was submitted
            settled.append((ticket, one))
            custom_ids.append(result.custom_id)
        cost = sum(one.charge.usd for _, one in settled)
        self.store.record_results(known.id, [one.row for _, one in settled], custom_ids, cost, cursor)
        for ticket, one in settled:
            settlement.account(one)
            transient = one.row.status == RowStatus.TRANSIENT
            if transient:
                self._transient(ticket.key, one.row.error or "transient error")
            else:
                self.collected.add(ticket.key)
            settlement.close(ticket, one, done=not transient)

    async def _prompt_tokens(self, results: list[BatchResult], rows: dict[str, BatchRow]) -> dict[str, int]:
        """Prompt tokens of answers that came without usage, counted again from the input (off the loop)."""
        new = [r for r in results if r.custom_id in rows and not rows[r.custom_id].collected]
        keys = {rows[r.custom_id].key for r in new if r.reply.kind == ReplyKind.OK and r.reply.prompt_tokens is None}
        if not keys:
            return {}
        try:
            return await asyncio.to_thread(count_keys, self.plan, keys)
        except InputError:
            return {}  # the input changed since: the completion is still charged

    def _transient(self, key: str, error: str) -> None:
        """A row to submit again (by this run while it has attempts left, else by the next run)."""
        self.transient[key] = error
        self._scan = True


async def run_batch(plan: Plan, journal: Journal, options: RunOptions, controls: Controls) -> RunResult:
    """Batch mode inside :func:`pipeline.engine.run.run_plan` (which holds the lock and the open journal)."""
    if options.sample:
        raise UserError('a sample sends rows in realtime: run it without [model] mode = "batch"')
    run = BatchRun(plan, journal, options, controls)
    session = run.session
    await run.execute()
    pending = run.store.pending()
    if pending and not session.stops.stopped:
        session.stops.stop(StopReason.batches_pending(len(pending), sum(b.rows for b in pending)))
    rows_out, errors, table = 0, 0, None
    if options.write_output:
        rows_out, errors, table = session.write_output(session.output_batches(current=False))
    return session.result(
        rows_out,
        errors,
        table,
        mode="batch",
        batches_submitted=run.batches_submitted,
        batches_pending=len(pending),
        rows_pending=sum(b.rows for b in pending),
        canary=run.canary.verdict,
    )
