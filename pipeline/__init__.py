"""pipeline: run large batches of LLM requests over datasets.

The public surface is re-exported here; everything else is implementation::

    import pipeline

    result = pipeline.run(df, "jobs/label_reviews.toml")  # a DataFrame in
    result.to_pandas()  # the same rows out, with completion, tokens and cost
    result.summary.cost_usd

    scores = pipeline.evaluate(df, "jobs/label_reviews.toml", gold="gold", sample=200)
    scores.accuracy, scores.cost_usd_full_run_expected, scores.report
"""

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
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # StopRun left the public surface: it was never raised (a stop is the result's
    # exit_code 3 and summary.stop_reason). Still importable, with a warning, for a release.
    if name == "StopRun":
        import warnings

        from pipeline.errors import StopRun

        warnings.warn(
            "pipeline.StopRun is deprecated and never raised: a stopped run returns exit_code 3 "
            "and says why in summary.stop_reason",
            DeprecationWarning,
            stacklevel=2,
        )
        return StopRun
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
