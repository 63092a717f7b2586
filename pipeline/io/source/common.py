"""What every input format shares: the formats and dtypes, the read errors, forced types, batching."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import InputError
from pipeline.io.fs import DataPath

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
# What ``[input] dtypes`` may force a column to.
DTYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "timestamp": pa.timestamp("us"),
}
T = TypeVar("T")
# What readers raise for a file they cannot read (bad bytes in a header are a UnicodeDecodeError).
READ_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError, UnicodeDecodeError)
BLOCK = 4 << 20


@dataclass(frozen=True)
class Opened:
    """What opening a file learnt: its format, its columns (as yielded and as read), rows and casts."""

    format: str
    schema: pa.Schema
    rows: int | None
    read_schema: pa.Schema | None
    casts: Mapping[str, pa.DataType]


@dataclass
class Cursor:
    """Where streaming is: the file being read and the rows yielded from it."""

    file: DataPath
    row: int = 0

    def start(self, file: DataPath) -> None:
        self.file, self.row = file, 0


def forced_types(dtypes: Mapping[str, str]) -> dict[str, pa.DataType]:
    forced = {}
    for column, name in dtypes.items():
        if name not in DTYPES:
            raise InputError(f"[input] dtypes: {column} = {name!r}: use one of {', '.join(DTYPES)}")
        forced[column] = DTYPES[name]
    return forced


def check_names(path: DataPath, names: list[str], forced: Mapping[str, pa.DataType]) -> None:
    """Column names are unique, and every forced dtype names a column."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"{path}: column {name!r} appears twice; rename one of them")
        seen.add(name)
    for column in forced:
        if column not in seen:
            raise InputError(f"[input] dtypes: column {column!r} not in {path} (columns: {', '.join(names)})")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def rebatch(reader: pa.RecordBatchReader, size: int) -> Iterator[pa.RecordBatch]:
    """CSV/JSON readers yield blocks of any size: slice them to ``size`` rows."""
    for block in reader:
        for start in range(0, block.num_rows, size):
            yield block.slice(start, size)


def check_forced(
    path: DataPath, column: str, values: pa.Array, kind: pa.DataType, first_row: int, *, text: bool
) -> None:
    """Every value of ``column`` converts to its forced type, or name the first that does not."""
    found = first_unconvertible(values, kind, text=text)
    if found is not None:
        i, value = found
        raise InputError(f"[input] dtypes: column {column!r} row {first_row + i} of {path}: {value!r} is not {kind}")


def first_unconvertible(values: pa.Array, kind: pa.DataType, *, text: bool) -> tuple[int, object] | None:
    """(Index, value) of the first value that does not convert to ``kind``, or None when all do.

    ``text``: CSV text, where an empty cell is a missing value.
    """
    convert = cast_text if text else cast
    try:
        convert(values, kind)
        return None
    except READ_ERRORS:
        pass
    for i, value in enumerate(values.to_pylist()):
        try:
            convert(pa.array([value], values.type), kind)
        except READ_ERRORS:
            return i, value
    return None


def cast(values: pa.Array, kind: pa.DataType) -> pa.Array:
    return values.cast(kind)


def cast_text(column: pa.Array, kind: pa.DataType) -> pa.Array:
    """CSV text to ``kind``: an empty cell becomes null."""
    empty = pc.equal(column, "")
    return pc.if_else(empty, pa.scalar(None, pa.string()), column).cast(kind)


def with_types(schema: pa.Schema, types: Mapping[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field(f.name, types[f.name]) if f.name in types else f for f in schema])
