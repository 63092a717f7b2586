"""CSV input: one pass types each column losslessly (a value must convert back to exactly its text).

A text column of plain decimal numbers that only fail the round trip by their
spelling (``3.0``, ``1.50``, ``1e3``) still reaches the prompt as its text, but
is marked (field metadata ``OUTPUT_TYPE``) to be written to the output as
float64, the type pandas gives it: ``df.price.mean()`` works on the output.
Text that becomes a number only by changing it (``007``, ``+3``) stays text,
and so do the columns named in ``keep_text`` (the id column).
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.errors import InputError
from pipeline.io import fs
from pipeline.io.fs import DataPath
from pipeline.io.source.common import BLOCK, READ_ERRORS, Opened, T, cast, check_forced, check_names, one_line

# The types a CSV column may become, most specific first: the first one every
# value of the column round-trips through wins.
_CSV_CANDIDATES: tuple[pa.DataType, ...] = (
    pa.int64(),
    pa.float64(),
    pa.bool_(),
    pa.timestamp("s"),
    pa.timestamp("ms"),
    pa.timestamp("us"),
    pa.timestamp("ns"),
)
_CSV_PARSE = pacsv.ParseOptions(newlines_in_values=True)
# Field metadata: the type the output gives a column that is text for the prompt.
OUTPUT_TYPE = b"pipeline.output_type"
# Plain decimal notation pandas reads as a float, without a sign or leading zeros to lose.
_DECIMAL = r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?$"
_NOT_INTEGER = r"[.eE]"


def csv_reader(path: DataPath, columns: list[str] | None = None) -> pa.RecordBatchReader:
    """Every column as text, empty cells as empty strings."""
    header = pacsv.open_csv(fs.readable(path), parse_options=_CSV_PARSE).schema.names
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in header},
        strings_can_be_null=False,
        include_columns=columns,
    )
    return pacsv.open_csv(
        fs.readable(path),
        read_options=pacsv.ReadOptions(block_size=BLOCK),
        parse_options=_CSV_PARSE,
        convert_options=convert,
    )


def open_csv(
    path: DataPath, batch_size: int, forced: dict[str, pa.DataType], keep_text: frozenset[str] = frozenset()
) -> Opened:
    """One pass over the whole file: it counts the rows, checks the encoding and types the columns."""
    header = _csv_step(path, 0, lambda: pacsv.open_csv(fs.readable(path), parse_options=_CSV_PARSE).schema.names)
    check_names(path, header, forced)
    typers = {name: _ColumnTyper(name, forced.get(name)) for name in header}
    rows = 0
    reader = _csv_step(path, 0, lambda: csv_reader(path))  # reads the first block already
    while (block := _csv_step(path, rows, lambda: _next_or_none(reader))) is not None:
        for name, column in zip(block.schema.names, block.columns, strict=True):
            typers[name].observe(path, column, rows + 1)
        rows += block.num_rows
    if rows == 0:
        raise InputError(f"{path}: no data")
    types = {name: typer.result for name, typer in typers.items() if not pa.types.is_string(typer.result)}
    schema = pa.schema([_csv_field(name, typers[name], name in keep_text) for name in header])
    return Opened("csv", schema, rows, None, types)


def _csv_field(name: str, typer: _ColumnTyper, keep_text: bool) -> pa.Field:
    """The column as read (its prompt text), marked float64 for the output when pandas would read it so."""
    if typer.decimal and not keep_text and pa.types.is_string(typer.result):
        return pa.field(name, pa.string(), metadata={OUTPUT_TYPE: b"float64"})
    return pa.field(name, typer.result)


def _csv_step(path: DataPath, rows: int, step: Callable[[], T]) -> T:
    """Run one read of the first pass; a reader error names the line (bad UTF-8) or the rows read."""
    try:
        return step()
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise_if_not_utf8(path, exc)
        where = f" after row {rows}" if rows else ""
        raise InputError(f"{path}: cannot read csv{where}: {one_line(exc)}") from None


def _next_or_none(reader: pa.RecordBatchReader) -> pa.RecordBatch | None:
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


class _ColumnTyper:
    """Narrows down the type of one CSV column, block by block."""

    def __init__(self, name: str, forced: pa.DataType | None) -> None:
        self.name = name
        self.forced = forced
        self.candidates = [] if forced is not None else list(_CSV_CANDIDATES)
        self.seen_value = False
        # Every value plain decimal notation, at least one not an integer (``3.0``, ``1.50``).
        self.all_decimal = forced is None
        self.fractional = False

    def observe(self, path: DataPath, column: pa.Array, first_row: int) -> None:
        if self.forced is not None:
            if not pa.types.is_string(self.forced):
                check_forced(path, self.name, column, self.forced, first_row, text=True)
            return
        if not self.candidates:
            return
        values = column.filter(pc.not_equal(column, ""))
        if len(values) == 0:
            return
        self.seen_value = True
        self.candidates = [kind for kind in self.candidates if _round_trips(values, kind)]
        if self.all_decimal:
            self.all_decimal = bool(pc.all(pc.match_substring_regex(values, _DECIMAL)).as_py())
            self.fractional = self.fractional or bool(pc.any(pc.match_substring_regex(values, _NOT_INTEGER)).as_py())

    @property
    def decimal(self) -> bool:
        """Text the prompt must see as written, which pandas reads as float64."""
        return self.seen_value and self.all_decimal and self.fractional

    @property
    def result(self) -> pa.DataType:
        if self.forced is not None:
            return self.forced
        if self.seen_value and self.candidates:
            return self.candidates[0]
        return pa.string()


def _round_trips(values: pa.Array, kind: pa.DataType) -> bool:
    """True when every value converts to ``kind`` and back to exactly its text.

    The way back is the cast that renders the value into a prompt, so a typed
    column renders exactly what the file holds.
    """
    try:
        back = cast(cast(values, kind), pa.string())
    except READ_ERRORS:
        return False
    return bool(pc.all(pc.equal(back, values)).as_py())


def raise_if_not_utf8(path: DataPath, exc: Exception) -> None:
    """Turn a reader's bare "invalid UTF8" into the file's line and byte."""
    text = str(exc).lower()
    if not isinstance(exc, UnicodeDecodeError) and "utf8" not in text and "utf-8" not in text:
        return
    found = first_invalid_utf8(path)
    if found is None:
        return
    line, byte = found
    raise InputError(
        f"{path}: line {line}: byte 0x{byte:02x} is not valid UTF-8; save the file as UTF-8 and rerun"
    ) from None


def first_ragged_row(path: DataPath, start: int) -> int | None:
    """The first data row (from 1) past ``start`` whose field count differs from the header's, or None.

    The CSV reader says which text it could not parse but not where: only read again after that error.
    """
    with fs.open_binary(path) as handle:
        rows = csv.reader(io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline=""))
        header = next(rows, None)
        if header is None:
            return None
        for row, fields in enumerate(rows, start=1):
            if row > start and fields and len(fields) != len(header):
                return row
    return None


def first_invalid_utf8(path: DataPath) -> tuple[int, int] | None:
    """(line number from 1, the offending byte) of the first invalid UTF-8 in a file, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with fs.open_binary(path) as handle:
        while chunk := handle.read(BLOCK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                return line + chunk.count(b"\n", 0, exc.start), chunk[exc.start]
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return line, 0
    return None
