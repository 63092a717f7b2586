"""What every input looks like to the engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pyarrow as pa


class DataSource(Protocol):
    """A file ``Source`` or an in-memory ``MemorySource``."""

    @property
    def path(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def schema(self) -> pa.Schema: ...
    @property
    def columns(self) -> list[str]: ...
    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]: ...
    def count_rows(self) -> int: ...
