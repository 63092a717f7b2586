"""The runner: rows flow from the plan through the limiter and client into the journal.

One producer renders input batches and queues the rows that still need a
request; ``concurrency`` workers send them. Everything runs inside one
``asyncio.TaskGroup`` so an error or a stop shuts it all down cleanly. On a
stop (a front end's request, a rejected key, the budget, a job-level failure)
no new request starts; requests in flight get ``stop_grace_s`` to finish and
be journaled, then are cancelled. The runner installs no signal handlers and
prints nothing: front ends steer it through :class:`Controls`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import pyarrow as pa

from pipeline.engine.budget import Budget
from pipeline.engine.client import Attempted, ChatClient, request_headers
from pipeline.engine.limits.adaptive import make_limiter, read_stated_limit
from pipeline.engine.limits.limiter import RateLimiter
from pipeline.engine.plan import Plan
from pipeline.engine.progress import Tracker
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.recorder import Recorder
from pipeline.engine.selection import BLANK_ERROR, RowSelector, pick_sample
from pipeline.engine.session import Controls, OutputBatches, RunOptions, RunResult, build_result, write_plan_output
from pipeline.engine.workqueue import WorkQueue
from pipeline.errors import ExitCode, InputError
from pipeline.providers.base import ReplyKind
from pipeline.store.journal import Journal, JournalRow, RowStatus

# Connecting should take well under this; a server that cannot be reached is
# then found in seconds, not after the whole request timeout.
CONNECT_TIMEOUT_S = 10.0


@dataclass(slots=True)
class Item:
    key: str
    prompt_hash: str
    body: bytes
    tokens: int  # prompt tokens when counted (limits, budget), else 0


class Run:
    """One execution of a plan against a server."""

    engine = "default"  # the summary names the engine that sent the requests
    workers: int | None = None

    def __init__(self, plan: Plan, journal: Journal, options: RunOptions, controls: Controls | None = None) -> None:
        self.plan = plan
        self.journal = journal
        self.options = options
        self.job = plan.job
        self.controls = controls or Controls()
        self.stopper = self.controls.stopper
        total = len(options.rows) if options.rows is not None else options.sample or plan.total_rows
        self.tracker = Tracker(total, quiet=options.quiet, desc=plan.job.name, notebook=options.notebook)
        self.budget = Budget(self.job.limits.budget_usd, journal.job_spent())
        self.need_tokens = bool(self.job.limits.tokens_per_minute or self.job.limits.budget_usd)
        self.queue: WorkQueue[Item] = WorkQueue(low_water=2 * self.job.limits.concurrency)
        # A new journal has nothing to look up: skip one query per batch.
        self.selector = RowSelector(
            journal.seen if journal.has_rows() else None,
            retry_failed=options.retry_failed,
            sample=pick_sample(options.sample, plan.total_rows, options.seed)
            if options.rows is None
            else set(options.rows),
        )
        self.dialect = plan.dialect()
        self.recorder = Recorder(plan.info, plan.structured, lambda: plan.counter, max_tokens=plan.job.model.max_tokens)
        self.produced_all = False
        self.input_error: str | None = None  # a bad record found while reading the input
        self.successes = 0  # replies that came back OK: the job as a whole works
        self.exit_code = ExitCode.STOPPED  # the code of a stop, when one happens
        self.limiter: RateLimiter | None = None

    def stop(self, reason: str, code: ExitCode = ExitCode.STOPPED) -> None:
        if not self.stopper.stopped:
            self.exit_code = code
        self.stopper.stop(reason)

    async def execute(self, base_url: str | None = None) -> None:
        limits = self.job.limits
        self.dialect = self.plan.dialect(base_url)
        limiter = self.limiter = make_limiter(limits, self.job.model.max_tokens, self.plan.provider)
        self.tracker.learned = limiter.learned
        headers = request_headers(self.plan.api_key, self.job.model.headers)
        connector = aiohttp.TCPConnector(limit=limits.concurrency + 4)
        timeout = aiohttp.ClientTimeout(total=limits.timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, limits.timeout_s))
        async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
            client = ChatClient(session, self.dialect, limiter, self.stopper, limits.max_attempts, limits.timeout_s)
            client.on_pause = self.tracker.paused
            await self._run_tasks(client)
        if self.input_error is not None:
            self.stop(self.input_error, ExitCode.USAGE)
        self.tracker.close()

    async def _run_tasks(self, client: ChatClient) -> None:
        async with asyncio.TaskGroup() as tg:
            producer = tg.create_task(self._produce())
            stated = read_stated_limit(client.limiter, client.session, self.job.model.base_url, self.plan.provider)
            key = tg.create_task(stated)
            workers = [tg.create_task(self._work(client)) for _ in range(self.job.limits.concurrency)]
            guard = tg.create_task(self._guard(workers))
            await asyncio.wait(workers)
            producer.cancel()
            guard.cancel()
            key.cancel()

    async def _guard(self, workers: list[asyncio.Task[None]]) -> None:
        """On a stop: unblock idle workers, then give busy ones the grace period."""
        await self.stopper.event.wait()
        self.queue.close(drop_pending=True)  # idle workers return at once
        grace = asyncio.create_task(asyncio.sleep(self.job.limits.stop_grace_s))
        hurry = asyncio.create_task(self.controls.hurry_event.wait())
        waiting = asyncio.create_task(asyncio.wait(workers))
        await asyncio.wait([grace, hurry, waiting], return_when=asyncio.FIRST_COMPLETED)
        for task in (grace, hurry, waiting):
            task.cancel()
        for worker in workers:
            worker.cancel()  # a no-op for workers that already finished

    async def _produce(self) -> None:
        offset = 0
        step = max(64, self.job.limits.concurrency)
        try:
            for batch, keys, rendered in self.plan.batches():
                items = await self._batch_items(keys, rendered, offset)
                offset += batch.num_rows
                for start in range(0, len(items), step):
                    if self.stopper.stopped:
                        return
                    await self.queue.put_many(items[start : start + step])
                if self.stopper.stopped:
                    return
        except InputError as exc:
            # A bad record deep in the input: the rows before it are sent as usual,
            # then the run stops (exit 2) and a rerun on the fixed file pays nothing twice.
            self.input_error = f"{exc}; fix the input and rerun (rows done are not paid again)"
            self.queue.close()
            return
        self.produced_all = True
        self.queue.close()

    async def _batch_items(self, keys: list[str], rendered: RenderedBatch, offset: int) -> list[Item]:
        """Decide, row by row, what still needs a request; journal skipped rows."""
        selection = self.selector.select(keys, rendered, offset)
        self.tracker.resumed(selection.done)
        hashes, todo = selection.hashes, selection.todo
        if selection.blank:
            self._journal_skipped([(keys[i], hashes[i]) for i in selection.blank], BLANK_ERROR)
        tokens = await self._count_tokens(rendered, todo)
        todo, tokens = self._skip_too_long(keys, hashes, todo, tokens)
        return [Item(keys[i], hashes[i], self.dialect_body(rendered, i), t) for i, t in zip(todo, tokens, strict=True)]

    def dialect_body(self, rendered: RenderedBatch, i: int) -> bytes:
        return self.dialect.chat_body(rendered.system(i), rendered.users[i])

    async def _count_tokens(self, rendered: RenderedBatch, todo: list[int]) -> list[int]:
        """Prompt tokens, counted only where a limit needs them (off the event loop)."""
        need = todo if self.need_tokens else [i for i in todo if not self.plan.fits_without_counting(rendered, i)]
        if not need:
            return [0] * len(todo)
        systems = [rendered.systems[i] for i in need] if rendered.systems is not None else [None] * len(need)
        users = [rendered.users[i] for i in need]
        counted = dict(zip(need, await asyncio.to_thread(self.plan.counter.count_chat, systems, users), strict=True))
        return [counted.get(i, 0) for i in todo]

    def _skip_too_long(
        self, keys: list[str], hashes: list[str], todo: list[int], tokens: list[int]
    ) -> tuple[list[int], list[int]]:
        limit = self.plan.context_length
        max_tokens = self.job.model.max_tokens
        if limit is None:
            return todo, tokens
        keep, kept_tokens = [], []
        for i, t in zip(todo, tokens, strict=True):
            if t and t + max_tokens > limit:
                error = (
                    f"skipped: prompt of {t} tokens + max_tokens {max_tokens} exceeds the model's "
                    f"context window of {limit} tokens; nothing was sent"
                )
                self._journal_skipped([(keys[i], hashes[i])], error)
            else:
                keep.append(i)
                kept_tokens.append(t)
        return keep, kept_tokens

    def _journal_skipped(self, rows: list[tuple[str, str]], error: str) -> None:
        now = time.time()
        self.journal.write_now([JournalRow(key, h, RowStatus.SKIPPED, error=error, updated=now) for key, h in rows])
        self.tracker.skipped(len(rows))

    async def _work(self, client: ChatClient) -> None:
        while True:
            item = await self.queue.get()
            if item is None or self.stopper.stopped:
                return
            await self._process(client, item)

    async def _process(self, client: ChatClient, item: Item) -> None:
        worst = (self.plan.worst_cost(item.tokens) or 0.0) if self.budget.limit is not None else 0.0
        if not self.budget.reserve(worst):
            self.stopper.stop(
                f"budget reached: ${self.budget.spent:.4f} spent of budget_usd ${self.budget.limit:g}; "
                "raise [limits] budget_usd and rerun to continue"
            )
            return
        tries, prior_cost, prior_attempts = 0, 0.0, 0
        while True:
            attempted = await client.complete(item.body, item.tokens)
            if attempted is None or self._job_level_failure(attempted):
                # Not journaled: a plain rerun sends the row again.
                self.budget.settle(worst, attempted.cost if attempted else 0.0)
                return
            charge = self.recorder.charge(attempted.reply, attempted.cost, item.tokens, item.body)
            row = self.recorder.record(
                item.key,
                item.prompt_hash,
                attempted.reply,
                attempts=attempted.attempts,
                latency_s=attempted.latency_s,
                charge=charge,
                prior_cost=prior_cost,
                prior_attempts=prior_attempts,
                tries=tries,
            )
            # The commit is shared by every row of this loop turn. Cancelling
            # workers (end of a grace period) cancels it for all of them, which is
            # fine: all are being cancelled, and the rows are committed regardless.
            try:
                await self.journal.write(row, charge.usd)
            except sqlite3.Error as exc:
                self.stop(f"cannot write the journal {self.journal.path} ({exc}); free space or fix it and rerun")
                return
            self.budget.settle(0.0, charge.usd)
            # Every attempt shows in the bar and the summary, retries of invalid replies included.
            self.tracker.requests(attempted.attempts, charge.usd, row.prompt_tokens, row.completion_tokens)
            if charge.estimated:
                self.tracker.counters.cost_estimated = True
            if not self._retry_invalid(row.status, tries):
                break
            # Ask again for a reply that fits the schema; the row keeps the total cost.
            tries, prior_cost, prior_attempts = tries + 1, prior_cost + charge.usd, prior_attempts + attempted.attempts
        self.budget.settle(worst, 0.0)
        self.tracker.row_done(row.status, row.error)
        if attempted.reply.kind == ReplyKind.AUTH:
            self.stopper.stop(
                f"the provider refused the key ({attempted.reply.error}); fix the key or credits and rerun"
            )

    def _job_level_failure(self, attempted: Attempted) -> bool:
        """Stop early when the job as a whole cannot work, instead of failing every row.

        Only before the first success: an unreachable server (every attempt of a
        row a connection error) or a model-level refusal (404 no endpoints, 403
        region or model access) would fail every row the same way.
        """
        reply = attempted.reply
        if reply.kind == ReplyKind.OK:
            self.successes += 1
            return False
        if self.successes:
            return False
        if reply.kind == ReplyKind.RETRY and reply.status is None and (reply.error or "").startswith("connection"):
            self.stop(
                f"cannot reach the server at {self.dialect.url}: {reply.error} "
                f"({attempted.attempts} attempts); check [model] base_url and the network, then rerun"
            )
            return True
        if reply.kind == ReplyKind.FATAL and reply.status in (403, 404):
            self.stop(
                f"the provider refused the job: {reply.error}; check [model] name and the provider's "
                "model access or routing settings, then rerun"
            )
            return True
        return False

    def _retry_invalid(self, status: RowStatus, tries: int) -> bool:
        if status != RowStatus.INVALID or tries >= self.job.prompt.retry_invalid or self.stopper.stopped:
            return False
        # This row's reservation is still held, so it covers the new attempt.
        return self.budget.within_limit()

    def output_batches(self) -> OutputBatches:
        """Input batches with keys (and prompt hashes where the journal may be stale), up to a bad record."""
        batches: OutputBatches
        if self.produced_all and not self.stopper.stopped:
            # Every row was looked at in this run and journaled under its current
            # prompt, so the journal is current: no need to render prompts again.
            batches = ((batch, keys, None) for batch, keys in self.plan.keyed_batches())
        else:
            # Stopped early: a row whose prompt changed may still hold an old answer.
            batches = (
                (batch, keys, [rendered.prompt_hash(i) for i in range(batch.num_rows)])
                for batch, keys, rendered in self.plan.batches()
            )
        try:
            yield from batches
        except InputError:
            if self.stopper.stopped:
                return  # the run stopped on this record: write what came before it
            raise


async def run_realtime(
    plan: Plan,
    journal: Journal,
    options: RunOptions,
    controls: Controls | None = None,
    new_run: Callable[[Plan, Journal, RunOptions, Controls | None], Run] = Run,
) -> RunResult:
    """Send what is not done, write the output (inside :func:`pipeline.engine.run.run_plan`'s session).

    ``new_run`` makes the run that sends the requests (the Ray driver passes its own).
    """
    run = new_run(plan, journal, options, controls)
    async with plan.provider.server(plan.job.model) as base_url:
        await run.execute(base_url)
    rows, errors, table = 0, 0, None
    if options.write_output and not options.sample:
        rows, errors, table = write_plan_output(plan, journal, run.output_batches(), run.stop)
    return _result(run, rows, errors, table)


def _result(run: Run, rows: int, rows_with_error: int, table: pa.Table | None = None) -> RunResult:
    learned = run.limiter.learned() if run.limiter is not None else None
    return build_result(
        run.plan,
        run.tracker,
        run.stopper,
        run.exit_code,
        run.budget.spent,
        rows,
        rows_with_error,
        table,
        learned_requests_per_minute=_round(learned.requests_per_minute if learned else None),
        learned_rate_source=learned.source if learned else None,
        learned_tokens_per_minute=learned.tokens_per_minute if learned else None,
        engine=run.engine,
        workers=run.workers,
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
