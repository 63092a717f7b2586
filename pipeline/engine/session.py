"""The frame every driver runs in: how a front end steers a run, the run's options and result, the output.

Shared by the realtime, batch and Ray drivers, so that no driver imports another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.engine.client import Stopper
from pipeline.engine.plan import Plan
from pipeline.engine.progress import Tracker
from pipeline.engine.reports import RunSummary
from pipeline.errors import ExitCode
from pipeline.io.output import output_schema, write_output, write_table
from pipeline.store.journal import Journal


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


@dataclass
class RunResult:
    exit_code: ExitCode
    summary: RunSummary
    spent_usd: float = 0.0
    table: pa.Table | None = field(default=None, repr=False)  # when the plan has no output file


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
