"""The journal's batch tables (``batches`` and ``batch_rows``): what batch mode submitted and collected.

Every write shares a transaction with the result rows it goes with, so a
rerun after any crash knows which batches to poll instead of submitting
their rows again.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import JournalError, UserError
from pipeline.store.journal import Journal, JournalRow
from pipeline.store.meta import Meta


@dataclass(frozen=True, slots=True)
class KnownBatch:
    """A batch the journal knows was accepted by the provider and is not fully collected."""

    id: str
    provider: str
    status: str
    rows: int
    worst_usd: float
    submitted: float
    cursor: str | None


@dataclass(slots=True)
class BatchRow:
    """A row in a batch, as journaled at submission."""

    key: str
    prompt_hash: str
    collected: bool


@dataclass(frozen=True, slots=True)
class SubmittedRow:
    """A row as submitted in a batch: the id the provider answers under, and the journal's key."""

    custom_id: str
    key: str
    prompt_hash: str


class BatchStore:
    """The ``batches`` and ``batch_rows`` tables; every write shares a transaction with result rows."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.conn = journal.conn

    def has_tables(self) -> bool:
        """False for a journal written before batch mode and opened read-only (``pipeline status``)."""
        found = self.conn.execute("SELECT name FROM sqlite_master WHERE name = 'batches'").fetchone()
        return found is not None

    def pending(self) -> list[KnownBatch]:
        rows = self.conn.execute(
            "SELECT id, provider, status, rows, worst_usd, submitted, cursor FROM batches "
            "WHERE collected = 0 ORDER BY submitted"
        )
        return [KnownBatch(*row) for row in rows]

    def known_ids(self) -> set[str]:
        """Every batch id the journal has recorded, collected or not."""
        return {row[0] for row in self.conn.execute("SELECT id FROM batches")}

    def adopted(self) -> list[str]:
        """Batches a run found at the provider (accepted before a crash) and adopted instead of paying twice."""
        value = self.journal.get_meta(Meta.ADOPTED_BATCHES)
        return list(json.loads(value)) if value else []

    def note_adopted(self, batch_id: str) -> None:
        self.journal.set_meta(Meta.ADOPTED_BATCHES, json.dumps([*self.adopted(), batch_id]))

    def pending_keys(self, keys: list[str]) -> set[str]:
        """The keys among ``keys`` that sit in a batch not yet collected."""
        rows = self.conn.execute(
            "SELECT r.key FROM batch_rows r JOIN batches b ON b.id = r.batch_id "
            "WHERE b.collected = 0 AND r.key IN (SELECT value FROM json_each(?))",
            (_json_list(keys),),
        )
        return {row[0] for row in rows}

    def submissions(self, keys: list[str]) -> dict[str, int]:
        """How many batches each row has been submitted in, across runs (its ``attempts``)."""
        rows = self.conn.execute(
            "SELECT key, COUNT(*) FROM batch_rows WHERE key IN (SELECT value FROM json_each(?)) GROUP BY key",
            (_json_list(keys),),
        )
        return dict(rows.fetchall())

    def rows_of(self, batch_id: str) -> dict[str, BatchRow]:
        rows = self.conn.execute(
            "SELECT custom_id, key, prompt_hash, collected FROM batch_rows WHERE batch_id = ?", (batch_id,)
        )
        return {cid: BatchRow(key, h, bool(done)) for cid, key, h, done in rows}

    def record_submission(
        self,
        batch_id: str,
        provider: str,
        chunk: list[SubmittedRow],
        worst: float,
        markers: list[JournalRow],
        canary: bool = False,
    ) -> None:
        """The commit that makes a batch known: its id, its rows, their pending markers (and that it is the canary)."""
        now = time.time()

        def also(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO batches (id, provider, status, collected, rows, worst_usd, submitted, updated) "
                "VALUES (?, ?, 'submitted', 0, ?, ?, ?, ?)",
                (batch_id, provider, len(chunk), worst, now, now),
            )
            conn.executemany(
                "INSERT INTO batch_rows (batch_id, custom_id, key, prompt_hash) VALUES (?, ?, ?, ?)",
                [(batch_id, r.custom_id, r.key, r.prompt_hash) for r in chunk],
            )
            if canary:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (Meta.CANARY_BATCH, batch_id))

        self.journal.write_now(markers, 0.0, also)

    def record_results(
        self, batch_id: str, rows: list[JournalRow], custom_ids: list[str], cost: float, cursor: str | None
    ) -> None:
        """One page of results, its rows marked collected and the page cursor saved, in one transaction."""

        def also(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE batch_rows SET collected = 1 WHERE batch_id = ? AND custom_id = ?",
                [(batch_id, cid) for cid in custom_ids],
            )
            conn.execute("UPDATE batches SET cursor = ?, updated = ? WHERE id = ?", (cursor, time.time(), batch_id))

        self.journal.write_now(rows, cost, also)

    def finish(self, batch_id: str, status: str, error: str | None, unanswered: list[JournalRow]) -> None:
        """A terminal batch fully read: rows it never answered become transient errors."""

        def also(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE batch_rows SET collected = 1 WHERE batch_id = ?", (batch_id,))
            conn.execute(
                "UPDATE batches SET collected = 1, status = ?, error = ?, updated = ? WHERE id = ?",
                (status, error, time.time(), batch_id),
            )

        self.journal.write_now(unanswered, 0.0, also)

    def canary_batch(self) -> str | None:
        """The canary batch waiting to be judged, if any."""
        return self.journal.get_meta(Meta.CANARY_BATCH)

    def forget_canary(self) -> None:
        """The canary batch was judged."""
        self.conn.execute("DELETE FROM meta WHERE key = ?", (Meta.CANARY_BATCH,))

    def set_status(self, batch_id: str, status: str) -> None:
        self.conn.execute("UPDATE batches SET status = ?, updated = ? WHERE id = ?", (status, time.time(), batch_id))


def _json_list(keys: list[str]) -> str:
    return json.dumps(keys)


def refuse_fresh_if_batches_pending(path: Path) -> None:
    """``--fresh`` sets the journal aside: not while provider batches of it are pending.

    Their rows would be submitted (and paid) again, and the set-aside batches'
    cost would never reach the job's total. A journal that cannot be read is
    set aside as ``--fresh`` promises (nothing can be known about its batches).
    """
    if not path.exists():
        return
    try:
        journal = Journal(path, readonly=True)
    except (JournalError, sqlite3.Error):
        return
    try:
        store = BatchStore(journal)
        pending = store.pending() if store.has_tables() else []
    except sqlite3.Error:
        return
    finally:
        journal.close()
    if pending:
        rows = sum(b.rows for b in pending)
        raise UserError(
            f"--fresh would set aside {len(pending)} provider batches still pending ({rows:,} rows), "
            "paying for their rows again: rerun without --fresh to collect them (`pipeline status` lists "
            "them), then use --fresh"
        )


def refuse_if_batches_pending(journal: Journal) -> None:
    """Realtime mode must not send rows that a provider batch will answer (and bill)."""
    pending = BatchStore(journal).pending()
    if pending:
        rows = sum(b.rows for b in pending)
        raise UserError(
            f"{len(pending)} batches of this job ({rows:,} rows) are pending at the provider: set [model] "
            'mode = "batch" and rerun to collect them (sending their rows in realtime would pay for them twice)'
        )
