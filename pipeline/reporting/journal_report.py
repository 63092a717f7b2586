"""``pipeline report``: a job's journal as one HTML page with charts.

Everything is aggregated in SQLite (time buckets, error classes, label
counts, a thinned sample of latencies), so a journal of millions of rows is
summarised without loading it into memory. The report needs neither the input
file nor a key: only the job file and its journal.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config.job import Job
from pipeline.errors import InputError, JobError
from pipeline.io.fs import basename, is_uri
from pipeline.reporting import charts
from pipeline.reporting.html import cards, esc, img, money, page, table
from pipeline.store.journal import Journal, RowStatus

# Throughput and cost are drawn in about this many time buckets.
_BUCKETS = 60
# At most about this many latencies are read for the histogram.
_LATENCY_SAMPLE = 20_000
_ROWS_PER_BUCKET = 5
_NO_ANSWER = "(no answer)"


@dataclass(frozen=True)
class JournalStats:
    """What the charts show, aggregated from the journal."""

    rows_by_status: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    attempts: int
    first: float | None  # epoch seconds of the first and last journaled answer
    last: float | None
    bucket_s: float
    bucket_minutes: list[float]  # start of each bucket, minutes after the first answer
    bucket_rows: list[int]
    bucket_cost: list[float]
    latencies: list[float]
    errors: dict[str, int]
    labels: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)  # the model as served, by rows

    @property
    def rows(self) -> int:
        return sum(self.rows_by_status.values())

    def latency_quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class JournalReport:
    """Where ``pipeline report`` wrote its page, and the figures on it."""

    path: Path
    charts: int
    stats: JournalStats

    def to_dict(self) -> dict[str, Any]:
        s = self.stats
        return {
            "report": str(self.path),
            "charts": self.charts,
            "rows": s.rows,
            "rows_by_status": s.rows_by_status,
            "cost_usd": s.cost_usd,
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "latency_s_median": s.latency_quantile(0.5),
            "latency_s_p95": s.latency_quantile(0.95),
            "errors": s.errors,
            "labels": s.labels or None,
        }


def write_report(job: Job) -> JournalReport:
    """Read the job's journal, draw the charts and write the page beside the job's output."""
    journal_path, out = job.output.journal_path, job.output.path
    if journal_path is None or out is None:
        raise JobError("[output] path: required key is missing")
    if not journal_path.exists():
        raise InputError(f"no journal at {journal_path}: run the job (or pipeline eval) first")
    journal = Journal(journal_path, readonly=True)
    try:
        stats = journal_stats(journal.conn, job)
    finally:
        journal.close()
    images = draw(stats, job)
    # Beside a local output; beside the (local) journal for an s3:// one.
    local = journal_path.with_name(basename(out)) if is_uri(out) else Path(out)
    path = local.with_name(f"{local.stem}.report.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(job, journal_path, stats, images), encoding="utf-8")
    return JournalReport(path, len(images), stats)


def journal_stats(conn: sqlite3.Connection, job: Job) -> JournalStats:
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
    if first is not None:
        buckets = dict(
            (b, (n, c))
            for b, n, c in conn.execute(
                f"SELECT CAST((updated - ?) / ? AS INTEGER) AS b, COUNT(*), COALESCE(SUM(cost_usd), 0) "
                f"FROM results WHERE {answered} GROUP BY b ORDER BY b",
                (first, bucket_s),
            )
        )
        running = 0.0
        for b in range(max(buckets) + 1):
            n, c = buckets.get(b, (0, 0.0))
            running += c
            minutes.append(b * bucket_s / 60)
            rows.append(round(n * 60 / bucket_s))
            costs.append(running)  # spent by the end of bucket b
    return JournalStats(
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
        latencies=_latencies(conn),
        errors=_error_classes(conn),
        labels=_labels(conn, job),
        models=dict(
            conn.execute(
                "SELECT model, COUNT(*) AS n FROM results WHERE model IS NOT NULL GROUP BY model ORDER BY n DESC"
            ).fetchall()
        ),
    )


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


def _labels(conn: sqlite3.Connection, job: Job) -> dict[str, int]:
    """Answers per label, in the job's label order; rows without an answer last."""
    labels = job.prompt.labels
    if not labels:
        return {}
    column = f"$.{job.prompt.column_prefix}label"
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


def draw(stats: JournalStats, job: Job) -> dict[str, bytes]:
    """The charts, by title, in page order."""
    images = {
        "Throughput": charts.throughput_png(stats.bucket_minutes, stats.bucket_rows),
        "Latency": charts.latency_png(stats.latencies),
        "Cumulative cost": charts.cumulative_cost_png(*_cost_curve(stats)),
        "Errors by class": charts.bars_png(stats.errors, "Errors by class", "no errors", color=charts.ERROR_COLOR),
    }
    if stats.labels:
        images["Labels"] = charts.bars_png(stats.labels, "Label distribution", "no answers yet")
    return images


def _cost_curve(stats: JournalStats) -> tuple[list[float], list[float]]:
    """Cost at the end of each bucket, starting from zero at the first answer."""
    if not stats.bucket_cost:
        return [], []
    step = stats.bucket_s / 60
    return [0.0, *(m + step for m in stats.bucket_minutes)], [0.0, *stats.bucket_cost]


def render(job: Job, journal_path: Path, stats: JournalStats, images: dict[str, bytes]) -> str:
    span = (stats.last - stats.first) if stats.first is not None and stats.last is not None else 0.0
    answered = stats.rows - stats.rows_by_status.get(str(RowStatus.SKIPPED), 0)
    rate = answered / span * 60 if span > 0 else None
    p50, p95 = stats.latency_quantile(0.5), stats.latency_quantile(0.95)
    body = [
        f"<h1>Run report: {esc(job.name)}</h1>",
        f"<p class='sub'>Journal <code>{esc(journal_path)}</code>, model {_models(job, stats)}{_when(stats)}.</p>",
        cards(
            [
                ("rows journaled", f"{stats.rows:,}"),
                ("ok", f"{stats.rows_by_status.get('ok', 0):,}"),
                ("with an error", f"{stats.rows - stats.rows_by_status.get('ok', 0):,}"),
                ("cost", money(stats.cost_usd)),
                ("rows per minute", "n/a" if rate is None else f"{rate:,.0f}"),
                ("latency median / p95", "n/a" if p50 is None or p95 is None else f"{p50:.2f} / {p95:.2f} s"),
            ]
        ),
        "<h2>Rows by status</h2>",
        table(["status", "rows"], [[k, f"{v:,}"] for k, v in sorted(stats.rows_by_status.items())]),
        f"<p>Tokens: {stats.prompt_tokens:,} in, {stats.completion_tokens:,} out; {stats.attempts:,} requests "
        "(final runs of each row).</p>",
        "<h2>Charts</h2>",
        "<div class='grid'>" + "".join(f"<div>{img(png, title)}</div>" for title, png in images.items()) + "</div>",
    ]
    if stats.errors:
        body.append("<h2>Errors by class</h2>")
        body.append(table(["class", "rows"], [[k, f"{v:,}"] for k, v in stats.errors.items()]))
    if stats.labels:
        body.append("<h2>Labels</h2>")
        body.append(table(["label", "rows"], [[k, f"{v:,}"] for k, v in stats.labels.items()]))
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    body.append(f"<footer>Written by <code>pipeline report</code> at {stamp}.</footer>")
    return page(f"Run report: {job.name}", body)


def _models(job: Job, stats: JournalStats) -> str:
    """The models that answered (as the server named them), else the job's."""
    if not stats.models:
        return f"<code>{esc(job.model.name)}</code>"
    return ", ".join(f"<code>{esc(m)}</code> ({n:,} rows)" for m, n in stats.models.items())


def _when(stats: JournalStats) -> str:
    if stats.first is None or stats.last is None:
        return ""
    start = dt.datetime.fromtimestamp(stats.first, dt.UTC).isoformat(timespec="seconds")
    end = dt.datetime.fromtimestamp(stats.last, dt.UTC).isoformat(timespec="seconds")
    return f", answers from {start} to {end}"
