"""SQLite's write-ahead log stays bounded under ingest that saturates the queue (issue 15,
item 7): many concurrent putters, a real SQLite file, and the -wal file's size after every
commit."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from collector.queue import SQLiteQueue
from collector.queue import sqlite as queue_module

NOW = 1_700_000_000.0
PUTTERS = 64
PUTS = 400  # each putter's, of EVENTS events: 256,000 events, about 120 MB of log written
EVENTS = 10
MIB = 1024 * 1024
# What the README promises for the default wal_frames_limit (1,000 pages of 4 KiB): commits
# wait past 8 MB, and the file is at most that plus the group commit that crossed it.
BOUND = 16 * MIB


def records(putter: int, put: int) -> list[dict[str, Any]]:
    return [
        {
            "message_id": f"{put:06d}-{putter:03d}-{n}",  # time-first, as the script's are
            "user_id": f"u{putter}",
            "received_at": NOW + put,
            "event": "e",
            "properties": {"x": "y" * 200},
        }
        for n in range(EVENTS)
    ]


async def saturate(queue: SQLiteQueue, puts: int) -> int:
    """Put as fast as the queue takes them from PUTTERS at once; the largest -wal file seen
    after any commit (the file only grows inside a commit, and one is sampled each turn of
    the loop, so no commit passes unseen)."""
    wal = queue.path.with_name(queue.path.name + "-wal")
    largest = 0
    running = True

    async def putter(k: int) -> None:
        for n in range(puts):
            await queue.put(records(k, n))

    async def watch() -> None:
        nonlocal largest
        while running:
            if wal.exists():
                largest = max(largest, wal.stat().st_size)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(putter(k) for k in range(PUTTERS)))
    finally:
        running = False
        await watcher
    return largest


async def test_the_log_stays_under_its_bound_under_saturating_ingest(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite3")
    await queue.open()
    try:
        largest = await saturate(queue, PUTS)
        assert queue._checkpointer is not None
        restarts = queue._checkpointer.restarts
        assert (await queue.stats()).depth == PUTTERS * PUTS * EVENTS  # progress: all stored
    finally:
        await queue.close()
    # Before commits waited for the restart, the log reached 100 MB and more here.
    assert largest < BOUND, f"{largest / MIB:.1f} MiB"
    assert restarts > 0
    with sqlite3.connect(tmp_path / "q.sqlite3") as reopened:
        assert reopened.execute("SELECT COUNT(*) FROM events").fetchone() == (
            PUTTERS * PUTS * EVENTS,
        )


async def test_commits_held_for_a_restart_go_on_when_the_log_cannot_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader that keeps an old snapshot keeps SQLite from restarting the log: held commits
    # go on once the checkpointer has tried, and never wait out a timeout.
    monkeypatch.setattr(queue_module, "BUSY_TIMEOUT", 3600.0)
    queue = SQLiteQueue(tmp_path / "q.sqlite3", wal_frames_limit=64)
    await queue.open()
    reader = sqlite3.connect(queue.path, isolation_level=None)
    try:
        await queue.put(records(999, 0))
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM events").fetchone()  # holds its snapshot
        async with asyncio.timeout(120):  # a deadlock, not a speed: the puts take a second
            await saturate(queue, 20)
        assert queue.log_holds > 0  # the log went past its bound, and commits were held
        assert (await queue.stats()).depth == PUTTERS * 20 * EVENTS + EVENTS
    finally:
        reader.close()
        await queue.close()


async def test_held_commits_wait_for_the_restart_they_asked_for(tmp_path: Path) -> None:
    # The checkpointer's own round never comes (an hour): the hold itself asks for the
    # restart, and the commit goes when it is over.
    queue = SQLiteQueue(tmp_path / "q.sqlite3", checkpoint_interval=3600, wal_frames_limit=64)
    await queue.open()
    try:
        await queue._submit(lambda c: c.execute("PRAGMA wal_autocheckpoint=0"))
        wal = queue.path.with_name(queue.path.name + "-wal")
        n = 0
        while wal.stat().st_size <= queue_module.log_bytes(2 * 64):
            await queue.put(records(0, n))
            n += 1
        checkpointer = queue._checkpointer
        assert checkpointer is not None
        assert checkpointer.restarts == 0
        async with asyncio.timeout(120):  # a deadlock, not a speed
            await queue.put(records(1, 0))
        assert (queue.log_holds, checkpointer.restarts) == (1, 1)
        # That commit wrote the log from its start, and cut the file back to its limit.
        assert wal.stat().st_size <= queue_module.log_bytes(64)
    finally:
        await queue.close()
