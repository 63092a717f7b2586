"""``--engine ray``: rows sent from Ray worker actors, journaled by the driver.

The driver (this process) keeps everything that makes a run trustworthy: the
run lock, the journal, the budget, the progress and the output. Workers are
Ray actors (:class:`~pipeline.engine.drivers.ray.worker.RowWorker`) that read units
of the input where it lives, render prompts and send the rows the driver
dispatches to them; a limiter actor hands out send times so that the job's
caps hold for all workers together, and a 429 seen by one pauses all.

Flow of one unit (a slice of a Parquet row group):

1. a worker loads it and returns each row's key, prompt hash and blank flag;
2. the driver's admission (the same as the realtime driver's) decides, with
   the journal, which rows still need a request and journals skipped rows;
   the worker counts prompt tokens where a limit needs them, by admission's rule;
3. the driver dispatches rows while fewer than ``concurrency`` are in flight
   across all workers, reserving each row's worst cost against the budget;
4. workers report finished rows in batches (``poll``); the driver settles
   them through the shared settlement, in one journal commit, and dispatches more.

A row counts as in flight from dispatch until its result is committed to the
journal, so a crash of the driver re-pays at most ``concurrency`` requests. A
worker that dies has its units loaded again by another (a replacement is
started) and its unfinished rows sent again.

Ray is imported only when this engine runs (``pip install 'pipeline[ray]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.engine.admission import Admitted, Ticket
from pipeline.engine.drivers.ray.cluster import (
    RaySettings,
    cause,
    fixed_caps,
    is_ray_error,
    ray_session,
    worker_gone,
)
from pipeline.engine.drivers.ray.units import Reported, UnitState, WorkerState, plan_units
from pipeline.engine.drivers.ray.worker import (
    Dispatch,
    LimiterActor,
    Outcome,
    RowWorker,
    Unit,
    UnitRows,
    WorkerSpec,
)
from pipeline.engine.plan import KeyScheme, Plan, content_keys
from pipeline.engine.session import Controls, RunOptions, RunResult, Session
from pipeline.engine.settlement import Settled, StopReason
from pipeline.errors import CredentialsError, InputError
from pipeline.store.journal import Journal

POLL_WAIT_S = 0.2  # a worker's poll returns at once with results, or after this long without


async def run_ray(
    plan: Plan, journal: Journal, options: RunOptions, controls: Controls | None, settings: RaySettings
) -> RunResult:
    """Send what is not done from Ray workers, write the output (inside ``run_plan``'s frame)."""
    session = Session(plan, journal, options, controls)
    run = RayRun(session, settings)
    async with plan.provider.server(plan.job.model) as base_url:
        await run.execute(base_url)
    rows, errors, table = 0, 0, None
    if options.write_output and not options.sample:
        current = run.produced_all and not session.stops.stopped
        rows, errors, table = session.write_output(session.output_batches(current))
    return session.result(rows, errors, table, engine="ray", workers=settings.workers)


class RayRun:
    """A run whose requests go out from Ray worker actors; the journal, admission and settlement stay here."""

    def __init__(self, session: Session, settings: RaySettings) -> None:
        self.session = session
        self.plan = session.plan
        self.job = session.plan.job
        self.stops = session.stops
        self.stopper = session.stops.stopper
        self.tracker = session.tracker
        self.admission = session.admission
        self.settlement = session.settlement
        self.canary = session.dispatch_canary()  # the canary's rows go out alone first
        self.dialect = self.plan.dialect()
        self.produced_all = False
        self.settings = settings
        self.pool: list[WorkerState] = []
        self.states: dict[int, UnitState] = {}
        self.retry_units: deque[Unit | UnitState] = deque()
        self.in_flight = 0
        self.loading = 0
        self.replacements = 0
        self.units_exhausted = False
        self.grace_over = False
        self.wake = asyncio.Event()
        self._units: Iterator[Unit] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Content keys number equal prompts in input order: units are keyed in order.
        self._occurrences: dict[str, int] = {}
        self._next_keyed = 0
        self._keyed = asyncio.Event()
        self._decided: dict[int, Admitted] = {}

    async def execute(self, base_url: str | None = None) -> None:
        self.dialect = self.plan.dialect(base_url)
        self.settlement.url = self.dialect.url
        with ray_session(self.settings):
            import ray

            rpm, tpm = fixed_caps(self.plan)
            remote_limiter = ray.remote(num_cpus=0)(LimiterActor)
            self.limiter_actor: Any = remote_limiter.remote(rpm, tpm, self.job.model.max_tokens)
            self._worker_class = ray.remote(num_cpus=0)(RowWorker)
            self._spec = self._worker_spec()
            self.pool = [self._new_worker(n) for n in range(self.settings.workers)]
            await self._check_workers()
            self._units = plan_units(self.plan.source, self._spec.schema.names)
            await self._drive()
        self.tracker.close()

    # -- workers -------------------------------------------------------------------------

    def _worker_spec(self) -> WorkerSpec:
        job = self.job
        names = list(dict.fromkeys(self.plan.renderer.columns + ([job.input.id_column] if job.input.id_column else [])))
        schema = pa.schema([self.plan.source.schema.field(n) for n in names])
        return WorkerSpec(
            dialect=self.dialect,
            user=job.prompt.user,
            system=job.prompt.system,
            id_column=job.input.id_column,
            schema=schema,
            model_name=self.plan.model_name,
            max_tokens=job.model.max_tokens,
            context_length=self.plan.context_length,
            count_all=self.admission.count_all,
            headers=dict(job.model.headers),
            api_key_env=job.model.api_key_env if self.plan.api_key else None,
            max_attempts=job.limits.max_attempts,
            timeout_s=job.limits.timeout_s,
            connections=job.limits.concurrency + 4,
        )

    def _new_worker(self, number: int) -> WorkerState:
        handle = self._worker_class.options(name=None).remote(self._spec, self.limiter_actor)
        self.limiter_actor.register.remote(handle)
        return WorkerState(handle, number)

    async def _check_workers(self) -> None:
        """Every worker must start (it reads the key from its node's environment) before anything is sent."""
        import ray

        try:
            await asyncio.gather(*(w.handle.pid.remote() for w in self.pool))
        except ray.exceptions.RayError as exc:
            raise CredentialsError(f"--engine ray: a worker could not start: {cause(exc)}") from None

    def _start_tasks(self, worker: WorkerState, tg: asyncio.TaskGroup) -> None:
        for coro in (self._feed(worker), self._poll(worker)):
            task = tg.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _replace(self, tg: asyncio.TaskGroup) -> None:
        """Start a new worker for a dead one."""
        self.replacements += 1
        worker = self._new_worker(len(self.pool))
        self.pool.append(worker)
        self._start_tasks(worker, tg)

    # -- units ---------------------------------------------------------------------------

    def _next_unit(self) -> Unit | UnitState | None:
        if self.retry_units:
            return self.retry_units.popleft()
        if self._units is None or self.units_exhausted:
            return None
        try:
            unit = next(self._units, None)
        except InputError as exc:
            # A bad record deep in a CSV or JSON Lines input (read here): stop cleanly.
            self.stops.stop(StopReason.input_error(exc))
            unit = None
        if unit is None:
            self.units_exhausted = True
        return unit

    async def _feed(self, worker: WorkerState) -> None:
        """Keep ``concurrency`` rows ready on this worker (loaded, not sent)."""
        low_water = self.job.limits.concurrency
        while worker.alive and not self.stopper.stopped:
            item = self._next_unit() if worker.pending() < low_water else None
            if item is None:
                # Enough rows ready, or no unit left for now (a dead worker's may come back).
                worker.wake.clear()
                await worker.wake.wait()
                continue
            self.loading += 1
            try:
                await self._load(worker, item)
            except Exception as exc:
                if not is_ray_error(exc):
                    raise
                if worker_gone(exc):
                    self.retry_units.appendleft(item)
                    self._worker_died(worker)
                else:  # a bad record, an unreadable file: the run cannot go on
                    self.stops.stop(StopReason.worker_input(cause(exc)))
                return
            finally:
                self.loading -= 1
                self.wake.set()

    async def _load(self, worker: WorkerState, item: Unit | UnitState) -> None:
        if isinstance(item, UnitState):
            # A dead worker's unit: render it again here; its rows are decided already.
            await worker.handle.load.remote(item.unit)
            item.worker = worker
            worker.units.append(item)
            return
        rows: UnitRows = await worker.handle.load.remote(item)
        # Decided once: a unit loaded again (its worker died while counting) is not keyed or counted twice.
        admitted = self._decided.get(item.id) or await self._decide(item, rows)
        self._decided[item.id] = admitted
        # The worker counts (it holds the prompts), by admission's rule; admission fits here.
        tokens = await worker.handle.count.remote(item.id, admitted.todo) if admitted.todo else []
        del self._decided[item.id]
        admitted = self.admission.fit(admitted, tokens)
        keys, hashes = admitted.keys, admitted.hashes
        tickets = {i: Ticket(keys[i], hashes[i], t) for i, t in zip(admitted.todo, admitted.tokens, strict=True)}
        state = UnitState(item, keys, hashes, tickets, deque(admitted.todo))
        if not state.rows:
            worker.handle.release.remote(item.id)
            return
        state.worker = worker
        self.states[item.id] = state
        worker.units.append(state)

    async def _decide(self, unit: Unit, rows: UnitRows) -> Admitted:
        """Keys, and admission's selection of the rows to send (blank rows are journaled)."""
        reported = Reported(rows.hashes, rows.blank)
        keys = await self._keys(unit, rows, reported)
        return self.admission.select(keys, reported, unit.offset)

    async def _keys(self, unit: Unit, rows: UnitRows, reported: Reported) -> list[str]:
        """The journal keys of a unit's rows, as the default engine makes them."""
        if self.plan.key_scheme == KeyScheme.ID and rows.ids is not None:
            return rows.ids
        if self.plan.key_scheme == KeyScheme.ROW_NUMBER:
            return [str(unit.offset + i) for i in range(unit.rows)]
        # Content keys number equal prompts in input order, so units are keyed in order.
        while self._next_keyed != unit.id:
            await self._keyed.wait()
        keys = content_keys(reported, self._occurrences)
        self._next_keyed += 1
        self._keyed.set()
        self._keyed = asyncio.Event()
        return keys

    # -- the loop ------------------------------------------------------------------------

    async def _drive(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for worker in self.pool:
                self._start_tasks(worker, tg)
            on_stop = tg.create_task(self._on_stop())
            try:
                while True:
                    self.wake.clear()
                    self._dispatch()
                    if self._finished():
                        break
                    await self.wake.wait()
                if self.in_flight:
                    await self._cancel_workers()
            finally:
                on_stop.cancel()
                for task in list(self._tasks):
                    task.cancel()
        self.produced_all = not self.stopper.stopped and self.units_exhausted

    def _finished(self) -> bool:
        if self.stopper.stopped:
            return self.in_flight == 0 or self.grace_over
        return self.units_exhausted and not self.retry_units and not self.loading and not self.states

    async def _on_stop(self) -> None:
        """On a stop: no new attempt anywhere; in-flight rows get the grace period."""
        await self.stopper.event.wait()
        for worker in self.pool:
            if worker.alive:
                worker.handle.stop.remote(self.stopper.reason or "stopped")
            worker.wake.set()
        self.wake.set()
        grace = asyncio.create_task(asyncio.sleep(self.job.limits.stop_grace_s))
        hurry = asyncio.create_task(self.session.controls.hurry_event.wait())
        await asyncio.wait([grace, hurry], return_when=asyncio.FIRST_COMPLETED)
        grace.cancel()
        hurry.cancel()
        self.grace_over = True
        self.wake.set()

    async def _cancel_workers(self) -> None:
        calls = [w.handle.cancel.remote() for w in self.pool if w.alive]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)

    def _dispatch(self) -> None:
        """Hand ready rows to workers while fewer than ``concurrency`` are in flight."""
        if self.stopper.stopped or self.canary.room() == 0:
            return
        alive = [w for w in self.pool if w.alive]
        if not alive:
            return
        share = math.ceil(self.job.limits.concurrency / len(alive))
        # First an even share each; then idle capacity to whoever has rows ready.
        for even in (True, False):
            for worker in sorted(alive, key=lambda w: w.in_flight):
                if self.stopper.stopped:  # the budget ran out while taking rows
                    return
                free = self.job.limits.concurrency - self.in_flight
                room = min(free, share - worker.in_flight) if even else free
                rows = self._take(worker, self.canary.cap(room))
                if rows:
                    worker.handle.send.remote(rows)
                    worker.in_flight += len(rows)
                    self.in_flight += len(rows)
                    worker.wake.set()  # it may want its next unit now

    def _take(self, worker: WorkerState, room: int) -> list[Dispatch]:
        taken: list[Dispatch] = []
        for state in worker.units:
            while state.pending and len(taken) < room:
                index = state.pending[0]
                row = state.rows[index]
                if not row.reserved and not self.admission.reserve(row):
                    self.stops.stop(self.session.over_budget())
                    return taken
                state.pending.popleft()
                state.sent.add(index)
                taken.append(Dispatch(state.unit.id, index, row.tokens))
                self.canary.sent(row.key)
        return taken

    async def _poll(self, worker: WorkerState) -> None:
        while worker.alive:
            try:
                outcomes: list[Outcome] = await worker.handle.poll.remote(POLL_WAIT_S)
            except Exception as exc:
                if not is_ray_error(exc):
                    raise
                if worker_gone(exc):
                    self._worker_died(worker)
                else:
                    self.stops.stop(StopReason.worker_failed(cause(exc)))
                return
            if outcomes:
                self._record(worker, outcomes)

    # -- results -------------------------------------------------------------------------

    def _record(self, worker: WorkerState, outcomes: list[Outcome]) -> None:
        """Settle a batch of finished rows: one journal commit, then each row as the realtime driver does."""
        settlement = self.settlement
        written: list[tuple[UnitState, int, Settled]] = []
        for outcome in outcomes:
            state = self.states[outcome.unit]
            ticket = state.rows[outcome.index]
            state.sent.discard(outcome.index)
            worker.in_flight -= 1
            self.in_flight -= 1
            attempted = outcome.attempted
            if attempted is None:
                # Not sent (the run is stopping) or the worker failed on it: the row stays not_run.
                if outcome.failure:
                    self.stops.stop(StopReason.worker_failed(outcome.failure))
                settlement.release(ticket)
                continue
            if settlement.failure(attempted):
                # Not journaled: a plain rerun sends the row again.
                settlement.release(ticket, attempted.cost)
                continue
            written.append((state, outcome.index, settlement.settle(ticket, attempted, outcome.body)))
        if written and not settlement.commit_now([settled for _, _, settled in written]):
            written = []
        for state, index, settled in written:
            ticket = state.rows[index]
            settlement.account(settled)
            if settlement.again(ticket, settled):
                # Ask again for a reply that fits the schema; the row keeps its reservation and total cost.
                state.pending.appendleft(index)
                continue
            settlement.close(ticket, settled)
            del state.rows[index]
            if not state.rows:
                self._release(state)
        self.wake.set()

    def _release(self, state: UnitState) -> None:
        self.states.pop(state.unit.id, None)
        worker = state.worker
        if worker is not None:
            worker.units.remove(state)
            if worker.alive:
                worker.handle.release.remote(state.unit.id)
            worker.wake.set()

    def _worker_died(self, worker: WorkerState) -> None:
        """Its rows in flight go back to be sent again; its units to another worker."""
        if not worker.alive:
            return
        worker.alive = False
        for state in worker.units:
            for index in sorted(state.sent, reverse=True):
                state.pending.appendleft(index)  # the reservation is kept for the new attempt
            self.in_flight -= len(state.sent)
            state.sent.clear()
            state.worker = None
            self.retry_units.append(state)
        worker.units = []
        worker.in_flight = 0
        if self.stopper.stopped:
            pass
        elif self.replacements >= self.settings.workers:
            # Units wait in order for their keys: without a new worker they could wait forever.
            self.stops.stop(StopReason.workers_died(self.replacements + 1))
        else:
            self._replace(self._tg)
        for other in self.pool:
            other.wake.set()
        self.wake.set()
