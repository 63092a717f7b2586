"""The journal's group commit: replies share a transaction, and a reply counts only once committed.

A sender awaits :meth:`Journal.write` before it frees its concurrency slot,
so "committed" is what bounds the rows a ``kill -9`` re-pays; these tests pin
when a group is committed (its timer, its size, an explicit flush, closing)
and that nothing is visible to another connection before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from pipeline.store import journal as journal_module
from pipeline.store.journal import Journal, JournalRow, RowStatus


def _row(i: int) -> JournalRow:
    return JournalRow(f"k{i}", "h", RowStatus.OK, completion=f"c{i}", updated=1.0)


def _committed(path: Path) -> int:
    """Rows another process would see (a separate connection reads only committed data)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "j.sqlite")


async def test_rows_of_one_group_share_one_commit_after_the_delay(journal: Journal) -> None:
    commits: list[int] = []
    write_now = journal.write_now

    def counting(rows: list[JournalRow], cost: float = 0.0, also: object = None) -> None:
        commits.append(len(rows))
        write_now(rows, cost)

    journal.write_now = counting  # type: ignore[method-assign,assignment]
    futures = [journal.write(_row(i), 0.5) for i in range(5)]
    await asyncio.sleep(0)
    assert _committed(journal.path) == 0, "a group waits for its timer"
    assert all(f is futures[0] for f in futures), "one future per group"
    await asyncio.wait_for(futures[0], timeout=2)
    assert commits == [5]
    assert _committed(journal.path) == 5
    assert journal.spent() == pytest.approx(2.5)
    # The next write starts a new group.
    later = journal.write(_row(99))
    assert later is not futures[0]
    await later
    assert commits == [5, 1]


async def test_a_full_group_commits_without_waiting_for_the_timer(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "GROUP_DELAY_S", 60.0)
    monkeypatch.setattr(journal_module, "GROUP_ROWS", 4)
    first = journal.write(_row(0))
    for i in range(1, 4):
        journal.write(_row(i))
    await asyncio.wait_for(first, timeout=2)  # not 60 s
    assert _committed(journal.path) == 4


async def test_flush_commits_a_waiting_group_at_once(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "GROUP_DELAY_S", 60.0)
    done = journal.write(_row(0))
    journal.flush()
    assert done.done() and done.exception() is None
    assert _committed(journal.path) == 1
    journal.flush()  # nothing waiting: a no-op
    await asyncio.sleep(0)
    assert _committed(journal.path) == 1


async def test_closing_commits_rows_whose_senders_were_cancelled(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop's grace period can end with senders cancelled while their group waits:
    the rows were paid for, so closing the journal still commits them."""
    monkeypatch.setattr(journal_module, "GROUP_DELAY_S", 60.0)

    async def sender(i: int) -> None:
        await journal.write(_row(i))

    tasks = [asyncio.create_task(sender(i)) for i in range(3)]
    await asyncio.sleep(0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    path = journal.path
    journal.close()
    assert _committed(path) == 3


async def test_a_failed_commit_is_raised_to_every_sender_of_the_group(journal: Journal) -> None:
    def broken(rows: list[JournalRow], cost: float = 0.0, also: object = None) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    journal.write_now = broken  # type: ignore[method-assign,assignment]
    done = journal.write(_row(0))
    assert journal.write(_row(1)) is done
    with pytest.raises(sqlite3.OperationalError):
        await asyncio.wait_for(done, timeout=2)
