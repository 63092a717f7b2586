"""The money promises at the engine's edges: one journal per job, a budget that fails closed,
every request counted, early stops for job-level failures, clean stops mid-stream, signals."""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import pipeline
from pipeline.engine.progress import Tracker
from pipeline.engine.run import run_plan
from pipeline.engine.session import RunOptions
from pipeline.store.journal import Journal
from tests.conftest import read_output, reviews, run_cli, write_job, write_parquet
from tests.fakes.server import FakeServer, expected_reply
from tests.integration.test_resume import JOURNAL, OUTPUT, PREFIX, Procs, finish, journal_count, wait_until

INPUT = "data/in.parquet"


def run_json(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = pipeline.cli.main(["run", "job", "--json", *args])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else {}


# ------------------------------------------------------------ 1. the journal belongs to the job


def test_output_flag_moves_only_the_output(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / INPUT, reviews(12))
    write_job(workdir, server.base_url)
    assert run_cli("job") == 0
    assert run_cli("job", "--output", "elsewhere.parquet") == 0
    assert server.stats()["requests"] == 12  # nothing re-sent for the new output
    assert read_output(workdir / "elsewhere.parquet").equals(read_output(workdir / OUTPUT))
    assert not (workdir / "elsewhere.parquet.journal.sqlite").exists()


def test_two_runs_with_different_outputs_share_one_lock(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / INPUT, reviews(40))
    write_job(workdir, server.base_url, limits={"concurrency": 2})
    server.config.latency_s = 0.2
    procs = Procs(workdir)
    try:
        first = procs.run("--quiet")
        wait_until(lambda: journal_count() >= 1, "the first run to start", proc=first)
        second = procs.run("--quiet", "--output", "other.parquet")
        code, _, err = finish(second, timeout=30)
        assert code == 2 and "another run of this job is active" in err
    finally:
        procs.cleanup()


def test_budget_counts_journals_set_aside_by_fresh(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """budget_usd caps what the job ever spends: --fresh does not hand out a new budget."""
    write_parquet(workdir / INPUT, reviews(30))
    # Each row costs about 2e-6 at the fake server's price; the budget allows roughly 20 rows in all.
    write_job(workdir, server.base_url, limits={"budget_usd": 0.00004, "concurrency": 1})
    spent = 0.0
    for args in ((), ("--fresh",), ("--fresh",), ("--output", "x.parquet")):
        _, summary = run_json(*args, capsys=capsys)
        spent = summary["job_spent_usd"]
        assert spent <= 0.00004
    assert server.stats()["cost"] <= 0.00004 + 1e-12
    assert server.stats()["cost"] == pytest.approx(spent)


# ------------------------------------------------------------ 2. the budget fails closed


def test_counted_completion_never_exceeds_max_tokens(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Our tokenizer may count a reply longer than the model's own max_tokens allowed it to be.

    The provider stops generating at max_tokens, so that is the most a reply can
    be billed for, and what the budget reserved for it: the estimate must not
    count more, or the recorded spend passes budget_usd.
    """
    server.config.include_usage = False
    write_parquet(workdir / INPUT, reviews(2000))
    # The fake server's replies are about 20 Tekken tokens; max_tokens 8 is below that.
    write_job(workdir, server.base_url, model={"max_tokens": 8}, limits={"budget_usd": 0.0005, "concurrency": 16})
    code, summary = run_json(capsys=capsys)
    assert code == 3 and "budget reached" in summary["stop_reason"]
    assert summary["completion_tokens"] <= 8 * summary["requests"]
    assert 0 < summary["job_spent_usd"] <= 0.0005


def test_reply_without_usage_is_charged_from_counted_tokens(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.config.include_usage = False
    write_parquet(workdir / INPUT, reviews(2000))
    write_job(workdir, server.base_url, limits={"budget_usd": 0.001, "concurrency": 4})
    code, summary = run_json(capsys=capsys)
    assert code == 3 and "budget reached" in summary["stop_reason"]
    assert summary["cost_estimated"] is True
    assert 0 < summary["job_spent_usd"] <= 0.001
    # The server's own bill (at the same $0.10/M price) is within the budget too.
    assert server.stats()["cost"] <= 0.001
    assert server.stats()["requests"] < 2000
    with sqlite3.connect(workdir / JOURNAL) as conn:
        costs = [row[0] for row in conn.execute("SELECT cost_usd FROM results WHERE status = 'ok'")]
    assert costs and all(c > 0 for c in costs)
    capsys.readouterr()
    run_cli_text = pipeline.cli.main(["run", "job"])
    assert run_cli_text == 3
    assert "estimated from counted tokens" in capsys.readouterr().out


# ------------------------------------------------------------ 3. every request counted and costed


def test_retry_invalid_is_bounded(workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(workdir / INPUT, reviews(2))
    write_job(workdir, server.base_url, prompt_extra='labels = ["a", "b"]\nretry_invalid = 11')
    assert run_cli("job") == 2
    assert "retry_invalid" in capsys.readouterr().err
    assert server.stats()["requests"] == 0


def test_every_invalid_retry_is_counted_and_costed(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    write_parquet(workdir / INPUT, reviews(5))
    write_job(workdir, server.base_url, prompt_extra='labels = ["a", "b"]\nretry_invalid = 3')
    server.config.script = {"review": ["wrong_label"] * 100}
    code, summary = run_json(capsys=capsys)
    assert code == 1
    stats = server.stats()
    assert stats["requests"] == 5 * 4 == summary["requests"]
    assert summary["cost_usd"] == pytest.approx(stats["cost"])


# ------------------------------------------------------------ 7. a 200 without content is retried


def test_null_content_is_retried(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / INPUT, reviews(3))
    write_job(workdir, server.base_url)
    server.config.script = {"review number 1 ": ["null_content"]}
    assert run_cli("job") == 0
    rows = read_output(workdir / OUTPUT).to_pylist()
    assert rows[1]["completion"] == expected_reply(PREFIX + rows[1]["text"]) and rows[1]["attempts"] == 2


# ------------------------------------------------------------ 9. job-level failures stop early


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_stops_early_and_leaves_rows_untouched(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_parquet(workdir / INPUT, reviews(200))
    write_job(workdir, f"http://127.0.0.1:{closed_port()}/v1", limits={"max_attempts": 4})
    started = time.monotonic()
    code, summary = run_json(capsys=capsys)
    assert time.monotonic() - started < 60
    assert code == 3 and "cannot reach the server" in summary["stop_reason"]
    with sqlite3.connect(workdir / JOURNAL) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0


@pytest.mark.parametrize(
    "behaviour", ["404:No endpoints found for mistralai/ministral-8b", "403:This model is not available in your region"]
)
def test_model_level_refusal_stops_early(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], behaviour: str
) -> None:
    write_parquet(workdir / INPUT, reviews(300))
    write_job(workdir, server.base_url, limits={"concurrency": 4})
    server.config.script = {"review": [behaviour] * 1000}
    code, summary = run_json(capsys=capsys)
    assert code == 3 and "the provider refused the job" in summary["stop_reason"]
    assert server.stats()["requests"] <= 8
    server.config.script = {}
    assert run_cli("job") == 0  # a plain rerun sends them all
    assert read_output(workdir / OUTPUT).column("error").null_count == 300


# ------------------------------------------------------------ 5 and 8. clean stops mid-run


class BadRecordAfter:
    """A data source whose second batch is a bad record, as a damaged file would be."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.path, self.format, self.schema, self.columns = inner.path, inner.format, inner.schema, inner.columns

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for i, batch in enumerate(self.inner.batches(columns)):
            if i == 1:
                raise pipeline.InputError("data.csv: row 11: invalid UTF-8")
            yield batch

    def count_rows(self) -> int:
        return int(self.inner.count_rows())


def test_bad_record_mid_stream_is_a_clean_stop(workdir: Path, server: FakeServer) -> None:
    import asyncio

    table = pa.table(reviews(30))
    job = {
        "input": {"batch_size": 10},
        "prompt": {"user": "Summarise in one sentence:\n\n{text}"},
        "model": {"base_url": server.base_url},
        "limits": {"requests_per_minute": 60000},
    }
    plan = pipeline.api.plan(table, job, output=workdir / "out.parquet", journal=workdir / "j.sqlite")
    plan.source = BadRecordAfter(plan.source)
    result = asyncio.run(run_plan(plan, RunOptions(quiet=True)))
    assert result.exit_code == 2 and "row 11" in (result.summary.stop_reason or "")
    assert server.stats()["requests"] == 10
    done = read_output(workdir / "out.parquet")
    assert done.num_rows == 10 and done.column("error").null_count == 10
    # Fixed: the rerun pays only for the rows after the bad record.
    again = pipeline.run(table, job, output=workdir / "out.parquet", journal=workdir / "j.sqlite", progress=False)
    assert again.exit_code == 0 and server.stats()["requests"] == 30 and server.duplicates() == 0


def test_journal_write_failure_is_a_one_line_stop(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_parquet(workdir / INPUT, reviews(50))
    write_job(workdir, server.base_url, limits={"concurrency": 2})
    original = Journal.write_now
    calls = {"n": 0}

    def full_disk(self: Journal, rows: list[Any], cost: float = 0.0) -> None:
        calls["n"] += 1
        if calls["n"] > 5:
            raise sqlite3.OperationalError("database or disk is full")
        original(self, rows, cost)

    monkeypatch.setattr(Journal, "write_now", full_disk)
    code, summary = run_json(capsys=capsys)
    assert code == 3
    assert "cannot write the journal" in summary["stop_reason"] and str(JOURNAL.name) in summary["stop_reason"]
    assert "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------ 11. dry run reads the journal


def test_dry_run_of_a_finished_job_sends_nothing_more(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    write_parquet(workdir / INPUT, reviews(20))
    write_job(workdir, server.base_url)
    assert run_cli("job") == 0
    write_parquet(workdir / INPUT, reviews(25))
    capsys.readouterr()
    assert pipeline.cli.main(["run", "job", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 25 and report["rows_done"] == 20 and report["rows_to_send"] == 5


def test_dry_run_time_honours_tokens_per_minute(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    write_parquet(workdir / INPUT, reviews(10))
    write_job(workdir, server.base_url, limits={"requests_per_minute": 0, "tokens_per_minute": 600})
    capsys.readouterr()
    assert pipeline.cli.main(["run", "job", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # 10 requests of (prompt + max_tokens 64) tokens at 600 tokens a minute: more than a minute.
    assert report["duration_s_min"] >= 10 * 64 / 600 * 60


# ------------------------------------------------------------ 13 and 14. signals and pauses


def test_stop_while_waiting_on_the_limiter_is_quick(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / INPUT, reviews(100))
    write_job(workdir, server.base_url, limits={"requests_per_minute": 6, "concurrency": 8})
    procs = Procs(workdir)
    try:
        proc = procs.run("--quiet")
        wait_until(lambda: server.stats()["ok"] >= 1 and journal_count() >= 1, "one reply", proc=proc)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, _, err = finish(proc, timeout=30)
        assert code == 3, err
        assert time.monotonic() - started < 3
    finally:
        procs.cleanup()


def test_retry_after_pause_is_shown_in_the_bar() -> None:
    tracker = Tracker(10, quiet=True)
    tracker.paused(120)
    assert "paused by the server until" in tracker.bar.postfix
