"""Object storage: s3:// inputs and outputs against moto's S3 server on loopback."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.config.job import load_job
from pipeline.errors import JobError
from pipeline.io import fs
from tests.conftest import reviews, run_cli, write_job
from tests.fakes.s3store import BUCKET, s3, s3_endpoint
from tests.fakes.server import FakeServer, expected_reply

__all__ = ["s3", "s3_endpoint"]  # fixtures


def _put_parquet(store: pafs.S3FileSystem, key: str, table: pa.Table) -> None:
    pq.write_table(table, f"{BUCKET}/{key}", filesystem=store)


def _texts(n: int, start: int = 0) -> dict[str, list[object]]:
    data = reviews(n + start)
    return {name: values[start:] for name, values in data.items()}


def test_s3_prefix_input_and_output_default_engine(
    workdir: Path, server: FakeServer, s3: pafs.S3FileSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    # A prefix of two Parquet files in, one Parquet file out, both on the store.
    _put_parquet(s3, "in/part-0.parquet", pa.table(_texts(30)))
    _put_parquet(s3, "in/part-1.parquet", pa.table(_texts(20, start=30)))
    write_job(
        workdir,
        server.base_url or "",
        input_path=f"s3://{BUCKET}/in/",
        output=f"s3://{BUCKET}/out/result.parquet",
        system=None,
        user="{text}",
    )
    assert run_cli("job") == 0

    out = pq.read_table(f"{BUCKET}/out/result.parquet", filesystem=s3)
    assert out.num_rows == 50
    rows = out.to_pylist()
    assert [r["id"] for r in rows] == list(range(50))
    for row in rows:
        assert row["completion"] == expected_reply(row["text"])
        assert row["error"] is None
    assert server.duplicates() == 0 and server.stats()["ok"] == 50
    # No temporary key is left, and the journal stayed on local disk.
    keys = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))]
    assert keys == [f"{BUCKET}/out/result.parquet"]
    journal = workdir / ".pipeline" / "s3" / BUCKET / "out" / "result.parquet.journal.sqlite"
    assert journal.exists()

    # A rerun sends nothing and writes the same output; status reads the local journal.
    assert run_cli("job") == 0
    assert server.stats()["requests"] == 50
    assert pq.read_table(f"{BUCKET}/out/result.parquet", filesystem=s3).equals(out)
    capsys.readouterr()
    assert run_cli("status", "job") == 0
    assert "50 done" in capsys.readouterr().out


def test_s3_single_csv_file_input(workdir: Path, server: FakeServer, s3: pafs.S3FileSystem) -> None:
    with s3.open_output_stream(f"{BUCKET}/reviews.csv") as sink:
        pacsv.write_csv(pa.table({"id": ["a", "b", "c"], "text": ["one", "two", "007"]}), sink)
    write_job(workdir, server.base_url or "", input_path=f"s3://{BUCKET}/reviews.csv", system=None, user="{text}")
    assert run_cli("job") == 0
    out = pq.read_table(workdir / "data" / "out" / "job.parquet").to_pylist()
    assert [(r["id"], r["completion"]) for r in out] == [
        (i, expected_reply(t)) for i, t in zip("abc", ["one", "two", "007"], strict=True)
    ]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (f"s3://{BUCKET}/missing.parquet", "file not found"),
        ("s3://no-such-bucket-x/in.parquet", "file not found"),
    ],
)
def test_s3_missing_input_is_a_user_error(
    workdir: Path,
    server: FakeServer,
    s3: pafs.S3FileSystem,
    capsys: pytest.CaptureFixture[str],
    path: str,
    message: str,
) -> None:
    write_job(workdir, server.base_url or "", input_path=path)
    assert run_cli("job") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert server.stats()["requests"] == 0


def test_s3_output_to_missing_bucket_is_refused_before_sending(
    workdir: Path, server: FakeServer, s3: pafs.S3FileSystem, capsys: pytest.CaptureFixture[str]
) -> None:
    _put_parquet(s3, "in.parquet", pa.table(_texts(5)))
    write_job(
        workdir, server.base_url or "", input_path=f"s3://{BUCKET}/in.parquet", output="s3://no-such-bucket-x/o.parquet"
    )
    assert run_cli("job") == 2
    assert "bucket 'no-such-bucket-x' not found" in capsys.readouterr().err
    assert server.stats()["requests"] == 0


def test_s3_output_written_whole_or_not_at_all(s3: pafs.S3FileSystem) -> None:
    # A failure half-way leaves the old object in place and no temporary key behind.
    _put_parquet(s3, "out.parquet", pa.table({"v": [1]}))
    with pytest.raises(RuntimeError), fs.remote_output(f"s3://{BUCKET}/out.parquet") as sink:
        sink.write(b"partial")
        raise RuntimeError("killed half-way")
    assert pq.read_table(f"{BUCKET}/out.parquet", filesystem=s3).to_pydict() == {"v": [1]}
    keys = [i.path for i in s3.get_file_info(pafs.FileSelector(BUCKET, recursive=True))]
    assert keys == [f"{BUCKET}/out.parquet"]


@pytest.mark.parametrize(
    ("value", "expected", "error"),
    [
        ("data/in.parquet", Path("data/in.parquet"), None),
        ("s3://bucket/key.parquet", "s3://bucket/key.parquet", None),
        ("s3://bucket/prefix/", "s3://bucket/prefix/", None),
        ("gs://bucket/key", None, "unsupported scheme gs://"),
        ("s3://bucket", None, "needs a bucket and a key"),
        ("s3:///key", None, "needs a bucket and a key"),
    ],
)
def test_data_paths_in_job_files(workdir: Path, value: str, expected: object, error: str | None) -> None:
    job_file = write_job(workdir, "http://127.0.0.1:9/v1", input_path=value)
    if error is not None:
        with pytest.raises(JobError, match=error):
            load_job(str(job_file))
    else:
        assert load_job(str(job_file)).input.path == expected


@pytest.mark.parametrize(
    ("output", "journal"),
    [
        ("data/out/x.parquet", Path("data/out/x.parquet.journal.sqlite")),
        ("s3://b/out/x.parquet", Path(".pipeline/s3/b/out/x.parquet.journal.sqlite")),
        ("s3://b/x.parquet", Path(".pipeline/s3/b/x.parquet.journal.sqlite")),
    ],
)
def test_journal_stays_on_local_disk(workdir: Path, output: str, journal: Path) -> None:
    job_file = write_job(workdir, "http://127.0.0.1:9/v1", output=output)
    assert load_job(str(job_file)).output.journal_path == journal


def test_s3_csv_output_staged_beside_the_journal(workdir: Path, server: FakeServer, s3: pafs.S3FileSystem) -> None:
    _put_parquet(s3, "in.parquet", pa.table(_texts(7)))
    write_job(
        workdir,
        server.base_url or "",
        input_path=f"s3://{BUCKET}/in.parquet",
        output=f"s3://{BUCKET}/out/result.csv",
        system=None,
        user="{text}",
    )
    assert run_cli("job") == 0
    with s3.open_input_stream(f"{BUCKET}/out/result.csv") as stream:
        out = pacsv.read_csv(stream).to_pylist()
    assert [r["completion"] for r in out] == [expected_reply(t) for t in _texts(7)["text"]]
    staging = workdir / ".pipeline" / "s3" / BUCKET / "out"
    assert not [p.name for p in staging.iterdir() if not p.name.startswith("result.csv.journal.sqlite")]
