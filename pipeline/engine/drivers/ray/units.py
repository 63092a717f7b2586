"""The units a Ray run hands to its workers, and the driver's view of a unit's rows.

A unit is a slice of the input a worker reads where it lives: up to
``UNIT_ROWS`` rows of one Parquet row group, found from the files' metadata
without reading them; CSV and JSON Lines cannot be split unread, so the
driver reads them and hands each slice over through Ray's object store.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline.engine.admission import Ticket
from pipeline.engine.drivers.ray.worker import Unit
from pipeline.engine.prompts import RenderedBatch
from pipeline.io import fs
from pipeline.io.base import DataSource

UNIT_ROWS = 1024  # rows per unit at most: small enough to spread a file over the workers


def plan_units(source: DataSource, columns: list[str]) -> Iterator[Unit]:
    """Slices of the input: Parquet row groups from metadata; text formats read here."""
    offset = 0
    number = 0
    if source.format == "parquet":
        for file in fs.parquet_files(fs.absolute(source.path)):
            meta = pq.ParquetFile(fs.readable(file)).metadata
            for group in range(meta.num_row_groups):
                size = meta.row_group(group).num_rows
                for start in range(0, size, UNIT_ROWS):
                    rows = min(UNIT_ROWS, size - start)
                    yield Unit(number, offset + start, rows, str(file), group, start)
                    number += 1
                offset += size
        return
    import ray

    # CSV and JSON Lines cannot be split without reading them: the driver reads
    # them in batches and hands each over through Ray's object store.
    for batch in source.batches(columns):
        for start in range(0, batch.num_rows, UNIT_ROWS):
            part = batch.slice(start, UNIT_ROWS)
            yield Unit(number, offset + start, part.num_rows, batch=ray.put(part))
            number += 1
        offset += batch.num_rows


class Reported(RenderedBatch):
    """A unit's rows as its worker reported them: prompt hashes and blank flags.

    The prompts stay on the worker; the driver's row selection and content
    keys need only these two, so they are given this stand-in for a batch.
    """

    def __init__(self, hashes: list[str], blank: list[bool]) -> None:
        super().__init__([""] * len(hashes), None, blank)
        self.hashes = hashes

    def prompt_hash(self, i: int) -> str:
        return self.hashes[i]


@dataclass
class UnitState:
    """A unit the driver tracks: its rows' keys, what is still to send, to whom it went."""

    unit: Unit
    keys: list[str]
    hashes: list[str]
    rows: dict[int, Ticket]  # rows this run still has to finish
    pending: deque[int]  # ready to dispatch
    sent: set[int] = field(default_factory=set)  # dispatched, not reported yet
    worker: WorkerState | None = None


@dataclass
class WorkerState:
    """A worker actor as the driver sees it: its handle, its rows in flight, its units."""

    handle: Any
    number: int
    in_flight: int = 0
    alive: bool = True
    units: list[UnitState] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def pending(self) -> int:
        return sum(len(u.pending) for u in self.units)
