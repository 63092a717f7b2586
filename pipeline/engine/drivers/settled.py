"""The driver for a run with nothing to send: a rerun of a finished job.

:func:`settled_rows` reads the input once and looks every row up in the
journal with the selector admission uses (:class:`RowSelector`): when every
row is done under its current prompt, no row needs a request or a journal
entry, and :func:`run_settled` ends the run without a transport: no HTTP
client (aiohttp is not even imported), no limiter, no local model server, no
request (a realtime run would have opened all of them to send nothing). The
progress bar, the output and the summary are the realtime driver's.

The journal remembers that pass (:mod:`pipeline.engine.unchanged`): the next
rerun, with the input, the job and the journal unchanged, skips reading the
input at all. Anything to do (a row to send, a blank prompt to journal, a bad
record in the input) and the run goes to the realtime driver, which reads the
input again from the start. A count of the journal's done rows comes first, so
a job with fewer done rows than input rows goes there without reading it here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config.job import AUTO
from pipeline.engine.selection import RowSelector
from pipeline.engine.session import Controls, RunOptions, RunResult, Session
from pipeline.engine.unchanged import record_settled, settled_before
from pipeline.errors import InputError

if TYPE_CHECKING:
    from pipeline.engine.limits.limiter import LearnedRate
    from pipeline.engine.plan import Plan
    from pipeline.store.journal import Journal


@dataclass(frozen=True)
class AllDone:
    """Every input row is done: how many, and when looking started (the run's wall time counts from there)."""

    done: int
    started: float  # time.monotonic()


def settled_rows(plan: Plan, journal: Journal, options: RunOptions) -> AllDone | None:
    """The input's rows, all done in the journal under their current prompt; None when any needs doing."""
    started = time.monotonic()
    if options.sample or options.rows is not None or options.fresh or plan.job.model.mode == "batch":
        return None
    retry_failed = options.retry_failed
    known = settled_before(plan, journal, retry_failed)
    if known is not None:  # nothing the pass depends on changed since it last found every row done
        return AllDone(known, started)
    # Every input row has its own key (repeated content gets "#2", "#3"), so this is necessary, and cheap.
    if journal.done_rows(retry_failed=retry_failed) < plan.total_rows:
        return None
    selector = RowSelector(journal.seen, retry_failed=retry_failed)
    done = 0
    try:
        for _, keys, rendered in plan.batches():
            selection = selector.select(keys, rendered, 0)
            if selection.todo or selection.blank:
                return None
            done += selection.done
    except InputError:
        return None  # the realtime driver sends the rows before the bad record and reports it
    record_settled(plan, journal, retry_failed, done)
    return AllDone(done, started)


async def run_settled(
    plan: Plan, journal: Journal, options: RunOptions, controls: Controls | None, settled: AllDone
) -> RunResult:
    """The run when :func:`settled_rows` found every row done: write the output, sum up."""
    session = Session(plan, journal, options, controls)
    session.tracker.started = settled.started
    session.tracker.resumed(settled.done)
    session.tracker.close()
    rows, errors, table = 0, 0, None
    if options.write_output:
        rows, errors, table = session.write_output(session.output_batches(current=True))
    learned = _learned(plan)
    return session.result(
        rows,
        errors,
        table,
        learned_requests_per_minute=None if learned is None else _round(learned.requests_per_minute),
        learned_rate_source=None if learned is None else learned.source,
        learned_tokens_per_minute=None if learned is None else learned.tokens_per_minute,
        engine="default",
    )


def _learned(plan: Plan) -> LearnedRate | None:
    """What the realtime driver's limiter would report having sent nothing: its starting point.

    Fixed caps report nothing, without loading the limiter (whose module loads
    aiohttp); a limit set to "auto" (at a provider with rate limits) reports
    the rate it would have started at, as a rerun always has.
    """
    limits = plan.job.limits
    if AUTO not in (limits.requests_per_minute, limits.tokens_per_minute) or not plan.provider.rate_limited:
        return None
    from pipeline.engine.limits.adaptive import make_limiter

    return make_limiter(limits, plan.job.model.max_tokens, plan.provider).learned()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
