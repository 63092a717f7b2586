"""Batch-mode edges where money or the key leaked: echoes, usage-less results, orphans, odd statuses.

Every test runs the real CLI (in process, or as a subprocess where a crash or a hang is
the point) against the loopback batch fake (``tests/fakes/batch.py``) of each provider.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.cli.app import main
from tests.conftest import TEST_KEY, reviews, run_cli, spawn, write_job, write_parquet
from tests.fakes.batch import FakeBatchServer
from tests.fakes.server import expected_reply

PREFIX = "Summarise in one sentence:\n\n"
OUTPUT = Path("data/out/job.parquet")
JOURNAL = Path("data/out/job.parquet.journal.sqlite")
PROVIDERS = ["openrouter", "mistral", "openai"]


@contextlib.contextmanager
def fake(flavour: str = "openrouter", **config: Any) -> Iterator[FakeBatchServer]:
    server = FakeBatchServer(flavour=flavour, **config)
    with server.running():
        yield server


def batch_job(
    workdir: Path, server: FakeBatchServer, rows: int, limits: dict[str, Any] | None = None, **model: Any
) -> dict[str, list[Any]]:
    data = reviews(rows)
    write_parquet(workdir / "data/in.parquet", data)
    spec = {"mode": "batch", "provider": server.config.flavour, "batch_poll_s": 0.05, **model}
    write_job(workdir, server.base_url, model=spec, limits=limits)
    return data


def text(i: int) -> str:
    return f"review number {i} about item {i * 7 % 13}"


def submitted(server: FakeBatchServer, i: int) -> int:
    with server.lock:
        return server.submitted_by_content.get(PREFIX + text(i), 0)


def output_rows() -> list[dict[str, Any]]:
    return pq.read_table(OUTPUT).to_pylist()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["run", *args, "--json", "--quiet"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else {}, captured.err


def assert_no_key_anywhere(*texts: str) -> None:
    for t in texts:
        assert TEST_KEY not in t
    journal = JOURNAL.read_bytes() + (Path(f"{JOURNAL}-wal").read_bytes() if Path(f"{JOURNAL}-wal").exists() else b"")
    assert TEST_KEY.encode() not in journal, "the key is in the journal"
    if OUTPUT.exists():
        assert TEST_KEY.encode() not in OUTPUT.read_bytes(), "the key is in the output"


# ------------------------------------------------------------------ the key echoed


@pytest.mark.parametrize("flavour", PROVIDERS)
@pytest.mark.parametrize("behaviour", ["echo_auth", "echo_auth_error"])
def test_results_echoing_the_key_are_masked_everywhere(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str, behaviour: str
) -> None:
    with fake(flavour, script={"number 3 ": [behaviour] * 9, "number 4 ": [behaviour] * 9}) as server:
        batch_job(workdir, server, 8, limits={"max_attempts": 2})
        code, summary, err = cli(capsys, "job")
        rows = output_rows()
        assert rows[3]["error"] and "***" in rows[3]["error"]
        assert_no_key_anywhere(json.dumps(summary), err, json.dumps(rows))
        capsys.readouterr()
        main(["status", "job"])
        assert TEST_KEY not in capsys.readouterr().out
        assert code in (1, 3)


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_a_submit_error_echoing_the_key_is_masked_in_the_stop_line_and_json(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, reject_submit_echo=True) as server:
        batch_job(workdir, server, 5)
        code, summary, err = cli(capsys, "job")
        assert code == 3
        assert "***" in (summary["stop_reason"] or "")
        assert_no_key_anywhere(json.dumps(summary), err)
        capsys.readouterr()
        assert main(["run", "job"]) == 3  # the human summary's "stopped:" line
        captured = capsys.readouterr()
        assert "stopped" in captured.err + captured.out
        assert TEST_KEY not in captured.err + captured.out


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_a_failed_batch_whose_error_quotes_the_key_is_masked(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, fail_echo={0: "validation failed"}) as server:
        batch_job(workdir, server, 5, limits={"max_attempts": 1})
        _code, summary, err = cli(capsys, "job")
        assert server.submissions
        assert_no_key_anywhere(json.dumps(summary), err, json.dumps(output_rows()))


# ------------------------------------------------------------------ usage-less results


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_results_without_usage_are_charged_for_prompt_and_completion(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, include_usage=False) as server:
        batch_job(workdir, server, 10)
        code, summary, _ = cli(capsys, "job")
        assert code == 0
        rows = output_rows()
        assert all(r["prompt_tokens"] and r["prompt_tokens"] > 5 for r in rows), [r["prompt_tokens"] for r in rows]
        assert all(r["completion_tokens"] for r in rows)
        assert summary["cost_estimated"]
        # Charged from counted tokens at the batch price: not less than the server's own bill.
        assert summary["cost_usd"] >= server.bill * 0.95, (summary["cost_usd"], server.bill)


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_the_budget_holds_when_results_carry_no_usage(workdir: Path, flavour: str) -> None:
    with fake(flavour, include_usage=False, price_per_token=1e-5, discount=1.0) as server:
        # $10/M at the job's prices too; 10 rows a batch.
        prices = {"input_price_per_million": 10.0, "output_price_per_million": 10.0, "batch_discount": 1.0}
        batch_job(workdir, server, 60, limits={"budget_usd": 0.006}, batch_max_requests=10, **prices)
        code = run_cli("job")
        assert code in (0, 3)
        assert server.bill <= 0.006 + 1e-12, f"${server.bill:.6f} billed against budget_usd $0.006"


# ------------------------------------------------------------------ --fresh with batches pending


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_fresh_refuses_while_batches_are_pending(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, complete_after_s=3600) as server:
        batch_job(workdir, server, 6)
        assert run_cli("job", "--no-wait") == 3
        capsys.readouterr()
        assert main(["run", "job", "--fresh", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pending" in err, err
        assert "--fresh" in err and "status" in err, err
        assert len(server.submissions) == 1
        with pytest.raises(pipeline.UserError, match="pending"):
            pipeline.run(None, "job", fresh=True, progress=False)
        assert len(server.submissions) == 1
        # Once collected, --fresh starts over as documented.
        server.config.complete_after_s = 0
        assert run_cli("job") == 0
        assert run_cli("job", "--fresh") == 0
        assert len(server.submissions) == 2


# ------------------------------------------------------------------ orphans after a crash


def _wait(cond: Any, what: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", PROVIDERS)
def test_a_batch_accepted_before_a_crash_is_adopted_not_paid_twice(
    workdir: Path, capsys: pytest.CaptureFixture[str], flavour: str
) -> None:
    with fake(flavour, respond_after_s=30) as server:
        data = batch_job(workdir, server, 50)
        proc = spawn(workdir, "run", "job", "--quiet")
        try:
            _wait(lambda: len(server.submissions) == 1, "the batch reaches the provider", proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        server.config.respond_after_s = 0
        capsys.readouterr()
        assert main(["run", "job", "--quiet"]) == 0
        err = capsys.readouterr().err
        assert len(server.submissions) == 1, "the orphan batch was submitted again"
        assert server.duplicates() == 0
        rows = output_rows()
        assert [r["completion"] for r in rows] == [expected_reply(PREFIX + t) for t in data["text"]]
        assert server.listings >= 1
        capsys.readouterr()
        main(["status", "job"])
        assert "adopted" in capsys.readouterr().out + err


# ------------------------------------------------------------------ odd results


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_a_good_result_wins_over_a_malformed_duplicate(workdir: Path, flavour: str) -> None:
    with fake(flavour, script={"number 2 ": ["dup_malformed"]}) as server:
        data = batch_job(workdir, server, 6)
        assert run_cli("job") == 0
        rows = output_rows()
        assert rows[2]["completion"] == expected_reply(PREFIX + data["text"][2]) and rows[2]["error"] is None
        assert submitted(server, 2) == 1


@pytest.mark.parametrize("flavour", PROVIDERS)
@pytest.mark.parametrize("behaviour", ["invalid_request_error", "invalid_request_type"])
def test_a_permanent_error_by_type_is_not_resubmitted(workdir: Path, flavour: str, behaviour: str) -> None:
    with fake(flavour, script={"number 3 ": [behaviour] * 20}) as server:
        batch_job(workdir, server, 6)
        assert run_cli("job") == 1
        assert submitted(server, 3) == 1
        assert run_cli("job") == 1
        assert submitted(server, 3) == 1, "a permanent error is resubmitted on every run"
        row = output_rows()[3]
        assert row["error"] and ("invalid_request" in row["error"] or "bad input" in row["error"])


def _run_sub(workdir: Path, timeout: float = 40) -> tuple[int, str]:
    proc = spawn(workdir, "run", "job", "--quiet")
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"polling never ended: {err[-1000:]}") from None
    return proc.returncode, err


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_an_unknown_status_word_ends_polling_with_a_clear_line(workdir: Path, flavour: str) -> None:
    with fake(flavour, status_word={0: "paused_for_review"}) as server:
        batch_job(workdir, server, 4)
        code, err = _run_sub(workdir)
        assert code == 3, err
        assert "paused_for_review" in err, err
        assert len(server.submissions) == 1


@pytest.mark.parametrize("flavour", ["openrouter", "openai"])
def test_a_batch_past_its_expires_at_ends_polling_with_a_clear_line(workdir: Path, flavour: str) -> None:
    with fake(flavour, expire_stuck=True, expires_after_s=-3600) as server:
        batch_job(workdir, server, 4)
        code, err = _run_sub(workdir)
        assert code == 3, err
        assert "expire" in err, err
        assert len(server.submissions) == 1
        # Nothing was resubmitted: the batch may still answer, so a rerun polls it again.
        with sqlite3.connect(JOURNAL) as conn:
            assert conn.execute("SELECT COUNT(*) FROM batches WHERE collected = 0").fetchone()[0] == 1
