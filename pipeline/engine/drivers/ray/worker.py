"""What runs inside Ray: the worker actor that sends rows, and the global limiter actor.

Plain classes, made into Ray actors by :mod:`pipeline.engine.drivers.ray.driver` (so
this module never imports Ray at import time). A worker reads its units of
input where they live (a Parquet row group on a shared path or in object
storage), renders their prompts and sends the rows the driver dispatches to
it with the same :class:`~pipeline.engine.client.ChatClient` as the default
engine. It keeps nothing durable: finished rows wait in a list until the
driver's next ``poll`` takes them, and the driver journals them.

The driver dispatches at most ``concurrency`` rows across all workers, and
a worker sends only rows it was dispatched: there is no prefetching of
requests, so a crash of the driver re-pays at most ``concurrency`` requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.admission import rows_to_count, spread
from pipeline.engine.client import Attempted, ChatClient, Stopper, request_headers
from pipeline.engine.limits.global_limiter import Grant, Schedule
from pipeline.engine.limits.limiter import RateLimiter
from pipeline.engine.prompts import PromptRenderer, RenderedBatch
from pipeline.engine.tokens import TokenCounter, counter_for
from pipeline.engine.transport import CONNECT_TIMEOUT_S, ChatTransport, chat_transport
from pipeline.io import fs
from pipeline.io.source import row_keys
from pipeline.providers.dialect import Dialect

GRANT_BATCH = 16  # send times asked of the limiter actor per call, at most
CACHED_ROW_GROUPS = 1  # row groups a worker keeps decoded (its units are usually consecutive)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, without the API key (read from its own environment)."""

    dialect: Dialect
    user: str
    system: str | None
    id_column: str | None
    schema: pa.Schema  # the columns read: prompt columns and the id column
    model_name: str
    max_tokens: int
    context_length: int | None
    count_all: bool  # token limits or a budget: every prompt is counted
    headers: dict[str, str]
    api_key_env: str | None
    max_attempts: int
    timeout_s: float
    connections: int


@dataclass(frozen=True)
class Unit:
    """A slice of the input: rows ``start`` to ``start + rows`` of one Parquet row group,
    or a batch the driver read itself (CSV and JSON Lines cannot be split without reading)."""

    id: int
    offset: int  # the row number of its first row in the whole input
    rows: int
    file: str | None = None  # an absolute path or an s3:// URI
    row_group: int = 0
    start: int = 0
    batch: Any = None  # a Ray object reference to a RecordBatch


@dataclass(frozen=True)
class UnitRows:
    """What the driver needs to key the rows and decide what still has to be sent (not the prompts)."""

    ids: list[str] | None  # the id column as text, when the job has one
    hashes: list[str]
    blank: list[bool]


@dataclass(frozen=True)
class Dispatch:
    unit: int
    index: int
    tokens: int


@dataclass(frozen=True)
class Outcome:
    """A finished row, reported to the driver."""

    unit: int
    index: int
    attempted: Attempted | None  # None: the run stopped before its first attempt
    # The request body, only for a reply without token counts (the recorder counts it).
    body: bytes | None = None
    failure: str | None = None  # the worker itself failed on this row


class RemoteLimiter(RateLimiter):
    """The in-process limiter's interface, with every decision made by the global limiter actor."""

    def __init__(self, actor: Any) -> None:
        super().__init__(0)
        self.actor = actor
        self.paused_until_s = 0.0  # wall-clock time; a 429 anywhere moves it
        self._waiting: list[tuple[int, asyncio.Future[float]]] = []
        self._fetcher: asyncio.Task[None] | None = None

    @property
    def unlimited(self) -> bool:
        return False  # every send time comes from the global limiter actor

    def try_admit(self, prompt_tokens: int = 0) -> bool:
        return False  # never the local fast path: the global limiter actor decides every send time

    async def acquire(self, prompt_tokens: int = 0) -> None:
        while True:
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            self._waiting.append((prompt_tokens, future))
            if self._fetcher is None or self._fetcher.done():
                self._fetcher = asyncio.create_task(self._fetch())
            at = await future
            await _sleep_until(at)
            if at >= self.paused_until_s:
                return
            # A 429 arrived after this time was granted: wait it out and ask again.
            await _sleep_until(self.paused_until_s)

    async def _fetch(self) -> None:
        """Ask for send times of the waiting requests, a few per call to the actor."""
        while self._waiting:
            batch, self._waiting = self._waiting[:GRANT_BATCH], self._waiting[GRANT_BATCH:]
            try:
                grant: Grant = await self.actor.grant.remote([tokens for tokens, _ in batch])
            except Exception as exc:  # the actor is gone: the requests cannot go out
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.pause(grant.paused_until)
            for (_, future), at in zip(batch, grant.times, strict=True):
                if not future.done():
                    future.set_result(at)

    def cool_down(self, seconds: float) -> None:
        """A 429 here: pause this worker now, and every other one through the actor."""
        self.pause(time.time() + seconds)
        self.actor.cool_down.remote(seconds)

    def pause(self, until: float) -> None:
        self.paused_until_s = max(self.paused_until_s, until)


async def _sleep_until(at: float) -> None:
    delay = at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


class LimiterActor:
    """The global limiter as an actor: one :class:`Schedule`, and the workers to tell of a 429."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: int, max_tokens: int) -> None:
        self.schedule = Schedule(requests_per_minute, tokens_per_minute, max_tokens)
        self.workers: list[Any] = []

    def register(self, worker: Any) -> None:
        self.workers.append(worker)

    def grant(self, prompt_tokens: list[int]) -> Grant:
        return self.schedule.grant(prompt_tokens)

    def cool_down(self, seconds: float) -> None:
        until = self.schedule.cool_down(seconds)
        for worker in self.workers:
            worker.pause.remote(until)  # fire and forget: a dead worker does not matter


class RowWorker:
    """A Ray worker actor: loads units, sends dispatched rows, hands finished rows back."""

    def __init__(self, spec: WorkerSpec, limiter: Any) -> None:
        self.spec = spec
        self.renderer = PromptRenderer(spec.user, spec.system)
        self.limiter = RemoteLimiter(limiter)
        self.stopper = Stopper()
        self.units: dict[int, RenderedBatch] = {}
        self.done: list[Outcome] = []
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._row_groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self._counter: TokenCounter | None = None
        self._client: ChatClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._transport: ChatTransport | None = None
        self._api_key = self._read_key()

    def _read_key(self) -> str | None:
        # The key never travels through Ray: each worker reads it from its own environment.
        env = self.spec.api_key_env
        if not env:
            return None
        key = os.environ.get(env, "").strip()
        if not key:
            raise RuntimeError(f"environment variable {env} is not set on this Ray node ({os.uname().nodename})")
        return key

    def pid(self) -> int:
        return os.getpid()

    async def load(self, unit: Unit) -> UnitRows:
        """Read and render a unit; its rows stay here until the driver releases it."""
        batch = await asyncio.to_thread(self._read, unit)
        rendered = self.renderer.render(batch)
        self.units[unit.id] = rendered
        hashes = [rendered.prompt_hash(i) for i in range(batch.num_rows)]
        ids = row_keys(batch, self.spec.id_column, unit.offset) if self.spec.id_column else None
        return UnitRows(ids, hashes, rendered.blank)

    def _read(self, unit: Unit) -> pa.RecordBatch:
        import ray

        if unit.batch is not None:
            return ray.get(unit.batch)
        assert unit.file is not None
        table = self._row_group(unit.file, unit.row_group)
        part = table.slice(unit.start, unit.rows)
        # Files of a folder may order (or type) their columns differently.
        return pa.RecordBatch.from_arrays(
            [part.column(f.name).combine_chunks().cast(f.type) for f in self.spec.schema], schema=self.spec.schema
        )

    def _row_group(self, file: str, row_group: int) -> pa.Table:
        cached = self._row_groups.get((file, row_group))
        if cached is None:
            parquet = pq.ParquetFile(fs.readable(file))
            cached = parquet.read_row_group(row_group, columns=self.spec.schema.names)
            self._row_groups[(file, row_group)] = cached
            while len(self._row_groups) > CACHED_ROW_GROUPS:
                self._row_groups.popitem(last=False)
        return cached

    async def count(self, unit: int, indices: list[int]) -> list[int]:
        """Prompt tokens of these rows where a limit needs them (0 where it does not), by admission's rule."""
        rendered = self.units[unit]
        spec = self.spec
        need = rows_to_count(
            rendered, indices, count_all=spec.count_all, context_length=spec.context_length, max_tokens=spec.max_tokens
        )
        if not need:
            return [0] * len(indices)
        systems: list[str | None] = (
            [rendered.systems[i] for i in need] if rendered.systems is not None else [None] * len(need)
        )
        users = [rendered.users[i] for i in need]
        counted = await asyncio.to_thread(self._count, systems, users)
        return spread(indices, need, counted)

    def _count(self, systems: list[str | None], users: list[str]) -> list[int]:
        if self._counter is None:
            self._counter = counter_for(self.spec.model_name)
        return self._counter.count_chat(systems, users)

    async def send(self, rows: list[Dispatch]) -> None:
        """Start sending dispatched rows; they come back through :meth:`poll`."""
        client = self._ensure_client()
        for row in rows:
            task = asyncio.create_task(self._send_one(client, row))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _ensure_client(self) -> ChatClient:
        if self._client is None:
            spec = self.spec
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=spec.connections),
                headers=request_headers(self._api_key, spec.headers),
                timeout=aiohttp.ClientTimeout(total=spec.timeout_s),
            )
            # Chat requests through the lean client where it can (engine/transport.py), at most
            # ``connections`` open at once, as the session's connector allows.
            connect_s = min(CONNECT_TIMEOUT_S, spec.timeout_s)
            url, connections = spec.dialect.url, spec.connections
            self._transport = chat_transport(self._session, url, spec.timeout_s, connect_s, connections)
            self._client = ChatClient(
                self._transport, spec.dialect, self.limiter, self.stopper, spec.max_attempts, spec.timeout_s
            )
        return self._client

    async def _send_one(self, client: ChatClient, row: Dispatch) -> None:
        body = b""
        try:
            unit = self.units[row.unit]
            body = self.spec.dialect.chat_body(unit.system(row.index), unit.users[row.index])
            attempted = await client.complete(body, row.tokens)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._report(Outcome(row.unit, row.index, None, failure=f"{type(exc).__name__}: {exc}"))
            return
        uncounted = attempted is not None and attempted.reply.prompt_tokens is None
        self._report(Outcome(row.unit, row.index, attempted, body if uncounted else None))

    def _report(self, outcome: Outcome) -> None:
        self.done.append(outcome)
        self._ready.set()

    async def poll(self, wait_s: float) -> list[Outcome]:
        """Finished rows since the last poll; waits up to ``wait_s`` for the first one."""
        if not self.done:
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), wait_s)
        done, self.done = self.done, []
        return done

    def release(self, unit: int) -> None:
        self.units.pop(unit, None)

    def pause(self, until: float) -> None:
        self.limiter.pause(until)

    def stop(self, reason: str) -> None:
        """No new attempt starts; requests in flight finish (the driver waits for them)."""
        self.stopper.stop(reason)

    async def cancel(self) -> None:
        """The grace period is over: drop what is still in flight, close the session."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._transport is not None:
            self._transport.close()
        if self._session is not None:
            await self._session.close()
