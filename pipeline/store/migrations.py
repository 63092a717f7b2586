"""Journal schema versions and the migrations between them.

A journal records its ``schema_version`` in ``meta``. Opening an older journal
applies every migration after its version, in order, inside one transaction,
so a journal written by an earlier release resumes instead of breaking on the
first added column. Add a migration by appending a function to ``MIGRATIONS``;
never edit one that has shipped.

Version 1 is the layout of the first release (no ``schema_version`` key).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]


def _v2_cost_estimated(conn: sqlite3.Connection) -> None:
    """Rows whose cost was estimated from counted tokens (the server reported no usage)."""
    conn.execute("ALTER TABLE results ADD COLUMN cost_estimated INTEGER NOT NULL DEFAULT 0")


def _v3_row_number_keys(conn: sqlite3.Connection) -> None:
    """Journals before content keys identified rows without an id column by row number: keep doing so."""
    conn.execute("INSERT OR IGNORE INTO meta VALUES ('key_scheme', 'row_number')")


# Batch mode: the provider batches a job submitted and which rows each holds, so a
# rerun polls them instead of submitting their rows again. Created with the
# journal (new journals are never migrated), and by the migration for older ones.
BATCH_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    status TEXT NOT NULL,
    collected INTEGER NOT NULL DEFAULT 0,
    rows INTEGER NOT NULL,
    worst_usd REAL NOT NULL DEFAULT 0,
    submitted REAL NOT NULL,
    updated REAL NOT NULL,
    cursor TEXT,
    error TEXT
);
CREATE TABLE IF NOT EXISTS batch_rows (
    batch_id TEXT NOT NULL,
    custom_id TEXT NOT NULL,
    key TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    collected INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, custom_id)
);
CREATE INDEX IF NOT EXISTS batch_rows_key ON batch_rows (key);
"""


def _v4_batches(conn: sqlite3.Connection) -> None:
    """Provider batches and their rows (batch mode)."""
    for statement in BATCH_SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v5_cache_and_attempts(conn: sqlite3.Connection) -> None:
    """Prompt-cache token counts and the cost of every attempt of a row (cost truth, provenance)."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(results)")}
    for name, kind in (("cached_tokens", "INTEGER"), ("cache_write_tokens", "INTEGER"), ("attempt_costs", "TEXT")):
        if name not in present:
            conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")


# MIGRATIONS[i] takes a journal from version i + 1 to version i + 2.
MIGRATIONS: list[Migration] = [_v2_cost_estimated, _v3_row_number_keys, _v4_batches, _v5_cache_and_attempts]
SCHEMA_VERSION = len(MIGRATIONS) + 1


def current_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 1


def migrate(conn: sqlite3.Connection) -> int:
    """Bring a journal up to ``SCHEMA_VERSION``; returns the version it had."""
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"journal schema version {found} is newer than this release understands ({SCHEMA_VERSION})"
        )
    if found == SCHEMA_VERSION:
        return found
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        for migration in MIGRATIONS[found - 1 :]:
            migration(conn)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    return found
