"""The frame every driver runs in: the lock and the journal, how a front end steers a run, the core, the output.

:func:`opened` holds the run lock and the open journal around a driver;
:class:`Session` is what every driver composes: the stop, the budget, the
counters, admission (which rows to send) and settlement (what a reply
becomes). A driver adds only its own transport. Shared by the realtime,
batch and Ray drivers, so that no driver imports another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipeline.engine.admission import Admission, Hold
from pipeline.engine.budget import Budget
from pipeline.engine.canary import CanaryGate, DispatchCanary
from pipeline.engine.plan import KeyScheme, Plan
from pipeline.engine.progress import Tracker
from pipeline.engine.recorder import Recorder
from pipeline.engine.reports import RunSummary
from pipeline.engine.selection import RowSelector, pick_sample
from pipeline.engine.settlement import Settlement, StopReason, Stops
from pipeline.engine.unchanged import record_output, unchanged_output
from pipeline.errors import ExitCode, InputError
from pipeline.io.output import READ_COLUMNS, input_arrays, output_schema, result_arrays, write_output, write_table
from pipeline.store.batches import refuse_fresh_if_batches_pending
from pipeline.store.journal import Journal, RunLock
from pipeline.store.meta import Meta

if TYPE_CHECKING:
    from pipeline.engine.client import Stopper


class Controls:
    """How a front end steers a run: ``stop`` (graceful) and ``hurry`` (cancel what is in flight).

    The CLI calls these from its signal handlers; a Python caller may call them
    from the event loop's thread (for example from a task).
    """

    def __init__(self) -> None:
        self.stops = Stops()
        self.hurry_event = asyncio.Event()

    @property
    def stopper(self) -> Stopper:
        """The flag senders watch (made on first use, with the HTTP client it belongs to)."""
        return self.stops.stopper

    def stop(self, reason: str) -> None:
        if self.stopper.stopped:
            self.hurry_event.set()  # asked twice: do not wait for the grace period
        self.stops.stop(StopReason.user(reason))

    def hurry(self) -> None:
        self.hurry_event.set()


# Input batches with their row keys and, where the journal may be stale, prompt hashes.
OutputBatches = Iterator[tuple[pa.RecordBatch, list[str], list[str] | None]]


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


@contextlib.contextmanager
def opened(plan: Plan, options: RunOptions) -> Iterator[Journal]:
    """The run lock and the open journal, for as long as a driver runs."""
    lock = RunLock(plan.journal_path)
    lock.acquire()
    try:
        if options.fresh:
            refuse_fresh_if_batches_pending(plan.journal_path)
        journal = Journal.open(plan.journal_path, plan.identity(), fresh=options.fresh)
        try:
            if plan.key_scheme != KeyScheme.ID:  # --fresh may have replaced the journal prepare() read
                plan.key_scheme = KeyScheme(journal.get_meta(Meta.KEY_SCHEME) or KeyScheme.CONTENT)
            if journal.get_meta(Meta.TOTAL_ROWS) != str(plan.total_rows):  # a rerun writes nothing it need not
                journal.set_meta(Meta.TOTAL_ROWS, str(plan.total_rows))
            yield journal
        finally:
            journal.close()
    finally:
        lock.release()


class Session:
    """One run's core, shared by every driver: stop, budget, counters, admission, settlement, output.

    The defaults are the realtime ones (the Ray driver shares them); batch mode
    passes its own selector, price factor, hold and resumed counting.
    """

    def __init__(
        self,
        plan: Plan,
        journal: Journal,
        options: RunOptions,
        controls: Controls | None = None,
        *,
        count_all: bool | None = None,
        selector: RowSelector | None = None,
        price_factor: float = 1.0,
        hold: Hold | None = None,
        track_resumed: bool = True,
    ) -> None:
        self.plan = plan
        self.journal = journal
        self.options = options
        self.controls = controls or Controls()
        self.stops = self.controls.stops
        self.price_factor = price_factor
        limits = plan.job.limits
        total = len(options.rows) if options.rows is not None else options.sample or plan.total_rows
        self.tracker = Tracker(total, quiet=options.quiet, desc=plan.job.name, notebook=options.notebook)
        self.budget = Budget(limits.budget_usd, journal.job_spent())
        if selector is None:
            # A new journal has nothing to look up: skip one query per batch.
            selector = RowSelector(
                journal.seen if journal.has_rows() else None,
                retry_failed=options.retry_failed,
                sample=pick_sample(options.sample, plan.total_rows, options.seed)
                if options.rows is None
                else set(options.rows),
            )
        if count_all is None:  # a token cap or a budget needs every prompt counted
            count_all = bool(limits.tokens_per_minute or limits.budget_usd)
        self.admission = Admission(
            plan,
            selector,
            count_all=count_all,
            budget=self.budget,
            journal=journal,
            tracker=self.tracker,
            hold=hold,
            track_resumed=track_resumed,
        )
        model = plan.job.model
        recorder = Recorder(plan.info, plan.structured, lambda: plan.counter, price_factor, model.max_tokens)
        self.settlement = Settlement(
            recorder, self.budget, self.tracker, self.stops, journal, retry_invalid=plan.job.prompt.retry_invalid
        )
        # The canary watches settled replies; a driver decides when to send it and waits on it.
        self.canary = CanaryGate.for_plan(plan, options.canary)
        self.settlement.observers.append(self.canary.observe)

    def dispatch_canary(self) -> DispatchCanary:
        """The canary for a driver that hands rows out itself (Ray), on this session's gate."""
        o = self.options
        return DispatchCanary(
            self.canary,
            self.stops,
            self.journal,
            self.plan.total_rows,
            chosen=len(o.rows) if o.rows is not None else o.sample,
            retry_failed=o.retry_failed,
        )

    def over_budget(self) -> StopReason:
        """The stop for a request whose worst case the budget cannot hold."""
        return StopReason.budget(self.budget.spent, self.budget.limit or 0.0)

    # -- the output ------------------------------------------------------------------------

    def output_batches(self, current: bool) -> OutputBatches:
        """Input batches with keys (and prompt hashes where the journal may be stale), up to a bad record.

        ``current``: every row was looked at in this run and journaled under its
        current prompt, so prompts need not be rendered again.
        """
        plan = self.plan
        batches: OutputBatches
        if current and plan.input_changed():  # edited during the run: an answer may be for an old prompt
            current = False
        if current:
            batches = ((batch, keys, None) for batch, keys in plan.keyed_batches())
        else:
            # Stopped early: a row whose prompt changed may still hold an old answer.
            batches = (
                (batch, keys, [rendered.prompt_hash(i) for i in range(batch.num_rows)])
                for batch, keys, rendered in plan.batches()
            )
        written = 0
        try:
            for item in batches:
                yield item
                written += item[0].num_rows
        except InputError as exc:
            # The run stopped on this record, or the file changed after it was read
            # and paid for: write what comes before it, and say so.
            if not self.stops.stopped:
                self.stops.stop(StopReason.input_error(f"{exc}; the output holds the first {written} rows"))

    def write_output(self, batches: OutputBatches) -> tuple[int, int, pa.Table | None]:
        return write_plan_output(self.plan, self.journal, batches, self.stops)

    def result(self, rows: int, rows_with_error: int, table: pa.Table | None, **extra: Any) -> RunResult:
        return build_result(
            self.plan,
            self.tracker,
            self.stops,
            self.budget.spent,
            rows,
            rows_with_error,
            table,
            price_factor=self.price_factor,
            **{"canary": self.canary.result, **extra},
        )


def write_plan_output(
    plan: Plan, journal: Journal, batches: OutputBatches, stops: Stops
) -> tuple[int, int, pa.Table | None]:
    """The plan's output (its file, or a table in memory); rows, rows with an error, the table.

    A file that cannot be written is a stop, not a traceback: every answer is
    already in the journal.
    """
    # Rows whose senders were cancelled (a stop's grace period ended) may still wait
    # for their group commit: commit them first, so the output has every paid answer.
    journal.flush()
    if plan.output_path is not None and not stops.stopped:
        unchanged = unchanged_output(plan, journal)  # a rerun that changed nothing: the file is current
        if unchanged is not None:
            return (*unchanged, None)
    schema = output_schema(plan.source.schema, plan.structured)
    joined = joined_batches(schema, batches, journal, plan)
    try:
        if plan.output_path is None:
            table, errors = write_table(schema, joined)
            return table.num_rows, errors, table
        rows, errors = write_output(plan.output_path, schema, joined, journal.path.parent)
    except OSError as exc:
        stops.stop(StopReason.output_write(plan.output_path, exc))
        return 0, 0, None
    if not stops.stopped:  # a run that stopped (the input edited mid-run) may have written part of it
        record_output(plan, journal, rows, errors)
    return rows, errors, None


def joined_batches(schema: pa.Schema, batches: OutputBatches, journal: Journal, plan: Plan) -> Iterator[pa.RecordBatch]:
    """The output join: each input batch with its rows' results from the journal, in input order."""
    structured = plan.structured
    for batch, keys, hashes in batches:
        rows = journal.columns_in_order(keys, READ_COLUMNS)
        arrays = input_arrays(batch, schema) + result_arrays(rows, hashes, structured)
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def build_result(
    plan: Plan,
    tracker: Tracker,
    stops: Stops,
    spent: float,
    rows: int,
    rows_with_error: int,
    table: pa.Table | None,
    *,
    price_factor: float = 1.0,
    **extra: Any,
) -> RunResult:
    """The run's summary and exit code (shared by every driver).

    Exit code: the stop's code when stopped early (3, or 2 on a bad input
    record); 1 when some output row carries an error; else 0. ``extra`` are
    the driver's own ``RunSummary`` fields.
    """
    c = tracker.counters
    stop = stops.current()
    if stop is not None:
        stop = stop.final(spent)  # replies in flight at a budget stop have settled since
        code = stop.exit_code
    elif rows_with_error or c.failed or c.invalid:
        code = ExitCode.ROWS_FAILED
    else:
        code = ExitCode.OK
    priced = plan.info.cost(c.prompt_tokens, c.completion_tokens, c.cached_tokens)
    elapsed = tracker.elapsed_s
    summary = RunSummary(
        job=plan.job.name,
        model=plan.model_name,
        exit_code=code,
        stop_reason=stop.message if stop is not None else None,
        stop_kind=stop.kind if stop is not None else None,
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
        cached_tokens=c.cached_tokens,
        cache_saved_usd=round(c.cache_saved_usd, 10),
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
