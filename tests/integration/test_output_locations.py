"""Output formats (Parquet, CSV, JSON Lines) and output/journal locations checked before sending."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from tests.conftest import reviews, write_job, write_parquet
from tests.fakes.server import FakeServer, expected_json
from tests.integration.test_io import REVIEW_SCHEMA, REVIEW_SCHEMA_TOML, USER_PREFIX

RESULT_NAMES = ["completion", "finish_reason", "prompt_tokens", "completion_tokens", "cost_usd", "error"]


def structured_job(workdir: Path, server: FakeServer, output: str, n: int = 9) -> dict[str, list[object]]:
    data = reviews(n)
    write_parquet(workdir / "data" / "in.parquet", data)
    write_job(
        workdir,
        server.base_url,
        prompt_extra=REVIEW_SCHEMA_TOML,
        model={"provider": "openrouter", "max_tokens": 256},
        output=output,
        limits={"concurrency": 4},
    )
    return data


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_csv_output_with_structured_columns_as_json(server: FakeServer, workdir: Path) -> None:
    """Streamed CSV: input and result columns, lists and objects as JSON text, nothing left behind."""
    data = structured_job(workdir, server, "data/out/job.csv", n=9)
    (workdir / "jobs" / "job.toml").write_text(
        (workdir / "jobs" / "job.toml").read_text().replace("[input]\n", "[input]\nbatch_size = 4\n")
    )
    assert main(["run", "job", "--quiet"]) == 0
    path = workdir / "data" / "out" / "job.csv"
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9
    assert [int(r["id"]) for r in rows] == data["id"]
    assert list(rows[0])[:2] == ["id", "text"] and set(RESULT_NAMES) <= set(rows[0])
    users = [USER_PREFIX + str(t) for t in data["text"]]
    for row, user in zip(rows, users, strict=True):
        want = expected_json(user, REVIEW_SCHEMA)
        assert json.loads(row["completion"]) == want
        assert json.loads(row["tags"]) == want["tags"]
        assert json.loads(row["meta"]) == want["meta"]
        assert row["title"] == want["title"]
        assert int(row["stars"]) == want["stars"]
        assert row["error"] == ""
    assert leftovers(path.parent) == []


def test_jsonl_output_matches_parquet_output(server: FakeServer, workdir: Path) -> None:
    """The JSON Lines output holds the same rows and values as the Parquet output of the same job."""
    data = structured_job(workdir, server, "data/out/job.jsonl", n=7)
    assert main(["run", "job", "--quiet"]) == 0
    path = workdir / "data" / "out" / "job.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == data["id"]
    # --output moves only the output: the journal is the job's, so nothing is sent again.
    assert main(["run", "job", "--quiet", "--output", "data/out/job.parquet"]) == 0
    assert server.stats()["requests"] == 7
    parquet_rows = pq.read_table(workdir / "data" / "out" / "job.parquet").to_pylist()
    drop = {"latency_s"}
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in parquet_rows
    ]
    assert list(rows[0]) == list(parquet_rows[0])
    assert leftovers(path.parent) == []


def refused(server: FakeServer, capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    code = main(["run", "job", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert server.stats()["requests"] == 0
    return lines[0]


def test_unsupported_output_extension(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url, output="data/out/job.xlsx")
    refused(server, capsys, "[output] path", ".xlsx", ".parquet, .csv or .jsonl")


def test_output_that_is_a_folder(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    (workdir / "data" / "out" / "job.parquet").mkdir(parents=True)
    write_job(workdir, server.base_url, output="data/out/job.parquet")
    refused(server, capsys, "[output] path", "is a folder")


def test_output_folder_under_a_file(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    (workdir / "data" / "results").write_text("a file, not a folder")
    write_job(workdir, server.base_url, output="data/results/job.parquet")
    refused(server, capsys, "[output] path", "data/results is a file")


def _unwritable_folder(workdir: Path) -> Path:
    """A folder this process cannot create files in: chmod when not root, else a sysfs folder."""
    if os.geteuid() != 0:
        folder = workdir / "readonly"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    sysfs = Path("/sys/kernel")
    try:
        (sysfs / ".pipeline-probe").touch()
    except OSError:
        return sysfs
    pytest.skip("no unwritable folder available to root here")


def test_output_folder_not_writable(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _unwritable_folder(workdir)
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url, output=str(folder / "job.parquet"))
    refused(server, capsys, "[output] path", f"{folder} is not writable")


def test_journal_folder_not_writable(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _unwritable_folder(workdir)
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    job = write_job(workdir, server.base_url)
    job.write_text(job.read_text() + f'journal = "{folder / "job.journal.sqlite"}"\n')
    refused(server, capsys, "[output] journal", f"{folder} is not writable")


def test_output_folder_is_created_when_missing(server: FakeServer, workdir: Path) -> None:
    """A folder that does not exist yet is fine: it is created when the output is written."""
    write_parquet(workdir / "data" / "in.parquet", reviews(3))
    write_job(workdir, server.base_url, output="data/new/deeper/job.csv")
    assert main(["run", "job", "--quiet"]) == 0
    assert (workdir / "data" / "new" / "deeper" / "job.csv").is_file()
