"""The event loop the command line runs on: the one place a loop is started.

uvloop (libuv; a dependency on Linux and macOS) when it is installed: it cuts
the loop's own share of a request's CPU. Else, or with
``PIPELINE_EVENT_LOOP=asyncio``, the standard library's loop. Library calls
(``pipeline.run``) use whatever loop their caller has: only the CLI picks one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
EVENT_LOOP_ENV = "PIPELINE_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for the standard loop."""
    if os.environ.get(EVENT_LOOP_ENV, "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
