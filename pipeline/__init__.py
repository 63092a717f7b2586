"""pipeline: run large batches of LLM requests over datasets.

The public surface is re-exported here; everything else is implementation.
"""

from pipeline.config.job import Job, load_job
from pipeline.errors import (
    CredentialsError,
    IdentityError,
    InputError,
    JobError,
    LocalServerError,
    LockedError,
    PipelineError,
    StopRun,
    UserError,
)

__all__ = [
    "CredentialsError",
    "IdentityError",
    "InputError",
    "Job",
    "JobError",
    "LocalServerError",
    "LockedError",
    "PipelineError",
    "StopRun",
    "UserError",
    "load_job",
    "run_job",
]
__version__ = "0.1.0"


def run_job(job: Job, *, quiet: bool = True, fresh: bool = False, retry_failed: bool = False) -> int:
    """Run a job from Python (outside any event loop); returns the CLI's exit code."""
    import asyncio

    from pipeline.engine.plan import prepare
    from pipeline.engine.runner import RunOptions, run_plan

    result = asyncio.run(run_plan(prepare(job), RunOptions(quiet=quiet, fresh=fresh, retry_failed=retry_failed)))
    return result.exit_code
