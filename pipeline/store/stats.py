"""Report queries: a journal of millions of rows summarised in SQLite, without loading it into memory."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.store.journal import RowStatus

# Throughput and cost are aggregated in about this many time buckets.
_BUCKETS = 60
# At most about this many latencies are read for the histogram.
_LATENCY_SAMPLE = 20_000
_ROWS_PER_BUCKET = 5
_MIN_LAST_SHARE = 0.25
_NO_ANSWER = "(no answer)"


@dataclass(frozen=True)
class JournalSummary:
    """A journal aggregated: rows by status, tokens, cost, time buckets, latencies, errors, labels, models."""

    rows_by_status: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    attempts: int
    first: float | None  # epoch seconds of the first and last journaled answer
    last: float | None
    bucket_s: float
    bucket_minutes: list[float]  # start of each bucket, minutes after the first answer
    bucket_rows: list[int]  # rows per minute in each bucket, over the time the run covered of it
    bucket_cost: list[float]
    latencies: list[float]
    errors: dict[str, int]
    labels: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)  # the model as served, by rows
    last_bucket_s: float = 0.0
    """Seconds from the last bucket's start to the last answer: its rate is over this time (0.25 to 1.25 buckets)."""

    @property
    def rows(self) -> int:
        return sum(self.rows_by_status.values())

    def latency_quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def journal_summary(conn: sqlite3.Connection, labels: Sequence[str] | None, column_prefix: str) -> JournalSummary:
    """Aggregate a journal in SQLite: ``labels`` and ``column_prefix`` name the label column to count, if any."""
    by_status = dict(conn.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall())
    prompt, completion, cost, attempts = conn.execute(
        "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), "
        "COALESCE(SUM(cost_usd), 0), COALESCE(SUM(attempts), 0) FROM results"
    ).fetchone()
    # Answers only: skipped rows were never sent, so they say nothing about speed.
    answered = "status != 'skipped'"
    first, last = conn.execute(f"SELECT MIN(updated), MAX(updated) FROM results WHERE {answered}").fetchone()
    # About _BUCKETS buckets, but wide enough to hold a few rows each on average,
    # so a slow run's bars do not jump between 0, 1 and 2 rows per bucket.
    span = (last or 0) - (first or 0)
    answered_rows = sum(n for status, n in by_status.items() if status != "skipped")
    bucket_s = max(1.0, span / _BUCKETS, span * _ROWS_PER_BUCKET / max(1, answered_rows))
    minutes: list[float] = []
    rows: list[int] = []
    costs: list[float] = []
    last_bucket_s = 0.0
    if first is not None:
        buckets = dict(
            (b, (n, c))
            for b, n, c in conn.execute(
                f"SELECT CAST((updated - ?) / ? AS INTEGER) AS b, COUNT(*), COALESCE(SUM(cost_usd), 0) "
                f"FROM results WHERE {answered} GROUP BY b ORDER BY b",
                (first, bucket_s),
            )
        )
        minutes, rows, costs, last_bucket_s = _time_buckets(buckets, bucket_s, span)
    return JournalSummary(
        rows_by_status={str(k): v for k, v in by_status.items()},
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_usd=cost,
        attempts=attempts,
        first=first,
        last=last,
        bucket_s=bucket_s,
        bucket_minutes=minutes,
        bucket_rows=rows,
        bucket_cost=costs,
        last_bucket_s=last_bucket_s,
        latencies=_latencies(conn),
        errors=_error_classes(conn),
        labels=_labels(conn, labels, column_prefix),
        models=dict(
            conn.execute(
                "SELECT model, COUNT(*) AS n FROM results WHERE model IS NOT NULL GROUP BY model ORDER BY n DESC"
            ).fetchall()
        ),
    )


def _time_buckets(
    buckets: dict[int, tuple[int, float]], bucket_s: float, span: float
) -> tuple[list[float], list[int], list[float], float]:
    """Start minutes, rows per minute and cost so far of each bucket, and the seconds the last one covers.

    The run ends part-way through its last bucket, so that bucket's rate is
    over the time it covers: over the whole width it would show a false drop
    at the end of every run. A last bucket covering under a quarter of its
    width (often just the final row) is folded into the one before, which then
    covers more than its width: a rate over a moment would be noise.
    """
    final = max(buckets)
    last_s = span - final * bucket_s
    if final > 0 and last_s < _MIN_LAST_SHARE * bucket_s:
        n, c = buckets.pop(final)
        n_before, c_before = buckets.get(final - 1, (0, 0.0))
        buckets[final - 1] = (n_before + n, c_before + c)
        final -= 1
        last_s += bucket_s
    minutes: list[float] = []
    rows: list[int] = []
    costs: list[float] = []
    running = 0.0
    for b in range(final + 1):
        n, c = buckets.get(b, (0, 0.0))
        running += c
        minutes.append(b * bucket_s / 60)
        covered = last_s if b == final and final > 0 else bucket_s
        rows.append(round(n * 60 / covered))
        costs.append(running)  # spent by the end of bucket b
    return minutes, rows, costs, last_s


def _latencies(conn: sqlite3.Connection) -> list[float]:
    count = conn.execute("SELECT COUNT(*) FROM results WHERE latency_s IS NOT NULL").fetchone()[0]
    step = max(1, count // _LATENCY_SAMPLE)
    return [
        r[0]
        for r in conn.execute("SELECT latency_s FROM results WHERE latency_s IS NOT NULL AND rowid % ? = 0", (step,))
    ]


def _error_classes(conn: sqlite3.Connection) -> dict[str, int]:
    """Errors grouped by what precedes the first colon (``HTTP 500``, ``invalid reply``, ...)."""
    rows = conn.execute(
        "SELECT substr(substr(error, 1, instr(error || ':', ':') - 1), 1, 40) AS kind, COUNT(*) AS n "
        "FROM results WHERE error IS NOT NULL GROUP BY kind ORDER BY n DESC, kind"
    )
    return {kind: n for kind, n in rows}


def _labels(conn: sqlite3.Connection, labels: Sequence[str] | None, column_prefix: str) -> dict[str, int]:
    """Answers per label, in the job's label order; rows without an answer last."""
    if not labels:
        return {}
    column = f"$.{column_prefix}label"
    found = dict(
        conn.execute(
            "SELECT json_extract(parsed, ?) AS v, COUNT(*) FROM results WHERE status = ? GROUP BY v",
            (column, str(RowStatus.OK)),
        ).fetchall()
    )
    counts = {label: found.pop(label, 0) for label in labels}
    for value, n in sorted(found.items(), key=lambda kv: str(kv[0])):
        counts[str(value)] = n
    missing = conn.execute("SELECT COUNT(*) FROM results WHERE status != ?", (str(RowStatus.OK),)).fetchone()[0]
    if missing:
        counts[_NO_ANSWER] = missing
    return counts


@dataclass(frozen=True)
class StatusCounts:
    """Rows by status, tokens and the last update, for ``pipeline status``."""

    by_status: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    last_update: float | None


def status_counts(conn: sqlite3.Connection) -> StatusCounts:
    by_status = dict(conn.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall())
    prompt, completion, last = conn.execute(
        "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), MAX(updated) FROM results"
    ).fetchone()
    return StatusCounts({str(k): v for k, v in by_status.items()}, prompt, completion, last)
