"""The typed reports a run hands to its front end (CLI or Python API).

Frozen dataclasses: the CLI prints them or dumps them with ``asdict()`` for
``--json``; the Python API returns them as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import ExitCode

if TYPE_CHECKING:
    from pipeline.engine.limits.limiter import LimitSource


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
