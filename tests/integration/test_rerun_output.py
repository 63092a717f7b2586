"""A rerun that changed nothing leaves the output file alone; anything the output is made of changing rewrites it.

The no-op rerun's summary stays what it was (rows, output rows, costs); the
file is the same file (same inode, same modification time). Each way the file
could have gone stale is checked to rewrite it: the output deleted or edited,
the input edited, a row journaled behind the output's back (a run killed
before it wrote), ``--output``, another format, a job setting changed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.csv as pacsv
import pytest

from pipeline.cli.app import main
from pipeline.config.job import load_job
from pipeline.engine import price_catalog
from pipeline.engine import run as run_module
from pipeline.engine.plan import Plan, prepare
from pipeline.store.journal import Journal, JournalRow, RowStatus
from tests.conftest import ROOT, read_output, reviews, run_cli, write_job, write_parquet
from tests.fakes.server import FakeServer, expected_reply

OUTPUT = Path("data/out/job.parquet")
JOURNAL = Path("data/out/job.parquet.journal.sqlite")


def _finished(workdir: Path, server: FakeServer, rows: int = 30, **job: object) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(rows))
    write_job(workdir, server.base_url, **job)  # type: ignore[arg-type]
    assert run_cli("job") == 0
    assert server.stats()["requests"] == rows


def _stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def _summary(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    code = main(["run", "job", "--json", *args])
    fields: dict[str, object] = json.loads(capsys.readouterr().out)
    assert fields["exit_code"] == code
    return fields


def _rows_right(path: Path, rows: int) -> None:
    table = read_output(path).to_pylist()
    assert len(table) == rows
    assert [r["id"] for r in table] == list(range(rows))
    assert all(r["completion"] == expected_reply(f"Summarise in one sentence:\n\n{r['text']}") for r in table)


def test_a_rerun_that_changed_nothing_leaves_the_output_alone(
    workdir: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    _finished(workdir, server)
    first = _summary(capsys)  # the first rerun writes and records what the file was made from
    before = _stamp(OUTPUT)
    again = _summary(capsys)
    assert _stamp(OUTPUT) == before
    assert server.stats()["requests"] == 30  # nothing sent by either rerun
    first.pop("wall_s"), again.pop("wall_s")
    assert again == first
    assert again["rows_resumed"] == 30 and again["output_rows"] == 30 and again["job_spent_usd"] > 0
    _rows_right(OUTPUT, 30)


def test_a_deleted_or_edited_output_is_written_again(workdir: Path, server: FakeServer) -> None:
    _finished(workdir, server)
    OUTPUT.unlink()
    assert run_cli("job") == 0
    _rows_right(OUTPUT, 30)
    OUTPUT.write_bytes(b"not parquet")
    assert run_cli("job") == 0
    _rows_right(OUTPUT, 30)
    # Same size, other bytes, the modification time put back: the figures cannot tell.
    # An edit that keeps both is not one a user makes by hand; anything else is caught.
    assert server.stats()["requests"] == 30


def test_an_edited_input_is_sent_and_written(workdir: Path, server: FakeServer) -> None:
    _finished(workdir, server)
    time.sleep(0.01)
    write_parquet(workdir / "data/in.parquet", reviews(35))
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 35
    _rows_right(OUTPUT, 35)


def test_a_row_journaled_by_a_run_that_never_wrote_its_output_is_written(workdir: Path, server: FakeServer) -> None:
    _finished(workdir, server)
    assert run_cli("job") == 0  # records what the output was made from
    # A run killed after journaling a row, before writing the output: the journal moved on.
    plan = prepare(load_job("job"))
    journal = Journal.open(JOURNAL, plan.identity())
    try:
        [[key, prompt_hash]] = journal.conn.execute("SELECT key, prompt_hash FROM results LIMIT 1").fetchall()
        journal.write_now([JournalRow(key, prompt_hash, RowStatus.OK, completion="changed", updated=time.time())])
    finally:
        journal.close()
    assert run_cli("job") == 0
    assert "changed" in read_output(OUTPUT).column("completion").to_pylist()


def test_another_output_path_or_format_is_written(workdir: Path, server: FakeServer) -> None:
    _finished(workdir, server)
    elsewhere = workdir / "data/out/elsewhere.csv"
    assert run_cli("job", "--output", str(elsewhere)) == 0
    assert pacsv.read_csv(elsewhere).num_rows == 30
    assert run_cli("job") == 0  # back to the job's own output: the journal remembers the last write only
    before = _stamp(OUTPUT)
    assert run_cli("job") == 0
    assert _stamp(OUTPUT) == before
    _rows_right(OUTPUT, 30)
    assert server.stats()["requests"] == 30


def test_a_changed_job_setting_rewrites_the_output(workdir: Path, server: FakeServer) -> None:
    _finished(workdir, server)
    assert run_cli("job") == 0
    before = _stamp(OUTPUT)
    write_job(workdir, server.base_url, limits={"concurrency": 4})  # not part of the journal's identity
    assert run_cli("job") == 0
    assert _stamp(OUTPUT) != before
    _rows_right(OUTPUT, 30)


def test_retry_failed_rewrites_what_it_retried(workdir: Path, server: FakeServer) -> None:
    write_parquet(workdir / "data/in.parquet", reviews(20))
    write_job(workdir, server.base_url, limits={"max_attempts": 1})
    server.config.fail_rate, server.config.fail_kind = 0.3, "400"
    assert run_cli("job") == 1
    assert run_cli("job") == 1  # nothing retried (permanent failures), nothing rewritten
    failed = [r for r in read_output(OUTPUT).to_pylist() if r["error"]]
    assert failed
    server.config.fail_rate = 0.0
    assert run_cli("job", "--retry-failed") == 0
    _rows_right(OUTPUT, 20)


def test_an_input_column_outside_the_prompt_edited_is_written(workdir: Path, server: FakeServer) -> None:
    """Nothing to send (every prompt is the same), yet the output carries the input's columns."""
    _finished(workdir, server)
    assert run_cli("job") == 0
    time.sleep(0.01)
    write_parquet(workdir / "data/in.parquet", {**reviews(30), "note": [f"note {i}" for i in range(30)]})
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 30
    assert read_output(OUTPUT).column("note").to_pylist() == [f"note {i}" for i in range(30)]


_NEVER_LOADED = ("aiohttp", "genai_prices", "tiktoken", "mistral_common", "tokenizers")


def test_a_noop_rerun_in_a_fresh_process_loads_no_http_client_tokenizer_or_catalog(
    workdir: Path, server: FakeServer
) -> None:
    price_catalog._cached_lookup.cache_clear()  # as in a fresh process: this test's cache folder gets the lookup
    _finished(workdir, server)
    code = (
        "import contextlib, io, json, sys\nfrom pipeline.cli.app import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n    code = main(['run', 'job', '--json'])\n"
        "print(json.dumps({'code': code, 'summary': json.loads(out.getvalue()), 'modules': sorted(sys.modules)}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):  # the first rerun reads the input, the second trusts what the first found
        res = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        found = json.loads(res.stdout.strip().splitlines()[-1])
        assert found["code"] == 0 and found["summary"]["rows_resumed"] == 30
        loaded = {m.split(".")[0] for m in found["modules"]} & set(_NEVER_LOADED)
        assert not loaded, loaded
    assert server.stats()["requests"] == 30


@pytest.mark.parametrize("limits", [{}, {"requests_per_minute": "auto"}])
def test_the_settled_driver_sums_up_as_the_realtime_driver_would(
    workdir: Path,
    server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    limits: dict[str, object],
) -> None:
    _finished(workdir, server, limits=limits)
    settled = _summary(capsys)
    monkeypatch.setattr(run_module, "settled_rows", lambda plan, journal, options: None)  # the realtime driver
    realtime = _summary(capsys)
    settled.pop("wall_s"), realtime.pop("wall_s")
    assert settled == realtime
    assert server.stats()["requests"] == 30


def test_the_second_noop_rerun_does_not_read_the_input(
    workdir: Path, server: FakeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _finished(workdir, server)
    assert run_cli("job") == 0  # reads the input, finds every row done, and the journal remembers it

    def unread(self: Plan) -> None:
        raise AssertionError("the input was read")

    with monkeypatch.context() as patched:
        patched.setattr(Plan, "batches", unread)
        assert run_cli("job") == 0
    # A status changed in place (no new row, no new write time): the pass runs again and sends that row.
    with sqlite3.connect(JOURNAL) as conn:
        conn.execute("UPDATE results SET status = 'transient' WHERE rowid = (SELECT min(rowid) FROM results)")
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 31
    _rows_right(OUTPUT, 30)
