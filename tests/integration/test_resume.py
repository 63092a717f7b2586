"""Checkpoint and resume: crashes, signals, job identity, incremental reruns, the lock, status.

The crash tests run ``python -m pipeline run`` as real subprocesses (``spawn``) against the
fake server running in this process, and kill them with real signals. The test side only
polls: the journal (read-only SQLite connections, which never checkpoint or recover the WAL),
the output folder and the server's statistics. Tests that need no crash run the CLI
in-process (``run_cli``), which is much faster.

Every row's completion is checked against :func:`expected_reply` of its own prompt, so a row
that got another row's answer, lost its answer or appears twice is caught, and the server's
``duplicates()`` counts what was paid for twice.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from tests.conftest import read_output, reviews, run_cli, spawn, write_job, write_parquet
from tests.fakes.server import FakeServer, expected_reply, last_user_content

PREFIX = "Summarise in one sentence:\n\n"  # the rendered form of write_job's default user template
INPUT = Path("data/in.parquet")
OUTPUT = Path("data/out/job.parquet")
JOURNAL = Path("data/out/job.parquet.journal.sqlite")
WAL = Path("data/out/job.parquet.journal.sqlite-wal")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3


# ----------------------------------------------------------------------------- helpers


class Procs:
    """Spawns pipeline subprocesses in the workdir and kills any left running at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[subprocess.Popen[str]] = []

    def run(self, *args: str) -> subprocess.Popen[str]:
        proc = spawn(self.workdir, "run", "job", *args)
        self.started.append(proc)
        return proc

    def status(self) -> subprocess.Popen[str]:
        proc = spawn(self.workdir, "status", "job", "--json")
        self.started.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()  # our own child, by its pid
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)


@pytest.fixture
def procs(workdir: Path) -> Iterator[Procs]:
    p = Procs(workdir)
    try:
        yield p
    finally:
        p.cleanup()


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    """Wait for a subprocess; return (exit code, stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def kill9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a run that must still be running, and reap it."""
    assert proc.poll() is None, f"the run ended ({proc.returncode}) before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL


def wait_until(
    cond: Callable[[], bool],
    what: str,
    timeout: float = 20,
    proc: subprocess.Popen[str] | None = None,
    poll_s: float = 0.01,
) -> None:
    """Poll ``cond`` with short sleeps; fail if it times out or ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {out!r} {err!r}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def journal_count(where: str = "1", path: Path = JOURNAL) -> int:
    """Rows in the journal's results (0 while it does not exist yet), read-only."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as conn:
            return conn.execute(f"SELECT COUNT(*) FROM results WHERE {where}").fetchone()[0]
    except sqlite3.Error:
        return 0


def user_messages(stats: dict[str, Any], since: int = 0) -> list[str]:
    """The last user message of every request body the server recorded after index ``since``."""
    return [last_user_content(b["body"]["messages"]) for b in stats["bodies"][since:]]


def assert_complete(out: pa.Table, data: dict[str, list[Any]], prefix: str = PREFIX) -> None:
    """Every input row exactly once, in input order, with its own completion and no error."""
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == data["id"]
    assert [r["text"] for r in rows] == data["text"]
    wrong = [r["id"] for r in rows if r["completion"] != expected_reply(prefix + r["text"]) or r["error"] is not None]
    assert wrong == [], f"{len(wrong)} rows lack their own completion, e.g. {wrong[:5]}"


def assert_output_sane(path: Path, rows: int) -> None:
    """The output is absent or a complete, readable Parquet file: never half-written."""
    if path.exists():
        table = pq.read_table(path)
        assert table.num_rows == rows


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- 1. SIGKILL at random


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 22, 33])
def test_sigkill_at_random_moments_loses_nothing_and_pays_little(
    workdir: Path, server: FakeServer, procs: Procs, seed: int
) -> None:
    """Three kill -9s at random moments, then a rerun: every row exactly once with its own reply,
    at most ``concurrency`` rows billed twice per kill, and never a half-written output.

    The server's latency caps a run at 16 / 0.05 s = 320 rows/s, so the job is sized from the
    seeded waits (about 900-1,300 rows rather than 600) for every kill to land mid-run.
    """
    concurrency = 16
    rng = random.Random(seed)
    waits = [rng.uniform(0.3, 1.5) for _ in range(3)]
    n = int(concurrency / 0.05 * sum(waits)) + 200  # + the rows done before each wait, and a margin
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"concurrency": concurrency})
    server.config.latency_s = 0.05
    journaled = [0]
    kills = 0
    for wait in waits:
        before = journal_count()
        requests_before = server.stats()["requests"]
        proc = procs.run("--quiet")
        wait_until(lambda b=before: journal_count() > b, "new journal rows", proc=proc)
        time.sleep(wait)
        kill9(proc)
        kills += 1
        assert_output_sane(workdir / OUTPUT, n)
        assert not (workdir / OUTPUT).exists(), "no run finished, so no output may exist"
        journaled.append(journal_count("status = 'ok'"))
        # Each kill on its own: the requests this run sent that its journal does not hold
        # (they are sent again, so paid twice) are at most the requests it had in flight.
        unjournaled = server.stats()["requests"] - requests_before - (journaled[-1] - journaled[-2])
        assert 0 <= unjournaled <= concurrency, (kills, unjournaled)
    # Every killed run's committed progress survives the next kill.
    assert journaled == sorted(journaled) and len(set(journaled)) == len(journaled), journaled
    assert journaled[-1] < n

    sent = server.stats()["requests"]
    code, _, err = finish(procs.run("--quiet"))
    assert code == EXIT_OK, err
    assert_complete(read_output(workdir / OUTPUT), data)
    assert server.duplicates() <= concurrency * kills
    # The final run resumed exactly where the journal stood: it sent only the rows not yet ok.
    assert server.stats()["requests"] - sent == n - journaled[-1]


# ---------------------------------------------------------------- 2. SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_stops_gracefully_and_resume_pays_nothing_twice(
    workdir: Path, server: FakeServer, procs: Procs, sig: signal.Signals
) -> None:
    """A signal mid-run: exit 3 with resume instructions, requests in flight are journaled (every
    billed reply is in the output), unsent rows say ``not_run``; the rerun finishes with no duplicate."""
    n = 48
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"concurrency": 8})
    server.config.latency_s = 0.3
    proc = procs.run()
    wait_until(
        lambda: journal_count() >= 8 and server.stats()["in_flight"] > 0, "replies journaled, more in flight", proc=proc
    )
    journaled_at_signal = journal_count()
    proc.send_signal(sig)
    code, out, err = finish(proc, timeout=15)
    assert code == EXIT_STOPPED, (out, err)
    assert f"interrupted by {sig.name}" in out
    assert "resume with: pipeline run job" in out

    rows = read_output(workdir / OUTPUT).to_pylist()
    assert [r["id"] for r in rows] == data["id"]
    ok = [r for r in rows if r["error"] is None]
    not_run = [r for r in rows if r["error"] is not None]
    assert ok and not_run
    assert all(r["error"].startswith("not_run") and r["completion"] is None for r in not_run)
    assert all(r["completion"] == expected_reply(PREFIX + r["text"]) for r in ok)
    # The requests in flight at the signal were waited for (none abandoned) and journaled.
    assert len(ok) > journaled_at_signal
    assert server.stats()["cancelled"] == 0
    assert server.stats()["ok"] == len(ok), "every billed reply is in the output"

    server.config.latency_s = 0.01
    code, out, err = finish(procs.run("--quiet"))
    assert code == EXIT_OK, err
    assert_complete(read_output(workdir / OUTPUT), data)
    assert server.duplicates() == 0
    assert server.stats()["ok"] == n


def test_sigterm_with_a_hanging_request_exits_after_the_grace_period(
    workdir: Path, server: FakeServer, procs: Procs
) -> None:
    """A request that never answers (timeout_s 60) does not hold a stop past ``stop_grace_s = 1``:
    exit 3 within a few seconds, the hung row is ``not_run``, and a rerun completes it."""
    n = 40
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"concurrency": 4, "timeout_s": 60, "stop_grace_s": 1})
    server.config.latency_s = 0.02
    server.config.script = {"review number 3 ": ["hang"]}
    proc = procs.run("--quiet")
    wait_until(lambda: journal_count() >= n - 1 and server.stats()["hung"] == 1, "all rows but the hung one", proc=proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc, timeout=20)
    elapsed = time.monotonic() - t0
    assert code == EXIT_STOPPED, err
    assert 0.9 <= elapsed < 5, f"exited {elapsed:.1f} s after SIGTERM with stop_grace_s = 1"
    rows = read_output(workdir / OUTPUT).to_pylist()
    hung = rows[3]
    assert hung["error"].startswith("not_run") and hung["completion"] is None
    assert all(r["error"] is None for i, r in enumerate(rows) if i != 3)

    code, _, err = finish(procs.run("--quiet"))  # the script is exhausted: the row now answers
    assert code == EXIT_OK, err
    assert_complete(read_output(workdir / OUTPUT), data)


# ----------------------------------------------------------------- 3. finished = no-op


def test_rerun_of_a_finished_job_is_a_quick_no_op(workdir: Path, server: FakeServer) -> None:
    """A rerun of a complete job sends nothing, exits 0 quickly and rewrites the same output."""
    n = 600
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"concurrency": 16})
    assert run_cli("job") == EXIT_OK
    first = read_output(workdir / OUTPUT)
    requests = server.stats()["requests"]
    assert requests == n

    t0 = time.monotonic()
    assert run_cli("job") == EXIT_OK
    elapsed = time.monotonic() - t0
    assert server.stats()["requests"] == requests
    assert elapsed < 2.0, f"no-op rerun took {elapsed:.2f} s"
    again = read_output(workdir / OUTPUT)
    assert again.equals(first)
    assert_complete(again, data)


# -------------------------------------------------------------------- 4. job identity

IDENTITY_CHANGES: list[tuple[str, dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
    ("model", {"model": {"name": "test/other-model"}}, lambda b: b["model"] == "test/other-model"),
    (
        "user",
        {"user": "Classify the tone:\\n\\n{text}"},
        lambda b: b["messages"][-1]["content"].startswith("Classify the tone:\n\n"),
    ),
    ("system", {"system": "You are terse."}, lambda b: b["messages"][0]["content"] == "You are terse."),
    ("max_tokens", {"model": {"max_tokens": 32}}, lambda b: b["max_tokens"] == 32),
    ("temperature", {"model": {"temperature": 0.7}}, lambda b: b["temperature"] == 0.7),
    ("params", {"model": {"params": {"seed": 7}}}, lambda b: b["seed"] == 7),
]


@pytest.mark.parametrize(("key", "change", "sent_with_change"), IDENTITY_CHANGES, ids=[c[0] for c in IDENTITY_CHANGES])
def test_changed_job_refuses_to_resume_and_fresh_starts_over(
    workdir: Path,
    server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    key: str,
    change: dict[str, Any],
    sent_with_change: Callable[[dict[str, Any]], bool],
) -> None:
    """Changing what determines the results makes a rerun exit 2 naming the change and sending
    nothing; ``--fresh`` sets the old journal aside beside it and re-sends every row."""
    n = 10
    write_parquet(workdir / INPUT, reviews(n))
    write_job(workdir, server.base_url)
    assert run_cli("job") == EXIT_OK
    capsys.readouterr()

    write_job(workdir, server.base_url, **change)
    assert run_cli("job") == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("pipeline: error: ") and err.count("\n") == 1, err
    assert f"({key})" in err and "--fresh" in err
    assert server.stats()["requests"] == n, "a refused rerun must send nothing"

    assert run_cli("job", "--fresh") == EXIT_OK
    stats = server.stats()
    assert stats["requests"] == 2 * n
    assert all(sent_with_change(b["body"]) for b in stats["bodies"][n:])
    aside = list((workdir / JOURNAL.parent).glob(f"{JOURNAL.name}.*.old"))
    assert len(aside) == 1
    assert journal_count(path=aside[0]) == n, "the set-aside journal keeps the old results"
    assert journal_count() == n
    # The new journal carries the new identity: a plain rerun now resumes as a no-op.
    assert run_cli("job") == EXIT_OK
    assert server.stats()["requests"] == 2 * n


def test_two_fresh_starts_keep_both_old_journals(workdir: Path, server: FakeServer) -> None:
    """Each ``--fresh`` keeps the journal it sets aside, even two within the same second."""
    write_parquet(workdir / INPUT, reviews(3))
    write_job(workdir, server.base_url)
    assert run_cli("job") == EXIT_OK
    time.sleep(1.02 - time.time() % 1)  # start of a second: both --fresh runs (~50 ms each) fall in it
    assert run_cli("job", "--fresh") == EXIT_OK
    assert run_cli("job", "--fresh") == EXIT_OK
    aside = list((workdir / JOURNAL.parent).glob(f"{JOURNAL.name}.*.old"))
    assert len(aside) == 2, [p.name for p in aside]


LIMIT_CHANGES: list[tuple[str, Any]] = [
    ("requests_per_minute", 30000),
    ("concurrency", 2),
    ("max_attempts", 3),
    ("timeout_s", 7),
    ("budget_usd", 5.0),
    ("stop_grace_s", 2),
]


@pytest.mark.parametrize(("limit", "value"), LIMIT_CHANGES, ids=[c[0] for c in LIMIT_CHANGES])
def test_changed_limits_resume_without_refusing(workdir: Path, server: FakeServer, limit: str, value: Any) -> None:
    """Limits do not determine results: after changing one, the rerun resumes and sends only
    the row left to retry."""
    n = 10
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"max_attempts": 1})
    server.config.script = {"review number 6 ": ["500"]}
    assert run_cli("job") == EXIT_FAILED
    assert server.stats()["requests"] == n

    write_job(workdir, server.base_url, limits={"max_attempts": 1, limit: value})
    assert run_cli("job") == EXIT_OK
    stats = server.stats()
    assert user_messages(stats, n) == [PREFIX + data["text"][6]]
    assert server.duplicates() == 0
    assert_complete(read_output(workdir / OUTPUT), data)


# --------------------------------------------------------------------- 5. incremental


def test_incremental_rerun_sends_only_new_and_changed_rows(workdir: Path, server: FakeServer) -> None:
    """With an id column, appending rows and editing one sends exactly those rows; the output
    covers the whole current input."""
    data = reviews(30)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, id_column="id")
    assert run_cli("job") == EXIT_OK
    assert server.stats()["requests"] == 30

    more = reviews(40)
    more["text"][5] = "review number 5, now rewritten by its author"
    write_parquet(workdir / INPUT, more)
    assert run_cli("job") == EXIT_OK
    sent = user_messages(server.stats(), 30)
    expected = {PREFIX + more["text"][5]} | {PREFIX + t for t in more["text"][30:]}
    assert len(sent) == 11 and set(sent) == expected
    assert server.duplicates() == 0
    assert_complete(read_output(workdir / OUTPUT), more)


# --------------------------------------------------------------------- 6. failed rows


def test_transient_failures_retried_by_rerun_fatal_only_with_retry_failed(workdir: Path, server: FakeServer) -> None:
    """A row that got 500 until max_attempts is retried by a plain rerun; a row refused with 400
    is not, until ``--retry-failed``."""
    data = reviews(12)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"max_attempts": 2})
    server.config.script = {"review number 4 ": ["500", "500"], "review number 7 ": ["400"]}
    assert run_cli("job") == EXIT_FAILED
    rows = read_output(workdir / OUTPUT).to_pylist()
    assert rows[4]["error"].startswith("HTTP 500") and rows[4]["attempts"] == 2
    assert rows[7]["error"].startswith("HTTP 400") and rows[7]["attempts"] == 1
    assert server.stats()["requests"] == 12 + 1  # row 4 was tried twice

    assert run_cli("job") == EXIT_FAILED  # row 7 still carries its 400
    assert user_messages(server.stats(), 13) == [PREFIX + data["text"][4]]
    rows = read_output(workdir / OUTPUT).to_pylist()
    assert rows[4]["error"] is None and rows[4]["completion"] == expected_reply(PREFIX + data["text"][4])
    assert rows[7]["error"].startswith("HTTP 400")

    assert run_cli("job", "--retry-failed") == EXIT_OK
    assert user_messages(server.stats(), 14) == [PREFIX + data["text"][7]]
    assert_complete(read_output(workdir / OUTPUT), data)
    assert run_cli("job", "--retry-failed") == EXIT_OK
    assert server.stats()["requests"] == 15, "--retry-failed re-sends failed rows, never ok ones"


def test_rerun_with_rows_still_failed_exits_1(workdir: Path, server: FakeServer) -> None:
    """Exit 0 means every row succeeded: a rerun that leaves a permanently failed row in the
    output must still exit 1."""
    write_parquet(workdir / INPUT, reviews(5))
    write_job(workdir, server.base_url)
    server.config.script = {"review number 2 ": ["400"]}
    assert run_cli("job") == EXIT_FAILED
    assert read_output(workdir / OUTPUT).column("error")[2].as_py().startswith("HTTP 400")
    assert run_cli("job") == EXIT_FAILED


# ----------------------------------------------------------------------------- 7. lock


def test_second_run_is_locked_out_until_the_first_dies(workdir: Path, server: FakeServer, procs: Procs) -> None:
    """While a run is active a second one exits 2 at once naming the first's pid; once the first
    is killed (flock dies with it) a new run is not blocked and completes."""
    n = 40
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"concurrency": 4})
    server.config.latency_s = 0.3
    first = procs.run("--quiet")
    wait_until(lambda: journal_count() > 0, "the first run's first replies", proc=first)

    t0 = time.monotonic()
    code, _, err = finish(procs.run("--quiet"), timeout=15)
    assert code == EXIT_USAGE
    assert time.monotonic() - t0 < 5
    assert first.poll() is None, "the first run must still have been active"
    assert err.startswith("pipeline: error: ") and err.count("\n") == 1, err
    assert f"pid {first.pid}" in err
    assert "Traceback" not in err

    kill9(first)
    server.config.latency_s = 0.01
    code, _, err = finish(procs.run("--quiet"))
    assert code == EXIT_OK, err
    assert_complete(read_output(workdir / OUTPUT), data)


# ---------------------------------------------------------------------------- 8. status


def status_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["status", "job", "--json"]) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def test_status_during_and_after_a_run(
    workdir: Path, server: FakeServer, procs: Procs, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pipeline status`` reports counts, tokens, cost, last progress, and whether (and which pid)
    a run is active, from the journal while the run goes on and after it ends."""
    n = 40
    write_parquet(workdir / INPUT, reviews(n))
    write_job(workdir, server.base_url, limits={"concurrency": 4, "max_attempts": 1})
    assert status_json(capsys)["started"] is False
    server.config.latency_s = 0.15
    server.config.script = {"review number 9 ": ["400"]}
    proc = procs.run("--quiet")
    wait_until(lambda: journal_count("status = 'ok'") >= 8, "some rows done", proc=proc)

    during = status_json(capsys)
    assert during["active"] is True and during["active_pid"] == proc.pid
    assert during["rows_total"] == n
    assert 8 <= during["rows_done"] < n
    assert during["rows_pending"] == n - during["rows_done"] - during["rows_failed"] - during["rows_skipped"]
    assert during["rows_pending"] > 0
    assert during["prompt_tokens"] > 0 and during["completion_tokens"] > 0 and during["cost_usd"] > 0
    last = dt.datetime.fromisoformat(during["last_progress"])
    assert abs((dt.datetime.now(dt.UTC) - last).total_seconds()) < 60
    assert proc.poll() is None, "status must have been taken while the run was active"
    main(["status", "job"])
    human = capsys.readouterr().out
    assert f"running (pid {proc.pid})" in human and f"{during['rows_done']} done" in human

    code, _, err = finish(proc)
    assert code == EXIT_FAILED, err
    after = status_json(capsys)
    stats = server.stats()
    assert after["active"] is False and after["active_pid"] is None
    assert (after["rows_done"], after["rows_failed"], after["rows_pending"]) == (n - 1, 1, 0)
    assert after["prompt_tokens"] == stats["prompt_tokens"]
    assert after["completion_tokens"] == stats["completion_tokens"]
    assert after["cost_usd"] == pytest.approx(stats["cost"], rel=1e-6)
    main(["status", "job"])
    human = capsys.readouterr().out
    assert "not running" in human and f"{n - 1} done, 1 failed" in human and "0 pending" in human


# ------------------------------------------------------------------------ 9. torn WAL


def wal_frames(wal: bytes) -> list[tuple[int, bool]]:
    """(offset, is_commit) of each whole frame in a WAL image (see SQLite's file format)."""
    page_size = int.from_bytes(wal[8:12], "big")
    size = 24 + page_size
    frames = []
    offset = 32
    while offset + size <= len(wal):
        frames.append((offset, int.from_bytes(wal[offset + 4 : offset + 8], "big") != 0))
        offset += size
    return frames


def ok_rows_of_copy(src: Path, dest_dir: Path) -> int:
    """Ok rows of a journal as SQLite would recover it, read from a copy (the original stays as is)."""
    dest_dir.mkdir()
    for suffix in ("", "-wal"):
        part = Path(f"{src}{suffix}")
        if part.exists():
            shutil.copyfile(part, dest_dir / f"j.sqlite{suffix}")
    with contextlib.closing(sqlite3.connect(dest_dir / "j.sqlite")) as conn:
        return conn.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_torn_journal_tail_after_sigkill(
    workdir: Path, server: FakeServer, procs: Procs, tmp_path: Path, damage: str
) -> None:
    """After a kill -9, a torn or garbled last WAL frame loses only the last commit: the rerun
    exits 0, re-sends exactly the rows the journal lost, and every row is present once."""
    n = 600
    data = reviews(n)
    write_parquet(workdir / INPUT, data)
    write_job(workdir, server.base_url, limits={"concurrency": 16})
    server.config.latency_s = 0.05
    proc = procs.run("--quiet")
    wait_until(lambda: journal_count() >= 100, "100 journaled rows", proc=proc)
    kill9(proc)

    before = ok_rows_of_copy(workdir / JOURNAL, tmp_path / "before")
    wal_path = workdir / WAL
    wal = wal_path.read_bytes() if wal_path.exists() else b""
    commits = [off for off, commit in wal_frames(wal) if commit] if len(wal) > 32 else []
    if commits:
        end = commits[-1] + 24 + int.from_bytes(wal[8:12], "big")  # end of the last committed frame
        # Tear 300 bytes off the last committed frame, or garble its last 64 bytes.
        wal = wal[: end - 300] if damage == "truncate" else wal[: end - 64] + bytes(range(64)) + wal[end:]
    else:  # everything was checkpointed: a WAL of garbage must be ignored
        wal += os.urandom(4096)
    wal_path.write_bytes(wal)
    after = ok_rows_of_copy(workdir / JOURNAL, tmp_path / "after")
    if commits:
        assert after < before, "the damage must cost the journal its last commit"

    server.reset()
    server.config.latency_s = 0.0
    code, _, err = finish(procs.run("--quiet"))
    assert code == EXIT_OK, err
    assert server.stats()["requests"] == n - after, "exactly the rows the journal lost are re-sent"
    assert_complete(read_output(workdir / OUTPUT), data)


# ---------------------------------------------------------- 10. kill while writing output


def test_kill_while_writing_output_never_leaves_a_partial_file(workdir: Path, server: FakeServer, procs: Procs) -> None:
    """SIGKILL in the middle of writing the output (a stopped run writes all 200,000 rows, which
    takes about a second) leaves no output at all the first time, and the previous complete
    output byte for byte the second time."""
    n = 200_000
    write_parquet(workdir / INPUT, reviews(n))
    write_job(workdir, server.base_url, limits={"concurrency": 16}, id_column=None)
    server.config.latency_s = 0.05

    def stop(proc: subprocess.Popen[str]) -> None:
        sent = server.stats()["requests"]
        wait_until(lambda: server.stats()["requests"] > sent, "the run to send", proc=proc)
        proc.send_signal(signal.SIGTERM)

    def stop_and_kill_while_writing() -> None:
        proc = procs.run("--quiet")
        stop(proc)
        pid_tmp = workdir / OUTPUT.parent / f".{OUTPUT.name}.{proc.pid}.tmp"
        wait_until(pid_tmp.exists, "the output's temporary file", proc=proc, poll_s=0.002)
        kill9(proc)

    stop_and_kill_while_writing()
    assert not (workdir / OUTPUT).exists(), "a killed first write must leave no output"

    proc = procs.run("--quiet")
    stop(proc)
    code, _, err = finish(proc)
    assert code == EXIT_STOPPED, err
    assert_output_sane(workdir / OUTPUT, n)
    digest = sha256(workdir / OUTPUT)

    stop_and_kill_while_writing()
    assert_output_sane(workdir / OUTPUT, n)
    assert sha256(workdir / OUTPUT) == digest, "a killed write must leave the previous output untouched"
