"""Both chat transports end to end: the lean client (the default) and aiohttp (``PIPELINE_HTTP=aiohttp``).

The rest of the suite runs on the default; these run a few of its cases on
each path through the CLI and the loopback fake server, and check which
client the server actually saw (its User-Agent).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_KEY, run_cli
from tests.fakes.server import FakeServer
from tests.integration.test_errors import assert_ok, bodies_for, make_job, output_rows, row_key, user_message


@pytest.fixture(params=["lean", "aiohttp"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "aiohttp":
        monkeypatch.setenv("PIPELINE_HTTP", "aiohttp")
    else:
        monkeypatch.delenv("PIPELINE_HTTP", raising=False)
    return str(request.param)


def _agents(server: FakeServer) -> set[str]:
    return {b["headers"].get("User-Agent", "") for b in server.stats()["bodies"]}


def test_run_on_each_path(workdir: Path, server: FakeServer, path: str) -> None:
    job = make_job(workdir, server, 40, model={"headers": {"X-Title": "paths"}})
    assert run_cli(str(job)) == 0
    rows = output_rows(workdir)
    for i in range(40):
        assert_ok(rows[i], i)
    agents = _agents(server)
    assert len(agents) == 1
    agent = agents.pop()
    assert ("aiohttp" in agent) == (path == "aiohttp"), agent
    seen = server.stats()["bodies"][0]["headers"]
    assert seen["Authorization"] == f"Bearer {TEST_KEY}" and seen["X-Title"] == "paths"


def test_drop_is_one_attempt_on_each_path(workdir: Path, server: FakeServer, path: str) -> None:
    """A connection dropped before the answer: that attempt ends, the retry loop sends again (counted)."""
    server.config.retry_after = "0"
    server.config.script = {row_key(3): ["drop"]}
    job = make_job(workdir, server, 8, limits={"max_attempts": 3})
    assert run_cli(str(job)) == 0
    rows = output_rows(workdir)
    assert_ok(rows[3], 3, attempts=2)
    assert len(bodies_for(server, user_message(3))) == 2  # the dropped one and its retry: nothing re-sent silently
    assert server.stats()["dropped"] == 1


def test_timeout_text_on_each_path(workdir: Path, server: FakeServer, path: str) -> None:
    server.config.retry_after = "0"
    server.config.script = {row_key(2): ["hang"] * 5}
    job = make_job(workdir, server, 5, limits={"max_attempts": 2, "timeout_s": 0.4})
    assert run_cli(str(job)) == 1
    rows = output_rows(workdir)
    assert rows[2]["error"] == "timeout after 0.4 s" and rows[2]["attempts"] == 2
    for i in (0, 1, 3, 4):
        assert_ok(rows[i], i)


def test_lean_run_never_imports_aiohttp(workdir: Path, server: FakeServer, path: str) -> None:
    """A run on the lean client loads no aiohttp at all (its import is a fifth of a second); the fallback does."""
    job = make_job(workdir, server, 10)
    code = (
        "import sys\n"
        "from pipeline.cli.app import main\n"
        f"code = main(['run', {str(job)!r}, '--quiet'])\n"
        "print(code, 'aiohttp' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.split() == ["0", str(path == "aiohttp")], done.stderr
    assert server.stats()["ok"] == 10
