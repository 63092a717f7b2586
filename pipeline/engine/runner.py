"""The runner: rows flow from the plan through the limiter and client into the journal.

One producer renders input batches and queues the rows that still need a
request; ``concurrency`` workers send them. Everything runs inside one
``asyncio.TaskGroup`` so an error or a signal shuts it all down cleanly. On a
stop (signal, rejected key, budget) no new request starts; requests in flight
get ``stop_grace_s`` to finish and be journaled, then are cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pyarrow as pa

from pipeline.engine.client import ChatClient, Stopper, request_headers
from pipeline.engine.limiter import RateLimiter
from pipeline.engine.plan import Plan
from pipeline.engine.progress import Tracker
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.recorder import Recorder
from pipeline.engine.reports import RunSummary
from pipeline.engine.workqueue import WorkQueue
from pipeline.errors import ExitCode
from pipeline.io.output import output_schema, write_output
from pipeline.providers.base import ReplyKind
from pipeline.store.journal import Journal, JournalRow, RowStatus, RunLock, Seen


@dataclass(slots=True)
class Item:
    key: str
    prompt_hash: str
    body: bytes
    tokens: int  # prompt tokens when counted (limits, budget), else 0


@dataclass
class RunOptions:
    quiet: bool = False
    fresh: bool = False
    retry_failed: bool = False
    sample: int | None = None
    seed: int = 0
    write_output: bool = True


@dataclass
class RunResult:
    exit_code: ExitCode
    summary: RunSummary
    spent_usd: float = 0.0


class Budget:
    """Reserves each request's worst case so a run never passes ``budget_usd``."""

    def __init__(self, limit: float | None, spent: float) -> None:
        self.limit = limit
        self.spent = spent
        self.reserved = 0.0

    def reserve(self, worst: float) -> bool:
        if self.limit is None:
            return True
        if self.spent + self.reserved + worst > self.limit:
            return False
        self.reserved += worst
        return True

    def within_limit(self) -> bool:
        return self.limit is None or self.spent + self.reserved <= self.limit

    def settle(self, worst: float, actual: float) -> None:
        if self.limit is not None:
            self.reserved -= worst
        self.spent += actual


class Run:
    """One execution of a plan against a server."""

    def __init__(self, plan: Plan, journal: Journal, options: RunOptions) -> None:
        self.plan = plan
        self.journal = journal
        self.options = options
        self.job = plan.job
        self.stopper = Stopper()
        self.tracker = Tracker(options.sample or plan.total_rows, quiet=options.quiet, desc=plan.job.name)
        self.budget = Budget(self.job.limits.budget_usd, journal.job_spent())
        self.need_tokens = bool(self.job.limits.tokens_per_minute or self.job.limits.budget_usd)
        self.queue: WorkQueue[Item] = WorkQueue(low_water=2 * self.job.limits.concurrency)
        self.sample_rows = self._pick_sample()
        self.dialect = plan.dialect()
        self.recorder = Recorder(plan.info, plan.structured, lambda: plan.counter)
        self._hurry = asyncio.Event()
        self.produced_all = False
        # A new journal has nothing to look up: skip one query per batch.
        self.journal_had_rows = journal.has_rows()

    def _pick_sample(self) -> set[int] | None:
        if not self.options.sample:
            return None
        size = min(self.options.sample, self.plan.total_rows)
        return set(random.Random(self.options.seed).sample(range(self.plan.total_rows), size))

    async def execute(self, base_url: str | None = None) -> None:
        limits = self.job.limits
        self.dialect = self.plan.dialect(base_url)
        limiter = RateLimiter(limits.requests_per_minute, limits.tokens_per_minute, self.job.model.max_tokens)
        headers = request_headers(self.plan.api_key, self.job.model.headers)
        connector = aiohttp.TCPConnector(limit=limits.concurrency + 4)
        timeout = aiohttp.ClientTimeout(total=limits.timeout_s)
        async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
            client = ChatClient(session, self.dialect, limiter, self.stopper, limits.max_attempts, limits.timeout_s)
            with self._signals():
                await self._run_tasks(client)
        self.tracker.close()

    async def _run_tasks(self, client: ChatClient) -> None:
        async with asyncio.TaskGroup() as tg:
            producer = tg.create_task(self._produce())
            workers = [tg.create_task(self._work(client)) for _ in range(self.job.limits.concurrency)]
            guard = tg.create_task(self._guard(workers))
            await asyncio.wait(workers)
            producer.cancel()
            guard.cancel()

    @contextlib.contextmanager
    def _signals(self) -> Any:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopper.stopped:
            self._hurry.set()  # a second Ctrl-C: do not wait for the grace period
        self.stopper.stop(f"interrupted by {sig.name}")

    async def _guard(self, workers: list[asyncio.Task[None]]) -> None:
        """On a stop: unblock idle workers, then give busy ones the grace period."""
        await self.stopper.event.wait()
        self.queue.close(drop_pending=True)  # idle workers return at once
        grace = asyncio.create_task(asyncio.sleep(self.job.limits.stop_grace_s))
        hurry = asyncio.create_task(self._hurry.wait())
        waiting = asyncio.create_task(asyncio.wait(workers))
        await asyncio.wait([grace, hurry, waiting], return_when=asyncio.FIRST_COMPLETED)
        for task in (grace, hurry, waiting):
            task.cancel()
        for worker in workers:
            worker.cancel()  # a no-op for workers that already finished

    async def _produce(self) -> None:
        offset = 0
        step = max(64, self.job.limits.concurrency)
        for batch, keys, rendered in self.plan.batches():
            items = await self._batch_items(keys, rendered, offset)
            offset += batch.num_rows
            for start in range(0, len(items), step):
                if self.stopper.stopped:
                    return
                await self.queue.put_many(items[start : start + step])
            if self.stopper.stopped:
                return
        self.produced_all = True
        self.queue.close()

    async def _batch_items(self, keys: list[str], rendered: RenderedBatch, offset: int) -> list[Item]:
        """Decide, row by row, what still needs a request; journal skipped rows."""
        seen = self.journal.seen(keys) if self.journal_had_rows else {}
        todo: list[int] = []
        hashes: list[str] = []
        resumed = 0
        for i, key in enumerate(keys):
            if self.sample_rows is not None and offset + i not in self.sample_rows:
                hashes.append("")
                continue
            h = rendered.prompt_hash(i)
            hashes.append(h)
            state = seen.get(key)
            if state is not None and state.prompt_hash == h and self._is_done(state):
                resumed += 1
            else:
                todo.append(i)
        self.tracker.resumed(resumed)
        todo = self._skip_blank(keys, rendered, hashes, todo)
        tokens = await self._count_tokens(rendered, todo)
        todo, tokens = self._skip_too_long(keys, hashes, todo, tokens)
        return [Item(keys[i], hashes[i], self.dialect_body(rendered, i), t) for i, t in zip(todo, tokens, strict=True)]

    def _is_done(self, state: Seen) -> bool:
        if state.status in (RowStatus.OK, RowStatus.SKIPPED):
            return True
        return state.status in (RowStatus.FAILED, RowStatus.INVALID) and not self.options.retry_failed

    def dialect_body(self, rendered: RenderedBatch, i: int) -> bytes:
        return self.dialect.body(rendered.messages(i))

    def _skip_blank(self, keys: list[str], rendered: RenderedBatch, hashes: list[str], todo: list[int]) -> list[int]:
        blank = [i for i in todo if rendered.blank[i]]
        if blank:
            error = "skipped: the rendered user prompt is empty (its columns are null or blank); nothing was sent"
            self._journal_skipped([(keys[i], hashes[i]) for i in blank], error)
        return [i for i in todo if not rendered.blank[i]]

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
            if attempted is None:
                self.budget.settle(worst, 0.0)
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
            await self.journal.write(row, charge.usd)
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

    def _retry_invalid(self, status: RowStatus, tries: int) -> bool:
        if status != RowStatus.INVALID or tries >= self.job.prompt.retry_invalid or self.stopper.stopped:
            return False
        # This row's reservation is still held, so it covers the new attempt.
        return self.budget.within_limit()

    def write_output(self) -> tuple[int, int]:
        schema = output_schema(self.plan.source.schema, self.plan.structured)
        batches: Iterator[tuple[pa.RecordBatch, list[str], list[str] | None]]
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
        return write_output(self.job.output.path, schema, batches, self.journal, self.plan.structured)


@contextlib.asynccontextmanager
async def server_for(plan: Plan) -> AsyncIterator[str | None]:
    """A local llama.cpp server for ``provider = "local"``, else the job's base_url."""
    if not plan.local:
        yield None
        return
    from pipeline.providers.local import local_server

    async with local_server(plan.job.model.path, n_ctx=plan.job.model.n_ctx) as base_url:
        yield base_url


async def run_plan(plan: Plan, options: RunOptions) -> RunResult:
    """Lock, open the journal, send what is not done, write the output."""
    lock = RunLock(plan.job.output.journal_path)
    lock.acquire()
    try:
        journal = Journal.open(plan.job.output.journal_path, plan.identity(), fresh=options.fresh)
        try:
            journal.set_meta("total_rows", str(plan.total_rows))
            run = Run(plan, journal, options)
            async with server_for(plan) as base_url:
                await run.execute(base_url)
            rows, errors = run.write_output() if options.write_output and not options.sample else (0, 0)
            return _result(run, rows, errors)
        finally:
            journal.close()
    finally:
        lock.release()


def _result(run: Run, rows: int, rows_with_error: int) -> RunResult:
    """Exit code: 3 stopped early; 1 some output row carries an error; else 0."""
    c = run.tracker.counters
    if run.stopper.stopped:
        code = ExitCode.STOPPED
    elif rows_with_error or c.failed or c.invalid:
        code = ExitCode.ROWS_FAILED
    else:
        code = ExitCode.OK
    plan = run.plan
    estimated = plan.info.cost(c.prompt_tokens, c.completion_tokens)
    elapsed = run.tracker.elapsed_s
    summary = RunSummary(
        job=plan.job.name,
        model=plan.model_name,
        exit_code=code,
        stop_reason=run.stopper.reason,
        rows_ok=c.ok,
        rows_failed=c.failed,
        rows_invalid=c.invalid,
        rows_skipped=c.skipped,
        rows_resumed=c.resumed,
        requests=c.requests,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        cost_usd=round(c.cost_usd, 8),
        cost_usd_estimated=None if estimated is None else round(estimated, 8),
        cost_estimated=c.cost_estimated,
        job_spent_usd=round(run.budget.spent, 8),
        price_source=plan.info.source,
        wall_s=round(elapsed, 2),
        requests_per_minute=round(c.requests / elapsed * 60, 1) if elapsed > 0 else 0.0,
        errors=dict(c.errors),
        output=str(plan.job.output.path) if rows else None,
        output_rows=rows,
        output_rows_with_error=rows_with_error,
    )
    return RunResult(code, summary, run.budget.spent)
