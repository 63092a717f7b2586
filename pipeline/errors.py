"""The pipeline's error tree.

Every error a user can cause (a bad job file, a bad dataset, a missing key)
is a :class:`UserError`: the CLI prints its one-line message and exits 2,
before anything is sent. Provider failures never surface as exceptions to the
user: they are classified per row (see ``providers.py``) and recorded.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class for every error the pipeline raises on purpose."""

    exit_code = 1


class UserError(PipelineError):
    """A mistake the user can fix: the message names the key, column or file."""

    exit_code = 2


class JobError(UserError):
    """The job file is invalid (bad TOML, unknown key, wrong type, bad template)."""


class InputError(UserError):
    """The dataset cannot be used (missing file, missing column, bad ids)."""


class CredentialsError(UserError):
    """The API key is missing from the environment."""


class LockedError(UserError):
    """Another run of the same job is active."""


class IdentityError(UserError):
    """The journal belongs to a job with different results-determining settings."""


class LocalServerError(PipelineError):
    """The local llama.cpp server could not be started."""

    exit_code = 2


class StopRun(PipelineError):
    """Sending stopped early (key rejected, out of credits, budget reached, signal).

    The run is resumable: rerunning the same command continues it.
    """

    exit_code = 3
