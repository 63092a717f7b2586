"""What every input looks like to the engine."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

from pipeline.io.fs import DataPath


class DataSource(Protocol):
    """A file ``Source`` or an in-memory ``MemorySource``."""

    @property
    def path(self) -> DataPath: ...
    @property
    def format(self) -> str: ...
    @property
    def schema(self) -> pa.Schema: ...
    @property
    def columns(self) -> list[str]: ...
    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]: ...
    def count_rows(self) -> int: ...
