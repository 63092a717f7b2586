"""The journal: every response, durable before its row counts as done.

SQLite in WAL mode. A committed transaction survives ``kill -9`` of the
process (WAL with ``synchronous=NORMAL`` gives up durability only on power
loss), and a torn tail of the WAL is discarded by SQLite's frame checksums.
Commits are grouped (:meth:`Journal.write`): replies wait in memory for at most
:data:`GROUP_DELAY_S`, or until :data:`GROUP_ROWS` of them are waiting, and are
then committed in one transaction. A reply's concurrency slot is freed only
once its row is committed (the sender awaits :meth:`Journal.write`), so the
rows paid for but not yet journaled are always among the ``concurrency``
requests in flight: a ``kill -9`` re-pays at most ``concurrency`` requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import Field, dataclass, field, fields
from enum import StrEnum
from operator import attrgetter
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.errors import IdentityError, JournalError, LockedError
from pipeline.store.meta import Meta
from pipeline.store.migrations import BATCH_SCHEMA, SCHEMA_VERSION, migrate

# Group commit: a reply waits at most this long for others to share its transaction...
GROUP_DELAY_S = 0.005
# ...or until this many are waiting. A commit costs about as much as journaling a
# few dozen rows, so grouping divides the journal's share of a request's CPU; the
# delay is small beside any real server's latency (it only holds the slot longer).
GROUP_ROWS = 256


class RowStatus(StrEnum):
    """A row's state in the journal.

    ``transient`` rows are retried by the next run; ``failed`` and ``invalid``
    rows only with ``--retry-failed`` (or ``retry_invalid`` for invalid ones).
    """

    OK = "ok"
    FAILED = "failed"
    INVALID = "invalid"
    TRANSIENT = "transient"
    SKIPPED = "skipped"


_FINGERPRINT = (
    "SELECT count(*), max(rowid), total(updated), "
    + ", ".join(f"sum(status = '{status.value}')" for status in RowStatus)
    + " FROM results"
)
_STATUS = {status.value: status for status in RowStatus}
DONE_STATUSES = frozenset({RowStatus.OK, RowStatus.FAILED, RowStatus.INVALID, RowStatus.SKIPPED})


@dataclass(slots=True)
class JournalRow:
    """One row's result: the single definition the SQL, the upsert and the output derive from."""

    key: str
    prompt_hash: str
    status: RowStatus
    completion: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    model: str | None = None
    provider: str | None = None
    generation_id: str | None = None
    attempts: int = 0
    latency_s: float | None = None
    error: str | None = None
    parsed: str | None = None  # the structured reply as JSON text
    invalid_tries: int = 0
    cost_estimated: bool = False  # cost counted from tokens: the server reported no usage
    updated: float = 0.0
    cached_tokens: int | None = None  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int | None = None  # prompt tokens written to it
    attempt_costs: str | None = None  # JSON list: USD of every attempt of the row, failed and invalid ones included


_NOT_NULL = {"key": "TEXT PRIMARY KEY", "prompt_hash": "TEXT NOT NULL", "status": "TEXT NOT NULL"}
_DEFAULTS = {"invalid_tries": "INTEGER NOT NULL DEFAULT 0", "cost_estimated": "INTEGER NOT NULL DEFAULT 0"}


def _column_sql(f: Field[Any]) -> str:
    if f.name in _NOT_NULL:
        return _NOT_NULL[f.name]
    if f.name in _DEFAULTS:
        return _DEFAULTS[f.name]
    if f.name == "updated":
        return "REAL NOT NULL"
    base = str(f.type).split(" |")[0]
    return {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER"}[base]


RESULT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(JournalRow))
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);\n"
    "CREATE TABLE IF NOT EXISTS results (\n"
    + ",\n".join(f"    {f.name} {_column_sql(f)}" for f in fields(JournalRow))
    + "\n);\n"
)
_UPSERT = f"INSERT OR REPLACE INTO results ({', '.join(RESULT_FIELDS)}) VALUES ({', '.join('?' * len(RESULT_FIELDS))})"
_AS_TUPLE = attrgetter(*RESULT_FIELDS)  # faster than dataclasses.astuple, which deep-copies


class RunLock:
    """One run per journal. ``flock`` dies with its process, so a killed run never blocks."""

    def __init__(self, journal_path: Path) -> None:
        self.path = journal_path.with_name(journal_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"another run of this job is active (pid {holder}; lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def holder(self) -> int | None:
        """The pid of an active run, or None (for ``pipeline status``)."""
        if not self.path.exists():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 64).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None


class Seen(NamedTuple):
    """What the journal knows of a row when deciding whether to send it.

    A tuple, not a dataclass: a rerun builds one per input row, and a frozen
    dataclass costs several times as much to make.
    """

    prompt_hash: str
    status: RowStatus
    invalid_tries: int


@dataclass(slots=True)
class _Group:
    """The rows waiting to be committed together, and the future their senders await."""

    rows: list[JournalRow] = field(default_factory=list)
    cost: float = 0.0
    done: asyncio.Future[None] | None = None
    timer: asyncio.TimerHandle | asyncio.Handle | None = None


class Journal:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro" if readonly else str(path)
        try:
            self.conn = sqlite3.connect(uri, uri=readonly, isolation_level=None, check_same_thread=False)
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
                self._create_or_migrate()
            else:
                self.conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"journal {path} cannot be read ({exc}): if it is damaged, move it aside "
                f"(or rerun with --fresh, which keeps it as *.old) and rerun"
            ) from None
        self._group = _Group()
        self._fingerprint: tuple[int, list[Any]] | None = None  # (total_changes when read, figures)

    def _create_or_migrate(self) -> None:
        new = self.conn.execute("SELECT name FROM sqlite_master WHERE name = 'results'").fetchone() is None
        self.conn.executescript(SCHEMA)
        if new:
            self.conn.executescript(BATCH_SCHEMA)
            self.set_meta(Meta.SCHEMA_VERSION, str(SCHEMA_VERSION))
            self.set_meta(Meta.KEY_SCHEME, "content")
        else:
            migrate(self.conn)

    @classmethod
    def open(cls, path: Path, identity: dict[str, Any], fresh: bool = False) -> Journal:
        """Open (or create) the journal for a job, checking it is the same job.

        ``fresh`` sets the old journal aside and carries what it spent into the
        new one, so ``budget_usd`` caps what the job ever spends.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        carried = 0.0
        if fresh and path.exists():
            try:
                old = cls(path)
            except JournalError:
                pass  # a damaged journal is set aside all the same; what it spent cannot be read
            else:
                carried = old.job_spent()
                old.close()
            set_aside(path)
        journal = cls(path)
        if carried:
            journal.set_meta(Meta.SPENT_BEFORE_USD, repr(carried))
        stored = journal.get_meta(Meta.IDENTITY)
        if stored is None:
            journal.set_meta(Meta.IDENTITY, json.dumps(identity, sort_keys=True, default=str))
            journal.set_meta(Meta.CREATED, str(time.time()))
        else:
            changed = changed_keys(json.loads(stored), json.loads(json.dumps(identity, default=str)))
            if changed:
                journal.close()
                raise IdentityError(
                    f"the job changed since its journal was written ({', '.join(changed)}): "
                    f"rerun with --fresh to start over (the old journal is kept aside), "
                    f"or restore the old settings to resume"
                )
        return journal

    def close(self) -> None:
        """Commit any rows still waiting for their group, then close."""
        try:
            self.flush()
        finally:
            self.conn.close()

    def get_meta(self, key: Meta) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: Meta, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def fingerprint(self) -> list[Any]:
        """Figures that change whenever a result is journaled: rows, the last row id, write times, statuses, spending.

        ``INSERT OR REPLACE`` gives a rewritten row a new ``updated`` time (and
        mostly a new row id), so a retried row changes it too; the counts per
        status catch a status changed in place. Read once per state of this
        connection (``total_changes`` counts every row it wrote; the run lock
        keeps other processes from writing): a rerun asks twice.
        """
        changes = self.conn.total_changes
        if self._fingerprint is None or self._fingerprint[0] != changes:
            figures = self.conn.execute(_FINGERPRINT).fetchone()
            self._fingerprint = (changes, [*figures, self.get_meta(Meta.SPENT_USD)])
        return self._fingerprint[1]

    def done_rows(self, *, retry_failed: bool = False) -> int:
        """Rows a run would not send again (``ok`` alone with ``retry_failed``), whatever their prompt."""
        done = [RowStatus.OK] if retry_failed else sorted(DONE_STATUSES)
        marks = ", ".join("?" * len(done))
        return int(self.conn.execute(f"SELECT count(*) FROM results WHERE status IN ({marks})", done).fetchone()[0])

    def has_rows(self) -> bool:
        return self.conn.execute("SELECT EXISTS (SELECT 1 FROM results)").fetchone()[0] == 1

    def seen(self, keys: list[str]) -> dict[str, Seen]:
        """Journal state for a batch of row keys (one query per batch)."""
        rows = self.conn.execute(
            "SELECT r.key, r.prompt_hash, r.status, r.invalid_tries FROM json_each(?) AS k "
            "JOIN results AS r ON r.key = k.value",
            (json.dumps(keys),),
        )
        status = _STATUS  # a dictionary lookup: calling RowStatus(...) per row cost a 20,000-row rerun 0.05 s
        return {key: Seen(h, status[s], n) for key, h, s, n in rows}

    def columns_in_order(self, keys: list[str], columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
        """``columns`` of each of ``keys``, in the order of ``keys``; a key never journaled gives nulls.

        The output writer's fast path: one query per batch, only the columns it
        writes, and no object or dictionary per row.
        """
        unknown = set(columns) - set(RESULT_FIELDS)
        if unknown:
            raise ValueError(f"not journal columns: {sorted(unknown)}")
        selected = ", ".join(f"r.{name}" for name in columns)
        rows = self.conn.execute(
            f"SELECT {selected} FROM json_each(?) AS k LEFT JOIN results AS r ON r.key = k.value ORDER BY k.key",
            (json.dumps(keys),),
        )
        return rows.fetchall()

    def results(self, keys: list[str]) -> dict[str, JournalRow]:
        rows = self.conn.execute(
            f"SELECT {', '.join(RESULT_FIELDS)} FROM results WHERE key IN (SELECT value FROM json_each(?))",
            (json.dumps(keys),),
        )
        return {row[0]: JournalRow(*row) for row in rows}

    def write(self, row: JournalRow, cost: float = 0.0) -> asyncio.Future[None]:
        """Queue a result; the returned future resolves once it is committed.

        The first row of a group arms a timer of :data:`GROUP_DELAY_S`; the group
        is committed when it fires, or at the end of the loop turn in which the
        group reaches :data:`GROUP_ROWS`. The caller keeps its concurrency slot
        until the future resolves: that is what bounds the rows a crash re-pays.
        The future is shared by the group; a caller that may be cancelled while
        waiting should wrap it in :func:`asyncio.shield` (the commit happens anyway).
        """
        group = self._group
        group.rows.append(row)
        group.cost += cost
        if group.done is None:
            loop = asyncio.get_running_loop()
            group.done = loop.create_future()
            group.timer = loop.call_later(GROUP_DELAY_S, self._flush_group, group)
        elif len(group.rows) == GROUP_ROWS and group.timer is not None:
            # Full: commit once this loop turn's callbacks have run.
            group.timer.cancel()
            group.timer = asyncio.get_running_loop().call_soon(self._flush_group, group)
        return group.done

    def flush(self) -> None:
        """Commit the rows waiting for their group now (the end of a run, or a stop)."""
        self._flush_group(self._group)

    def _flush_group(self, group: _Group) -> None:
        if group is not self._group or not group.rows:
            return  # already committed (a flush() came before the timer)
        self._group = _Group()
        if group.timer is not None:
            group.timer.cancel()
        done = group.done
        try:
            self.write_now(group.rows, group.cost)
        except sqlite3.Error as exc:
            if done is not None and not done.done():
                done.set_exception(exc)
                return
            raise
        if done is not None and not done.done():
            done.set_result(None)

    def write_now(
        self, rows: list[JournalRow], cost: float = 0.0, also: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        """Commit rows (and what they cost) in one transaction, with ``also``'s statements (batch mode)."""
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany(_UPSERT, map(_AS_TUPLE, rows))
            if also is not None:
                also(self.conn)
            if cost:
                self.conn.execute(
                    "INSERT INTO meta VALUES ('spent_usd', ?) ON CONFLICT(key) "
                    "DO UPDATE SET value = CAST(value AS REAL) + excluded.value",
                    (cost,),
                )

    def spent(self) -> float:
        """Everything billed into this journal, across runs."""
        value = self.get_meta(Meta.SPENT_USD)
        return float(value) if value else 0.0

    def job_spent(self) -> float:
        """Everything the job has been billed, including journals set aside by ``--fresh``."""
        before = self.get_meta(Meta.SPENT_BEFORE_USD)
        return self.spent() + (float(before) if before else 0.0)

    def any_cost_estimated(self) -> bool:
        return self.conn.execute("SELECT EXISTS (SELECT 1 FROM results WHERE cost_estimated)").fetchone()[0] == 1

    def completion_token_sample(self, limit: int = 100_000) -> list[int]:
        rows = self.conn.execute(
            "SELECT completion_tokens FROM results WHERE status = 'ok' AND completion_tokens IS NOT NULL LIMIT ?",
            (limit,),
        )
        return [r[0] for r in rows]


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Journal]:
    """An existing journal, opened read-only: no lock, no migration, no WAL switch; closed after.

    For readers beside a run (``pipeline status``, reports, dry runs,
    evaluations): a damaged or unreadable journal is a :class:`JournalError`.
    """
    journal = Journal(path, readonly=True)
    try:
        yield journal
    finally:
        journal.close()


def read_meta(path: Path, key: Meta) -> str | None:
    """One meta value of an existing journal, read without locking or migrating it."""
    with read_only(path) as journal:
        value = journal.get_meta(key)
    if value is None and key == Meta.KEY_SCHEME:
        return "row_number"  # a journal from before schema version 3
    return value


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def set_aside(path: Path) -> Path:
    """Move a journal (and its WAL files) out of the way for ``--fresh``; never overwrite."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{stamp}.old")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{stamp}-{n}.old")
    for suffix in ("", "-wal", "-shm"):
        part = Path(str(path) + suffix)
        if part.exists():
            part.rename(Path(str(target) + suffix))
    return target
