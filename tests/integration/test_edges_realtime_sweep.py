"""More realtime edges, of the kinds issue 22 names, in shapes the first tests do not try.

Billed replies without an answer in other shapes (reasoning only, an empty
choice, a null message, a streaming chunk's shape), costs written as text with
spaces or in exponent form, and a 404 "no endpoints" arriving while other
requests are in flight. Real CLI runs against ``tests/fakes/server.py``.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli
from tests.fakes.server import FakeServer
from tests.integration.test_edges_realtime import (
    BILLED_SHAPES,
    JOURNAL,
    OUTPUT,
    cli_json,
    journal_spent,
    priced_job,
)


@pytest.mark.parametrize("behaviour", BILLED_SHAPES)
def test_billed_replies_in_other_shapes_are_charged_once(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], behaviour: str
) -> None:
    priced_job(workdir, server, 10)
    server.config.fail_rate, server.config.fail_kind = 1.0, behaviour
    code, summary, err = cli_json(capsys, "job")
    stats = server.stats()
    assert stats["requests"] == 10, "a billed reply without an answer is not asked again"
    assert code == 1 and summary["rows_failed"] == 10, err
    assert "Traceback" not in err
    assert math.isclose(summary["cost_usd"], stats["cost"], rel_tol=1e-9)
    assert math.isclose(journal_spent(), stats["cost"], rel_tol=1e-9)
    rows = pq.read_table(OUTPUT).to_pylist()
    assert all(r["cost_usd"] and r["error"] for r in rows)
    assert run_cli("job") == 1 and server.stats()["requests"] == 10


@pytest.mark.parametrize("form", [" {} ", "{}\n", "{:.6e}", "+{}"], ids=["spaces", "newline", "exponent", "plus"])
@pytest.mark.parametrize("behaviour", [None, "null_content+cost"])
def test_costs_written_as_text_in_other_forms_are_read(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], form: str, behaviour: str | None
) -> None:
    priced_job(workdir, server, 8)
    server.config.cost_as_string = form
    server.config.price_per_token = 3 * 20e-6  # billed more than the job's price table says
    if behaviour:
        server.config.fail_rate, server.config.fail_kind = 1.0, behaviour
    _, summary, _ = cli_json(capsys, "job")
    stats = server.stats()
    # "{:.6e}" rounds the figure: the run reports what the server wrote.
    assert math.isclose(summary["cost_usd"], stats["cost"], rel_tol=1e-5), (summary["cost_usd"], stats["cost"])
    assert not summary["cost_estimated"]


# ------------------------------------------------------------------ a 404 while others are in flight

NO_ENDPOINTS = "404:No endpoints found for mistralai/ministral-8b."


@pytest.mark.parametrize(
    "message", [NO_ENDPOINTS, "404:No endpoints found matching your data policy (Free model training)."]
)
def test_no_endpoints_while_requests_are_in_flight_journals_them_and_stops(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], message: str
) -> None:
    priced_job(workdir, server, 120, limits={"concurrency": 8})
    server.config.latency_s = 0.05
    server.config.latency_jitter_s = 0.1
    # Rows 0-29 answer; from row 30 on, the model has no endpoints.
    server.config.script = {f"number {i} ": [message] * 5 for i in range(30, 120)}
    code, summary, err = cli_json(capsys, "job", "--no-canary")
    assert code == 3, (summary, err)
    assert "No endpoints found" in (summary["stop_reason"] or "")
    stats = server.stats()
    assert stats["requests"] < 60, "it stopped: no new requests after the 404"
    with sqlite3.connect(JOURNAL) as conn:
        journaled = conn.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()[0]
        failed = conn.execute("SELECT COUNT(*) FROM results WHERE status = 'failed'").fetchone()[0]
    assert journaled == stats["ok"], "every answer that came back was journaled"
    assert failed == 0, "a 404 of the model is not the row's failure"
    rows = pq.read_table(OUTPUT).to_pylist()
    assert sum(1 for r in rows if r["completion"]) == stats["ok"]
    server.config.script = {}
    assert run_cli("job") == 0
    assert server.stats()["ok"] == 120 and server.duplicates() == 0


def test_no_endpoints_as_the_first_reply_after_a_resumed_run_stops(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Answers from an earlier run count as successes: the model is gone, not the job wrong."""
    priced_job(workdir, server, 20, limits={"concurrency": 1})
    server.config.script = {"review": ["ok"] * 10 + ["500"] * 200}
    server.config.retry_after = "0"
    cli_json(capsys, "job", "--no-canary")
    server.config.script = {"review": [NO_ENDPOINTS] * 100}
    code, summary, _ = cli_json(capsys, "job", "--no-canary")
    assert code == 3 and "No endpoints found" in (summary["stop_reason"] or "")
    assert server.stats()["ok"] == 10
    server.config.script = {}
    assert run_cli("job") == 0 and server.duplicates() == 0
