"""The typed reports a run hands to its front end (CLI or Python API).

Frozen dataclasses: the CLI prints them or dumps them with ``asdict()`` for
``--json``; the Python API returns them as they are. In a notebook they show
as a short table (``_repr_html_``), and ``repr()`` is one short line: the
full field list is ``to_dict()``.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import ExitCode

if TYPE_CHECKING:
    from pipeline.engine.canary import CanaryVerdict
    from pipeline.engine.lanes import LaneCost
    from pipeline.engine.limits.limiter import LimitSource
    from pipeline.engine.settlement import StopKind


@dataclass(frozen=True)
class RunSummary:
    """What one run did: the fields of ``pipeline run --json``."""

    job: str
    model: str
    exit_code: ExitCode
    stop_reason: str | None
    rows_ok: int
    rows_failed: int
    rows_invalid: int
    rows_skipped: int
    rows_resumed: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    """What this run was billed (or, where a server reported no usage, counted: see ``cost_estimated``)."""
    cost_usd_estimated: float | None
    """This run's tokens at the job's prices, for comparison with what was billed."""
    cost_estimated: bool
    """True when some replies came without usage and their cost was counted from tokens."""
    job_spent_usd: float
    """Everything the job has spent, across runs and journals set aside by ``--fresh``."""
    price_source: str
    wall_s: float
    requests_per_minute: float
    errors: dict[str, int] = field(default_factory=dict)
    output: str | None = None
    output_rows: int = 0
    output_rows_with_error: int = 0
    estimate: Estimate | None = None
    """With ``--sample``: the dry-run estimate for the whole job, from the sample."""
    mode: str = "realtime"
    batches_submitted: int = 0
    """Batch mode: provider batches this run submitted."""
    batches_pending: int = 0
    """Batch mode: batches still running at the provider when the run ended (a rerun collects them)."""
    rows_pending: int = 0
    """Batch mode: rows in those batches."""
    learned_requests_per_minute: float | None = None
    """With ``requests_per_minute = "auto"``: the rate learned from the server (what to pin), else None."""
    learned_rate_source: LimitSource | None = None
    """How it was learned: ``measured`` (from 429s), ``stated`` (the server said), ``not_reached`` (no limit met)."""
    learned_tokens_per_minute: int | None = None
    """With ``tokens_per_minute = "auto"``: the token limit the server stated, if it did."""
    engine: str = "default"
    """Which engine sent the requests: ``default`` (this process) or ``ray``."""
    workers: int | None = None
    """With ``--engine ray``: the number of Ray worker actors."""
    canary: CanaryVerdict | None = None
    """The canary's verdict, completion-token figures and suggested max_tokens (None: no canary this run)."""
    cached_tokens: int = 0
    """Prompt tokens this run read from the provider's prompt cache (billed at the cached price)."""
    cache_saved_usd: float = 0.0
    """What reading them from the cache saved against the input price."""
    stop_kind: StopKind | None = None
    """Why the run stopped early (``budget``, ``user``, ``input_error``, ...; a ``str``), None when it did not."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        failed = self.rows_failed + self.rows_invalid
        return (
            f"RunSummary(job={self.job!r}, exit_code={int(self.exit_code)}, rows_ok={self.rows_ok}, "
            f"rows_failed={failed}, requests={self.requests}, cost_usd={self.cost_usd:.6g}, wall_s={self.wall_s:.1f})"
        )

    def figures(self) -> list[tuple[str, str]]:
        """The figures a person reads first, as (label, text) pairs."""
        rows = f"{self.rows_ok:,} ok, {self.rows_failed + self.rows_invalid:,} failed, {self.rows_skipped:,} skipped"
        out = [
            ("job", self.job),
            ("model", self.model),
            ("exit code", f"{int(self.exit_code)} ({self.exit_code.name.lower().replace('_', ' ')})"),
            ("rows", f"{rows}, {self.rows_resumed:,} already done"),
            ("requests", f"{self.requests:,} in {self.wall_s:.1f} s"),
            ("tokens", f"{self.prompt_tokens:,} in + {self.completion_tokens:,} out"),
            ("cost", f"${self.cost_usd:.6f} (job total ${self.job_spent_usd:.6f})"),
        ]
        if self.stop_reason:
            out.append(("stopped", self.stop_reason))
        if self.errors:
            out.append(("errors", ", ".join(f"{k} x{v}" for k, v in sorted(self.errors.items()))))
        if self.batches_pending:
            out.append(("batches pending", f"{self.batches_pending:,} ({self.rows_pending:,} rows)"))
        if self.output:
            out.append(("output", self.output))
        return out

    def _repr_html_(self) -> str:
        return html_table("Run summary", self.figures())


@dataclass(frozen=True)
class Estimate:
    """A dry run: what the job would send now and what it would cost (the fields of ``--dry-run --json``)."""

    rows: int
    rows_done: int
    """Rows the journal already has: not sent again, not counted below."""
    rows_to_send: int
    input_tokens: int
    output_tokens_max: int
    output_tokens_expected: int
    output_tokens_interval: list[int]
    output_tokens_basis: str
    cost_usd_min: float | None
    cost_usd_expected: float | None
    cost_usd_interval: list[float | None]
    cost_usd_max: float | None
    duration_s_min: float
    """The least time the job's fixed caps allow ("auto" limits fix none in advance)."""
    requests_per_minute: int | str
    """The job's setting: a number, or "auto" (learned while running)."""
    model: str
    tokenizer: str
    tokens_exact: bool
    price_source: str
    input_price_per_million: float | None
    output_price_per_million: float | None
    context_length: int | None
    skipped: dict[str, int]
    rows_per_s: int | None
    mode: str = "realtime"
    batch_discount: float | None = None
    """Batch mode: the cost figures above are at this fraction of the list price."""
    realtime_cost_usd_expected: float | None = None
    """Batch mode: what the expected cost would be in realtime mode."""
    realtime_cost_usd_max: float | None = None
    output_tokens_p50: int | None = None
    """Completion tokens of rows already answered (e.g. by ``--sample N``): median, 95th percentile, longest."""
    output_tokens_p95: int | None = None
    output_tokens_longest: int | None = None
    max_tokens_suggested: int | None = None
    """A max_tokens that fits the answered rows, when it would at least halve the job's (as the canary suggests)."""
    cached_tokens_expected: int = 0
    """Input tokens expected to be read from the provider's prompt cache (priced at the cached price above)."""
    shared_prefix_tokens: int = 0
    """The longest prefix the rows share, in tokens."""
    shared_prefixes: int = 0
    """Shared prefixes worth caching: each is warmed by one request before its other rows go."""
    cache_rule: str = ""
    """The provider's caching rule applied (minimum length, granularity)."""
    cache_saved_usd_expected: float | None = None
    """What caching is expected to save against the list price."""
    cached_input_price_per_million: float | None = None
    cache_write_price_per_million: float | None = None
    missing_prices: list[str] = field(default_factory=list)
    """Prices nobody knows, each with the [model] key that sets it."""
    lanes: list[LaneCost] = field(default_factory=list)
    """The job priced in each lane the provider offers (realtime, with cache, batch, flex)."""
    cheapest_lane: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __repr__(self) -> str:
        return (
            f"Estimate(model={self.model!r}, rows_to_send={self.rows_to_send}, rows_done={self.rows_done}, "
            f"input_tokens={self.input_tokens}, cost_usd_expected={_usd(self.cost_usd_expected)}, "
            f"cost_usd_max={_usd(self.cost_usd_max)})"
        )

    def figures(self) -> list[tuple[str, str]]:
        """The figures a person reads first, as (label, text) pairs."""
        exact = "exact" if self.tokens_exact else "approximate"
        out = [
            ("model", self.model),
            ("rows to send", f"{self.rows_to_send:,} of {self.rows:,} ({self.rows_done:,} already done)"),
            ("input tokens", f"{self.input_tokens:,} ({self.tokenizer}, {exact})"),
            ("output tokens", f"{self.output_tokens_expected:,} expected, {self.output_tokens_max:,} at most"),
            (
                "cost",
                f"{_usd(self.cost_usd_expected)} expected ({_usd(self.cost_usd_min)} to {_usd(self.cost_usd_max)}), "
                f"prices from {self.price_source}",
            ),
        ]
        if self.mode == "batch":
            out.append(("time", "within the provider's batch window (usually minutes, at most 24 h)"))
        elif self.requests_per_minute == "auto":
            out.append(("time", 'requests_per_minute = "auto": the rate is learned while running'))
        else:
            out.append(("time", f"at least {self.duration_s_min:,.0f} s at the job's rate limits"))
        if self.skipped:
            out.append(("skipped", ", ".join(f"{k} x{v}" for k, v in sorted(self.skipped.items()))))
        return out

    def _repr_html_(self) -> str:
        return html_table("Estimate (dry run)", self.figures())


def _usd(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.6f}"


def html_table(title: str, figures: list[tuple[str, str]]) -> str:
    """A small two-column table for a notebook: no styles of its own, so it follows the notebook's theme."""
    rows = "".join(
        f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>{html.escape(v)}</td></tr>"
        for k, v in figures
    )
    return f"<table><caption style='text-align:left'><b>{html.escape(title)}</b></caption>{rows}</table>"


@dataclass(frozen=True)
class JobStatus:
    """What the journal says about a job (the fields of ``pipeline status --json``)."""

    job: str
    journal: str
    active: bool
    active_pid: int | None
    started: bool
    rows_total: int | None
    rows_done: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    rows_retryable: int = 0
    rows_pending: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    """Everything the job has spent, including journals set aside by ``--fresh``."""
    last_progress: str | None = None
    batches_pending: list[PendingBatch] = field(default_factory=list)
    """Batch mode: provider batches not yet collected (a rerun collects them)."""
    rows_in_batches: int = 0
    """Batch mode: rows in those batches (not counted in ``rows_retryable``)."""
    batches_adopted: list[str] = field(default_factory=list)
    """Batch mode: batches the provider accepted before a crash, found and adopted by a later run (paid once)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PendingBatch:
    """A provider batch the journal knows of and has not fully collected."""

    id: str
    provider: str
    status: str
    """The provider's own word for it when last polled (``submitted`` before the first poll)."""
    rows: int
    submitted: str
    """When it was submitted (ISO 8601, UTC)."""
