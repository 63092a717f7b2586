"""Batch mode: rows go through the provider's batch API, into the same journal and output.

A run selects rows exactly as realtime mode does (``RowSelector``), leaves out
rows already waiting in a provider batch, and submits the rest in batches of at
most the provider's request and byte limits, reserving each batch's worst case
against ``budget_usd`` first. Each batch id and its rows are committed to the
journal in the transaction that marks those rows ``not_run: pending in batch
...``: from then on a rerun, after any crash, polls the batch instead of
submitting its rows again. (A kill between the provider accepting a batch and
that commit loses the id: that one batch's rows are submitted again.)

The run then polls its pending batches every ``batch_poll_s`` seconds and
journals each terminal batch's results page by page, each page in one
transaction that also marks its rows collected, so a rerun that reads a page
again skips what it already has. Rows a batch never answered (it expired,
failed or was cancelled) are journaled as transient errors and submitted again
in a new batch; so are results that carry a transient error. With
``wait=False`` (``--no-wait``) the run submits, collects what has finished,
writes the output and ends with exit code 3 while batches are pending.

No chat request is ever sent in this mode, and rate caps do not apply: batches
do not count against the providers' rate limits.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import pyarrow as pa

from pipeline.engine.canary import CanaryGate, CanarySettings, CanaryStatus, CanaryVerdict, judge_settled
from pipeline.engine.client import backoff_delay, request_headers
from pipeline.engine.progress import Tracker
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.recorder import Recorder
from pipeline.engine.selection import BLANK_ERROR, RowSelector
from pipeline.errors import ExitCode, InputError, JobError, UserError
from pipeline.providers.base import Reply, ReplyKind
from pipeline.providers.batch_base import (
    BatchAdapter,
    BatchApiError,
    BatchRequest,
    BatchResult,
    BatchState,
    custom_id_for,
)
from pipeline.secrets import Redactor
from pipeline.store.journal import Journal, JournalRow, RowStatus

if TYPE_CHECKING:
    from pipeline.engine.plan import Plan
    from pipeline.engine.runner import Controls, RunOptions, RunResult

CONNECT_TIMEOUT_S = 10.0
# Journal meta key: the batch holding the canary, from its submission until it is judged.
CANARY_BATCH = "canary_batch"
READ_TIMEOUT_S = 120.0  # a provider may take a while to accept a 200 MB batch
ENVELOPE_BYTES = 4096  # room for the submission's own fields around the requests


def make_adapter(plan: Plan) -> BatchAdapter:
    """The batch API of the job's provider; a JobError for a provider without one."""
    from pipeline.providers import provider_for

    spec = plan.job.model
    name = provider_for(spec).name
    if name == "openrouter":
        from pipeline.providers.batch_openrouter import OpenRouterBatches

        return OpenRouterBatches(spec.batch_url or f"{spec.base_url}/batches", plan.model_name)
    if name == "mistral":
        from pipeline.providers.batch_mistral import MistralBatches

        return MistralBatches(spec.base_url, spec.batch_url, plan.model_name)
    if name == "openai":
        from pipeline.providers.batch_openai import OpenAIBatches

        return OpenAIBatches(spec.base_url, spec.batch_url)
    raise JobError(
        f'[model] mode = "batch" needs a provider with a batch API (openrouter, openai or mistral), not {name}'
    )


# ----------------------------------------------------------------------------- the journal's batch tables


@dataclass(frozen=True, slots=True)
class KnownBatch:
    """A batch the journal knows was accepted by the provider and is not fully collected."""

    id: str
    provider: str
    status: str
    rows: int
    worst_usd: float
    submitted: float
    cursor: str | None


@dataclass(slots=True)
class BatchRow:
    """A row in a batch, as journaled at submission."""

    key: str
    prompt_hash: str
    collected: bool


@dataclass(slots=True)
class Queued:
    """A row waiting for the batch being assembled."""

    key: str
    prompt_hash: str
    request: BatchRequest
    tokens: int  # prompt tokens when counted (budget), else 0


class BatchStore:
    """The ``batches`` and ``batch_rows`` tables; every write shares a transaction with result rows."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.conn = journal.conn

    def has_tables(self) -> bool:
        """False for a journal written before batch mode and opened read-only (``pipeline status``)."""
        found = self.conn.execute("SELECT name FROM sqlite_master WHERE name = 'batches'").fetchone()
        return found is not None

    def pending(self) -> list[KnownBatch]:
        rows = self.conn.execute(
            "SELECT id, provider, status, rows, worst_usd, submitted, cursor FROM batches "
            "WHERE collected = 0 ORDER BY submitted"
        )
        return [KnownBatch(*row) for row in rows]

    def pending_keys(self, keys: list[str]) -> set[str]:
        """The keys among ``keys`` that sit in a batch not yet collected."""
        rows = self.conn.execute(
            "SELECT r.key FROM batch_rows r JOIN batches b ON b.id = r.batch_id "
            "WHERE b.collected = 0 AND r.key IN (SELECT value FROM json_each(?))",
            (_json_list(keys),),
        )
        return {row[0] for row in rows}

    def submissions(self, keys: list[str]) -> dict[str, int]:
        """How many batches each row has been submitted in, across runs (its ``attempts``)."""
        rows = self.conn.execute(
            "SELECT key, COUNT(*) FROM batch_rows WHERE key IN (SELECT value FROM json_each(?)) GROUP BY key",
            (_json_list(keys),),
        )
        return dict(rows.fetchall())

    def rows_of(self, batch_id: str) -> dict[str, BatchRow]:
        rows = self.conn.execute(
            "SELECT custom_id, key, prompt_hash, collected FROM batch_rows WHERE batch_id = ?", (batch_id,)
        )
        return {cid: BatchRow(key, h, bool(done)) for cid, key, h, done in rows}

    def record_submission(
        self,
        batch_id: str,
        provider: str,
        chunk: list[Queued],
        worst: float,
        markers: list[JournalRow],
        canary: bool = False,
    ) -> None:
        """The commit that makes a batch known: its id, its rows, their pending markers (and that it is the canary)."""
        now = time.time()

        def also(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO batches (id, provider, status, collected, rows, worst_usd, submitted, updated) "
                "VALUES (?, ?, 'submitted', 0, ?, ?, ?, ?)",
                (batch_id, provider, len(chunk), worst, now, now),
            )
            conn.executemany(
                "INSERT INTO batch_rows (batch_id, custom_id, key, prompt_hash) VALUES (?, ?, ?, ?)",
                [(batch_id, q.request.custom_id, q.key, q.prompt_hash) for q in chunk],
            )
            if canary:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (CANARY_BATCH, batch_id))

        self.journal.write_now(markers, 0.0, also)

    def record_results(
        self, batch_id: str, rows: list[JournalRow], custom_ids: list[str], cost: float, cursor: str | None
    ) -> None:
        """One page of results, its rows marked collected and the page cursor saved, in one transaction."""

        def also(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE batch_rows SET collected = 1 WHERE batch_id = ? AND custom_id = ?",
                [(batch_id, cid) for cid in custom_ids],
            )
            conn.execute("UPDATE batches SET cursor = ?, updated = ? WHERE id = ?", (cursor, time.time(), batch_id))

        self.journal.write_now(rows, cost, also)

    def finish(self, batch_id: str, status: str, error: str | None, unanswered: list[JournalRow]) -> None:
        """A terminal batch fully read: rows it never answered become transient errors."""

        def also(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE batch_rows SET collected = 1 WHERE batch_id = ?", (batch_id,))
            conn.execute(
                "UPDATE batches SET collected = 1, status = ?, error = ?, updated = ? WHERE id = ?",
                (status, error, time.time(), batch_id),
            )

        self.journal.write_now(unanswered, 0.0, also)

    def forget_canary(self) -> None:
        """The canary batch was judged."""
        self.conn.execute("DELETE FROM meta WHERE key = ?", (CANARY_BATCH,))

    def set_status(self, batch_id: str, status: str) -> None:
        self.conn.execute("UPDATE batches SET status = ?, updated = ? WHERE id = ?", (status, time.time(), batch_id))


def _json_list(keys: list[str]) -> str:
    return json.dumps(keys)


def pending_error(batch_id: str, submitted: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(submitted))
    return f"not_run: pending in batch {batch_id} (submitted {when}); rerun the job to collect it"


def refuse_if_batches_pending(journal: Journal) -> None:
    """Realtime mode must not send rows that a provider batch will answer (and bill)."""
    pending = BatchStore(journal).pending()
    if pending:
        rows = sum(b.rows for b in pending)
        raise UserError(
            f"{len(pending)} batches of this job ({rows:,} rows) are pending at the provider: set [model] "
            'mode = "batch" and rerun to collect them (sending their rows in realtime would pay for them twice)'
        )


# ----------------------------------------------------------------------------- the run


class BatchRun:
    """One batch-mode execution of a plan: submit, poll, collect, in a loop."""

    def __init__(self, plan: Plan, journal: Journal, options: RunOptions, controls: Controls) -> None:
        from pipeline.engine.runner import Budget

        self.plan = plan
        self.journal = journal
        self.options = options
        self.job = plan.job
        self.spec = plan.job.model
        self.stopper = controls.stopper
        self.tracker = Tracker(plan.total_rows, quiet=options.quiet, desc=plan.job.name, notebook=options.notebook)
        self.store = BatchStore(journal)
        self.budget = Budget(self.job.limits.budget_usd, journal.job_spent())
        if self.budget.limit is not None:
            # Batches of earlier runs still hold their worst case until collected.
            self.budget.reserved = sum(b.worst_usd for b in self.store.pending())
        self.recorder = Recorder(
            plan.info, plan.structured, lambda: plan.counter, self.spec.batch_discount, plan.job.model.max_tokens
        )
        self.selector = RowSelector(journal.seen, retry_failed=options.retry_failed)
        self.dialect = plan.dialect()
        self.adapter = make_adapter(plan)
        self.exit_code = ExitCode.STOPPED
        self.canary = CanaryGate(
            CanarySettings.from_limits(self.job.limits, options.canary),
            self.spec.max_tokens,
            Redactor(plan.api_key).redact,
        )
        # The canary batch waiting to be judged (submitted by this run or an earlier one).
        self.canary_batch = journal.get_meta(CANARY_BATCH)
        if self.canary_batch is not None:
            self.canary.deciding = False  # that canary decides for this run
        self.canary_verdict: CanaryVerdict | None = None
        self.batches_submitted = 0
        self.sent: dict[str, int] = {}  # batches each row was submitted in by this run
        self.transient: dict[str, str] = {}  # rows whose last result was transient: key -> error
        self.collected: set[str] = set()  # rows this run journaled a final result for
        self._scan = True  # rows may need submitting: read the input (again)
        self._counted_upto = 0  # input rows whose resumed rows the bar has counted
        self._poll_failures: dict[str, int] = {}
        self._budget_blocked = False  # a batch waits for pending batches to release their reservations

    def stop(self, reason: str, code: ExitCode = ExitCode.STOPPED) -> None:
        if not self.stopper.stopped:
            self.exit_code = code
        self.stopper.stop(reason)

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
                if self._scan and not self.stopper.stopped and self.canary_batch is None:
                    self._scan = False
                    await self._submit_new(session)
                pending = self.store.pending()
                self._show(pending)
                if not pending or self.stopper.stopped or not self.options.wait:
                    break
                await self.stopper.sleep(self.spec.batch_poll_s)
        if self.canary_batch is not None and not self.stopper.stopped:
            self.stop(
                f"the canary batch {self.canary_batch} is pending at the provider: rerun to judge its answers "
                "and submit the other rows (they are not submitted before it passes)"
            )
        for error in self.transient.values():
            self.tracker.row_done(RowStatus.TRANSIENT, error)  # not answered, and not submitted again
        self.tracker.close()

    def _show(self, pending: list[KnownBatch]) -> None:
        rows = sum(b.rows for b in pending)
        canary = "canary " if self.canary_batch is not None else ""
        self.tracker.set_note(f"{len(pending)} {canary}batches pending ({rows:,} rows)" if pending else "")

    # -- the canary ---------------------------------------------------------------------

    def _judge_canary(self) -> None:
        """Once the canary batch is collected: judge its rows; the rest is submitted only if it passes."""
        batch_id = self.canary_batch
        if batch_id is None or self.stopper.stopped:
            return
        if any(b.id == batch_id for b in self.store.pending()):
            self.canary_verdict = self._pending_canary()
            return
        keys = list({r.key for r in self.store.rows_of(batch_id).values()})
        rows = list(self.journal.results(keys).values())
        from pipeline.engine.estimate import expected_output_tokens, expected_row_cost

        output_tokens = expected_output_tokens(self.spec.max_tokens, [])
        verdict = judge_settled(
            rows,
            [r.prompt_tokens for r in rows if r.prompt_tokens],
            self.canary.settings,
            self.spec.max_tokens,
            lambda prompt: expected_row_cost(self.plan, prompt, output_tokens),
            self.canary.redact,
        )
        self.canary_verdict = verdict
        self.canary_batch = None
        # Judged: a later run sends its own canary (of rows not answered yet).
        self.store.forget_canary()
        if verdict.failed:
            self.stop(verdict.message or "canary failed")
        else:
            self._scan = True

    def _pending_canary(self) -> CanaryVerdict:
        rows = next((b.rows for b in self.store.pending() if b.id == self.canary_batch), 0)
        return CanaryVerdict(CanaryStatus.PENDING, rows=rows, answered=0, max_tokens=self.spec.max_tokens)

    # -- submitting ---------------------------------------------------------------------

    async def _submit_new(self, session: aiohttp.ClientSession) -> None:
        """Read the input and submit every row that needs a request and is in no pending batch.

        With a canary, the first rows go alone in a small batch and nothing else is
        submitted: the rest follows once that batch is collected and judged.
        """
        chunk: list[Queued] = []
        size = 0
        offset = 0
        held: list[Queued] = []  # rows read before the canary's size is decided
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
                if self.canary.deciding:
                    held += items
                    canary = self.canary.size(len(held), final=False)
                    if canary is None:
                        continue
                    if canary:
                        await self._submit_canary(session, held[:canary])
                        return
                    items, held = held, []
                if not await add(items) or self.stopper.stopped:
                    return
            if held:
                canary = self.canary.size(len(held), final=True)
                if canary:
                    await self._submit_canary(session, held[:canary])
                    return
                if not await add(held):
                    return
            if chunk:
                await self._submit(session, chunk)
        except InputError as exc:
            self.stop(f"{exc}; fix the input and rerun (nothing done is paid again)", ExitCode.USAGE)

    async def _batch_items(self, keys: list[str], rendered: RenderedBatch, offset: int) -> list[Queued]:
        selection = self.selector.select(keys, rendered, offset)
        if offset >= self._counted_upto:
            # Done before this run (counted once per input row, however often the input is
            # read); rows this run collected already count in the bar.
            looked_at = set(selection.todo) | set(selection.blank)
            fresh = sum(1 for i, key in enumerate(keys) if i not in looked_at and key in self.collected)
            self.tracker.resumed(selection.done - fresh)
            self._counted_upto = offset + len(keys)
        hashes = selection.hashes
        if selection.blank:
            self._journal_skipped([(keys[i], hashes[i]) for i in selection.blank], BLANK_ERROR)
        todo = selection.todo
        if not todo:
            return []
        waiting = self.store.pending_keys([keys[i] for i in todo])
        max_attempts = self.job.limits.max_attempts
        todo = [i for i in todo if keys[i] not in waiting and self.sent.get(keys[i], 0) < max_attempts]
        tokens = await self._count_tokens(rendered, todo)
        items = []
        limit = self.plan.context_length
        max_tokens = self.spec.max_tokens
        for i, t in zip(todo, tokens, strict=True):
            if limit is not None and t and t + max_tokens > limit:
                error = (
                    f"skipped: prompt of {t} tokens + max_tokens {max_tokens} exceeds the model's "
                    f"context window of {limit} tokens; nothing was sent"
                )
                self._journal_skipped([(keys[i], hashes[i])], error)
                continue
            request = BatchRequest(
                custom_id_for(keys[i]), self.dialect.chat_body(rendered.system(i), rendered.users[i])
            )
            items.append(Queued(keys[i], hashes[i], request, t))
        return items

    async def _count_tokens(self, rendered: RenderedBatch, todo: list[int]) -> list[int]:
        """Prompt tokens where the budget or the context window needs them (off the event loop)."""
        need_all = self.budget.limit is not None
        need = todo if need_all else [i for i in todo if not self.plan.fits_without_counting(rendered, i)]
        if not need:
            return [0] * len(todo)
        systems = [rendered.systems[i] for i in need] if rendered.systems is not None else [None] * len(need)
        users = [rendered.users[i] for i in need]
        counted = await asyncio.to_thread(self.plan.counter.count_chat, systems, users)
        by_row = dict(zip(need, counted, strict=True))
        return [by_row.get(i, 0) for i in todo]

    def _journal_skipped(self, rows: list[tuple[str, str]], error: str) -> None:
        now = time.time()
        self.journal.write_now([JournalRow(key, h, RowStatus.SKIPPED, error=error, updated=now) for key, h in rows])
        self.tracker.skipped(len(rows))

    async def _submit_canary(self, session: aiohttp.ClientSession, chunk: list[Queued]) -> None:
        if not await self._submit(session, chunk, canary=True) and self.canary_batch is None:
            self.canary.deciding = True  # not submitted (the budget waits for pending batches): decide again

    def _worst(self, chunk: list[Queued]) -> float:
        """The most a batch can cost: every prompt plus a full ``max_tokens`` reply, at the batch price."""
        if self.budget.limit is None:
            return 0.0
        return sum(self.plan.worst_cost(q.tokens) or 0.0 for q in chunk) * self.spec.batch_discount

    async def _submit(self, session: aiohttp.ClientSession, chunk: list[Queued], canary: bool = False) -> bool:
        """Submit one batch and journal it; False when the run must submit no more."""
        worst = self._worst(chunk)
        if not self.budget.reserve(worst):
            if self.store.pending():
                # Pending batches hold their worst case until collected (they usually cost far
                # less): try again once one is collected.
                self._budget_blocked = True
                return False
            self.stop(
                f"budget reached: ${self.budget.spent:.4f} spent and ${self.budget.reserved:.4f} reserved by "
                f"pending batches of budget_usd ${self.budget.limit:g}; raise [limits] budget_usd and rerun"
            )
            return False
        requests = [q.request for q in chunk]
        attempt = 0
        while True:
            attempt += 1
            try:
                batch_id = await self.adapter.submit(session, requests)
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
            self.store.record_submission(batch_id, self.adapter.name, chunk, worst, markers, canary)
        except sqlite3.Error as exc:
            self.stop(f"cannot write the journal {self.journal.path} ({exc}); batch {batch_id} was submitted")
            return False
        for q in chunk:
            self.sent[q.key] = self.sent.get(q.key, 0) + 1
            self.transient.pop(q.key, None)
        self.batches_submitted += 1
        if canary:
            self.canary_batch = batch_id
            self.canary_verdict = CanaryVerdict(
                CanaryStatus.PENDING, rows=len(chunk), answered=0, max_tokens=self.spec.max_tokens
            )
        self.tracker.requests(len(chunk), 0.0, None, None)
        return not self.stopper.stopped  # a stop (Ctrl-C) during the upload: submit nothing more

    def _submission_failed(self, reply: Reply) -> None:
        if reply.kind == ReplyKind.AUTH:
            self.stop(f"the provider refused the key ({reply.error}); fix the key or credits and rerun")
        elif reply.kind == ReplyKind.FATAL and reply.status is not None and 400 <= reply.status < 500:
            self.stop(
                f"the provider refused the batch: {reply.error}; check [model] name, batch_url and params, then rerun"
            )
        else:
            self.stop(f"cannot submit a batch: {reply.error}; rerun to try again (nothing was paid for it)")

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

    def _poll_failed(self, known: KnownBatch, reply: Reply) -> None:
        failures = self._poll_failures.get(known.id, 0) + 1
        self._poll_failures[known.id] = failures
        if reply.kind == ReplyKind.AUTH:
            self.stop(f"the provider refused the key ({reply.error}); fix the key or credits and rerun")
        elif failures >= self.job.limits.max_attempts:
            self.stop(
                f"cannot read batch {known.id} ({failures} tries): {reply.error}; rerun to try again "
                "(the batch stays in the journal: its rows are not submitted again)"
            )

    async def _collect(self, session: aiohttp.ClientSession, known: KnownBatch, state: BatchState) -> None:
        """Journal a terminal batch's results, page by page; then settle its unanswered rows."""
        rows = self.store.rows_of(known.id)
        attempts = self.store.submissions(list({r.key for r in rows.values()}))
        try:
            async for page in self.adapter.results(session, state, known.cursor):
                self._journal_page(known, rows, attempts, page.results, page.next_cursor)
        except BatchApiError as exc:
            self._poll_failed(known, exc.reply)
            return  # the next poll reads on from the saved cursor
        except sqlite3.Error as exc:
            self.stop(f"cannot write the journal {self.journal.path} ({exc}); free space or fix it and rerun")
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
    ) -> None:
        out: list[JournalRow] = []
        custom_ids: list[str] = []
        cost = 0.0
        now = time.time()
        for result in results:
            ref = rows.get(result.custom_id)
            if ref is None or ref.collected:
                continue  # not ours, or journaled before (a rerun reading the page again)
            ref.collected = True
            reply = result.reply
            charge = self.recorder.charge(reply, reply.cost or 0.0, 0)
            row = self.recorder.record(
                ref.key,
                ref.prompt_hash,
                reply,
                attempts=attempts.get(ref.key, 1),
                latency_s=max(0.0, now - known.submitted),
                charge=charge,
            )
            out.append(row)
            custom_ids.append(result.custom_id)
            cost += charge.usd
            self.tracker.requests(0, charge.usd, row.prompt_tokens, row.completion_tokens)
            if charge.estimated:
                self.tracker.counters.cost_estimated = True
            if row.status == RowStatus.TRANSIENT:
                self._transient(ref.key, row.error or "transient error")
            else:
                self.collected.add(ref.key)
                self.tracker.row_done(row.status, row.error)
            if reply.kind == ReplyKind.AUTH:
                self.stop(f"the provider refused the key ({reply.error}); fix the key or credits and rerun")
        self.store.record_results(known.id, out, custom_ids, cost, cursor)
        self.budget.settle(0.0, cost)

    def _transient(self, key: str, error: str) -> None:
        """A row to submit again (by this run while it has attempts left, else by the next run)."""
        self.transient[key] = error
        self._scan = True

    # -- output -------------------------------------------------------------------------

    def output_batches(self) -> Iterator[tuple[pa.RecordBatch, list[str], list[str] | None]]:
        try:
            for batch, keys, rendered in self.plan.batches():
                yield batch, keys, [rendered.prompt_hash(i) for i in range(batch.num_rows)]
        except InputError:
            if self.stopper.stopped:
                return
            raise


async def run_batch(plan: Plan, journal: Journal, options: RunOptions, controls: Controls) -> RunResult:
    """Batch mode inside ``run_plan`` (which holds the lock and the open journal)."""
    if options.sample:
        raise UserError('a sample sends rows in realtime: run it without [model] mode = "batch"')
    run = BatchRun(plan, journal, options, controls)
    await run.execute()
    pending = run.store.pending()
    if pending and not run.stopper.stopped:
        rows = sum(b.rows for b in pending)
        run.stop(f"{len(pending)} batches pending at the provider ({rows:,} rows); rerun to collect them")
    rows_out, errors, table = 0, 0, None
    if options.write_output:
        from pipeline.engine.runner import write_plan_output

        rows_out, errors, table = write_plan_output(plan, journal, run.output_batches(), run.stop)
    return _result(run, pending, rows_out, errors, table)


def _result(
    run: BatchRun, pending: list[KnownBatch], rows: int, rows_with_error: int, table: pa.Table | None
) -> RunResult:
    from pipeline.engine.runner import build_result

    return build_result(
        run.plan,
        run.tracker,
        run.stopper,
        run.exit_code,
        run.budget.spent,
        rows,
        rows_with_error,
        table,
        price_factor=run.spec.batch_discount,
        mode="batch",
        batches_submitted=run.batches_submitted,
        batches_pending=len(pending),
        rows_pending=sum(b.rows for b in pending),
        canary=run.canary_verdict,
    )
