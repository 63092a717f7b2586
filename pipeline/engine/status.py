"""A job's status from its journal, without running it: ``pipeline status`` and :func:`pipeline.status`."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

from pipeline.config.job import Job
from pipeline.engine.reports import JobStatus, PendingBatch
from pipeline.store.batches import BatchStore
from pipeline.store.journal import Journal, RunLock, read_only
from pipeline.store.meta import Meta
from pipeline.store.stats import status_counts


def job_status(job: Job, path: Path) -> JobStatus:
    """What the journal at ``path`` says about ``job``: rows by state, tokens, spend, pending batches."""
    holder = RunLock(path).holder()
    base = JobStatus(job.name, str(path), holder is not None, holder, started=False, rows_total=None)
    if not path.exists():
        return base
    with read_only(path) as journal:
        counts = status_counts(journal.conn)
        total = journal.get_meta(Meta.TOTAL_ROWS)
        spent = journal.job_spent()
        batches = _pending_batches(journal)
        store = BatchStore(journal)
        adopted = store.adopted() if store.has_tables() else []
    by = counts.by_status
    done = by.get("ok", 0)
    failed = by.get("failed", 0) + by.get("invalid", 0)
    skipped = by.get("skipped", 0)
    rows_total = int(total) if total else None
    pending = max(0, rows_total - done - failed - skipped) if rows_total is not None else None
    # Rows waiting in provider batches are journaled as transient "pending" markers.
    in_batches = sum(b.rows for b in batches)
    last = counts.last_update
    return replace(
        base,
        started=True,
        rows_total=rows_total,
        rows_done=done,
        rows_failed=failed,
        rows_skipped=skipped,
        rows_retryable=max(0, by.get("transient", 0) - in_batches),
        rows_pending=pending,
        prompt_tokens=counts.prompt_tokens,
        completion_tokens=counts.completion_tokens,
        cost_usd=round(spent, 8),
        last_progress=dt.datetime.fromtimestamp(last, dt.UTC).isoformat(timespec="seconds") if last else None,
        batches_pending=batches,
        rows_in_batches=in_batches,
        batches_adopted=adopted,
    )


def _pending_batches(journal: Journal) -> list[PendingBatch]:
    """Batch mode: provider batches not yet collected."""
    store = BatchStore(journal)
    if not store.has_tables():
        return []
    return [
        PendingBatch(
            b.id, b.provider, b.status, b.rows, dt.datetime.fromtimestamp(b.submitted, dt.UTC).isoformat("T", "seconds")
        )
        for b in store.pending()
    ]
