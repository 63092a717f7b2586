"""Input checked before the first request: folder schemas, encodings, id types, duplicate names.

Each case is a real file on disk opened the way a run opens it; the cases that
matter to users also run the job against the loopback server and check that it
stopped with exit 2 and one line before sending anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.app import main
from pipeline.errors import InputError, RecordError
from pipeline.io.source import Source, check_id_column, lossless_common_type
from tests.conftest import write_job, write_parquet
from tests.fakes.server import FakeServer

BIG = 5 << 20  # past the readers' 4 MB block: the bad record is not in the first block


def refused(capsys: pytest.CaptureFixture[str], server: FakeServer, *expected: str) -> str:
    """Run job "job": exit 2, one stderr line holding every ``expected`` text, nothing sent."""
    code = main(["run", "job", "--quiet"])
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipeline: error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert server.stats()["requests"] == 0
    return lines[0]


# ------------------------------------------------------------------ Parquet folders


@pytest.mark.parametrize(
    ("a", "b", "common"),
    [
        (pa.int64(), pa.int64(), pa.int64()),
        (pa.int32(), pa.int64(), pa.int64()),
        (pa.int8(), pa.int16(), pa.int16()),
        (pa.uint32(), pa.int64(), pa.int64()),
        (pa.uint32(), pa.int32(), pa.int64()),
        (pa.uint8(), pa.uint16(), pa.uint16()),
        (pa.float32(), pa.float64(), pa.float64()),
        (pa.int32(), pa.float64(), pa.float64()),
        (pa.string(), pa.large_string(), pa.large_string()),
        (pa.null(), pa.string(), pa.string()),
        (pa.timestamp("s"), pa.timestamp("us"), pa.timestamp("us")),
        # Lossy or meaningless: refused.
        (pa.int64(), pa.string(), None),
        (pa.int64(), pa.float64(), None),  # integers past 2**53 would change
        (pa.uint64(), pa.int64(), None),
        (pa.float64(), pa.int32(), pa.float64()),
        (pa.string(), pa.binary(), None),
        (pa.timestamp("s"), pa.timestamp("s", "UTC"), None),
        (pa.list_(pa.int32()), pa.list_(pa.int64()), None),
        (pa.bool_(), pa.int8(), None),
    ],
)
def test_lossless_common_type(a: pa.DataType, b: pa.DataType, common: pa.DataType | None) -> None:
    assert lossless_common_type(a, b) == common
    assert lossless_common_type(b, a) == common


def test_folder_with_conflicting_column_types_is_refused(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """id is int64 in one file and text in another: exit 2 naming both files and the column."""
    write_parquet(workdir / "data" / "parts" / "a.parquet", {"id": [1, 2], "text": ["one", "two"]})
    write_parquet(workdir / "data" / "parts" / "b.parquet", {"id": ["3", "4"], "text": ["three", "four"]})
    write_job(workdir, server.base_url, input_path="data/parts")
    refused(capsys, server, "'id'", "a.parquet", "b.parquet", "int64", "string")


def test_folder_widens_column_types_losslessly(server: FakeServer, workdir: Path) -> None:
    """int32 in one file, int64 in another: read as int64, every value intact."""
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["one", "two"]}), _mk(workdir, "a"))
    pq.write_table(pa.table({"id": pa.array([2**40, 4], pa.int64()), "text": ["three", "four"]}), _mk(workdir, "b"))
    source = Source.open(workdir / "data" / "parts")
    assert source.schema.field("id").type == pa.int64()
    ids = [v for batch in source.batches() for v in batch.column("id").to_pylist()]
    assert ids == [1, 2, 2**40, 4]
    write_job(workdir, server.base_url, input_path="data/parts")
    assert main(["run", "job", "--quiet"]) == 0
    assert server.stats()["requests"] == 4


def _mk(workdir: Path, name: str) -> Path:
    folder = workdir / "data" / "parts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.parquet"


# ----------------------------------------------------------------------- encodings


def test_invalid_utf8_deep_in_csv_is_found_before_sending(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad byte after 5 MB of good rows: exit 2 naming the file and its line; nothing sent."""
    path = workdir / "data" / "in.csv"
    rows = [b"id,text\n"]
    size = 0
    n = 0
    while size < BIG:
        line = b"%d,a perfectly ordinary review number %d\n" % (n, n)
        rows.append(line)
        size += len(line)
        n += 1
    rows.append(b"%d,caf\xe9 au lait\n" % n)  # Latin-1, not UTF-8
    path.write_bytes(b"".join(rows))
    write_job(workdir, server.base_url, input_path="data/in.csv")
    line = refused(capsys, server, "in.csv", f"line {n + 2}", "0xe9", "UTF-8")
    assert "Traceback" not in line


def test_invalid_utf8_in_a_later_csv_column_is_found(workdir: Path) -> None:
    """The old row count read only the first column: a bad byte in another one slipped through."""
    path = workdir / "data" / "in.csv"
    path.write_bytes(b"id,text\n1,fine\n2,fine\n3,bad \xff\n")
    with pytest.raises(InputError, match=r"line 4: byte 0xff"):
        Source.open(path)


def test_invalid_utf8_in_jsonl_is_found_before_sending(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The JSON reader does not check UTF-8; the first pass does, and names the line."""
    path = workdir / "data" / "in.jsonl"
    good = [json.dumps({"id": i, "text": f"review {i}"}).encode() for i in range(3)]
    path.write_bytes(b"\n".join([*good, b'{"id": 3, "text": "caf\xe9"}']) + b"\n")
    write_job(workdir, server.base_url, input_path="data/in.jsonl")
    refused(capsys, server, "in.jsonl", "line 4", "UTF-8")


@pytest.mark.parametrize("numbers_up_to", [4 << 20, BIG], ids=["at-block-start", "inside-block"])
def test_jsonl_id_type_change_after_first_block(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str], numbers_up_to: int
) -> None:
    """Numeric ids for 4 or 5 MB, then text ids: exit 2 naming the field, the text type and the line."""
    path = workdir / "data" / "in.jsonl"
    lines = []
    size = 0
    while size < numbers_up_to:
        line = json.dumps({"id": len(lines), "text": "x" * 200})
        lines.append(line)
        size += len(line) + 1
    n = len(lines)
    lines += [json.dumps({"id": f"abc{i}", "text": "the odd one"}) for i in range(3)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_job(workdir, server.base_url, input_path="data/in.jsonl")
    line = refused(capsys, server, "in.jsonl", "'id'", "string", f"line {n + 1}")
    assert "int64" in line or "number" in line


# ---------------------------------------------------------------- names and ids


def test_csv_with_duplicate_column_names(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "data" / "in.csv").write_text("id,text,text\n1,a,b\n", encoding="utf-8")
    write_job(workdir, server.base_url, input_path="data/in.csv")
    refused(capsys, server, "in.csv", "'text'", "twice")


def test_binary_ids_that_are_not_utf8(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = pa.array([b"a1", b"b2", b"\xff\xfe"], pa.binary())
    pq.write_table(pa.table({"id": ids, "text": ["one", "two", "three"]}), workdir / "data" / "in.parquet")
    write_job(workdir, server.base_url)
    refused(capsys, server, "[input] id_column", "row 3", "not UTF-8")


def test_binary_ids_that_are_utf8_work(server: FakeServer, workdir: Path) -> None:
    ids = pa.array([b"a1", b"b2", "caf\u00e9".encode()], pa.binary())
    pq.write_table(pa.table({"id": ids, "text": ["one", "two", "three"]}), workdir / "data" / "in.parquet")
    write_job(workdir, server.base_url)
    assert main(["run", "job", "--quiet"]) == 0
    assert server.stats()["requests"] == 3


@pytest.mark.parametrize(
    "ids",
    [
        pa.array([[1], [2]], pa.list_(pa.int64())),
        pa.array([{"a": 1}, {"a": 2}], pa.struct([("a", pa.int64())])),
        pa.array([None, None], pa.null()),
    ],
    ids=["list", "struct", "null"],
)
def test_id_column_of_unusable_type(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str], ids: pa.Array
) -> None:
    pq.write_table(pa.table({"id": ids, "text": ["one", "two"]}), workdir / "data" / "in.parquet")
    write_job(workdir, server.base_url)
    refused(capsys, server, "[input] id_column", "'id'", str(ids.type).split("<")[0])


def test_id_check_reads_int_ids(workdir: Path) -> None:
    path = write_parquet(workdir / "data" / "in.parquet", {"id": [3, 1, 2], "text": ["a", "b", "c"]})
    assert check_id_column(Source.open(path), "id") == 3


# -------------------------------------------------------------- found while streaming


def test_record_error_names_file_and_row_when_a_folder_file_breaks(workdir: Path) -> None:
    """A file of a folder corrupted after the checks: RecordError naming that file and where reading stopped."""
    write_parquet(workdir / "data" / "parts" / "a.parquet", {"id": [1, 2, 3], "text": ["x", "y", "z"]})
    write_parquet(workdir / "data" / "parts" / "b.parquet", {"id": [4, 5], "text": ["v", "w"]})
    source = Source.open(workdir / "data" / "parts", batch_size=2)
    (workdir / "data" / "parts" / "b.parquet").write_bytes(b"PAR1 this is no longer a parquet file PAR1")
    seen = []
    with pytest.raises(RecordError) as caught:
        for batch in source.batches():
            seen += batch.column("id").to_pylist()
    assert seen == [1, 2, 3]
    assert caught.value.path == workdir / "data" / "parts" / "b.parquet"
    assert caught.value.row == 1
    assert isinstance(caught.value, InputError)
    message = str(caught.value)
    assert "b.parquet: row 1:" in message and "\n" not in message


def test_record_error_in_csv_changed_after_the_checks(workdir: Path) -> None:
    """A CSV that gained a bad line after opening: the rows before it are read, the error names it."""
    path = workdir / "data" / "in.csv"
    path.write_text("id,n\n1,10\n2,20\n3,30\n", encoding="utf-8")
    source = Source.open(path, batch_size=2)
    assert source.schema.field("n").type == pa.int64()
    with path.open("a", encoding="utf-8") as fh:
        fh.write("4,forty\n")  # no longer an integer column
    seen = []
    with pytest.raises(RecordError) as caught:
        for batch in source.batches():
            seen += batch.column("id").to_pylist()
    assert seen == [1, 2, 3]
    assert caught.value.path == path
    assert caught.value.row == 4  # the bad row itself, counted from 1 like every data row
    assert "in.csv: row 4:" in str(caught.value) and "'forty'" in str(caught.value)


# ------------------------------------------------------------------- forced dtypes


def test_forced_dtype_that_does_not_fit_is_named(
    server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "data" / "in.csv").write_text("id,text,zip\n1,a,02139\n2,b,n/a\n", encoding="utf-8")
    job = write_job(workdir, server.base_url, input_path="data/in.csv")
    job.write_text(job.read_text().replace("[input]\n", '[input]\ndtypes = { zip = "int64" }\n'))
    refused(capsys, server, "[input] dtypes", "'zip'", "row 2", "'n/a'")


def test_forced_dtype_for_missing_column(server: FakeServer, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(workdir / "data" / "in.parquet", {"id": [1], "text": ["a"]})
    job = write_job(workdir, server.base_url)
    job.write_text(job.read_text().replace("[input]\n", '[input]\ndtypes = { zip = "string" }\n'))
    refused(capsys, server, "[input] dtypes", "'zip'")


def test_forced_dtype_on_jsonl_and_parquet(workdir: Path) -> None:
    """dtypes apply to every format: numbers forced to text keep their digits."""
    (workdir / "data" / "in.jsonl").write_text('{"id": 1, "zip": 2139}\n{"id": 2, "zip": 10001}\n', encoding="utf-8")
    source = Source.open(workdir / "data" / "in.jsonl", dtypes={"zip": "string"})
    assert source.schema.field("zip").type == pa.string()
    assert [v for b in source.batches() for v in b.column("zip").to_pylist()] == ["2139", "10001"]
    path = write_parquet(workdir / "data" / "in.parquet", {"id": [1, 2], "flag": ["true", "false"]})
    source = Source.open(path, dtypes={"flag": "bool"})
    assert [v for b in source.batches() for v in b.column("flag").to_pylist()] == [True, False]
