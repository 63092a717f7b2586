"""In-memory inputs for the Python API: pandas, pyarrow, polars (Arrow stream), or anything Arrow reads.

A :class:`MemorySource` has the interface of a file ``Source`` (schema,
columns, batches, count_rows), so planning, row selection and output assembly
do not care where rows come from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.errors import InputError


@dataclass(frozen=True)
class MemorySource:
    table: pa.Table
    batch_size: int = 8192
    path: Path = Path("<data>")  # how messages name the input
    format: str = "table"

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    @property
    def columns(self) -> list[str]:
        return list(self.table.column_names)

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        table = self.table.select(columns) if columns else self.table
        for batch in table.to_batches(max_chunksize=self.batch_size):
            if batch.num_rows:
                yield batch

    def count_rows(self) -> int:
        return int(self.table.num_rows)


# What Arrow raises for data it cannot convert (mixed types in a column, objects it cannot type).
_CONVERT_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError, TypeError)


def to_table(data: Any) -> pa.Table:
    """Arrow table from a DataFrame, a Table, a RecordBatch(Reader), or an Arrow stream exporter.

    Data Arrow cannot convert is an :class:`InputError` naming what went wrong, in one line.
    """
    try:
        table = _convert(data)
    except _CONVERT_ERRORS as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(
            f"data: cannot read it as a table ({problem}); give each column values of one type "
            "(e.g. df[col] = df[col].astype(str))"
        ) from None
    if len(set(table.column_names)) != len(table.column_names):
        raise InputError(f"data: duplicate column names: {', '.join(table.column_names)}")
    return table


def _convert(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        table = data
    elif isinstance(data, pa.RecordBatch):
        table = pa.Table.from_batches([data])
    elif isinstance(data, pa.RecordBatchReader):
        table = data.read_all()
    elif is_pandas(data):
        if not data.columns.is_unique:
            raise InputError(f"data: duplicate column names: {', '.join(map(str, data.columns))}")
        table = pa.Table.from_pandas(data, preserve_index=False)
    elif hasattr(data, "__arrow_c_stream__"):
        # polars, DuckDB relations, ...: the Arrow PyCapsule stream interface.
        table = pa.RecordBatchReader.from_stream(data).read_all()
    elif isinstance(data, list) and all(isinstance(row, dict) for row in data):
        table = pa.Table.from_pylist(data)
    else:
        raise InputError(
            f"data: cannot read a {type(data).__name__}: pass a pandas DataFrame, a pyarrow Table or "
            "RecordBatchReader, an object with __arrow_c_stream__ (polars), a list of dicts, or a file path"
        )
    return table


def is_pandas(data: Any) -> bool:
    return type(data).__module__.startswith("pandas") and type(data).__name__ == "DataFrame"
