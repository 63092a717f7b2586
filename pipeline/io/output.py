"""The output writer: input rows plus result columns, written atomically.

The output is assembled by streaming: the engine joins one input batch at a
time with its rows from the journal (:data:`READ_COLUMNS`, turned into the
result columns by :func:`result_arrays`) and this module appends it (a
Parquet row group, CSV or JSON Lines rows), so memory stays bounded for any
number of rows. It never reads the journal itself. It is written to
a temporary file beside the target and renamed into place, so a crash never
leaves a half-written file (an ``s3://`` output is then uploaded whole: see
``io/fs.py``). Where it goes is checked before anything is sent
(:func:`check_output_location`): a run must not pay for rows it cannot write.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.errors import JobError
from pipeline.io import fs
from pipeline.io.arrow_values import arrays_from_values
from pipeline.io.fs import DataPath
from pipeline.io.source.csv import OUTPUT_TYPE

# The documented result columns and their Arrow types. Types are fixed, so a
# column keeps its type even when every value is null.
RESULT_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("completion", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("cached_tokens", pa.int64()),
    ("cache_write_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("model", pa.string()),
    ("provider", pa.string()),
    ("generation_id", pa.string()),
    ("attempts", pa.int64()),
    ("attempt_costs", pa.string()),
    ("latency_s", pa.float64()),
    ("error", pa.string()),
]
NOT_RUN = "not_run: the run stopped before this row was sent; rerun the job to finish it"


def output_schema(input_schema: pa.Schema, structured: Any | None) -> pa.Schema:
    """The input's columns (in their output type, see ``source.csv.OUTPUT_TYPE``), then the result columns."""
    fields = [_output_field(f) for f in input_schema]
    fields += [pa.field(name, kind) for name, kind in RESULT_COLUMNS]
    if structured is not None:
        fields += [pa.field(name, kind) for name, kind in structured.columns]
    return pa.schema(fields)


def _output_field(field: pa.Field) -> pa.Field:
    kind = (field.metadata or {}).get(OUTPUT_TYPE)
    if kind is None:
        return field
    return pa.field(field.name, pa.type_for_alias(kind.decode()), field.nullable)


def input_arrays(batch: pa.RecordBatch, schema: pa.Schema) -> list[pa.Array]:
    """The input batch's columns in their output types (CSV decimals kept as text for the prompt become floats)."""
    arrays = list(batch.columns)
    for i, column in enumerate(arrays):
        kind = schema.field(i).type
        if column.type != kind:
            empty = pc.equal(column, "")
            arrays[i] = pc.if_else(empty, pa.scalar(None, column.type), column).cast(kind)
    return arrays


# What the output needs from the journal: the result columns, then what decides whether a row counts.
READ_COLUMNS = (*(name for name, _ in RESULT_COLUMNS), "key", "prompt_hash", "parsed")
_READ = READ_COLUMNS
_RESULTS = len(RESULT_COLUMNS)
_KEY, _HASH, _PARSED = _RESULTS, _RESULTS + 1, _RESULTS + 2
_RESULT_TYPES = [kind for _, kind in RESULT_COLUMNS]
# A row never journaled, or journaled for a prompt that has since changed.
_MISSING: tuple[Any, ...] = tuple(NOT_RUN if name == "error" else None for name in _READ)


def result_arrays(rows: list[tuple[Any, ...]], hashes: list[str] | None, structured: Any | None) -> list[pa.Array]:
    """The result columns for one batch from its journal rows (:data:`READ_COLUMNS`, in the batch's row order).

    A row never journaled has a null key. With ``hashes``, a journaled row whose
    prompt hash differs counts as not run.
    """
    if hashes is None:
        rows = [_MISSING if row[_KEY] is None else row for row in rows]
    else:
        rows = [
            _MISSING if row[_KEY] is None or row[_HASH] != expected else row
            for row, expected in zip(rows, hashes, strict=True)
        ]
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(_READ)
    arrays = arrays_from_values(columns[:_RESULTS], _RESULT_TYPES)
    if structured is not None:
        arrays += structured.to_arrays([json.loads(p) if p else None for p in columns[_PARSED]])
    return arrays


def write_output(
    path: DataPath, schema: pa.Schema, batches: Iterator[pa.RecordBatch], staging: Path
) -> tuple[int, int]:
    """Stream output batches (input columns and result columns) into ``path`` atomically.

    ``staging``: a local folder for an object-storage output's whole file.
    Returns the number of rows written and how many of them carry an error.
    """
    if fs.is_uri(path):
        return _write_remote(str(path), schema, batches, staging)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The run lock is held, so a temporary file left here is from a killed run.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows = errors = 0
    error_index = schema.get_field_index("error")  # unique: inputs may not use result names
    try:
        sink = _SINKS[OUTPUT_FORMATS[path.suffix.lower()]](tmp, schema)
        try:
            for batch in batches:
                sink.write(batch)
                rows += batch.num_rows
                error = batch.column(error_index)
                errors += len(error) - error.null_count
        finally:
            sink.close()
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return rows, errors


def _write_remote(uri: str, schema: pa.Schema, batches: Iterator[pa.RecordBatch], staging: Path) -> tuple[int, int]:
    """Object storage: written whole in ``staging`` (local disk), then uploaded whole (``io/fs.py``)."""
    staged = staging / f".{os.getpid()}.{fs.basename(uri)}"
    try:
        counts = write_output(staged, schema, batches, staging)
        fs.upload_whole(staged, uri)
    finally:
        staged.unlink(missing_ok=True)
    return counts


def write_table(schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> tuple[pa.Table, int]:
    """The same rows as :func:`write_output`, assembled in memory (the Python API without an output file)."""
    out: list[pa.RecordBatch] = []
    errors = 0
    error_index = schema.get_field_index("error")
    for batch in batches:
        out.append(batch)
        error = batch.column(error_index)
        errors += len(error) - error.null_count
    return pa.Table.from_batches(out, schema=schema), errors


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ locations

OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def check_output_location(path: Path, key: str = "[output] path") -> None:
    """Before sending: the output has a supported extension, is not a folder, and its folder is writable."""
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise JobError(
            f"{key}: {path}: unsupported extension {path.suffix or '(none)'!r}; use .parquet, .csv or .jsonl"
        )
    if path.is_dir():
        raise JobError(f"{key}: {path} is a folder; give a file name, e.g. {path / ('out' + path.suffix)}")
    check_writable_folder(path.parent, key)


def check_journal_location(path: Path, key: str = "[output] journal") -> None:
    """Before sending: the journal is not a folder, and its folder is writable."""
    if path.is_dir():
        raise JobError(f"{key}: the journal {path} is a folder")
    check_writable_folder(path.parent, key)


def check_writable_folder(folder: Path, key: str) -> None:
    """``folder`` exists or can be created, and a file can be created in it.

    The test is a real file, not ``os.access``: permission bits do not tell
    about read-only mounts, and root passes every access check.
    """
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise JobError(f"{key}: cannot create folder {folder}: {existing} is a file")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".pipeline-write-test-")
    except OSError as exc:
        what = "folder" if existing == folder else f"folder {folder} cannot be created: its parent"
        raise JobError(f"{key}: {what} {existing} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


# ---------------------------------------------------------------------- sinks


class _Sink(Protocol):
    def write(self, batch: pa.RecordBatch) -> None: ...

    def close(self) -> None: ...


class _ParquetSink:
    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(path, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()


class _CsvSink:
    """CSV with a header; list and struct columns (structured outputs) as JSON text."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._as_json = {i for i, f in enumerate(schema) if pa.types.is_nested(f.type)}
        self._schema = pa.schema(
            [pa.field(f.name, pa.string()) if i in self._as_json else f for i, f in enumerate(schema)]
        )
        self._writer = pacsv.CSVWriter(path, self._schema)

    def write(self, batch: pa.RecordBatch) -> None:
        arrays = [
            pa.array([_json_text(v) for v in column.to_pylist()], pa.string()) if i in self._as_json else column
            for i, column in enumerate(batch.columns)
        ]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self._schema))

    def close(self) -> None:
        self._writer.close()


class _JsonlSink:
    """One JSON object per line, keys in column order."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._file = path.open("w", encoding="utf-8", newline="\n")

    def write(self, batch: pa.RecordBatch) -> None:
        dumps = json.JSONEncoder(ensure_ascii=False, default=_json_default).encode
        self._file.writelines(dumps(row) + "\n" for row in batch.to_pylist())

    def close(self) -> None:
        self._file.close()


_SINKS: dict[str, Callable[[Path, pa.Schema], _Sink]] = {
    "parquet": _ParquetSink,
    "csv": _CsvSink,
    "jsonl": _JsonlSink,
}


def _json_text(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    """Arrow values JSON has no type for: times as ISO 8601, bytes as text (or base64), decimals as text."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
