"""The driver contract: the same fake-server script through the realtime, batch and Ray drivers
leaves the same journal rows and the same ``RunSummary`` counters.

One script for every driver: a row whose first request gets a 500 (retried: realtime and Ray
retry the request, batch mode submits the row again in a new batch; either way two requests),
a row refused with a 400 (failed, not retried), a blank prompt and a prompt over the model's
context window (skipped, nothing sent), and ordinary rows. Each driver runs as a real
``pipeline run --json`` subprocess against a loopback server speaking the real protocol
(``tests/fakes/server.py`` for chat, ``tests/fakes/batch.py`` for the batch API); the Ray leg
starts a real local Ray instance.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import spawn, write_job, write_parquet
from tests.fakes.batch import FakeBatchServer
from tests.fakes.server import FakeServer

ROWS = 24
RETRIED = "number 5 "  # its first request gets a 500
REFUSED = "number 7 "  # its request gets a 400
JOURNAL = Path("data/out/job.parquet.journal.sqlite")
# What the contract compares, per journal row and in the summary.
ROW_FIELDS = ("key", "status", "completion", "error", "attempts", "prompt_tokens", "completion_tokens")
COUNTERS = (
    "exit_code",
    "rows_ok",
    "rows_failed",
    "rows_invalid",
    "rows_skipped",
    "rows_resumed",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors",
    "output_rows",
    "output_rows_with_error",
)


def data() -> dict[str, list[Any]]:
    texts = [f"review number {i} about item {i * 7 % 13}" for i in range(ROWS)]
    texts[3] = " "  # a blank prompt: skipped
    texts[11] = "word " * 400  # over the context window: skipped
    return {"id": list(range(ROWS)), "text": texts}


def prepare(workdir: Path, base_url: str, **model: Any) -> None:
    (workdir / "jobs").mkdir(parents=True)
    write_parquet(workdir / "data" / "in.parquet", data())
    spec = {"provider": "openrouter", "context_length": 256, **model}
    write_job(workdir, base_url, system=None, user="{text}", model=spec, limits={"concurrency": 4})


def run(workdir: Path, *flags: str) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
    """Run the job in a subprocess; its journal rows by key and its summary's counters."""
    proc = spawn(workdir, "run", "job", "--json", "--quiet", *flags)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 1), err
    summary = json.loads(out)
    with sqlite3.connect(workdir / JOURNAL) as conn:
        rows = conn.execute(f"SELECT {', '.join(ROW_FIELDS)} FROM results ORDER BY CAST(key AS INTEGER)")
        journal = {row[0]: row for row in rows}
    return journal, {k: summary[k] for k in COUNTERS}


@pytest.fixture
def legs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-test-contract")
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path


def realtime_leg(root: Path, *flags: str) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
    server = FakeServer(script={RETRIED: ["500"], REFUSED: ["400"]}, retry_after="0")
    with server.running():
        workdir = root / ("ray" if flags else "realtime")
        prepare(workdir, server.base_url or "")
        result = run(workdir, *flags)
        assert server.duplicates() == 0
    return result


def batch_leg(root: Path) -> tuple[dict[str, tuple[Any, ...]], dict[str, Any]]:
    server = FakeBatchServer(flavour="openrouter", script={RETRIED: [500], REFUSED: [400]})
    with server.running():
        workdir = root / "batch"
        prepare(workdir, server.base_url, mode="batch", batch_poll_s=0.05)
        result = run(workdir)
        assert server.chat_requests == 0
    return result


def check_script_played(journal: dict[str, tuple[Any, ...]], summary: dict[str, Any]) -> None:
    """The script did what the contract relies on, so equal results are not equally empty."""
    status = {key: row[1] for key, row in journal.items()}
    assert len(journal) == ROWS
    assert (status["3"], status["11"], status["7"], status["5"]) == ("skipped", "skipped", "failed", "ok")
    assert journal["5"][4] == 2  # two requests for the retried row
    assert summary["rows_ok"] == ROWS - 3 and summary["requests"] == ROWS - 2 + 1


def test_realtime_and_batch_drivers_leave_the_same_journal_and_counters(legs: Path) -> None:
    realtime = realtime_leg(legs)
    check_script_played(*realtime)
    batch = batch_leg(legs)
    assert batch[0] == realtime[0]
    assert batch[1] == realtime[1]


@pytest.mark.ray
@pytest.mark.slow
def test_ray_driver_leaves_the_same_journal_and_counters(legs: Path) -> None:
    pytest.importorskip("ray")
    realtime = realtime_leg(legs)
    check_script_played(*realtime)
    ray = realtime_leg(legs, "--engine", "ray", "--workers", "2")
    assert ray[0] == realtime[0]
    assert ray[1] == realtime[1]
