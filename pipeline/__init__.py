"""pipeline: run large batches of LLM requests over datasets.

The public surface is re-exported here; everything else is implementation::

    import pipeline

    result = pipeline.run(df, "jobs/label_reviews.toml")  # a DataFrame in
    result.to_pandas()  # the same rows out, with completion, tokens and cost
    result.summary.cost_usd
"""

from pipeline.api import Result, arun, estimate, load, run
from pipeline.config.job import Job, load_job
from pipeline.engine.reports import Estimate, RunSummary
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

__all__ = [
    "CredentialsError",
    "Estimate",
    "ExitCode",
    "IdentityError",
    "InputError",
    "Job",
    "JobError",
    "JournalError",
    "LocalServerError",
    "LockedError",
    "PipelineError",
    "Result",
    "RunSummary",
    "StopRun",
    "UserError",
    "arun",
    "estimate",
    "load",
    "load_job",
    "run",
]
__version__ = "0.1.0"
