"""``pipeline status``: the job's status (computed in :mod:`pipeline.engine.status`) as text."""

from __future__ import annotations

from pipeline.engine.reports import JobStatus


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
