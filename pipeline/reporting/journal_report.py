"""``pipeline report``: a job's journal as one HTML page with charts.

Everything is aggregated in SQLite (time buckets, error classes, label
counts, a thinned sample of latencies), so a journal of millions of rows is
summarised without loading it into memory. The report needs neither the input
file nor a key: only the job file and its journal.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.job import Job
from pipeline.errors import InputError, JobError
from pipeline.io.fs import basename, is_uri
from pipeline.reporting import charts
from pipeline.reporting.html import cards, esc, img, money, page, table
from pipeline.store.journal import RowStatus, read_only
from pipeline.store.stats import JournalSummary, journal_summary


@dataclass(frozen=True)
class JournalReport:
    """Where ``pipeline report`` wrote its page, and the figures on it."""

    path: Path
    charts: int
    stats: JournalSummary

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
    with read_only(journal_path) as journal:
        stats = journal_summary(journal.conn, job.prompt.labels, job.prompt.column_prefix)
    images = draw(stats, job)
    # Beside a local output; beside the (local) journal for an s3:// one.
    local = journal_path.with_name(basename(out)) if is_uri(out) else Path(out)
    path = local.with_name(f"{local.stem}.report.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(job, journal_path, stats, images), encoding="utf-8")
    return JournalReport(path, len(images), stats)


def draw(stats: JournalSummary, job: Job) -> dict[str, bytes]:
    """The charts, by title, in page order."""
    images = {
        "Throughput": charts.throughput_png(
            stats.bucket_minutes, stats.bucket_rows, stats.bucket_s, stats.last_bucket_s
        ),
        "Latency": charts.latency_png(stats.latencies),
        "Cumulative cost": charts.cumulative_cost_png(*_cost_curve(stats)),
        "Errors by class": charts.bars_png(stats.errors, "Errors by class", "no errors", color=charts.ERROR_COLOR),
    }
    if stats.labels:
        images["Labels"] = charts.bars_png(stats.labels, "Label distribution", "no answers yet")
    return images


def _cost_curve(stats: JournalSummary) -> tuple[list[float], list[float]]:
    """Cost at the end of each bucket, starting from zero at the first answer."""
    if not stats.bucket_cost:
        return [], []
    step = stats.bucket_s / 60
    ends = [m + step for m in stats.bucket_minutes]
    ends[-1] = stats.bucket_minutes[-1] + stats.last_bucket_s / 60  # the run ends part-way through its last bucket
    return [0.0, *ends], [0.0, *stats.bucket_cost]


def render(job: Job, journal_path: Path, stats: JournalSummary, images: dict[str, bytes]) -> str:
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


def _models(job: Job, stats: JournalSummary) -> str:
    """The models that answered (as the server named them), else the job's."""
    if not stats.models:
        return f"<code>{esc(job.model.name)}</code>"
    return ", ".join(f"<code>{esc(m)}</code> ({n:,} rows)" for m, n in stats.models.items())


def _when(stats: JournalSummary) -> str:
    if stats.first is None or stats.last is None:
        return ""
    start = dt.datetime.fromtimestamp(stats.first, dt.UTC).isoformat(timespec="seconds")
    end = dt.datetime.fromtimestamp(stats.last, dt.UTC).isoformat(timespec="seconds")
    return f", answers from {start} to {end}"
