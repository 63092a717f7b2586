"""CSV columns typed losslessly: a type only when every value round-trips to exactly its text.

The property that matters: whatever type a column gets, the text that reaches
the prompt (and the journal key) is exactly the text in the file, so typing
changes neither what is asked nor which journal rows a rerun finds.
"""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.cli.app import main
from pipeline.engine.prompts import PromptRenderer
from pipeline.io.source import Source, row_keys
from tests.conftest import read_output, write_job
from tests.fakes.server import FakeServer, last_user_content

CASES: list[tuple[str, list[str], pa.DataType]] = [
    ("ints", ["1", "2", "-30"], pa.int64()),
    ("int64 max", ["9223372036854775807", "1"], pa.int64()),
    ("int and empty", ["1", "", "3"], pa.int64()),
    ("zero one", ["0", "1"], pa.int64()),
    ("leading zero", ["007", "7"], pa.string()),
    ("plus sign", ["+3", "4"], pa.string()),
    ("minus zero", ["-0", "1"], pa.float64()),  # -0.0 prints as "-0": lossless
    ("point zero", ["3.0", "1.5"], pa.string()),  # 3.0 would print as "3"
    ("padded", [" 7", "8"], pa.string()),
    ("past int64", ["99999999999999999999", "1"], pa.string()),
    ("exponent", ["1e3", "2"], pa.string()),
    ("trailing zero", ["1.50", "2.5"], pa.string()),
    ("floats", ["1.5", "2", "-0.25", "0.1"], pa.float64()),
    ("bools", ["true", "false", ""], pa.bool_()),
    ("capitalised bools", ["True", "False"], pa.string()),
    ("timestamps", ["2024-01-01 10:00:00", "2024-02-29 23:59:59"], pa.timestamp("s")),
    ("microseconds", ["2024-01-01 10:00:00.123456", "2024-01-02 00:00:00.000001"], pa.timestamp("us")),
    ("iso T", ["2024-01-01T10:00:00", "2024-01-02T10:00:00"], pa.string()),
    ("dates", ["2024-01-01", "2024-01-02"], pa.string()),
    ("mixed", ["1", "x"], pa.string()),
    ("all empty", ["", ""], pa.string()),
    ("words", ["hello", "world"], pa.string()),
]


@pytest.mark.parametrize(("values", "kind"), [(v, k) for _, v, k in CASES], ids=[c[0] for c in CASES])
def test_column_type_and_prompt_text(workdir: Path, values: list[str], kind: pa.DataType) -> None:
    """The chosen type, and the text each value renders to in a prompt is the file's text."""
    path = workdir / "data" / "in.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["col"])
        writer.writerows([v] for v in values)
    source = Source.open(path)
    assert source.schema.field("col").type == kind
    assert source.count_rows() == len(values)
    batch = next(source.batches())
    assert batch.schema.field("col").type == kind
    rendered = PromptRenderer("{col}", None).render(batch).users
    assert rendered == values


def test_a_late_value_keeps_a_column_text(workdir: Path) -> None:
    """Integers for 5 MB, then "007": the whole column stays text (the type is decided over the whole file)."""
    path = workdir / "data" / "in.csv"
    rows = [f"{i},{i % 1000},review {i}\n" for i in range(250_000)]
    rows.append("250000,007,the odd one\n")
    path.write_text("id,code,text\n" + "".join(rows), encoding="utf-8")
    assert path.stat().st_size > 5 << 20
    source = Source.open(path)
    assert source.schema.field("id").type == pa.int64()
    assert source.schema.field("code").type == pa.string()
    codes = [v for batch in source.batches(["code"]) for v in batch.column(0).to_pylist()]
    assert codes[:3] == ["0", "1", "2"] and codes[-1] == "007"


def test_int_ids_keep_their_key_text(workdir: Path) -> None:
    """An int64 id 7 is the journal key "7", as when CSV ids were text (not "7.0")."""
    path = workdir / "data" / "in.csv"
    path.write_text("id,text\n7,a\n-12,b\n9223372036854775807,c\n", encoding="utf-8")
    source = Source.open(path)
    assert source.schema.field("id").type == pa.int64()
    assert row_keys(next(source.batches()), "id", 0) == ["7", "-12", "9223372036854775807"]


TYPED_CSV = "id,price,in_stock,seen,zip,text\n" + "".join(
    f"{i},{i * 1.5 + 0.25},{'true' if i % 2 else 'false'},2024-01-{i + 1:02d} 10:00:00,0{2100 + i},item {i}\n"
    for i in range(6)
)


def test_typed_csv_end_to_end_and_resume_of_a_text_era_journal(server: FakeServer, workdir: Path) -> None:
    """Typed output columns, prompts as in the file, and a journal keyed by text resumes with nothing re-sent.

    The first run forces every column to text, as CSV input was read before; the
    second run types them: keys and prompts are the same, so nothing is sent again.
    """
    (workdir / "data" / "in.csv").write_text(TYPED_CSV, encoding="utf-8")
    template = "{id} {price} {in_stock} {seen} {zip} {text}"
    job = write_job(workdir, server.base_url, input_path="data/in.csv", user=template)
    original = job.read_text(encoding="utf-8")
    all_text = '{ id = "string", price = "string", in_stock = "string", seen = "string" }'
    job.write_text(original.replace("[input]\n", f"[input]\ndtypes = {all_text}\n"), encoding="utf-8")
    assert main(["run", "job", "--quiet"]) == 0
    text_era = read_output(workdir / "data" / "out" / "job.parquet")
    assert all(f.type == pa.string() for f in list(text_era.schema)[:6])

    job.write_text(original, encoding="utf-8")
    assert main(["run", "job", "--quiet"]) == 0
    assert server.stats()["requests"] == 6  # the typed run re-sent nothing
    table = read_output(workdir / "data" / "out" / "job.parquet")
    types = {f.name: f.type for f in table.schema}
    assert types["id"] == pa.int64()
    assert types["price"] == pa.float64()
    assert types["in_stock"] == pa.bool_()
    assert pa.types.is_timestamp(types["seen"])  # Parquet stores a seconds unit as ms
    assert types["zip"] == pa.string()  # "02100": a leading zero keeps it text
    assert table.column("id").to_pylist() == list(range(6))
    assert table.column("zip").to_pylist() == [f"0{2100 + i}" for i in range(6)]
    assert table.column("error").to_pylist() == [None] * 6

    lines = TYPED_CSV.splitlines()[1:]
    sent = sorted(last_user_content(b["body"]["messages"]) for b in server.stats()["bodies"])
    assert sent == sorted(line.replace(",", " ") for line in lines)
    journal = workdir / "data" / "out" / "job.parquet.journal.sqlite"
    with sqlite3.connect(journal) as conn:
        keys = sorted(row[0] for row in conn.execute("SELECT key FROM results"))
    assert keys == [str(i) for i in range(6)]


def test_forced_string_dtype_keeps_a_numeric_column_text(workdir: Path) -> None:
    path = workdir / "data" / "in.csv"
    path.write_text("id,zip\n1,2139\n2,10001\n", encoding="utf-8")
    assert Source.open(path).schema.field("zip").type == pa.int64()
    source = Source.open(path, dtypes={"zip": "string"})
    assert source.schema.field("zip").type == pa.string()
    assert next(source.batches()).column("zip").to_pylist() == ["2139", "10001"]
    forced = Source.open(path, dtypes={"id": "float64"})
    assert next(forced.batches()).column("id").to_pylist() == [1.0, 2.0]
