"""The pipeline's error tree and exit codes.

::

    PipelineError                  exit 1 unless a subclass says otherwise
    ├── UserError                  exit 2: a mistake the user can fix; nothing was sent
    │   ├── JobError               the job file (bad TOML, unknown key, wrong type, bad template)
    │   ├── InputError             the dataset (missing file, column, bad ids, bad bytes)
    │   │   └── RecordError        a record found unreadable while streaming (names file and row)
    │   ├── CredentialsError       the API key (missing, malformed)
    │   ├── LockedError            another run of the job is active
    │   ├── JournalError           the journal cannot be read
    │   └── IdentityError          the journal belongs to different settings
    ├── LocalServerError           exit 2: the local llama.cpp server did not start
    └── UnavailableError           exit 3: a service outside the job (the price list) failed; try again

A run that stops early (a signal, the budget, a refused key, ...) raises
nothing: it returns exit code 3 with a typed reason (``StopReason`` in
``engine/settlement.py``; its message is ``RunSummary.stop_reason``).

Provider failures are not exceptions: the HTTP boundary turns every response
into a classified ``Reply`` value (see ``providers/base.py``), recorded per row.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """What the process exit code (and ``Result.exit_code``) says about a run."""

    OK = 0  # every row succeeded
    ROWS_FAILED = 1  # finished, but some rows carry an error
    USAGE = 2  # usage, job, input or key error: nothing was sent
    STOPPED = 3  # stopped early (signal, key rejected, budget, job-level failure): resumable


class PipelineError(Exception):
    """Base class for every error the pipeline raises on purpose."""

    exit_code: int = ExitCode.ROWS_FAILED


class UserError(PipelineError):
    """A mistake the user can fix: the message names the key, column or file."""

    exit_code = ExitCode.USAGE


class JobError(UserError):
    """The job file is invalid (bad TOML, unknown key, wrong type, bad template)."""


class InputError(UserError):
    """The dataset cannot be used (missing file, missing column, bad ids)."""


class RecordError(InputError):
    """A record that cannot be read, found while streaming the input (after sending may have begun).

    ``path`` is the file (one file of a folder) and ``row`` the row, counted from 1
    within that file, where reading stopped.
    """

    def __init__(self, path: Path | str, row: int, problem: str) -> None:
        super().__init__(f"{path}: row {row}: {problem}")
        self.path = path
        self.row = row


class CredentialsError(UserError):
    """The API key is missing from the environment."""


class LockedError(UserError):
    """Another run of the same job is active."""


class JournalError(UserError):
    """The journal cannot be read (damaged, or from a newer release): the message names its path."""


class IdentityError(UserError):
    """The journal belongs to a job with different results-determining settings."""


class LocalServerError(PipelineError):
    """The local llama.cpp server could not be started."""

    exit_code = ExitCode.USAGE


class StopRun(PipelineError):
    """Deprecated, never raised: a stopped run returns exit code 3 and its ``stop_reason``.

    Kept importable (``pipeline.StopRun`` warns) for one release; not in ``pipeline.__all__``.
    """

    exit_code = ExitCode.STOPPED


class UnavailableError(PipelineError):
    """Something outside any job could not be fetched or saved (``pipeline prices --refresh`` offline).

    Exit 3, like a stop: nothing was changed, and the same command can simply be
    run again later. (Exit 1 would claim that rows failed.)
    """

    exit_code = ExitCode.STOPPED
