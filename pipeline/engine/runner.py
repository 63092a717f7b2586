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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pyarrow as pa

from pipeline.engine.adaptive import make_limiter, read_stated_limit
from pipeline.engine.batch import refuse_if_batches_pending, run_batch
from pipeline.engine.canary import CanaryGate, CanarySettings
from pipeline.engine.client import Attempted, ChatClient, Stopper, request_headers
from pipeline.engine.estimate import expected_output_tokens, expected_row_cost
from pipeline.engine.limiter import RateLimiter
from pipeline.engine.plan import KeyScheme, Plan
from pipeline.engine.progress import Tracker
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.recorder import Recorder
from pipeline.engine.reports import RunSummary
from pipeline.engine.selection import BLANK_ERROR, RowSelector, pick_sample
from pipeline.engine.workqueue import WorkQueue
from pipeline.errors import ExitCode, InputError
from pipeline.io.output import output_schema, write_output, write_table
from pipeline.providers.base import ReplyKind
from pipeline.secrets import Redactor
from pipeline.store.journal import Journal, JournalRow, RowStatus, RunLock

# Connecting should take well under this; a server that cannot be reached is
# then found in seconds, not after the whole request timeout.
CONNECT_TIMEOUT_S = 10.0


class Controls:
    """How a front end steers a run: ``stop`` (graceful) and ``hurry`` (cancel what is in flight).

    The CLI calls these from its signal handlers; a Python caller may call them
    from the event loop's thread (for example from a task).
    """

    def __init__(self) -> None:
        self.stopper = Stopper()
        self.hurry_event = asyncio.Event()

    def stop(self, reason: str) -> None:
        if self.stopper.stopped:
            self.hurry_event.set()  # asked twice: do not wait for the grace period
        self.stopper.stop(reason)

    def hurry(self) -> None:
        self.hurry_event.set()


# Input batches with their row keys and, where the journal may be stale, prompt hashes.
OutputBatches = Iterator[tuple[pa.RecordBatch, list[str], list[str] | None]]


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
    notebook: bool = False  # a tqdm bar that renders in Jupyter (the Python API)
    # Exactly these row offsets (an evaluation's rows); overrides ``sample``.
    rows: frozenset[int] | None = None
    wait: bool = True  # batch mode: poll until every batch is collected (False: --no-wait)
    canary: bool = True  # send and judge a first slice before the rest (False: --no-canary, pipeline eval)


@dataclass
class RunResult:
    exit_code: ExitCode
    summary: RunSummary
    spent_usd: float = 0.0
    table: pa.Table | None = field(default=None, repr=False)  # when the plan has no output file


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
        self.canary = CanaryGate(
            CanarySettings.from_limits(self.job.limits, options.canary),
            self.job.model.max_tokens,
            Redactor(plan.api_key).redact,
        )

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
        held: list[Item] = []  # rows read before the canary's size is decided
        try:
            for batch, keys, rendered in self.plan.batches():
                items = await self._batch_items(keys, rendered, offset)
                offset += batch.num_rows
                if self.canary.deciding:
                    held += items
                    items, held = await self._canary_first(held, final=False)
                if not await self._put(items):
                    return
            if held:
                items, held = await self._canary_first(held, final=True)
                if not await self._put(items):
                    return
        except InputError as exc:
            # A bad record deep in the input: the rows before it are sent as usual,
            # then the run stops (exit 2) and a rerun on the fixed file pays nothing twice.
            self.input_error = f"{exc}; fix the input and rerun (rows done are not paid again)"
            self.queue.close()
            return
        self.produced_all = True
        self.queue.close()

    async def _put(self, items: list[Item]) -> bool:
        """Queue rows for the workers, a slice at a time; False when the run stopped."""
        step = max(64, self.job.limits.concurrency)
        for start in range(0, len(items), step):
            if self.stopper.stopped:
                return False
            await self.queue.put_many(items[start : start + step])
        return not self.stopper.stopped

    async def _canary_first(self, held: list[Item], final: bool) -> tuple[list[Item], list[Item]]:
        """Once the canary's size is known: send it alone, judge it, and return the rows after it.

        Returns (rows to queue, rows still held). A failed canary stops the run (exit 3);
        its rows are journaled like any others.
        """
        size = self.canary.size(len(held), final)
        if size is None:
            return [], held
        if not size:
            return held, []
        canary, rest = held[:size], held[size:]
        sample = await asyncio.to_thread(self.journal.completion_token_sample)  # the dry run's basis, before the canary
        output_tokens = expected_output_tokens(self.job.model.max_tokens, sample)
        self.canary.start([item.key for item in canary])
        self.tracker.set_note(f"canary: {size} rows first")
        if not await self._put(canary) or not await self.canary.wait(self.stopper.event):
            return [], []
        self.tracker.set_note("")
        verdict = self.canary.verdict(lambda prompt: expected_row_cost(self.plan, prompt, output_tokens))
        if verdict.failed:
            self.stop(verdict.message or "canary failed")
            return [], []
        return rest, []

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
        self.canary.observe(row, item.tokens)
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


def write_plan_output(
    plan: Plan, journal: Journal, batches: OutputBatches, stop: Callable[[str], None]
) -> tuple[int, int, pa.Table | None]:
    """The plan's output (its file, or a table in memory); rows, rows with an error, the table.

    Shared by realtime and batch mode. A file that cannot be written is a stop,
    not a traceback: every answer is already in the journal.
    """
    schema = output_schema(plan.source.schema, plan.structured)
    try:
        if plan.output_path is None:
            table, errors = write_table(schema, batches, journal, plan.structured)
            return table.num_rows, errors, table
        rows, errors = write_output(plan.output_path, schema, batches, journal, plan.structured)
    except OSError as exc:
        stop(
            f"cannot write the output {plan.output_path}: {exc}; every answer is in the journal: "
            "fix the cause and rerun (nothing is paid again)"
        )
        return 0, 0, None
    return rows, errors, None


async def run_plan(
    plan: Plan,
    options: RunOptions,
    controls: Controls | None = None,
    new_run: Callable[[Plan, Journal, RunOptions, Controls | None], Run] = Run,
) -> RunResult:
    """Lock, open the journal, send what is not done, write the output.

    ``new_run`` makes the run that sends the requests (the Ray engine passes its own).
    """
    lock = RunLock(plan.journal_path)
    lock.acquire()
    try:
        journal = Journal.open(plan.journal_path, plan.identity(), fresh=options.fresh)
        try:
            if plan.key_scheme != KeyScheme.ID:  # --fresh may have replaced the journal prepare() read
                plan.key_scheme = KeyScheme(journal.get_meta("key_scheme") or KeyScheme.CONTENT)
            journal.set_meta("total_rows", str(plan.total_rows))
            if plan.job.model.mode == "batch":
                return await run_batch(plan, journal, options, controls or Controls())
            refuse_if_batches_pending(journal)
            run = new_run(plan, journal, options, controls)
            async with plan.provider.server(plan.job.model) as base_url:
                await run.execute(base_url)
            rows, errors, table = 0, 0, None
            if options.write_output and not options.sample:
                rows, errors, table = write_plan_output(plan, journal, run.output_batches(), run.stop)
            return _result(run, rows, errors, table)
        finally:
            journal.close()
    finally:
        lock.release()


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
        canary=run.canary.result,
    )


def build_result(
    plan: Plan,
    tracker: Tracker,
    stopper: Stopper,
    stop_code: ExitCode,
    spent: float,
    rows: int,
    rows_with_error: int,
    table: pa.Table | None,
    *,
    price_factor: float = 1.0,
    **extra: Any,
) -> RunResult:
    """The run's summary and exit code (shared by realtime and batch mode).

    Exit code: the stop's code when stopped early (3, or 2 on a bad input
    record); 1 when some output row carries an error; else 0. ``extra`` are
    the mode's own ``RunSummary`` fields.
    """
    c = tracker.counters
    if stopper.stopped:
        code = stop_code
    elif rows_with_error or c.failed or c.invalid:
        code = ExitCode.ROWS_FAILED
    else:
        code = ExitCode.OK
    priced = plan.info.cost(c.prompt_tokens, c.completion_tokens)
    elapsed = tracker.elapsed_s
    summary = RunSummary(
        job=plan.job.name,
        model=plan.model_name,
        exit_code=code,
        stop_reason=stopper.reason,
        rows_ok=c.ok,
        rows_failed=c.failed,
        rows_invalid=c.invalid,
        rows_skipped=c.skipped,
        rows_resumed=c.resumed,
        requests=c.requests,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        cost_usd=round(c.cost_usd, 8),
        cost_usd_estimated=None if priced is None else round(priced * price_factor, 8),
        cost_estimated=c.cost_estimated,
        job_spent_usd=round(spent, 8),
        price_source=plan.info.source,
        wall_s=round(elapsed, 2),
        requests_per_minute=round(c.requests / elapsed * 60, 1) if elapsed > 0 else 0.0,
        errors=dict(c.errors),
        output=str(plan.output_path) if rows and plan.output_path else None,
        output_rows=rows,
        output_rows_with_error=rows_with_error,
        **extra,
    )
    return RunResult(code, summary, spent, table)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
