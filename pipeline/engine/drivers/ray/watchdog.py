"""The watchdog of a local Ray instance: when the driver dies, its Ray processes die too.

A local Ray instance is a handful of processes started by the driver (GCS,
raylet, log monitor, dashboard and runtime-env agents, one process per
actor). ``ray.shutdown()`` stops them on a normal exit, but after ``kill -9``
of the driver some of them live on for a minute or more. The driver starts
this small process first, in its own session (so a Ctrl-C meant for the
driver does not reach it), with a pipe on its standard input:

- while the driver lives, it notes every process that descends from the
  driver and was not there before (twice a second);
- when the pipe closes (the driver exited, however it died) it kills them
  all, with any children they started since, and exits.

Processes are identified by pid *and* start time, so a reused pid is never
killed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from typing import IO

import psutil

POLL_S = 0.5


def start(driver_pid: int) -> subprocess.Popen[bytes]:
    """Start the watchdog for ``driver_pid``; close its stdin (or exit) to fire it."""
    # Run as a script: it needs only the standard library and psutil, not this package.
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), str(driver_pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """A normal exit: let the watchdog sweep whatever ``ray.shutdown()`` left, and wait for it."""
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout_s)


Known = dict[int, float]  # pid -> create_time


def _snapshot(pid: int) -> Known:
    """The driver's descendants that belong to Ray (its other children are not ours to kill)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    found: Known = {}
    for child in children:
        with contextlib.suppress(psutil.Error):
            if _is_ray(child):
                found[child.pid] = child.create_time()
    return found


def _is_ray(proc: psutil.Process) -> bool:
    # raylet, gcs_server, ray::<Actor>, and Python processes running ray's own modules.
    return "ray" in proc.name() or any("ray" in part for part in proc.cmdline()[:3])


def _descendants(known: Known) -> Known:
    """The known processes still alive, with every child they have now."""
    found: Known = {}
    for pid, created in known.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() != created:
                continue  # the pid was reused: not ours
            found[pid] = created
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = child.create_time()
    return found


def _kill(known: Known) -> None:
    for pid, created in known.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                proc.send_signal(signal.SIGKILL)


def watch(driver_pid: int, pipe: IO[bytes]) -> None:
    me = os.getpid()
    before = set(_snapshot(driver_pid))  # a Ray instance of someone else's: not ours to kill
    known: Known = {}
    while True:
        readable, _, _ = select.select([pipe], [], [], POLL_S)
        for pid, created in _snapshot(driver_pid).items():
            if pid != me and pid not in before:
                known[pid] = created
        if readable and not os.read(pipe.fileno(), 4096):
            break  # end of file: the driver is gone or done
        if not psutil.pid_exists(driver_pid):
            break
    known = _descendants(known)
    known.pop(me, None)
    _kill(known)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(argv[0]), sys.stdin.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
