"""Realtime edges where money was lost: replies that cost but carry no answer, odd costs, stops.

Each test drives the real CLI against the loopback chat server (``tests/fakes/server.py``)
misbehaving in one way, and checks the money promises: what the server billed is what the
run reports and the budget counts, nothing is paid again by a rerun, and a problem with
the job as a whole is a clean stop (exit 3) with one line saying what to do.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from tests.conftest import reviews, run_cli, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer

OUTPUT = Path("data/out/job.parquet")
JOURNAL = Path("data/out/job.parquet.journal.sqlite")
# $20 per million tokens at the server and in the job: a request costs about $0.002.
PRICE = 20e-6
PRICES = {"input_price_per_million": 20.0, "output_price_per_million": 20.0}


def priced_job(
    workdir: Path, server: FakeServer, rows: int, limits: dict[str, Any] | None = None, **model: Any
) -> None:
    server.config.price_per_token = PRICE
    write_parquet(workdir / "data/in.parquet", reviews(rows))
    write_job(workdir, server.base_url, limits=limits, model={**PRICES, **model})


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    capsys.readouterr()
    code = main(["run", *args, "--json", "--quiet"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def journal_spent() -> float:
    """What the journal says the job was billed (its running total, not the rows' last costs)."""
    with sqlite3.connect(JOURNAL) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'spent_usd'").fetchone()
    return float(row[0]) if row else 0.0


# ------------------------------------------------------------------ cost without content


BILLED_NO_ANSWER = ["null_content+cost", "no_choices+cost"]
# Other shapes of a billed reply without an answer (a reasoning-only message, an empty choice, ...).
BILLED_SHAPES = ["reasoning+cost", "empty_choice+cost", "null_message+cost", "chunk+cost"]


@pytest.mark.parametrize("behaviour", BILLED_NO_ANSWER)
def test_a_billed_reply_without_content_is_charged_once_and_not_paid_again(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], behaviour: str
) -> None:
    """A reasoning model that spends max_tokens thinking answers content null with usage.cost."""
    priced_job(workdir, server, 20)
    server.config.fail_rate, server.config.fail_kind = 1.0, behaviour
    code, summary, _ = cli_json(capsys, "job")
    stats = server.stats()
    assert stats["requests"] == 20, "each row asked once: a billed empty reply is not retried"
    assert code == 1 and summary["rows_failed"] == 20
    assert math.isclose(summary["cost_usd"], stats["cost"], rel_tol=1e-9)
    assert math.isclose(journal_spent(), stats["cost"], rel_tol=1e-9)
    rows = pq.read_table(OUTPUT).to_pylist()
    assert all(r["cost_usd"] and r["error"] and "without an answer" in r["error"] for r in rows)
    # A rerun pays nothing again; --retry-failed asks again on purpose.
    assert run_cli("job") == 1
    assert server.stats()["requests"] == 20
    server.config.fail_rate = 0.0
    assert run_cli("job", "--retry-failed") == 0
    assert server.stats()["requests"] == 40


@pytest.mark.parametrize(
    "behaviour", [*BILLED_NO_ANSWER, *BILLED_SHAPES, "error200+cost", "500+cost", "502+cost", "400+cost"]
)
def test_the_budget_counts_billed_replies_that_carry_no_answer(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], behaviour: str
) -> None:
    """20 rows, budget $0.01, every reply billed ~$0.002 without an answer: never past the budget, reruns too."""
    priced_job(workdir, server, 20, limits={"budget_usd": 0.01, "concurrency": 2, "max_attempts": 3})
    server.config.fail_rate, server.config.fail_kind = 1.0, behaviour
    reported = 0.0
    for _ in range(4):
        code, summary, _ = cli_json(capsys, "job")
        assert code in (1, 3)
        reported += summary["cost_usd"]
    billed = server.stats()["cost"]
    assert billed <= 0.01 + 1e-12, f"${billed:.6f} billed against budget_usd $0.01"
    assert math.isclose(reported, billed, rel_tol=1e-9)
    assert math.isclose(journal_spent(), billed, rel_tol=1e-9)


def test_an_empty_string_answer_with_a_cost_is_an_answer_and_charged(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    priced_job(workdir, server, 5)
    server.config.fail_rate, server.config.fail_kind = 1.0, "empty+cost"
    code, summary, _ = cli_json(capsys, "job")
    assert code == 0 and summary["rows_ok"] == 5
    assert math.isclose(summary["cost_usd"], server.stats()["cost"], rel_tol=1e-9)
    assert run_cli("job") == 0 and server.stats()["requests"] == 5


@pytest.mark.parametrize("budget", [None, 0.01])
def test_string_costs_are_read_as_the_server_billed_them(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], budget: float | None
) -> None:
    """``usage.cost: "0.0021"``: the server's figure, not tokens x the job's (here lower) prices."""
    priced_job(workdir, server, 20, limits={"budget_usd": budget} if budget else None)
    server.config.cost_as_string = True
    server.config.price_per_token = 3 * PRICE  # the provider bills more than the job's price table says
    _, summary, _ = cli_json(capsys, "job")
    billed = server.stats()["cost"]
    assert math.isclose(summary["cost_usd"], billed, rel_tol=1e-9)
    assert not summary["cost_estimated"]
    if budget:
        assert billed <= budget * 3 + 1e-12  # the reservation is at the job's prices; what counts is the bill
        assert journal_spent() <= budget * 3 + 1e-12


# ------------------------------------------------------------------ stops


NO_ENDPOINTS = "404:No endpoints found for mistralai/ministral-8b."


def test_no_endpoints_after_some_successes_stops_the_job_leaving_rows_unsent(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    priced_job(workdir, server, 40, limits={"concurrency": 1})
    # Every message contains "review": the first 10 succeed, then the model has no endpoint.
    server.config.script = {"review": ["ok"] * 10 + [NO_ENDPOINTS] * 100}
    code, summary, _err = cli_json(capsys, "job")
    assert code == 3, summary
    assert "No endpoints found" in (summary["stop_reason"] or "")
    assert server.stats()["requests"] == 11
    rows = pq.read_table(OUTPUT).to_pylist()
    assert sum(1 for r in rows if r["completion"]) == 10
    assert all(r["error"].startswith("not_run") for r in rows if not r["completion"])
    # The model is back: a plain rerun sends the rest, the 404'd row included.
    server.config.script = {}
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 11 + 30 and server.duplicates() == 0


def test_budget_stop_line_states_the_true_spend(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-flight replies settle after the stop: the line must state what was finally spent."""
    priced_job(workdir, server, 60, limits={"budget_usd": 0.01, "concurrency": 8})
    server.config.latency_s = 0.2
    code, summary, _err = cli_json(capsys, "job")
    assert code == 3
    reason = summary["stop_reason"] or ""
    figures = re.findall(r"\$([0-9.]+) spent", reason)
    assert figures, reason
    assert math.isclose(float(figures[0]), summary["job_spent_usd"], rel_tol=1e-3), reason
    assert math.isclose(summary["job_spent_usd"], server.stats()["cost"], rel_tol=1e-9)


def test_retry_failed_sends_over_context_rows_once_the_context_grew(workdir: Path, server: FakeServer) -> None:
    data = reviews(5)
    data["text"][2] = "long " * 400
    write_parquet(workdir / "data/in.parquet", data)
    write_job(workdir, server.base_url, model={"context_length": 300})
    assert run_cli("job") == 1
    rows = pq.read_table(OUTPUT).to_pylist()
    assert rows[2]["error"].startswith("skipped: prompt of") and server.stats()["requests"] == 4
    write_job(workdir, server.base_url, model={"context_length": 131072})
    assert run_cli("job", "--retry-failed") == 0
    assert server.stats()["requests"] == 5
    assert pq.read_table(OUTPUT).to_pylist()[2]["completion"]


def _run_with_timeout(workdir: Path, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    proc = spawn(workdir, "run", *args)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the run did not end within {timeout} s: {err[-2000:]}") from None
    return proc.returncode, out, err


def test_a_retry_after_beyond_the_limit_stops_and_says_when_to_come_back(workdir: Path, server: FakeServer) -> None:
    priced_job(workdir, server, 10, limits={"concurrency": 2})
    server.config.retry_after = "7200"
    server.config.script = {"review number 3 ": ["429"] * 5}
    started = time.monotonic()
    code, _out, err = _run_with_timeout(workdir, "job", "--quiet")
    assert code == 3, err
    assert time.monotonic() - started < 30
    assert "7200" in err or "2 h" in err or "UTC" in err, err
    assert "Retry-After" in err or "come back" in err or "rerun after" in err, err
    server.config.script = {}
    assert run_cli("job") == 0
    assert server.duplicates() == 0


# ------------------------------------------------------------------ --workers


@pytest.mark.parametrize("workers", ["100000", "5000"])
def test_ray_workers_past_what_makes_sense_are_refused_in_one_line(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    priced_job(workdir, server, 5)
    started = time.monotonic()
    assert main(["run", "job", "--engine", "ray", "--workers", workers, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 10
    assert err.count("\n") == 1 and "--workers" in err, err
    assert server.stats()["requests"] == 0
