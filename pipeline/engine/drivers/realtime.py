"""The realtime driver: rows flow from the plan through the limiter and client into the journal.

Stages it composes (:mod:`pipeline.engine.session`): admission (select,
count, fit, reserve) and settlement (failure, settle, commit, account,
again, close). Its own transport: one producer renders input batches and
queues the rows admission lets through; ``concurrency`` workers send them
with one :class:`~pipeline.engine.client.ChatClient`. Everything runs inside
one ``asyncio.TaskGroup`` so an error or a stop shuts it all down cleanly. On
a stop (a front end's request, a rejected key, the budget, a job-level
failure) no new request starts; requests in flight get ``stop_grace_s`` to
finish and be journaled, then are cancelled. The driver installs no signal
handlers and prints nothing: front ends steer it through ``Controls``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pipeline.engine.admission import Ticket
from pipeline.engine.client import ChatClient, request_headers
from pipeline.engine.limits.adaptive import make_limiter, read_stated_limit, wants_stated_limit
from pipeline.engine.limits.limiter import RateLimiter
from pipeline.engine.plan import Plan
from pipeline.engine.prompts import RenderedBatch
from pipeline.engine.session import Controls, RunOptions, RunResult, Session
from pipeline.engine.settlement import StopReason
from pipeline.engine.transport import (
    CONNECT_TIMEOUT_S,
    AiohttpTransport,
    ChatTransport,
    LeanTransport,
    lean_available,
    open_session,
)
from pipeline.engine.workqueue import WorkQueue
from pipeline.errors import InputError
from pipeline.store.journal import Journal

if TYPE_CHECKING:
    import aiohttp


class RealtimeRun:
    """One realtime execution of a plan against a server."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.plan = session.plan
        self.job = session.plan.job
        self.stops = session.stops
        self.stopper = session.stops.stopper
        self.tracker = session.tracker
        self.admission = session.admission
        self.settlement = session.settlement
        self.canary = session.canary
        self.queue: WorkQueue[Ticket] = WorkQueue(low_water=2 * self.job.limits.concurrency)
        self.dialect = self.plan.dialect()
        self.produced_all = False
        self.input_error: StopReason | None = None  # a bad record found while reading the input
        self.limiter: RateLimiter | None = None

    async def execute(self, base_url: str | None = None) -> None:
        limits = self.job.limits
        self.dialect = self.plan.dialect(base_url)
        self.settlement.url = self.dialect.url
        limiter = self.limiter = make_limiter(limits, self.job.model.max_tokens, self.plan.provider)
        self.tracker.learned = limiter.learned
        headers = request_headers(self.plan.api_key, self.job.model.headers)
        connect_s = min(CONNECT_TIMEOUT_S, limits.timeout_s)
        url = self.dialect.url
        lean = lean_available(url)
        # An aiohttp session only where one is needed: chat requests the lean client cannot send,
        # or the provider's stated limit (auto rate limits). Otherwise aiohttp is never imported.
        session = None
        if not lean or wants_stated_limit(limiter):
            session = open_session(headers, limits.concurrency + 4, limits.timeout_s, connect_s)
        transport: ChatTransport | None = None
        try:
            if lean:
                transport = LeanTransport(url, headers, limits.timeout_s, connect_s)
            else:
                assert session is not None
                transport = AiohttpTransport(session, url, limits.timeout_s)
            client = ChatClient(transport, self.dialect, limiter, self.stopper, limits.max_attempts, limits.timeout_s)
            client.on_pause = self.tracker.paused
            await self._run_tasks(client, session)
        finally:
            if transport is not None:
                transport.close()
            if session is not None:
                await session.close()
        if self.input_error is not None:
            self.stops.stop(self.input_error)
        self.tracker.close()

    async def _run_tasks(self, client: ChatClient, session: aiohttp.ClientSession | None) -> None:
        async with asyncio.TaskGroup() as tg:
            producer = tg.create_task(self._produce())
            key = None
            if session is not None:
                stated = read_stated_limit(client.limiter, session, self.job.model.base_url, self.plan.provider)
                key = tg.create_task(stated)
            workers = [tg.create_task(self._work(client)) for _ in range(self.job.limits.concurrency)]
            guard = tg.create_task(self._guard(workers))
            await asyncio.wait(workers)
            producer.cancel()
            guard.cancel()
            if key is not None:
                key.cancel()

    async def _guard(self, workers: list[asyncio.Task[None]]) -> None:
        """On a stop: unblock idle workers, then give busy ones the grace period."""
        await self.stopper.event.wait()
        self.queue.close(drop_pending=True)  # idle workers return at once
        grace = asyncio.create_task(asyncio.sleep(self.job.limits.stop_grace_s))
        hurry = asyncio.create_task(self.session.controls.hurry_event.wait())
        waiting = asyncio.create_task(asyncio.wait(workers))
        await asyncio.wait([grace, hurry, waiting], return_when=asyncio.FIRST_COMPLETED)
        for task in (grace, hurry, waiting):
            task.cancel()
        for worker in workers:
            worker.cancel()  # a no-op for workers that already finished

    async def _produce(self) -> None:
        offset = 0
        held: list[Ticket] = []  # rows read while the canary's size is not known yet
        try:
            for batch, keys, rendered in self.plan.batches():
                tickets = await self._tickets(keys, rendered, offset)
                offset += batch.num_rows
                if self.canary.deciding:
                    held += tickets
                    tickets, held = await self._after_canary(held, final=False)
                if not await self._put(tickets):
                    return
        except InputError as exc:
            # A bad record deep in the input: the rows before it are sent as usual,
            # then the run stops (exit 2) and a rerun on the fixed file pays nothing twice.
            self.input_error = StopReason.input_error(exc)
            await self._put((await self._after_canary(held, final=True))[0])
            self.queue.close()
            return
        # The input ended before the canary's size was known: it is decided on every row to send.
        if not await self._put((await self._after_canary(held, final=True))[0] if held else []):
            return
        self.produced_all = True
        self.queue.close()

    async def _put(self, tickets: list[Ticket]) -> bool:
        """Queue rows for the workers, a slice at a time; False when the run stopped."""
        step = max(64, self.job.limits.concurrency)
        for start in range(0, len(tickets), step):
            if self.stopper.stopped:
                return False
            await self.queue.put_many(tickets[start : start + step])
        return not self.stopper.stopped

    async def _after_canary(self, held: list[Ticket], final: bool) -> tuple[list[Ticket], list[Ticket]]:
        """(Rows to queue, rows still held): once the canary's size is known, it is sent alone and judged first.

        Settlement reports its rows to the gate; a failed canary stops the run
        (exit 3), its rows journaled like any others.
        """
        split = self.canary.split(held, final)
        if split is None:
            return [], held
        canary, rest = split
        if not canary:
            return rest, []
        # The dry run's basis for the cost check: rows answered before the canary.
        self.canary.start([t.key for t in canary], self.session.journal.completion_token_sample())
        self.tracker.set_note(f"canary: {len(canary)} rows first")
        if not await self._put(canary) or not await self.canary.wait(self.stopper.event):
            return [], []
        self.tracker.set_note("")
        verdict = self.canary.verdict()
        if verdict.failed:
            self.stops.stop(StopReason.canary(verdict.message or "canary failed"))
            return [], []
        return rest, []

    async def _tickets(self, keys: list[str], rendered: RenderedBatch, offset: int) -> list[Ticket]:
        """Admission decides what still needs a request; the transport's part is the request body."""
        admitted = await self.admission.admit(keys, rendered, offset)
        hashes = admitted.hashes
        chat_body = self.dialect.chat_body
        return [
            Ticket(keys[i], hashes[i], t, chat_body(rendered.system(i), rendered.users[i]))
            for i, t in zip(admitted.todo, admitted.tokens, strict=True)
        ]

    async def _work(self, client: ChatClient) -> None:
        while True:
            ticket = await self.queue.get()
            if ticket is None or self.stopper.stopped:
                return
            await self._process(client, ticket)

    async def _process(self, client: ChatClient, ticket: Ticket) -> None:
        settlement = self.settlement
        if not self.admission.reserve(ticket):
            self.stops.stop(self.session.over_budget())
            return
        while True:
            attempted = await client.complete(ticket.body or b"", ticket.tokens)
            if attempted is None:  # stopped before the first attempt
                settlement.release(ticket)
                return
            if settlement.failure(attempted):
                # Not journaled: a plain rerun sends the row again.
                settlement.release(ticket, attempted.cost)
                return
            settled = settlement.settle(ticket, attempted, ticket.body)
            if not await settlement.commit(settled):
                return
            settlement.account(settled)
            if not settlement.again(ticket, settled):
                break
        settlement.close(ticket, settled)


async def run_realtime(
    plan: Plan, journal: Journal, options: RunOptions, controls: Controls | None = None
) -> RunResult:
    """Send what is not done, write the output (inside :func:`pipeline.engine.run.run_plan`'s frame)."""
    session = Session(plan, journal, options, controls)
    run = RealtimeRun(session)
    async with plan.provider.server(plan.job.model) as base_url:
        await run.execute(base_url)
    rows, errors, table = 0, 0, None
    if options.write_output and not options.sample:
        current = run.produced_all and not session.stops.stopped
        rows, errors, table = session.write_output(session.output_batches(current))
    learned = run.limiter.learned() if run.limiter is not None else None
    return session.result(
        rows,
        errors,
        table,
        learned_requests_per_minute=_round(learned.requests_per_minute if learned else None),
        learned_rate_source=learned.source if learned else None,
        learned_tokens_per_minute=learned.tokens_per_minute if learned else None,
        engine="default",
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
