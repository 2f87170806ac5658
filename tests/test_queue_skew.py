"""The claim under skew, on real files: its cost does not grow with the backlog, an event in
backoff holds back its own user only, and files of the schema before the heads table open.

Cost is counted in SQLite's virtual machine steps (a progress handler called on every one),
which are deterministic, rather than timed."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from collector.queue import Claimed, SQLiteQueue

NOW = 1_700_000_000.0
T = TypeVar("T")


def rec(user: str, n: int) -> dict[str, Any]:
    return {"message_id": f"{user}-{n}", "user_id": user, "received_at": NOW, "event": f"e{n}"}


@pytest.fixture
async def opened(tmp_path: Path) -> AsyncIterator[list[SQLiteQueue]]:
    """Queues opened by a test, closed after it."""
    queues: list[SQLiteQueue] = []
    yield queues
    for queue in queues:
        await queue.close()


async def filled(directory: Path, opened: list[SQLiteQueue], lines: dict[str, int]) -> SQLiteQueue:
    """A queue in `directory` holding, for each user, that many events (users in turn)."""
    queue = SQLiteQueue(directory / "q.sqlite3", dedupe_window=0)
    await queue.open()
    opened.append(queue)
    longest = max(lines.values())
    for start in range(0, longest, 1000):
        await queue.put(
            [
                rec(user, n)
                for n in range(start, min(longest, start + 1000))
                for user, count in lines.items()
                if n < count
            ]
        )
    return queue


async def counting(queue: SQLiteQueue, operation: Awaitable[T]) -> tuple[T, int]:
    """What `operation` on `queue` returns, and the SQLite steps that its commit took."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    connection = queue._connection
    assert connection is not None
    connection.set_progress_handler(count, 1)
    try:
        result = await operation
    finally:
        connection.set_progress_handler(None, 0)
    return result, steps


async def claim_counting(queue: SQLiteQueue, limit: int, now: float) -> tuple[list[Claimed], int]:
    """A claim, and the SQLite steps that its commit took."""
    return await counting(queue, queue.claim(limit, now=now, lease=60))


def ids(claimed: list[Claimed]) -> list[str]:
    return [c.record["message_id"] for c in claimed]


async def test_a_claim_costs_the_same_with_a_hundred_times_the_backlog(
    tmp_path: Path, opened: list[SQLiteQueue]
) -> None:
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    users = ("a", "b", "c", "d", "e")
    small = await filled(tmp_path / "small", opened, dict.fromkeys(users, 20))
    large = await filled(tmp_path / "large", opened, dict.fromkeys(users, 2000))
    # Fewer due heads than the limit: the case where a scan for more would read everything.
    small_claimed, small_steps = await claim_counting(small, 16, NOW)
    large_claimed, large_steps = await claim_counting(large, 16, NOW)
    assert ids(small_claimed) == ids(large_claimed) == [f"{u}-0" for u in users]
    assert large_steps <= small_steps * 1.2
    # The leased heads are not read again either: nothing is due.
    assert (await claim_counting(large, 16, NOW))[1] <= small_steps


async def test_puts_acks_and_retries_cost_the_same_with_a_hundred_times_the_backlog(
    tmp_path: Path, opened: list[SQLiteQueue]
) -> None:
    """Keeping the heads must not make ingest or outcomes read the backlog instead."""
    costs: list[list[int]] = []
    for name, count in (("small", 20), ("large", 2000)):
        (tmp_path / name).mkdir()
        queue = await filled(tmp_path / name, opened, dict.fromkeys("abcde", count))
        _, put = await counting(queue, queue.put([rec(u, 10**6) for u in "abcdefgh"]))
        first, second, *_ = await queue.claim(16, now=NOW, lease=60)
        _, ack = await counting(queue, queue.ack(first.id))
        retry = queue.retry(second.id, available_at=NOW + 60, error="503")
        _, retried = await counting(queue, retry)
        _, reset = await counting(queue, queue.reset_backoff(NOW))
        costs.append([put, ack, retried, reset])
    small, large = costs
    assert all(big <= few * 1.2 for few, big in zip(small, large, strict=True)), costs


async def test_an_event_in_backoff_holds_back_its_own_user_only_in_speed_too(
    tmp_path: Path, opened: list[SQLiteQueue]
) -> None:
    (tmp_path / "alone").mkdir()
    (tmp_path / "beside").mkdir()
    light = {f"light{i}": 1 for i in range(10)}
    alone = await filled(tmp_path / "alone", opened, light)
    beside = await filled(tmp_path / "beside", opened, {"heavy": 5000, **light})
    [head] = await beside.claim(1, now=NOW, lease=60)
    assert head.record["message_id"] == "heavy-0"
    await beside.retry(head.id, available_at=NOW + 3600, error="Outbound answered 503")

    alone_claimed, alone_steps = await claim_counting(alone, 16, NOW + 1)
    beside_claimed, beside_steps = await claim_counting(beside, 16, NOW + 1)
    assert ids(beside_claimed) == ids(alone_claimed) == [f"light{i}-0" for i in range(10)]
    assert beside_steps <= alone_steps * 1.2
    for item in beside_claimed:
        await beside.ack(item.id)
    # Its time come, the heavy user's head goes again, and its line after it.
    [again] = await beside.claim(16, now=NOW + 3600, lease=60)
    assert (again.record["message_id"], again.attempts) == ("heavy-0", 1)
    await beside.ack(again.id)
    assert ids(await beside.claim(16, now=NOW + 3600, lease=60)) == ["heavy-1"]


async def test_due_heads_go_in_the_order_they_became_due(
    tmp_path: Path, opened: list[SQLiteQueue]
) -> None:
    queue = await filled(tmp_path, opened, {"a": 2, "b": 2, "c": 1})
    a, b, c = await queue.claim(3, now=NOW, lease=60)
    await queue.retry(a.id, available_at=NOW + 20, error="503")
    await queue.retry(b.id, available_at=NOW + 10, error="503")
    await queue.ack(c.id)
    assert ids(await queue.claim(5, now=NOW + 30, lease=60)) == ["b-0", "a-0"]


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


async def test_a_claim_says_whether_its_user_was_identified_also_after_reopening(
    tmp_path: Path, opened: list[SQLiteQueue]
) -> None:
    queue = await filled(tmp_path, opened, {"a": 2, "b": 2})
    a, b = await queue.claim(5, now=NOW, lease=60)
    assert (a.identified, b.identified) == (False, False)
    await queue.ack(a.id, identified=True)
    await queue.ack(b.id)
    await queue.close()
    opened.remove(queue)
    again = SQLiteQueue(queue.path, dedupe_window=0)
    await again.open()
    opened.append(again)
    claimed = await again.claim(5, now=NOW, lease=60)
    assert [(c.record["message_id"], c.identified) for c in claimed] == [
        ("a-1", True),
        ("b-1", False),
    ]
