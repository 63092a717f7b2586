"""Batch mode against a loopback fake of each provider's batch API (``tests/fakes/batch.py``).

Every test checks rows by their own completion (``expected_reply`` of the row's
prompt), submissions per prompt at the server (nothing paid twice), that no
realtime chat request was sent, and that ``cost_usd`` adds up to what the
server billed. Crash tests run ``python -m pipeline run`` as real subprocesses
and kill them with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from pipeline.providers.base import ReplyKind
from pipeline.providers.batches import BatchRequest, custom_id_for, result_reply
from pipeline.providers.openrouter.batches import OpenRouterBatches
from tests.conftest import reviews, run_cli, spawn, write_job, write_parquet
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


def output_rows() -> list[dict[str, Any]]:
    return pq.read_table(OUTPUT).to_pylist()


def assert_all_answered(data: dict[str, list[Any]], server: FakeBatchServer) -> list[dict[str, Any]]:
    """Every row once, in order, with its own completion; nothing realtime; cost_usd is the server's bill."""
    rows = output_rows()
    assert [r["id"] for r in rows] == data["id"]
    wrong = [r["id"] for r in rows if r["completion"] != expected_reply(PREFIX + r["text"]) or r["error"]]
    assert wrong == [], f"{len(wrong)} rows lack their own completion, e.g. {wrong[:5]}"
    assert server.chat_requests == 0
    assert math.isclose(sum(r["cost_usd"] for r in rows), server.bill, rel_tol=1e-9)
    return rows


def submissions(server: FakeBatchServer, ids: range | list[int]) -> list[int]:
    with server.lock:
        return [server.submitted_by_content.get(PREFIX + f"review number {i} about item {i * 7 % 13}", 0) for i in ids]


# ------------------------------------------------------------------------- unit seams


@pytest.mark.parametrize(
    ("response", "error", "kind", "text"),
    [
        ({"status_code": 200, "body": {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}}, None,
         ReplyKind.OK, None),
        ({"status_code": 500, "body": {"error": {"code": 500, "message": "boom"}}}, None, ReplyKind.RETRY, "HTTP 500"),
        ({"status_code": 429, "body": {"error": {"message": "slow"}}}, None, ReplyKind.RETRY, "HTTP 429"),
        ({"status_code": 400, "body": {"error": {"message": "bad"}}}, None, ReplyKind.FATAL, "HTTP 400: bad"),
        ({"status_code": 402, "body": {"error": {"message": "credits"}}}, None, ReplyKind.AUTH, "HTTP 402"),
        ({"status_code": 200, "body": {"error": {"message": "upstream"}}}, None, ReplyKind.RETRY, "provider error"),
        (None, {"code": "batch_expired", "message": "late"}, ReplyKind.RETRY, "batch error: batch_expired: late"),
        (None, {"code": 400, "message": "bad input"}, ReplyKind.FATAL, "HTTP 400: bad input"),
        (None, None, ReplyKind.RETRY, "without a response"),
    ],
)  # fmt: skip
def test_result_lines_are_classified_like_realtime_replies(
    response: Any, error: Any, kind: ReplyKind, text: str | None
) -> None:
    reply = result_reply(response, error)
    assert reply.kind == kind
    if text is None:
        assert reply.error is None and reply.content == "hi"
    else:
        assert text in (reply.error or "")


@pytest.mark.parametrize(
    ("key", "same"),
    [("17", True), ("row-3_a.b:c", True), ("a" * 64, True), ("a" * 65, False), ("0f3a#2", False), ("é", False)],
)
def test_custom_ids_are_the_key_or_a_stable_digest(key: str, same: bool) -> None:
    cid = custom_id_for(key)
    assert (cid == key) is same
    assert cid == custom_id_for(key) and len(cid) <= 64
    assert custom_id_for(key + "x") != cid


def test_openrouter_submission_puts_endpoint_and_model_before_requests() -> None:
    adapter = OpenRouterBatches("http://x/batches", "mistralai/ministral-8b")
    raw = adapter.submission([BatchRequest("1", b'{"model": "mistralai/ministral-8b", "messages": []}')])
    data = json.loads(raw)
    assert list(data) == ["endpoint", "model", "completion_window", "requests"]
    assert data["requests"] == [{"custom_id": "1", "body": {"model": "mistralai/ministral-8b", "messages": []}}]


async def test_the_fake_enforces_the_field_order_rule() -> None:
    """The strict fake answers 400 when ``requests`` precedes ``endpoint``/``model`` (as OpenRouter does)."""
    body = {"messages": [{"role": "user", "content": "hi"}]}
    bad = {"requests": [{"custom_id": "a", "body": body}], "endpoint": "/v1/chat/completions", "model": "m"}
    good = {"endpoint": "/v1/chat/completions", "model": "m", "requests": [{"custom_id": "a", "body": body}]}
    with fake() as server:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{server.base_url}/batches", data=json.dumps(bad)) as resp:
                assert resp.status == 400
            async with session.post(f"{server.base_url}/batches", data=json.dumps(good)) as resp:
                assert resp.status == 202
                assert (await resp.json())["status"] == "validating"
    assert server.rejected == ["endpoint and model must come before requests"]


# ------------------------------------------------------------------------- end to end, per provider


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_batch_run_answers_every_row_once_with_no_realtime_request(workdir: Path, flavour: str) -> None:
    with fake(flavour, complete_after_s=0.3) as server:
        data = batch_job(workdir, server, 40)
        assert run_cli("job") == 0
        rows = assert_all_answered(data, server)
        assert server.duplicates() == 0 and len(server.submissions) == 1
        assert server.polls >= 2  # it waited for the delayed completion
        assert {r["attempts"] for r in rows} == {1}
        # A second run is a no-op: nothing submitted, nothing paid.
        assert run_cli("job") == 0
        assert len(server.submissions) == 1


@pytest.mark.parametrize("flavour", PROVIDERS)
def test_expired_batch_resubmits_only_its_unanswered_rows(workdir: Path, flavour: str) -> None:
    with fake(flavour, expire={0: 0.5}) as server:
        data = batch_job(workdir, server, 30)
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        counts = submissions(server, range(30))
        assert sorted(counts) == [1] * 15 + [2] * 15  # the unanswered half, exactly twice
        assert [n for _, n in server.submissions] == [30, 15]


def test_failed_batch_resubmits_its_rows(workdir: Path) -> None:
    with fake(fail={0: "request 3: invalid body"}) as server:
        data = batch_job(workdir, server, 10)
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        assert submissions(server, range(10)) == [2] * 10


def test_results_are_read_in_pages_when_the_batch_object_holds_only_some(workdir: Path) -> None:
    with fake(inline_limit=5, page_size=7) as server:
        data = batch_job(workdir, server, 50)
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        assert server.result_pages == math.ceil(50 / 7)
        assert server.duplicates() == 0


def test_results_only_in_pages(workdir: Path) -> None:
    with fake(inline_results=False, page_size=9) as server:
        data = batch_job(workdir, server, 20)
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        assert server.result_pages == 3


def test_5000_requests_per_batch_at_most(workdir: Path) -> None:
    with fake() as server:
        data = batch_job(workdir, server, 5_021)
        assert run_cli("job") == 0
        assert [n for _, n in server.submissions] == [20, 5_000, 1]  # the canary, then batches of 5,000 at most
        assert server.rejected == []
        assert_all_answered(data, server)


def test_result_errors_are_classified_like_realtime_errors(workdir: Path) -> None:
    """A 500 result is transient (submitted again in this run); a 400 result fails the row."""
    script = {"review number 3 ": [500], "review number 4 ": [400]}
    with fake(script=script) as server:
        data = batch_job(workdir, server, 8)
        assert run_cli("job") == 1
        rows = output_rows()
        assert rows[3]["completion"] == expected_reply(PREFIX + data["text"][3]) and rows[3]["error"] is None
        assert rows[3]["attempts"] == 2
        assert rows[4]["completion"] is None and rows[4]["error"].startswith("HTTP 400: ")
        assert submissions(server, range(8)) == [1, 1, 1, 2, 1, 1, 1, 1]
        # The failed row is permanent: a plain rerun does not send it again.
        assert run_cli("job") == 1
        assert submissions(server, [4]) == [1]


def test_no_wait_exits_3_with_pending_rows_marked_then_a_rerun_collects(workdir: Path) -> None:
    with fake(complete_after_s=3600) as server:
        data = batch_job(workdir, server, 12)
        assert run_cli("job", "--no-wait") == 3
        rows = output_rows()
        batch_id = server.submissions[0][0]
        assert all(r["error"].startswith("not_run: ") and f"pending in batch {batch_id}" in r["error"] for r in rows)
        # Status shows the pending batch.
        status = _status_json()
        assert [b["id"] for b in status["batches_pending"]] == [batch_id]
        assert status["rows_in_batches"] == 12 and status["rows_retryable"] == 0
        # Rows waiting in a batch are not "to send" in a dry run.
        assert _cli_json("run", "job", "--dry-run", "--json")["rows_to_send"] == 0
        # Still pending: a second --no-wait submits nothing new.
        assert run_cli("job", "--no-wait") == 3
        assert len(server.submissions) == 1
        # Realtime mode refuses to send rows a batch will answer.
        write_job(workdir, server.base_url, model={"provider": "openrouter"})
        assert main(["run", "job", "--quiet"]) == 2
        batch_job(workdir, server, 12)
        server.config.complete_after_s = 0
        summary = _cli_json("run", "job", "--no-wait", "--json")  # asserts exit 0
        assert summary["rows_ok"] == 12 and summary["rows_resumed"] == 0 and summary["batches_pending"] == 0
        assert summary["mode"] == "batch" and summary["batches_submitted"] == 0
        assert_all_answered(data, server)
        assert server.duplicates() == 0
        assert _status_json()["batches_pending"] == []


def _status_json() -> dict[str, Any]:
    return _cli_json("status", "job", "--json")


def _cli_json(*args: str) -> dict[str, Any]:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(list(args)) == 0
    result: dict[str, Any] = json.loads(buf.getvalue())
    return result


def test_budget_reserves_each_batch_worst_case_before_submitting(workdir: Path) -> None:
    """Budget for one 5,000-row batch's worst case but not two: the second is never submitted."""
    with fake() as server:
        batch_job(workdir, server, 6_000)
        # Worst case per row about (28 prompt + 64 max) tokens x $0.1/M x 0.5 = $4.6e-6: 5,000 rows about $0.023,
        # the other 1,000 about $0.0046: together over $0.025.
        write_job(
            workdir,
            server.base_url,
            model={"mode": "batch", "provider": "openrouter", "batch_poll_s": 0.05},
            limits={"budget_usd": 0.025, "canary_rows": 0},  # batches of 5,000 from the start
        )
        # --no-wait: the second batch does not fit beside the first one's reservation.
        assert run_cli("job", "--no-wait") == 3
        assert [n for _, n in server.submissions] == [5_000]
        # Waiting: once the first batch is collected (for far less than its worst case) the rest fits.
        assert run_cli("job") == 0
        assert [n for _, n in server.submissions] == [5_000, 1_000]
        assert server.duplicates() == 0 and server.bill <= 0.025
        # Without pending batches to wait for, a batch over the budget stops the run, sending nothing.
        write_job(
            workdir,
            server.base_url,
            name="small",
            model={"mode": "batch", "provider": "openrouter", "batch_poll_s": 0.05},
            limits={"budget_usd": 0.01, "canary_rows": 0},
        )
        assert main(["run", "small", "--quiet"]) == 3
        assert len(server.submissions) == 2


def test_batch_dry_run_prices_at_the_discount_and_shows_realtime(workdir: Path, capsys: Any) -> None:
    with fake() as server:
        batch_job(workdir, server, 30)
        assert main(["run", "job", "--dry-run", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["mode"] == "batch" and report["batch_discount"] == 0.5
        assert math.isclose(report["cost_usd_expected"], report["realtime_cost_usd_expected"] / 2)
        assert math.isclose(report["cost_usd_max"], report["realtime_cost_usd_max"] / 2)
        assert main(["run", "job", "--dry-run"]) == 0
        assert "realtime mode would cost" in capsys.readouterr().out
        assert server.submissions == [] and server.chat_requests == 0


def test_job_file_checks(workdir: Path) -> None:
    with fake() as server:
        batch_job(workdir, server, 3)
        assert main(["run", "job", "--sample", "2"]) == 2
        write_job(workdir, server.base_url, model={"provider": "openrouter"})
        assert main(["run", "job", "--no-wait"]) == 2
        write_job(workdir, server.base_url, model={"mode": "batch", "provider": "local"})
        assert main(["run", "job"]) == 2
        write_job(workdir, server.base_url, model={"mode": "batch", "batch_url": "ftp://x"})
        assert main(["run", "job"]) == 2
        assert server.submissions == []


# ------------------------------------------------------------------------- crashes (real subprocesses)


def _wait(cond: Callable[[], bool], what: str, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _journaled_batches() -> int:
    if not JOURNAL.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{JOURNAL}?mode=ro", uri=True, timeout=2)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])
    except sqlite3.Error:
        return 0


def _kill9(proc: subprocess.Popen[str]) -> None:
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_while_waiting_then_rerun_never_resubmits(workdir: Path) -> None:
    with fake(complete_after_s=3600) as server:
        data = batch_job(workdir, server, 300)
        proc = spawn(workdir, "run", "job", "--quiet")
        try:
            _wait(lambda: _journaled_batches() == 1, "the batch is journaled", proc)
            polls = server.polls
            _wait(lambda: server.polls >= polls + 2, "the run polls", proc)
            _kill9(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        server.config.complete_after_s = 0
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        # The killed run's batch (the canary) is collected and judged, not submitted again; then the rest.
        assert [n for _, n in server.submissions] == [20, 280] and server.duplicates() == 0


@pytest.mark.slow
def test_done_when_12000_rows_first_batch_expires_half_done(workdir: Path, capsys: Any) -> None:
    """Issue 13's acceptance test, against the strict fake OpenRouter batch API.

    --no-wait submits three batches and exits 3; a waiting run is killed with SIGKILL; the
    rerun ends with exit 0, every row once with its own completion, only the expired batch's
    unanswered rows submitted twice, no realtime request, and cost_usd summing to the bill.
    """
    with fake(complete_after_s=3600, expire={0: 0.5}) as server:
        data = batch_job(workdir, server, 12_000, limits={"canary_rows": 0})  # batches of 5,000 from the start
        # The batch-mode dry run: half the realtime price.
        assert main(["run", "job", "--dry-run", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["rows_to_send"] == 12_000 and report["cost_usd_expected"] > 0
        assert math.isclose(report["cost_usd_expected"], report["realtime_cost_usd_expected"] / 2)

        assert run_cli("job", "--no-wait") == 3
        assert [n for _, n in server.submissions] == [5_000, 5_000, 2_000]
        assert all(r["error"].startswith("not_run: ") and "pending in batch" in r["error"] for r in output_rows())

        proc = spawn(workdir, "run", "job", "--quiet")
        try:
            polls = server.polls
            _wait(lambda: server.polls >= polls + 6, "the run polls every batch twice", proc)
            _kill9(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert len(server.submissions) == 3  # the killed run only waited

        server.config.complete_after_s = 0  # the first batch now expires half done; the others complete
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        assert [n for _, n in server.submissions] == [5_000, 5_000, 2_000, 2_500]
        counts = submissions(server, range(12_000))
        twice = [i for i, n in enumerate(counts) if n == 2]
        assert twice == list(range(2_500, 5_000))  # the expired batch's unanswered rows, exactly twice
        assert all(n == 1 for i, n in enumerate(counts) if not 2_500 <= i < 5_000)
        assert server.chat_requests == 0 and server.rejected == []


def _journal_spent() -> float:
    with contextlib.closing(sqlite3.connect(f"file:{JOURNAL}?mode=ro", uri=True, timeout=2)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'spent_usd'").fetchone()
    return float(row[0]) if row else 0.0


@pytest.mark.slow
def test_kill_9_at_random_moments_pays_at_most_one_batch_twice_per_kill(workdir: Path) -> None:
    """Kills land while submitting, polling and collecting (results in small pages): after a
    rerun every row is answered once in the output, at most one batch per kill was submitted
    twice (caught between its POST and its journal commit), and the journal's spend and the
    output's cost_usd equal what the server billed (no page counted twice)."""
    import random

    rng = random.Random(13)
    with fake(complete_after_s=0.4, inline_results=False, page_size=50, expire={1: 0.3}) as server:
        data = batch_job(workdir, server, 2_000, batch_max_requests=250)
        kills = 0
        # Kill while submitting, while reading result pages, and at a random moment after that.
        stages: list[Callable[[], bool]] = [
            lambda: _journaled_batches() >= 2,
            lambda: server.result_pages >= 3,
            lambda: server.result_pages >= 8,
        ]
        for ready in stages:
            proc = spawn(workdir, "run", "job", "--quiet")
            try:
                _wait(ready, "the run gets going", proc)
            except AssertionError:
                if proc.poll() is None:  # timed out: our own child, by its pid
                    proc.kill()
                    proc.communicate(timeout=10)
                break  # it finished first
            time.sleep(rng.uniform(0, 0.05))
            if proc.poll() is not None:
                break
            _kill9(proc)
            kills += 1
        assert kills >= 2  # the kills landed mid-run
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        assert server.duplicates() <= 250 * kills + 175  # + the expired batch's 175 unanswered rows
        assert math.isclose(_journal_spent(), server.bill, rel_tol=1e-9)
        assert all(n <= 250 for _, n in server.submissions)


def test_python_api_batch_mode_with_and_without_waiting(workdir: Path) -> None:
    import pipeline

    data = reviews(6)
    with fake(complete_after_s=3600) as server:
        job = {
            "prompt": {"user": "Summarise in one sentence:\n\n{text}"},
            "input": {"id_column": "id"},
            "model": {"base_url": server.base_url, "provider": "openrouter", "mode": "batch", "batch_poll_s": 0.05},
        }
        table = pa.table(data)
        first = pipeline.run(table, job, wait=False, progress=False)
        assert first.exit_code == 3 and first.summary.batches_pending == 1 and first.summary.rows_pending == 6
        assert all("pending in batch" in e for e in first.table.column("error").to_pylist())
        server.config.complete_after_s = 0
        second = pipeline.run(table, job, progress=False)
        assert second.ok and second.summary.batches_submitted == 0
        assert second.table.column("completion").to_pylist() == [expected_reply(PREFIX + t) for t in data["text"]]
        assert server.duplicates() == 0 and server.chat_requests == 0


def test_journals_of_schema_3_gain_the_batch_tables(tmp_path: Path) -> None:
    from pipeline.store.journal import Journal
    from pipeline.store.migrations import SCHEMA_VERSION

    path = tmp_path / "j.sqlite"
    Journal(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE batch_rows")
        conn.execute("DROP TABLE batches")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    journal = Journal(path)
    try:
        tables = {r[0] for r in journal.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"batches", "batch_rows"} <= tables
        assert journal.get_meta("schema_version") == str(SCHEMA_VERSION) == "5"
    finally:
        journal.close()


@pytest.mark.slow
def test_sigterm_while_waiting_writes_the_output_and_exits_3(workdir: Path) -> None:
    with fake(complete_after_s=3600) as server:
        batch_job(workdir, server, 50)
        proc = spawn(workdir, "run", "job", "--quiet")
        try:
            _wait(lambda: server.polls >= 2, "the run polls", proc)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 3, err
        assert "interrupted by SIGTERM" in err
        assert all("pending in batch" in r["error"] for r in output_rows())
        assert len(server.submissions) == 1 and server.chat_requests == 0


@pytest.mark.slow
def test_kill_between_submit_and_journal_commit_adopts_that_batch(workdir: Path) -> None:
    """A batch the provider accepted but the journal never recorded is found by its metadata, not paid twice."""
    with fake(respond_after_s=30) as server:
        data = batch_job(workdir, server, 300)
        proc = spawn(workdir, "run", "job", "--quiet")
        try:
            _wait(lambda: len(server.submissions) == 1, "the batch reaches the provider", proc)
            _kill9(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert _journaled_batches() == 0
        server.config.respond_after_s = 0
        assert run_cli("job") == 0
        assert_all_answered(data, server)
        # The batch accepted before the kill (the canary) is adopted, not paid again; then the rest.
        assert [n for _, n in server.submissions] == [20, 280]
        assert server.duplicates() == 0
