"""The SQLite queue's heads table: files of the schema before it open with their lines intact.

That a claim's cost does not grow with the backlog and that an event in backoff holds back
its own user only (counted in SQLite's virtual machine steps) is in test_queue_contract.py,
which runs against both queues."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from collector.queue import Claimed, SQLiteQueue

NOW = 1_700_000_000.0


def rec(user: str, n: int) -> dict[str, Any]:
    return {"message_id": f"{user}-{n}", "user_id": user, "received_at": NOW, "event": f"e{n}"}


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[list[SQLiteQueue]]:
    """Queues opened by a test, closed after it."""
    queues: list[SQLiteQueue] = []
    yield queues
    for queue in queues:
        await queue.close()


def ids(claimed: list[Claimed]) -> list[str]:
    return [c.record["message_id"] for c in claimed]


# The schema before the heads table, as collectors up to 4911d0d created it.
OLD_SCHEMA = """
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    user_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    available_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    body BLOB NOT NULL
);
CREATE INDEX events_by_user ON events (user_key, id);
CREATE TABLE received (message_id TEXT PRIMARY KEY, received_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX received_by_time ON received (received_at);
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    received_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER,
    response TEXT NOT NULL,
    body BLOB NOT NULL
);
"""


async def test_a_queue_file_of_the_old_schema_opens_with_its_lines_intact(
    tmp_path: Path, opened: list[SQLiteQueue]
) -> None:
    path = tmp_path / "q.sqlite3"
    with sqlite3.connect(path) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(OLD_SCHEMA)
        rows = [
            # a: its head in backoff after 2 attempts; b: its head leased by a dead process
            ("a", "a-1", NOW, NOW + 100, 0.0, 2),
            ("b", "b-1", NOW, NOW, NOW + 50, 0),
            ("a", "a-2", NOW, NOW, 0.0, 0),
            ("c", "c-1", NOW, NOW, 0.0, 0),
            ("b", "b-2", NOW, NOW, 0.0, 0),
        ]
        old.executemany(
            "INSERT INTO events (user_key, message_id, received_at, available_at, lease_until,"
            " attempts, body) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*row, orjson.dumps(rec(row[0], int(row[1][-1])))) for row in rows],
        )
    old.close()

    queue = SQLiteQueue(path)
    await queue.open()
    opened.append(queue)
    assert queue.interrupted == 1  # b-1's lease is void
    assert ids(await queue.claim(10, now=NOW, lease=600)) == ["b-1", "c-1"]
    [a] = await queue.claim(10, now=NOW + 100, lease=600)
    assert (a.record["message_id"], a.attempts) == ("a-1", 2)
    await queue.ack(a.id)
    assert ids(await queue.claim(10, now=NOW + 100, lease=60)) == ["a-2"]
    assert (await queue.stats()).depth == 5 - 1
