"""The Python API: a DataFrame in, a DataFrame out, on the same engine as the CLI.

``run`` and ``arun`` send what is not done yet and return a :class:`Result`;
``estimate`` is the dry run; ``status`` reads the journal; ``evaluate`` and
``aevaluate`` score answers against a gold column. ``run`` works in a plain
script, from a thread, and inside a running event loop (a notebook cell):
there it runs the job on a helper thread with its own loop and waits for it.

Library calls print nothing unless asked for a progress bar, install no
signal handlers and leave no process-wide state behind, except with
``engine="ray"``: a Ray instance the call starts is shut down when it ends,
but the ``ray`` logger stays at ERROR and ``RAY_USAGE_STATS_ENABLED=0`` and
``RAY_IGNORE_UNHANDLED_ERRORS=1`` stay set (where the environment had not set
them) for the rest of the process.

Resume works as on the command line: every call journals its answers, so
calling again on the same or overlapping data pays nothing twice for a row
already done. Without a journal of the job's own (``[output] path`` or
``journal``) the journal lives in the cache folder (``$PIPELINE_CACHE_DIR``,
else ``$XDG_CACHE_HOME/pipeline``, else ``~/.cache/pipeline``), named by the
job's identity, not by the data; its rows are keyed by their prompt, never
by an id column, so two frames numbered alike (a train and a test split)
never overwrite each other's answers: each prompt is paid once.

A call returns the rows it was given, with the caller's pandas index, in
every case: with or without an output file of any format, and for a sample
(its rows only). Ctrl-C (or cancelling the task) stops the call as the CLI
stops a run: requests in flight get ``stop_grace_s`` to come back and be
journaled, then the interruption propagates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import numbers
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from pydantic import ValidationError

from pipeline.config.job import Job, check_job_name, describe_validation_error, load_job
from pipeline.engine.plan import KeyScheme, Plan, prepare
from pipeline.engine.reports import Estimate, JobStatus, RunSummary, html_table
from pipeline.errors import ExitCode, InputError, JobError, UserError
from pipeline.evaluation.evaluate import aevaluate_job
from pipeline.evaluation.results import EvalOptions, Evaluation
from pipeline.io import fs

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.engine.session import Controls, RunResult

# Ray worker actors wait on the network, so a few per CPU make sense; far more only
# cost memory (each actor is a process of ~100 MB) and start-up time.
WORKERS_PER_CPU = 4
MAX_WORKERS = 1024

JobLike = str | Path | dict[str, Any] | Job


@dataclass(frozen=True)
class Result:
    """What a run returns: the rows with their answers, and the run's summary."""

    table: pa.Table
    """The input columns plus the result columns, one row per input row, in input order."""
    summary: RunSummary
    exit_code: ExitCode
    """As the CLI's: 0 every row succeeded, 1 some rows carry an error, 3 stopped early."""
    index: Any = field(default=None, repr=False, compare=False)
    """The caller's pandas index for these rows (None: the input was not a DataFrame)."""

    def to_pandas(self) -> pd.DataFrame:
        """The rows as a DataFrame, under the index of the DataFrame they came from.

        So ``df["completion"] = pipeline.run(df, job).to_pandas()["completion"]``
        puts each answer on its own row, whatever ``df``'s index.
        """
        frame = self.table.to_pandas()
        if self.index is not None and len(self.index) == len(frame):
            frame.index = self.index
        return frame

    @property
    def ok(self) -> bool:
        return self.exit_code == ExitCode.OK

    def __repr__(self) -> str:
        return f"Result(rows={self.table.num_rows}, columns={self.table.num_columns}, summary={self.summary!r})"

    def _repr_html_(self) -> str:
        """The run's figures and the first rows, so that a notebook cell ending in ``result`` says what happened."""
        preview = self.table.slice(0, _PREVIEW_ROWS).to_pylist()
        head = "".join(f"<th>{html.escape(name)}</th>" for name in self.table.column_names)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row.values()) + "</tr>" for row in preview
        )
        more = self.table.num_rows - len(preview)
        note = f"<p>{more:,} more rows: <code>result.to_pandas()</code></p>" if more > 0 else ""
        return (
            html_table("Result", self.summary.figures())
            + f"<div style='overflow-x:auto'><table><tr>{head}</tr>{body}</table></div>{note}"
        )


_PREVIEW_ROWS = 5
_CELL_CHARS = 60


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…"


def load(job: JobLike) -> Job:
    """A job from a path (or a name in ``jobs/``), a dict shaped like the TOML file, or a Job."""
    if isinstance(job, Job):
        return job
    if isinstance(job, dict):
        fields = dict(job)
        name = check_job_name(fields.pop("name", "job"))
        try:
            return Job.model_validate(fields).model_copy(update={"name": name})
        except ValidationError as exc:
            raise JobError(f"job: {describe_validation_error(exc)}") from None
    if isinstance(job, (str, Path)):
        return load_job(str(job))
    raise JobError(f"job: expected a path, a dict or a pipeline.Job, not {type(job).__name__}")


def plan(
    data: Any = None,
    job: JobLike | None = None,
    *,
    output: str | Path | None = None,
    journal: str | Path | None = None,
    need_key: bool = True,
) -> Plan:
    """Check a job against its data before anything is sent (every problem is a ``UserError``)."""
    if job is None:
        raise JobError("job: pass a job file path, a dict shaped like the TOML file, or a pipeline.Job")
    loaded = load(job)
    try:
        out = fs.parse_data_path(output) if output is not None else None
    except ValueError as exc:
        raise JobError(f"output: {exc}") from None
    prepared = prepare(
        loaded, need_key=need_key, data=data, output=out, journal=Path(journal) if journal is not None else None
    )
    if journal is None and loaded.output.journal_path is None and prepared.key_scheme == KeyScheme.ID:
        # The cache journal serves whatever data the job is called on: ids of two
        # frames may collide, their prompts do not.
        prepared.key_scheme = KeyScheme.CONTENT
    return prepared


def check_sample(sample: Any) -> int | None:
    """``sample`` as the CLI's ``--sample`` takes it: a positive whole number of rows, or None."""
    if sample is None:
        return None
    # numbers.Integral: a numpy whole number (``len(df) // 10`` on numpy figures) counts too.
    if isinstance(sample, bool) or not isinstance(sample, numbers.Integral) or sample <= 0:
        raise UserError(f"sample: must be a positive whole number of rows, not {sample!r}")
    return int(sample)


def check_workers(workers: Any, address: str | None) -> int | None:
    """Ray worker actors: positive, and not past what the machine (or any cluster) can use."""
    if workers is None:
        return None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise UserError(f"workers: must be a positive whole number, not {workers!r}")
    cpus = os.cpu_count() or 1
    limit = MAX_WORKERS if address else min(MAX_WORKERS, WORKERS_PER_CPU * cpus)
    if workers > limit:
        where = "for a cluster" if address else f"on this machine ({cpus} CPUs, {WORKERS_PER_CPU} per CPU)"
        raise UserError(
            f"--workers {workers} is more than makes sense {where}: at most {limit}; "
            "each worker is a process, and a few per CPU already keep the network busy"
        )
    return workers


async def arun(
    data: Any = None,
    job: JobLike | None = None,
    *,
    output: str | Path | None = None,
    journal: str | Path | None = None,
    fresh: bool = False,
    retry_failed: bool = False,
    sample: int | None = None,
    seed: int = 0,
    progress: bool = True,
    wait: bool = True,
    engine: Literal["default", "ray"] = "default",
    workers: int | None = None,
    address: str | None = None,
    canary: bool = True,
) -> Result:
    """Run a job in the running event loop; see :func:`run`."""
    from pipeline.engine.run import run_plan
    from pipeline.engine.selection import pick_sample
    from pipeline.engine.session import RunOptions
    from pipeline.engine.settlement import StopKind

    sample = check_sample(sample)
    if engine not in ("default", "ray"):
        raise JobError(f"engine: {engine!r} is not one of 'default', 'ray'")
    if engine != "ray" and (workers or address):
        raise JobError("workers and address go with engine='ray'")
    if engine == "ray" and not wait:
        raise JobError("wait=False is for batch mode; engine='ray' sends rows in realtime")
    if engine == "ray":
        workers = check_workers(workers, address)
    prepared = plan(data, job, output=output, journal=journal)
    options = RunOptions(
        quiet=not progress,
        fresh=fresh,
        retry_failed=retry_failed,
        sample=sample,
        seed=seed,
        notebook=True,
        wait=wait,
        canary=canary,
    )
    if engine == "ray":
        from pipeline.engine.drivers.ray.cluster import DEFAULT_WORKERS, RaySettings

        settings = RaySettings(workers or DEFAULT_WORKERS, address)
        result = await _steered(lambda controls: run_plan(prepared, options, controls, ray=settings))
    else:
        result = await _steered(lambda controls: run_plan(prepared, options, controls))
    if result.summary.stop_kind == StopKind.INPUT_ERROR:
        # A bad record found while streaming (the file changed during the run): the
        # CLI's exit 2 and its line; the answers paid for are in the journal and the output.
        raise InputError(result.summary.stop_reason or "the input could not be read")
    rows = sorted(pick_sample(sample, prepared.total_rows, seed) or ()) if sample else None
    table = result.table
    if table is None or rows is not None:
        table = _rows_from_journal(prepared, rows)
    return Result(table, result.summary, result.exit_code, _index_of(data, rows))


async def _steered(start: Callable[[Controls], Awaitable[RunResult]]) -> RunResult:
    """Run a job; when the call is cancelled (Ctrl-C), stop it as the CLI stops a run, then propagate.

    The job runs in a task of its own, so cancelling the caller does not cancel
    the requests in flight: they get ``stop_grace_s`` to come back and be
    journaled. Cancelled twice, the run does not wait for them.
    """
    from pipeline.engine.session import Controls

    controls = Controls()
    task = asyncio.ensure_future(start(controls))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        controls.stop("interrupted: the call was cancelled")
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                controls.hurry()
        if not task.cancelled():
            task.exception()  # retrieved: the interruption is what the caller hears about
        raise


def _rows_from_journal(prepared: Plan, rows: list[int] | None) -> pa.Table:
    """The call's rows with their answers, from the journal (an output file in any format, or a sample)."""
    from pipeline.engine.session import joined_batches
    from pipeline.io.output import output_schema, write_table
    from pipeline.store.journal import read_only

    schema = output_schema(prepared.source.schema, prepared.structured)
    if not prepared.journal_path.exists():
        return schema.empty_table()
    with read_only(prepared.journal_path) as journal:
        batches = (
            (batch, keys, [rendered.prompt_hash(i) for i in range(batch.num_rows)])
            for batch, keys, rendered in prepared.batches()
        )
        table, _ = write_table(schema, joined_batches(schema, batches, journal, prepared))
    return table if rows is None else table.take(pa.array(rows, pa.int64()))


def _index_of(data: Any, rows: list[int] | None) -> Any:
    """The caller's DataFrame index for the returned rows (None for other inputs)."""
    from pipeline.io.memory import is_pandas

    if not is_pandas(data):
        return None
    return data.index if rows is None else data.index.take(rows)


def run(
    data: Any = None,
    job: JobLike | None = None,
    *,
    output: str | Path | None = None,
    journal: str | Path | None = None,
    fresh: bool = False,
    retry_failed: bool = False,
    sample: int | None = None,
    seed: int = 0,
    progress: bool = True,
    wait: bool = True,
    engine: Literal["default", "ray"] = "default",
    workers: int | None = None,
    address: str | None = None,
    canary: bool = True,
) -> Result:
    """Send every row that is not done yet and return all rows with their answers.

    ``data``: a pandas DataFrame, a pyarrow Table or RecordBatchReader, an
    object with ``__arrow_c_stream__`` (polars), a list of dicts, or a file
    path; ``None`` reads ``[input] path``. ``job``: a job file path (or a
    name in ``jobs/``), a dict shaped like the TOML file, or a
    :class:`pipeline.Job`; with ``data`` given, ``[input]`` and ``[output]``
    may be omitted. ``output``: also write the rows to this Parquet file
    (default: ``[output] path``, if any). ``journal``: where the journal
    lives (default: beside the job's output file, else the cache folder).
    ``progress``: show a progress bar (notebook-aware); nothing else is
    printed. ``wait``: in batch mode (``[model] mode = "batch"``), poll until
    every provider batch is collected; ``False`` returns once what has
    finished is collected (``exit_code`` 3 while batches are pending, as with
    ``--no-wait``). ``engine="ray"`` sends the requests from ``workers`` Ray
    worker actors (default 2), on a local Ray instance or the cluster at
    ``address`` (or the Ray this program already started); see the README.
    ``canary``: send a first slice of the rows alone and judge its answers
    before paying for the rest (``[limits] canary_rows``); ``False`` sends
    every row at once, as ``--no-canary`` does.
    Mistakes in the job or the data raise :class:`pipeline.UserError` before
    anything is sent.
    """
    call = arun(
        data,
        job,
        output=output,
        journal=journal,
        fresh=fresh,
        retry_failed=retry_failed,
        sample=sample,
        seed=seed,
        progress=progress,
        wait=wait,
        engine=engine,
        workers=workers,
        address=address,
        canary=canary,
    )
    return _run_sync(call)


def estimate(
    data: Any = None, job: JobLike | None = None, *, output: str | Path | None = None, journal: str | Path | None = None
) -> Estimate:
    """The dry run: rows still to send, tokens, cost and time. Needs no key and sends nothing."""
    from pipeline.engine.estimate import dry_run

    return dry_run(plan(data, job, output=output, journal=journal, need_key=False))


def status(job: JobLike, *, journal: str | Path | None = None) -> JobStatus:
    """What the job's journal says, without running it (``pipeline status``): rows done, failed, pending,
    tokens, what the job has spent, provider batches pending, and whether a run holds the journal now.

    ``journal``: the journal file (default: beside ``[output] path``). Needs no key, no data and no network.
    """
    from pipeline.engine.status import job_status

    loaded = load(job)
    path = Path(journal) if journal is not None else loaded.output.journal_path
    if path is None:
        raise JobError("status: the job has no [output] path: pass journal= (the journal file)")
    return job_status(loaded, path)


async def aevaluate(
    data: Any = None,
    job: JobLike | None = None,
    *,
    gold: str,
    sample: int | None = None,
    seed: int = 0,
    field: str | None = None,
    journal: str | Path | None = None,
    min_accuracy: float | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate in the running event loop; see :func:`evaluate`."""
    if job is None:
        raise JobError("job: pass a job file path, a dict shaped like the TOML file, or a pipeline.Job")
    options = EvalOptions(
        gold=gold,
        sample=sample,
        seed=seed,
        field=field,
        quiet=not progress,
        notebook=True,
        min_accuracy=min_accuracy,
    )
    return await aevaluate_job(load(job), options, data=data, journal=Path(journal) if journal is not None else None)


def evaluate(
    data: Any = None,
    job: JobLike | None = None,
    *,
    gold: str,
    sample: int | None = None,
    seed: int = 0,
    field: str | None = None,
    journal: str | Path | None = None,
    min_accuracy: float | None = None,
    progress: bool = True,
) -> Evaluation:
    """Answer the rows that have a gold label (all, or a seeded sample of ``sample``) and score them.

    ``data`` and ``job`` are as for :func:`pipeline.run`. ``gold`` names the
    column with the right answers; ``field`` the schema property to compare
    (default: ``label``, or the schema's only property). The answers are
    journaled like a run's, so a later :func:`pipeline.run` of the same job
    pays nothing for them; with ``[[variants]]`` every variant answers the
    same rows in its own journal. Returns an :class:`Evaluation`: accuracy,
    per-label scores, confusion matrix, costs, one entry per variant in
    ``results``, and the paths of the confusion-matrix PNG and the HTML report.
    """
    call = aevaluate(
        data,
        job,
        gold=gold,
        sample=sample,
        seed=seed,
        field=field,
        journal=journal,
        min_accuracy=min_accuracy,
        progress=progress,
    )
    result: Evaluation = _run_sync(call)
    return result


def _run_sync(call: Any) -> Any:
    """``asyncio.run``, or, inside a running loop (a notebook cell), the same on a helper thread.

    On the helper thread, Ctrl-C reaches the caller's thread, not the job's loop:
    it is passed on as a cancellation of the job's task, which stops it
    gracefully (see :func:`_steered`), and raised once the job has stopped.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(call)
    started: concurrent.futures.Future[tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]]
    started = concurrent.futures.Future()

    async def job() -> Any:
        task = asyncio.current_task()
        assert task is not None
        started.set_result((asyncio.get_running_loop(), task))
        return await call

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline") as pool:
        future = pool.submit(asyncio.run, job())
        try:
            return future.result()
        except KeyboardInterrupt:
            while not future.done():
                loop, task = started.result()
                loop.call_soon_threadsafe(task.cancel)  # the first stops gracefully, the next hurries
                try:
                    concurrent.futures.wait([future])
                except KeyboardInterrupt:
                    continue
            raise
