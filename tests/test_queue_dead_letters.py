"""Dead letters on real files: counted like the queue's depth, not by reading their table on
every /readyz and scrape, and recounted after the `dead-letters` command changed them.

Whether a statement reads a table is seen with SQLite's authorizer, which is asked for every
table a statement reads when it is prepared (setting it makes SQLite prepare them again).
Counting virtual machine steps cannot tell: `COUNT(*)` is one step however many rows it
counts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from collector.queue import DeadLetterFilter, QueueStats, SQLiteQueue

NOW = 1_700_000_000.0
T = TypeVar("T")


def rec(user: str, n: int) -> dict[str, Any]:
    return {"message_id": f"{user}-{n}", "user_id": user, "received_at": NOW, "event": f"e{n}"}


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SQLiteQueue]:
    opened = SQLiteQueue(tmp_path / "q.sqlite3", dedupe_window=0)
    await opened.open()
    yield opened
    await opened.close()


async def dead_lettered(queue: SQLiteQueue, count: int, *, now: float = NOW) -> None:
    """Put `count` events (one user each, so all are heads) and dead-letter them all."""
    await queue.put([rec(f"u{n}", n) for n in range(count)])
    claimed = await queue.claim(count, now=now, lease=60)
    await asyncio.gather(
        *(
            queue.dead_letter(
                c.id, reason="Outbound answered 400", status=400, response="", now=now
            )
            for c in claimed
        )
    )


async def tables_read(queue: SQLiteQueue, operation: Awaitable[T]) -> tuple[T, set[str]]:
    """What `operation` returns, and the tables that the statements of its commit read."""
    tables: set[str] = set()

    def note(action: int, table: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_READ and table is not None:
            tables.add(table)
        return sqlite3.SQLITE_OK

    connection = queue._connection
    assert connection is not None
    connection.set_authorizer(note)
    try:
        result = await operation
    finally:
        connection.set_authorizer(None)
    return result, tables


async def test_stats_do_not_read_the_dead_letters(queue: SQLiteQueue) -> None:
    await dead_lettered(queue, 300)
    stats, tables = await tables_read(queue, queue.stats())
    assert stats == QueueStats(depth=0, oldest_received_at=None, dead_letters=300)
    assert "dead_letters" not in tables
    assert "events" in tables  # the authorizer does see what stats read (the head of the line)


async def test_the_count_follows_dead_letters_added_replayed_and_purged(
    queue: SQLiteQueue,
) -> None:
    await dead_lettered(queue, 5)
    assert (await queue.stats()).dead_letters == 5
    assert await queue.replay_dead_letters(DeadLetterFilter(ids=(1, 2))) == 2
    assert await queue.purge_dead_letters(DeadLetterFilter(ids=(3,))) == 1
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters) == (2, 2)


async def test_a_count_at_open_and_a_recount_after_another_process(
    queue: SQLiteQueue, tmp_path: Path
) -> None:
    await dead_lettered(queue, 4)
    tool = SQLiteQueue(queue.path, owner=False)  # what the `dead-letters` command opens
    await tool.open()
    try:
        assert (await tool.stats()).dead_letters == 4  # counted at open
        assert await tool.purge_dead_letters(DeadLetterFilter(ids=(1,))) == 1
    finally:
        await tool.close()
    stats, tables = await tables_read(queue, queue.stats())
    assert stats.dead_letters == 3
    assert "dead_letters" in tables  # recounted once, as another process changed them
    _, tables = await tables_read(queue, queue.stats())
    assert "dead_letters" not in tables  # and not again

    tool = SQLiteQueue(queue.path, owner=False)
    await tool.open()
    try:
        assert await tool.replay_dead_letters(DeadLetterFilter(ids=(2,))) == 1
    finally:
        await tool.close()
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters) == (1, 2)


async def test_a_failed_commit_leaves_the_count_as_it_was(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1)])
    [claimed] = await queue.claim(1, now=NOW, lease=60)

    def refuse(action: int, table: str | None, *_: object) -> int:
        # The event cannot be deleted from the queue: the whole move is rolled back.
        return sqlite3.SQLITE_DENY if action == sqlite3.SQLITE_DELETE else sqlite3.SQLITE_OK

    connection = queue._connection
    assert connection is not None
    connection.set_authorizer(refuse)
    try:
        with pytest.raises(Exception, match="not authorized"):
            await queue.dead_letter(claimed.id, reason="x", status=400, response="", now=NOW)
    finally:
        connection.set_authorizer(None)
    assert (queue.dead_count, (await queue.stats()).dead_letters) == (0, 0)
