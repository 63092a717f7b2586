"""What an evaluation returns: per-variant scores, costs and mistakes, and their JSON form.

Shared by :mod:`.evaluate` (which computes them) and :mod:`.page` (which renders them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ExitCode
from pipeline.evaluation.metrics import LabelScore, Scores


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate against: the gold column, which rows, which answer property."""

    gold: str
    sample: int | None = None
    seed: int = 0
    field: str | None = None
    quiet: bool = True
    notebook: bool = False  # a progress bar that renders in Jupyter (the Python API)
    fresh: bool = False  # set the journals aside first (after changing the prompt or model)
    # The cheapest variant at least this accurate is recommended; None: the most accurate.
    min_accuracy: float | None = None


@dataclass(frozen=True)
class Mistake:
    """One wrongly answered row, for the report."""

    key: str
    gold: str
    predicted: str
    prompt: str  # the rendered user prompt, shortened
    error: str | None  # why the row has no answer, when it has none


@dataclass(frozen=True)
class VariantEvaluation:
    """How one variant (or the job itself, without variants) did on the evaluated rows."""

    name: str
    model: str
    scores: Scores
    errors_by_status: Mapping[str, int]
    cost_usd: float | None
    """What the evaluated rows' answers cost, from the journal (also when paid by an earlier run)."""
    cost_usd_paid_now: float
    """What this evaluation was billed: 0 when every row was answered before."""
    cost_per_1k_rows: float | None
    cost_usd_full_run_expected: float | None
    """The whole job's rows at the observed cost per evaluated row."""
    requests: int
    journal: Path
    chart: Path
    mistakes: tuple[Mistake, ...]
    frontier: bool = False
    """No other variant is at least as accurate for at most the cost."""
    stop_reason: str | None = None

    @property
    def accuracy(self) -> float | None:
        return self.scores.accuracy

    def to_dict(self) -> dict[str, Any]:
        s = self.scores
        return {
            "name": self.name,
            "model": self.model,
            "rows": s.rows,
            "correct": s.correct,
            "accuracy": s.accuracy,
            "macro_f1": s.macro_f1,
            "rows_with_error": s.errors,
            "errors_by_status": dict(self.errors_by_status),
            "per_label": {label: _score_dict(v) for label, v in s.per_label.items()},
            "confusion": {g: dict(row) for g, row in s.confusion.items()},
            "cost_usd": self.cost_usd,
            "cost_usd_paid_now": self.cost_usd_paid_now,
            "cost_per_1k_rows": self.cost_per_1k_rows,
            "cost_usd_full_run_expected": self.cost_usd_full_run_expected,
            "requests": self.requests,
            "frontier": self.frontier,
            "journal": str(self.journal),
            "chart": str(self.chart),
            "stop_reason": self.stop_reason,
            "mistakes": [asdict(m) for m in self.mistakes],
        }


@dataclass(frozen=True)
class Evaluation:
    """The result of ``pipeline eval`` / :func:`pipeline.evaluate`.

    ``results`` holds one entry per variant, or one for the job itself when it
    has no variants; the top-level figures (``accuracy``, ``per_label``, ...)
    are those of the first entry.
    """

    job: str
    gold: str
    field: str
    rows: int
    rows_in_job: int
    rows_with_gold: int
    sample: int | None
    seed: int
    results: tuple[VariantEvaluation, ...]
    has_variants: bool
    recommended: str | None
    report: Path
    min_accuracy: float | None = None
    variants_chart: Path | None = None
    exit_code: ExitCode = ExitCode.OK
    labels: tuple[str, ...] = ()

    @property
    def first(self) -> VariantEvaluation:
        return self.results[0]

    @property
    def accuracy(self) -> float | None:
        return self.first.scores.accuracy

    @property
    def per_label(self) -> Mapping[str, LabelScore]:
        return self.first.scores.per_label

    @property
    def confusion(self) -> Mapping[str, Mapping[str, int]]:
        return self.first.scores.confusion

    @property
    def cost_usd(self) -> float | None:
        return self.first.cost_usd

    @property
    def cost_usd_full_run_expected(self) -> float | None:
        return self.first.cost_usd_full_run_expected

    @property
    def chart(self) -> Path:
        return self.first.chart

    @property
    def stop_reason(self) -> str | None:
        return next((r.stop_reason for r in self.results if r.stop_reason), None)

    def to_dict(self) -> dict[str, Any]:
        """The ``pipeline eval --json`` object."""
        first = self.first.to_dict()
        out: dict[str, Any] = {
            "job": self.job,
            "gold": self.gold,
            "field": self.field,
            "rows": self.rows,
            "rows_in_job": self.rows_in_job,
            "rows_with_gold": self.rows_with_gold,
            "sample": self.sample,
            "seed": self.seed,
            "model": first["model"],
            "accuracy": first["accuracy"],
            "macro_f1": first["macro_f1"],
            "correct": first["correct"],
            "rows_with_error": first["rows_with_error"],
            "errors_by_status": first["errors_by_status"],
            "per_label": first["per_label"],
            "confusion": first["confusion"],
            "cost_usd": first["cost_usd"],
            "cost_usd_paid_now": sum(r.cost_usd_paid_now for r in self.results),
            "requests": sum(r.requests for r in self.results),
            "cost_per_1k_rows": first["cost_per_1k_rows"],
            "cost_usd_full_run_expected": first["cost_usd_full_run_expected"],
            "chart": first["chart"],
            "report": str(self.report),
            "mistakes": first["mistakes"],
            "exit_code": int(self.exit_code),
            "stop_reason": self.stop_reason,
        }
        if self.has_variants:
            out["variant"] = self.first.name
            out["variants"] = [r.to_dict() for r in self.results]
            out["variants_chart"] = str(self.variants_chart) if self.variants_chart else None
            out["recommended"] = self.recommended
            out["min_accuracy"] = self.min_accuracy
        return out


def _score_dict(s: LabelScore) -> dict[str, Any]:
    return {"precision": s.precision, "recall": s.recall, "f1": s.f1, "support": s.support}
