"""The Ray instance a run uses: what it refuses up front, joining a cluster or starting a local one, Ray's errors.

Ray is imported only inside these functions (``pip install 'pipeline[ray]'``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config.job import AUTO
from pipeline.engine.limits.limiter import fixed_rate
from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.engine.plan import Plan

DEFAULT_WORKERS = 2
LOCAL_CPUS = 1  # the actors ask for no CPU (they wait on the network); Ray needs a number
LOCAL_OBJECT_STORE = 128 * 1024**2  # bytes: only CSV/JSON Lines batches pass through it


@dataclass(frozen=True)
class RaySettings:
    workers: int = DEFAULT_WORKERS
    address: str | None = None  # None: start a local Ray instance


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def is_ray_error(exc: BaseException) -> bool:
    import ray

    return isinstance(exc, ray.exceptions.RayError)


def worker_gone(exc: BaseException) -> bool:
    """The actor died (its process was killed, its node lost), as opposed to an error in its code."""
    import ray

    return isinstance(exc, ray.exceptions.RayActorError)


def cause(exc: BaseException) -> str:
    """The first line that says what went wrong, without Ray's traceback around it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line:
            return line[:300]
    return lines[-1][:300] if lines else type(exc).__name__


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` where nothing listens is an error now: Ray itself would retry it for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": Ray's own lookup
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


def _join(ray: Any, address: str) -> None:
    """``ray.init(address)``: a cluster that cannot be reached or refuses us is the user's one-line error.

    Nothing has been sent yet. Ray raises ``ConnectionError`` for an address with
    no cluster, or a cluster whose token authentication refuses this machine.
    """
    _reachable(address)
    refused: tuple[type[BaseException], ...] = (ConnectionError,)
    auth_error = getattr(getattr(ray, "exceptions", None), "AuthenticationError", None)
    if isinstance(auth_error, type) and issubclass(auth_error, BaseException):
        refused += (auth_error,)
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except refused as exc:
        raise UserError(
            f"--address {address}: could not join the Ray cluster ({' '.join(str(exc).split())}); "
            "check the address, that the cluster runs, and that this machine has the cluster's token "
            "(RAY_AUTH_MODE=token with ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        ) from None


@contextlib.contextmanager
def ray_session(settings: RaySettings) -> Iterator[None]:
    """Join a cluster (``address``) or start a local Ray instance, watched by a watchdog."""
    import ray

    if ray.is_initialized():
        yield  # the caller's own Ray (the Python API inside a Ray program): theirs to stop
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # a dead worker is handled, not printed
    logging.getLogger("ray").setLevel(logging.ERROR)
    watchdog = None
    if settings.address is None:
        from pipeline.engine.drivers.ray import watchdog as ray_watchdog

        watchdog = ray_watchdog.start(os.getpid())
    try:
        if settings.address is None:
            ray.init(
                num_cpus=LOCAL_CPUS,
                object_store_memory=LOCAL_OBJECT_STORE,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.ERROR,
                namespace="pipeline",
                _node_ip_address="127.0.0.1",
            )
        else:
            _join(ray, settings.address)
        try:
            yield
        finally:
            ray.shutdown()
    finally:
        if watchdog is not None:
            from pipeline.engine.drivers.ray import watchdog as ray_watchdog

            ray_watchdog.stop(watchdog)


def check_ray(plan: Plan) -> None:
    """What the Ray driver refuses, before the lock and the journal (a user error sends nothing)."""
    if not ray_available():
        raise UserError("--engine ray needs Ray: pip install 'pipeline[ray]'")
    if plan.job.model.mode == "batch":
        raise UserError('--engine ray sends rows in realtime: run it without [model] mode = "batch"')
    fixed_caps(plan)


def fixed_caps(plan: Plan) -> tuple[int, int]:
    """The job's caps as numbers, for the limiter actor.

    A rate learned from the server (``"auto"``) is learned inside one process
    (``engine/limits/adaptive.py``); across workers the cap must be set. A provider
    without rate limits (a local server) has nothing to learn: no cap.
    """
    limits = plan.job.limits
    for key, value in (
        ("requests_per_minute", limits.requests_per_minute),
        ("tokens_per_minute", limits.tokens_per_minute),
    ):
        if value == AUTO and plan.provider.rate_limited:
            raise UserError(
                f'[limits] {key} = "auto" is learned by one process: with --engine ray set it to a number '
                "(the provider's limit for your account; pipeline run without --engine ray shows the learned rate)"
            )
    return fixed_rate(limits.requests_per_minute), fixed_rate(limits.tokens_per_minute)
