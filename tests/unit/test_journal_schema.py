"""New and migrated journals end with the same schema: one layout, however a journal was born.

A new journal is created from ``SCHEMA`` and ``BATCH_SCHEMA``; an old one is
brought up by the migrations. A column added to :class:`JournalRow` without a
migration (or a migration that drifts from the new layout) fails here.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pipeline.store.journal import Journal
from pipeline.store.meta import Meta
from pipeline.store.migrations import SCHEMA_VERSION

# The first release's layout (schema version 1, before any migration): no
# cost_estimated column, no batch tables, no schema_version or key_scheme key.
V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE results (
    key TEXT PRIMARY KEY,
    prompt_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    completion TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    model TEXT,
    provider TEXT,
    generation_id TEXT,
    attempts INTEGER,
    latency_s REAL,
    error TEXT,
    parsed TEXT,
    invalid_tries INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
);
"""


def layout(path: Path) -> dict[str, object]:
    """Tables with their columns (name, type, not null, default, key; order aside) and indexes."""
    with sqlite3.connect(path) as conn:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        out: dict[str, object] = {
            table: sorted(tuple(row[1:]) for row in conn.execute(f"PRAGMA table_info({table})")) for table in tables
        }
        out["indexes"] = sorted(
            (table, name, sql)
            for table, name, sql in conn.execute(
                "SELECT tbl_name, name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        )
    return out


def test_a_migrated_journal_has_the_layout_of_a_new_one(tmp_path: Path) -> None:
    new, old = tmp_path / "new.sqlite", tmp_path / "old.sqlite"
    Journal(new).close()
    with sqlite3.connect(old) as conn:
        conn.executescript(V1)
        conn.execute("INSERT INTO meta VALUES ('identity', '{}')")
    migrated = Journal(old)
    assert migrated.get_meta(Meta.SCHEMA_VERSION) == str(SCHEMA_VERSION)
    assert migrated.get_meta(Meta.KEY_SCHEME) == "row_number"  # old journals keep their row-number keys
    migrated.close()
    assert layout(old) == layout(new)
    assert set(layout(new)) == {"meta", "results", "batches", "batch_rows", "indexes"}


def test_the_layout_compare_sees_a_missing_column(tmp_path: Path) -> None:
    new, short = tmp_path / "new.sqlite", tmp_path / "short.sqlite"
    Journal(new).close()
    Journal(short).close()
    with sqlite3.connect(short) as conn:
        conn.execute("ALTER TABLE results DROP COLUMN cost_estimated")
    assert layout(short) != layout(new)
