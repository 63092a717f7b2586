"""``pipeline status``: what the journal says about a job, without running it."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from pipeline.config.job import Job
from pipeline.engine.reports import JobStatus
from pipeline.store.journal import Journal, RunLock


def job_status(job: Job) -> JobStatus:
    path = job.output.journal_path
    assert path is not None, "the CLI requires [output] path"
    holder = RunLock(path).holder()
    base = JobStatus(job.name, str(path), holder is not None, holder, started=False, rows_total=None)
    if not path.exists():
        return base
    journal = Journal(path, readonly=True)
    try:
        summary = journal.summary()
        total = journal.get_meta("total_rows")
        spent = journal.job_spent()
    finally:
        journal.close()
    by = summary["by_status"]
    done = by.get("ok", 0)
    failed = by.get("failed", 0) + by.get("invalid", 0)
    skipped = by.get("skipped", 0)
    rows_total = int(total) if total else None
    pending = max(0, rows_total - done - failed - skipped) if rows_total is not None else None
    last = summary["last_update"]
    return replace(
        base,
        started=True,
        rows_total=rows_total,
        rows_done=done,
        rows_failed=failed,
        rows_skipped=skipped,
        rows_retryable=by.get("transient", 0),
        rows_pending=pending,
        prompt_tokens=summary["prompt_tokens"],
        completion_tokens=summary["completion_tokens"],
        cost_usd=round(spent, 8),
        last_progress=dt.datetime.fromtimestamp(last, dt.UTC).isoformat(timespec="seconds") if last else None,
    )


def format_status(s: JobStatus) -> str:
    active = f"running (pid {s.active_pid})" if s.active else "not running"
    if not s.started:
        return f"{s.job}: never run ({active}); journal would be {s.journal}"
    total = f"{s.rows_total:,}" if s.rows_total is not None else "?"
    pending = f"{s.rows_pending:,}" if s.rows_pending is not None else "?"
    return "\n".join(
        [
            f"{s.job}: {active}",
            f"  rows: {s.rows_done:,} done, {s.rows_failed:,} failed, {s.rows_skipped:,} skipped, "
            f"{pending} pending of {total} ({s.rows_retryable:,} to retry)",
            f"  tokens: {s.prompt_tokens:,} in, {s.completion_tokens:,} out; cost so far ${s.cost_usd:.4f}",
            f"  last progress: {s.last_progress or 'never'}",
            f"  journal: {s.journal}",
        ]
    )
