"""Input datasets read as a stream of Arrow record batches.

Memory stays bounded however large the file: nothing here materialises the
whole dataset. CSV columns are read as text so that what is in the file
(``007``, ``1.50``, quotes, newlines, emoji) reaches the prompt unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io.base import DataSource

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class Source:
    """A dataset on disk, with its format and column names, read in batches."""

    path: Path
    format: str
    schema: pa.Schema
    batch_size: int = 8192

    @classmethod
    def open(cls, path: Path, batch_size: int = 8192) -> Source:
        if not path.exists():
            raise InputError(f"[input] path: file not found: {path}")
        fmt = "parquet" if path.is_dir() else FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(f"[input] path: {path}: use .parquet, .csv, .jsonl or a folder of Parquet files")
        source = cls(path, fmt, pa.schema([]), batch_size)
        try:
            schema = source._infer_schema()
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path}: cannot read {fmt}: {_one_line(exc)}") from None
        if schema is None:
            raise InputError(f"{path}: no data")
        return cls(path, fmt, schema, batch_size)

    def _infer_schema(self) -> pa.Schema | None:
        if self.format == "parquet":
            return self._parquet_schema()
        if self.format == "jsonl":
            return _jsonl_schema(self.path)
        first = next(self._raw_batches(), None)
        return None if first is None else first.schema

    def _parquet_schema(self) -> pa.Schema:
        """Every file of a folder must have the same columns (in any order)."""
        files = self._parquet_files()
        schema = pq.read_schema(files[0])
        for file in files[1:]:
            other = pq.read_schema(file)
            if set(other.names) != set(schema.names):
                raise InputError(
                    f"[input] path: {file} has columns {', '.join(other.names)} but {files[0]} has "
                    f"{', '.join(schema.names)}: every Parquet file of the folder needs the same columns"
                )
        return schema

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield record batches in file order; errors become one-line InputErrors."""
        try:
            for batch in self._raw_batches(columns):
                if batch.num_rows:
                    yield batch
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{self.path}: cannot read {self.format}: {_one_line(exc)}") from None

    def _raw_batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        if self.format == "parquet":
            yield from self._parquet_batches(columns)
        elif self.format == "csv":
            yield from self._csv_batches(columns)
        else:
            yield from self._jsonl_batches(columns)

    def _parquet_files(self) -> list[Path]:
        if not self.path.is_dir():
            return [self.path]
        files = sorted(self.path.rglob("*.parquet"))
        if not files:
            raise InputError(f"[input] path: no .parquet files in folder {self.path}")
        return files

    def _parquet_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        names = columns or self.schema.names
        target = pa.schema([self.schema.field(n) for n in names])
        for file in self._parquet_files():
            # Buffered, un-prebuffered reads decode a large row group page by page
            # instead of holding its whole column chunks in memory (410 MB -> 160 MB
            # for a 1,000,000-row, 260 MB file in one row group).
            parquet = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
            for batch in parquet.iter_batches(batch_size=self.batch_size, columns=names):
                # Files of a folder may order (or type) their columns differently.
                yield batch if batch.schema == target else batch.select(names).cast(target)

    def _csv_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        header = pacsv.open_csv(self.path, parse_options=_CSV_PARSE).schema.names
        convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=False,
            include_columns=columns,
        )
        reader = pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=4 << 20),
            parse_options=_CSV_PARSE,
            convert_options=convert,
        )
        yield from _rebatch(reader, self.batch_size)

    def _jsonl_batches(self, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
        # An explicit schema from a first pass: the reader would otherwise infer
        # types from its first block only and fail on a column that starts null.
        parse = pajson.ParseOptions(explicit_schema=self.schema)
        reader = pajson.open_json(self.path, read_options=pajson.ReadOptions(block_size=4 << 20), parse_options=parse)
        for batch in _rebatch(reader, self.batch_size):
            yield batch.select(columns) if columns else batch

    def count_rows(self) -> int:
        """Row count: from Parquet metadata, or one streaming pass for text formats."""
        if self.format == "parquet":
            return sum(pq.ParquetFile(f).metadata.num_rows for f in self._parquet_files())
        first = self.columns[:1]
        return sum(batch.num_rows for batch in self.batches(first))


_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)
_JSONL_CHUNK = 4 << 20


def _jsonl_schema(path: Path) -> pa.Schema | None:
    """Unify the types of every block of a JSON Lines file (one streaming pass)."""
    schemas = []
    with path.open("rb") as handle:
        while chunk := handle.read(_JSONL_CHUNK):
            chunk += handle.readline()  # end the block on a line boundary
            if chunk.strip():
                schemas.append(pajson.read_json(io.BytesIO(chunk)).schema)
    if not schemas:
        return None
    return pa.unify_schemas(schemas, promote_options="permissive")


def _rebatch(reader: pa.RecordBatchReader, size: int) -> Iterator[pa.RecordBatch]:
    """CSV/JSON readers yield blocks of any size: slice them to ``size`` rows."""
    for block in reader:
        for start in range(0, block.num_rows, size):
            yield block.slice(start, size)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def check_id_column(source: DataSource, id_column: str) -> int:
    """Fail before sending if the id column is missing, has nulls or duplicates.

    Only the id column is read; returns the number of rows.
    """
    if id_column not in source.columns:
        raise InputError(
            f"[input] id_column: column {id_column!r} not in {source.path} (columns: {', '.join(source.columns)})"
        )
    chunks = [batch.column(0) for batch in source.batches([id_column])]
    ids = (
        pa.chunked_array(chunks, type=source.schema.field(id_column).type)
        if chunks
        else pa.chunked_array([], pa.string())
    )
    if ids.null_count:
        raise InputError(f"[input] id_column: column {id_column!r} has {ids.null_count} null values")
    if source.format == "csv":
        empty = pc.sum(pc.equal(ids, "")).as_py() or 0
        if empty:
            raise InputError(f"[input] id_column: column {id_column!r} has {empty} empty values")
    counts = pc.value_counts(ids)
    # max() first: comparing with a Python scalar makes pyarrow import pandas.
    if len(counts) and pc.max(counts.field("counts")).as_py() > 1:
        repeated = counts.filter(pc.greater(counts.field("counts"), 1))
        example = repeated[0]["values"].as_py()
        raise InputError(
            f"[input] id_column: column {id_column!r} has {len(repeated)} duplicated values (e.g. {example!r})"
        )
    return len(ids)


def row_keys(batch: pa.RecordBatch, id_column: str | None, offset: int) -> list[str]:
    """Each row's key in the journal: its id as text, or its row number."""
    if id_column is None:
        return [str(i) for i in range(offset, offset + batch.num_rows)]
    return pc.cast(batch.column(id_column), pa.string()).to_pylist()
