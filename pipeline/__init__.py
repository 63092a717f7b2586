"""pipeline: run large batches of LLM requests over datasets.

The public surface is re-exported here; everything else is implementation::

    import pipeline

    result = pipeline.run(df, "jobs/label_reviews.toml")  # a DataFrame in
    result.to_pandas()  # the same rows out, with completion, tokens and cost
    result.summary.cost_usd

    scores = pipeline.evaluate(df, "jobs/label_reviews.toml", gold="gold", sample=200)
    scores.accuracy, scores.cost_usd_full_run_expected, scores.report

The names are imported on first use (PEP 562): ``import pipeline`` and the
command line's start-up (``pipeline --help``, a rerun with nothing to do) do
not pay for pyarrow, aiohttp, pydantic and the evaluation code until needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.api import Result, aevaluate, arun, estimate, evaluate, load, run, status
    from pipeline.config.job import Job, load_job
    from pipeline.engine.reports import Estimate, JobStatus, RunSummary
    from pipeline.errors import (
        CredentialsError,
        ExitCode,
        IdentityError,
        InputError,
        JobError,
        JournalError,
        LocalServerError,
        LockedError,
        PipelineError,
        UserError,
    )
    from pipeline.evaluation.metrics import LabelScore, Scores
    from pipeline.evaluation.results import Evaluation, VariantEvaluation

__all__ = [
    "CredentialsError",
    "Estimate",
    "Evaluation",
    "ExitCode",
    "IdentityError",
    "InputError",
    "Job",
    "JobError",
    "JobStatus",
    "JournalError",
    "LabelScore",
    "LocalServerError",
    "LockedError",
    "PipelineError",
    "Result",
    "RunSummary",
    "Scores",
    "UserError",
    "VariantEvaluation",
    "aevaluate",
    "arun",
    "estimate",
    "evaluate",
    "load",
    "load_job",
    "run",
    "status",
]
# The module that defines each public name (the TYPE_CHECKING imports above, for tools).
_WHERE = {
    **dict.fromkeys(("Result", "aevaluate", "arun", "estimate", "evaluate", "load", "run", "status"), "pipeline.api"),
    **dict.fromkeys(("Job", "load_job"), "pipeline.config.job"),
    **dict.fromkeys(("Estimate", "JobStatus", "RunSummary"), "pipeline.engine.reports"),
    **dict.fromkeys(("LabelScore", "Scores"), "pipeline.evaluation.metrics"),
    **dict.fromkeys(("Evaluation", "VariantEvaluation"), "pipeline.evaluation.results"),
    **dict.fromkeys(
        (
            "CredentialsError",
            "ExitCode",
            "IdentityError",
            "InputError",
            "JobError",
            "JournalError",
            "LocalServerError",
            "LockedError",
            "PipelineError",
            "UserError",
        ),
        "pipeline.errors",
    ),
}
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "StopRun":
        # StopRun left the public surface: it was never raised (a stop is the result's
        # exit_code 3 and summary.stop_reason). Still importable, with a warning, for a release.
        import warnings

        from pipeline.errors import StopRun

        warnings.warn(
            "pipeline.StopRun is deprecated and never raised: a stopped run returns exit_code 3 "
            "and says why in summary.stop_reason",
            DeprecationWarning,
            stacklevel=2,
        )
        return StopRun
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
