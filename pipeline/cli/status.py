"""``pipeline status``: what the journal says about a job, without running it."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from pipeline.config.job import Job
from pipeline.engine.reports import JobStatus, PendingBatch
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
        batches = _pending_batches(journal)
        adopted = _adopted_batches(journal)
    finally:
        journal.close()
    by = summary["by_status"]
    done = by.get("ok", 0)
    failed = by.get("failed", 0) + by.get("invalid", 0)
    skipped = by.get("skipped", 0)
    rows_total = int(total) if total else None
    pending = max(0, rows_total - done - failed - skipped) if rows_total is not None else None
    # Rows waiting in provider batches are journaled as transient "pending" markers.
    in_batches = sum(b.rows for b in batches)
    last = summary["last_update"]
    return replace(
        base,
        started=True,
        rows_total=rows_total,
        rows_done=done,
        rows_failed=failed,
        rows_skipped=skipped,
        rows_retryable=max(0, by.get("transient", 0) - in_batches),
        rows_pending=pending,
        prompt_tokens=summary["prompt_tokens"],
        completion_tokens=summary["completion_tokens"],
        cost_usd=round(spent, 8),
        last_progress=dt.datetime.fromtimestamp(last, dt.UTC).isoformat(timespec="seconds") if last else None,
        batches_pending=batches,
        rows_in_batches=in_batches,
        batches_adopted=adopted,
    )


def _adopted_batches(journal: Journal) -> list[str]:
    from pipeline.store.batches import BatchStore

    store = BatchStore(journal)
    return store.adopted() if store.has_tables() else []


def _pending_batches(journal: Journal) -> list[PendingBatch]:
    """Batch mode: provider batches not yet collected."""
    from pipeline.store.batches import BatchStore

    store = BatchStore(journal)
    if not store.has_tables():
        return []
    return [
        PendingBatch(
            b.id, b.provider, b.status, b.rows, dt.datetime.fromtimestamp(b.submitted, dt.UTC).isoformat("T", "seconds")
        )
        for b in store.pending()
    ]


def format_status(s: JobStatus) -> str:
    active = f"running (pid {s.active_pid})" if s.active else "not running"
    if not s.started:
        return f"{s.job}: never run ({active}); journal would be {s.journal}"
    total = f"{s.rows_total:,}" if s.rows_total is not None else "?"
    pending = f"{s.rows_pending:,}" if s.rows_pending is not None else "?"
    in_batches = f"{s.rows_in_batches:,} in provider batches, " if s.rows_in_batches else ""
    lines = [
        f"{s.job}: {active}",
        f"  rows: {s.rows_done:,} done, {s.rows_failed:,} failed, {s.rows_skipped:,} skipped, "
        f"{pending} pending of {total} ({in_batches}{s.rows_retryable:,} to retry)",
        f"  tokens: {s.prompt_tokens:,} in, {s.completion_tokens:,} out; cost so far ${s.cost_usd:.4f}",
        f"  last progress: {s.last_progress or 'never'}",
    ]
    lines += [
        f"  batch {b.id} ({b.provider}): {b.status}, {b.rows:,} rows, submitted {b.submitted}"
        for b in s.batches_pending
    ]
    lines += [
        f"  batch {batch_id}: adopted (the provider accepted it before a run was killed; paid once)"
        for batch_id in s.batches_adopted
    ]
    lines.append(f"  journal: {s.journal}")
    return "\n".join(lines)
