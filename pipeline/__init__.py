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
        StopRun,
        UserError,
    )
    from pipeline.evaluation.metrics import LabelScore, Scores
    from pipeline.evaluation.results import Evaluation, VariantEvaluation

# Each public name and the module that defines it.
_WHERE = {
    "Result": "pipeline.api",
    "aevaluate": "pipeline.api",
    "arun": "pipeline.api",
    "estimate": "pipeline.api",
    "evaluate": "pipeline.api",
    "load": "pipeline.api",
    "run": "pipeline.api",
    "status": "pipeline.api",
    "Job": "pipeline.config.job",
    "load_job": "pipeline.config.job",
    "Estimate": "pipeline.engine.reports",
    "JobStatus": "pipeline.engine.reports",
    "RunSummary": "pipeline.engine.reports",
    "CredentialsError": "pipeline.errors",
    "ExitCode": "pipeline.errors",
    "IdentityError": "pipeline.errors",
    "InputError": "pipeline.errors",
    "JobError": "pipeline.errors",
    "JournalError": "pipeline.errors",
    "LocalServerError": "pipeline.errors",
    "LockedError": "pipeline.errors",
    "PipelineError": "pipeline.errors",
    "StopRun": "pipeline.errors",
    "UserError": "pipeline.errors",
    "LabelScore": "pipeline.evaluation.metrics",
    "Scores": "pipeline.evaluation.metrics",
    "Evaluation": "pipeline.evaluation.results",
    "VariantEvaluation": "pipeline.evaluation.results",
}

__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
