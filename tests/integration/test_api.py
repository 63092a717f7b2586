"""The Python API, called directly: DataFrames in and out, resume, loops, threads, no side effects."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.store.migrations import SCHEMA_VERSION
from tests.fakes.server import FakeServer, expected_reply

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def job_dict(base_url: str, **limits: Any) -> dict[str, Any]:
    return {
        "name": "api",
        "prompt": {"system": "Be brief.", "user": "Summarise: {text}"},
        "model": {"base_url": base_url, "max_tokens": 32},
        "limits": {"requests_per_minute": 60000, "concurrency": 8, "max_attempts": 3, "timeout_s": 5, **limits},
    }


def frame(ids: range) -> pd.DataFrame:
    return pd.DataFrame({"id": list(ids), "text": [f"note {i} about parcel {i * 3 % 11}" for i in ids]})


def assert_matched(result: pipeline.Result, df: pd.DataFrame) -> None:
    """Every row carries the answer to its own prompt, in input order."""
    out = result.to_pandas()
    assert out["id"].tolist() == df["id"].tolist()
    assert out["completion"].tolist() == [expected_reply(f"Summarise: {t}") for t in df["text"]]
    assert out["error"].isna().all()
    assert result.exit_code == pipeline.ExitCode.OK


def test_the_whole_story(server: FakeServer, workdir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """DataFrame, rerun, arun in asyncio.run, run in a running loop, a thread, an estimate without a key."""
    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
    thresholds = gc.get_threshold()
    job = job_dict(server.base_url)

    df = frame(range(30))
    first = pipeline.run(df, job, progress=False)
    assert_matched(first, df)
    assert first.summary.requests == 30 and first.summary.rows_ok == 30
    assert first.summary.cost_usd > 0
    assert isinstance(first.table, pa.Table)

    again = pipeline.run(df, job, progress=False)
    assert_matched(again, df)
    assert again.summary.requests == 0 and again.summary.rows_resumed == 30

    overlapping = frame(range(20, 45))

    async def in_a_loop() -> pipeline.Result:
        return await pipeline.arun(overlapping, job, progress=False)

    assert_matched(asyncio.run(in_a_loop()), overlapping)  # 15 new rows

    async def notebook_cell() -> pipeline.Result:
        # A running loop, as in Jupyter: the blocking call must still work.
        return pipeline.run(frame(range(40, 50)), job, progress=False)

    assert_matched(asyncio.run(notebook_cell()), frame(range(40, 50)))  # 5 new rows

    table = pa.Table.from_pandas(frame(range(0, 60, 2)), preserve_index=False)
    box: dict[str, pipeline.Result] = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", pipeline.run(table, job, progress=False)))
    thread.start()
    thread.join()
    assert_matched(box["r"], table.to_pandas())  # 5 new rows: 50..58

    stats = server.stats()
    assert stats["requests"] == 30 + 15 + 5 + 5
    assert server.duplicates() == 0

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPENROUTER_API_KEY")
        estimate = pipeline.estimate(frame(range(70)), job)
    assert isinstance(estimate, pipeline.Estimate)
    assert estimate.rows == 70 and estimate.rows_done == 55 and estimate.rows_to_send == 15

    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers
    assert gc.get_threshold() == thresholds
    assert server.stats()["requests"] == stats["requests"]


def test_journal_lives_in_the_cache_named_by_the_job(server: FakeServer, workdir: Path) -> None:
    job = job_dict(server.base_url)
    pipeline.run(frame(range(3)), job, progress=False)
    journals = list((workdir / "cache" / "journals").glob("api-*.journal.sqlite"))
    assert len(journals) == 1
    # A different prompt is a different job: its own journal, and the rows are sent again.
    changed = {**job, "prompt": {"user": "Classify: {text}"}}
    pipeline.run(frame(range(3)), changed, progress=False)
    assert len(list((workdir / "cache" / "journals").glob("api-*.journal.sqlite"))) == 2
    assert server.stats()["requests"] == 6


def test_output_file_and_job_file(server: FakeServer, workdir: Path) -> None:
    """A job file path works as on the command line; ``output`` also writes Parquet."""
    (workdir / "jobs" / "notes.toml").write_text(
        f'[prompt]\nuser = "Summarise: {{text}}"\n[model]\nbase_url = "{server.base_url}"\nmax_tokens = 32\n'
        "[limits]\nrequests_per_minute = 60000\n",
        encoding="utf-8",
    )
    df = frame(range(4))
    result = pipeline.run(df, "notes", output=workdir / "out.parquet", progress=False)
    assert_matched(result, df)
    assert pq.read_table(workdir / "out.parquet").equals(result.table)
    # The journal belongs to the job, not to where one call writes its output.
    assert not (workdir / "out.parquet.journal.sqlite").exists()
    assert len(list((workdir / "cache" / "journals").glob("notes-*.journal.sqlite"))) == 1


def test_polars_style_arrow_stream(server: FakeServer, workdir: Path) -> None:
    """Anything exporting the Arrow C stream interface is accepted."""

    class Stream:
        def __init__(self, table: pa.Table) -> None:
            self.table = table

        def __arrow_c_stream__(self, requested_schema: Any = None) -> Any:
            return self.table.__arrow_c_stream__(requested_schema)

    df = frame(range(5))
    result = pipeline.run(Stream(pa.Table.from_pandas(df, preserve_index=False)), job_dict(server.base_url))
    assert_matched(result, df)


@pytest.mark.parametrize(
    ("data", "job", "message"),
    [
        (None, {"prompt": {"user": "{text}"}}, "[input] path"),
        (pd.DataFrame({"x": [1]}), {"prompt": {"user": "{text}"}}, "{text}"),
        (pd.DataFrame({"text": ["a"]}), {"prompt": {"user": "{text}"}, "limits": {"concurrency": 0}}, "concurrency"),
        (object(), {"prompt": {"user": "{text}"}}, "cannot read a object"),
        (pd.DataFrame({"text": ["a"]}), 42, "expected a path"),
    ],
)
def test_mistakes_raise_user_errors_before_sending(
    server: FakeServer, workdir: Path, data: Any, job: Any, message: str
) -> None:
    if isinstance(job, dict):
        job = {**job, "model": {"base_url": server.base_url}}
    with pytest.raises(pipeline.UserError, match=message.replace("[", r"\[").replace("{", r"\{")):
        pipeline.run(data, job, progress=False)
    assert server.stats()["requests"] == 0


def test_old_journal_with_row_number_keys_resumes(server: FakeServer, workdir: Path) -> None:
    """A journal from before schema versions and content keys is migrated, not re-paid."""
    df = frame(range(6))
    journal = workdir / "old.journal.sqlite"
    # One at a time, so the journal's insertion order is the input order.
    pipeline.run(df, job_dict(server.base_url, concurrency=1), journal=journal, progress=False)
    with sqlite3.connect(journal) as conn:
        # Rewrite it as the first release wrote it: row-number keys, no version, no new column.
        keys = [row[0] for row in conn.execute("SELECT key FROM results ORDER BY rowid")]
        for number, key in enumerate(keys):
            conn.execute("UPDATE results SET key = ? WHERE key = ?", (str(number), key))
        conn.execute("DELETE FROM meta WHERE key IN ('schema_version', 'key_scheme')")
        conn.execute("ALTER TABLE results DROP COLUMN cost_estimated")
    again = pipeline.run(df, job_dict(server.base_url), journal=journal, progress=False)
    assert again.summary.requests == 0
    assert_matched(again, df)
    with sqlite3.connect(journal) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == str(SCHEMA_VERSION) and meta["key_scheme"] == "row_number"


def test_status_from_python_is_what_the_cli_prints(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.cli.app import main

    journal = workdir / "api.journal.sqlite"
    job = job_dict(server.base_url)
    never = pipeline.status(job, journal=journal)
    assert isinstance(never, pipeline.JobStatus) and not never.started and not never.active

    pipeline.run(frame(range(12)), job, journal=journal, progress=False)
    status = pipeline.status(job, journal=journal)
    assert status.started and status.rows_total == 12 and status.rows_done == 12 and status.rows_pending == 0
    assert status.cost_usd > 0 and status.prompt_tokens > 0 and status.batches_pending == []

    # The CLI formats the same computation: its --json is this object's dict.
    (workdir / "jobs" / "api.toml").write_text(
        f'[input]\npath = "data/in.parquet"\n[prompt]\nuser = "{{text}}"\n'
        f'[output]\npath = "data/out.parquet"\njournal = "{journal}"\n[model]\nbase_url = "{server.base_url}"\n'
    )
    capsys.readouterr()
    assert main(["status", "api", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == status.to_dict()

    with pytest.raises(pipeline.JobError, match="pass journal="):
        pipeline.status(job)  # no [output] path and no journal: nothing to read


def test_a_sample_returns_the_estimate_for_the_whole_job(server: FakeServer, workdir: Path) -> None:
    """``run(sample=N)`` extrapolates in the engine, as ``--sample`` does: the estimate is on the summary."""
    job = job_dict(server.base_url)
    df = frame(range(40))
    result = pipeline.run(df, job, sample=5, progress=False)
    assert result.summary.requests == 5
    estimate = result.summary.estimate
    assert estimate is not None
    assert estimate.rows == 40 and estimate.rows_done == 5 and estimate.rows_to_send == 35
    assert estimate.output_tokens_basis == "mean of 5 answered rows in the journal"
    assert pipeline.run(df, job, progress=False).summary.estimate is None  # a full run has none
