"""The signals that stop a run gracefully (twice: at once), shared by ``pipeline run`` and ``pipeline eval``."""

from __future__ import annotations

import signal

# SIGHUP (the terminal closed, or a scheduler's stop) behaves like SIGTERM: a graceful stop with a summary.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
