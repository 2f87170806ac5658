"""The SQLite queue on real files: durable puts, group commit, the checkpointer, the write lock,
dedupe by the records' time. What every queue does (order, leases, outcomes, dead letters,
limits) is in test_queue_contract.py, run against both queues."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import eventually

from collector.queue import QueueUnavailable, SQLiteQueue
from collector.queue import sqlite as queue_module

NOW = 1_700_000_000.0


def rec(user: str, n: int) -> dict[str, Any]:
    return {"message_id": f"{user}-{n}", "user_id": user, "received_at": NOW, "event": f"e{n}"}


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[SQLiteQueue]:
    q = SQLiteQueue(tmp_path / "q.sqlite3")
    await q.open()
    yield q
    await q.close()


async def test_put_is_on_disk_when_it_returns(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1)])
    # Another connection, as another process would, sees the committed row.
    with sqlite3.connect(queue.path) as other:
        assert other.execute("SELECT message_id FROM events").fetchall() == [("a-1",)]


async def test_concurrent_puts_share_commits(queue: SQLiteQueue) -> None:
    before = queue.commits
    await asyncio.gather(*(queue.put([rec(f"u{i}", 1)]) for i in range(200)))
    assert (await queue.stats()).depth == 200
    assert queue.stored == 200
    assert queue.commits - before < 50  # 200 puts, far fewer transactions


async def test_the_log_is_checkpointed_off_the_loop_and_stays_bounded(tmp_path: Path) -> None:
    q = SQLiteQueue(tmp_path / "q.sqlite3", checkpoint_interval=0.01, wal_frames_limit=256)
    await q.open()
    wal = tmp_path / "q.sqlite3-wal"
    largest = 0
    try:
        # The committing connection checkpoints itself only past the limit.
        limit = await q._submit(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone())
        assert limit == (256,)
        body = "x" * 700
        for n in range(300):  # about 6 MB of events, as requests would bring them
            await q.put([{**rec(f"u{i}", n), "body": body} for i in range(30)])
            largest = max(largest, wal.stat().st_size)
            await asyncio.sleep(0.002)
        assert (await q.stats()).depth == 9000
        assert q._checkpointer is not None
        assert q._checkpointer.checkpoints > 0
    finally:
        await q.close()
    # 256 frames of 4 KiB make 1 MiB: the log starts over near there, a commit later.
    assert largest < 3 * 1024 * 1024, largest
    with sqlite3.connect(tmp_path / "q.sqlite3") as reopened:
        assert reopened.execute("SELECT COUNT(*) FROM events").fetchone() == (9000,)


async def test_an_idle_queue_is_not_checkpointed_again(tmp_path: Path) -> None:
    q = SQLiteQueue(tmp_path / "q.sqlite3", checkpoint_interval=0.01)
    await q.open()
    try:
        await q.put([rec("a", 1)])
        checkpointer = q._checkpointer
        assert checkpointer is not None
        await eventually(lambda: checkpointer.checkpoints >= 1)
        settled = checkpointer.checkpoints
        await asyncio.sleep(0.3)  # thirty rounds of the checkpointer, and no commit
        assert checkpointer.checkpoints == settled
        await q.put([rec("a", 2)])
        await eventually(lambda: checkpointer.checkpoints > settled)
    finally:
        await q.close()


async def test_a_write_lock_held_elsewhere_does_not_stop_the_event_loop(
    queue: SQLiteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = sqlite3.connect(queue.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # as the checkpointer's restart or a CLI command would
    try:
        put = asyncio.create_task(queue.put([rec("a", 1)]))
        started = asyncio.get_running_loop().time()
        await asyncio.sleep(0.05)
        # Waiting inside SQLite would hold the loop for the whole busy timeout (5 s).
        held = asyncio.get_running_loop().time() - started
        assert held < 2.5, held
        assert not put.done()
    finally:
        other.execute("COMMIT")
    assert await put == 0
    assert (await queue.stats()).depth == 1

    monkeypatch.setattr(queue_module, "BUSY_TIMEOUT", 0.2)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(QueueUnavailable, match="locked"):
            await queue.put([rec("a", 2)])
    finally:
        other.execute("COMMIT")
        other.close()
    await queue.put([rec("a", 3)])  # and it recovers once the lock is free
    assert (await queue.stats()).depth == 2


async def test_a_commit_waiting_on_a_restart_goes_as_soon_as_the_checkpointer_is_done(
    queue: SQLiteQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "LOCK_POLL", 3600.0)  # no retry but on the signal
    assert queue._checkpointer is not None
    other = sqlite3.connect(queue.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the lock, as the checkpointer's restart holds it
    put = asyncio.create_task(queue.put([rec("a", 1)]))
    await asyncio.sleep(0.05)
    assert not put.done()
    other.execute("COMMIT")
    other.close()
    # The checkpointer says so from its own thread, as after a restart.
    await asyncio.to_thread(queue._checkpointer._released)
    assert await asyncio.wait_for(put, 60) == 0
    assert (await queue.stats()).depth == 1


def test_the_checkpointer_says_when_a_restart_is_over(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (x)")
    released: list[int] = []

    def checkpointer(restart_frames: int) -> queue_module.Checkpointer:
        return queue_module.Checkpointer(
            path,
            interval=1,
            restart_frames=restart_frames,
            commits=lambda: 0,
            released=lambda: released.append(restart_frames),
        )

    reader = sqlite3.connect(path, isolation_level=None)
    try:
        for n in range(20):
            writer.execute("INSERT INTO t VALUES (?)", (n,))
        checkpointer(10_000).checkpoint(reader)  # a passive one only: no lock taken
        assert released == []
        for n in range(20):
            writer.execute("INSERT INTO t VALUES (?)", (n,))
        checkpointer(2).checkpoint(reader)  # past the frames: a restart, then the word
        assert released == [2]
    finally:
        reader.close()
        writer.close()


async def test_full_synchronous_mode_is_applied(tmp_path: Path) -> None:
    q = SQLiteQueue(tmp_path / "q.sqlite3", synchronous="full")
    await q.open()
    try:
        mode = await q._submit(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        journal = await q._submit(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        assert (mode, journal) == (2, "wal")
    finally:
        await q.close()


async def test_a_resent_message_id_is_stored_once(queue: SQLiteQueue) -> None:
    assert await queue.put([rec("a", 1), rec("a", 2)]) == 0
    assert await queue.put([rec("a", 2), rec("a", 3)]) == 1
    [head] = await queue.claim(5, now=NOW, lease=60)
    await queue.ack(head.id)
    # Delivered and gone from the queue, but still remembered within the window.
    assert await queue.put([rec("a", 1)]) == 1
    assert (await queue.stats()).depth == 2
    assert (queue.stored, queue.duplicates) == (3, 2)


async def test_dedupe_forgets_after_its_window(tmp_path: Path) -> None:
    q = SQLiteQueue(tmp_path / "q.sqlite3", dedupe_window=100)
    await q.open()
    try:
        await q.put([rec("a", 1)])
        later = {**rec("b", 1), "received_at": NOW + 101}
        await q.put([later])  # prunes what is older than the window
        assert await q.put([{**rec("a", 1), "received_at": NOW + 102}]) == 0
    finally:
        await q.close()


def browser(ip: str, n: int) -> dict[str, Any]:
    """A record as ingest stores a browser's: a dedupe key scoped to it, and its IP."""
    return {**rec(f"visitor{n % 2}", n), "ip": ip, "dedupe_key": f"{ip}/{n}"}


def counts(queue: SQLiteQueue) -> tuple[Any, ...]:
    """What the queue keeps in memory of its events: depth, bytes and the clients' shares."""
    return (
        queue.depth,
        queue.bytes,
        dict(queue.clients),
        queue.browser_events,
        queue.browser_bytes,
    )


async def recounted(path: Path) -> tuple[Any, ...]:
    """The same, counted from the file's records by another connection (a tool's)."""
    tool = SQLiteQueue(path, owner=False)
    await tool.open()
    try:
        return counts(tool)
    finally:
        await tool.close()


async def test_outcomes_keep_the_counts_and_shares_the_records_say(tmp_path: Path) -> None:
    # An ack counts what leaves from what its claim read (not from the deleted rows); the
    # counts must stay those of the records, for every outcome, for events this process did
    # not claim, and for an id SQLite gives again to another event.
    path = tmp_path / "q.sqlite3"
    queue = SQLiteQueue(path)
    await queue.open()
    try:
        records = [browser("198.51.100.7", n) for n in range(6)]
        records += [browser("2001:db8::1", n) for n in range(6, 9)]
        records += [rec("server", n) for n in range(3)]
        await queue.put(records)
        claimed = await queue.claim(10, now=NOW, lease=60, depth=3)
        assert len(claimed) == 9
        first, second, third, *rest = claimed
        await queue.ack_all([(c.id, False) for c in rest])
        await queue.retry(first.id, available_at=NOW, error="503")
        await queue.release(third.id)
        await queue.dead_letter(second.id, reason="400", status=400, response="", now=NOW)
        assert counts(queue) == await recounted(path)
        assert queue._leased == {}  # every claimed event had its outcome: nothing kept
        # Leased by a process that stopped: acked here without this process's claim.
        await queue.claim(10, now=NOW, lease=60, depth=10)
        await queue.close()
        queue = SQLiteQueue(path)
        await queue.open()
        with sqlite3.connect(path) as other:
            waiting = [row[0] for row in other.execute("SELECT id FROM events ORDER BY id")]
        await queue.ack_all([(event_id, False) for event_id in waiting[:-2]])
        assert counts(queue) == await recounted(path)
        # The newest event acked after its claim: its id goes to the next event stored (the
        # largest rowid plus one), from another client; acked, it counts as that one's.
        kept, newest = sorted(
            await queue.claim(10, now=NOW, lease=60, depth=10), key=attrgetter("id")
        )
        await queue.ack(newest.id)
        await queue.put([browser("203.0.113.9", 99)])
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT MAX(id) FROM events").fetchall() == [(newest.id,)]
        assert queue.clients["203.0.113.9"] == (1, len(orjson.dumps(browser("203.0.113.9", 99))))
        await queue.ack_all([(newest.id, False), (kept.id, False)])
        assert counts(queue) == (0, 0, {}, 0, 0) == await recounted(path)
    finally:
        await queue.close()


async def test_a_line_leased_deep_keeps_each_events_lease_through_outcomes_and_a_restart(
    tmp_path: Path,
) -> None:
    # A claim writes its lease on a line's head and its last event only; what each outcome
    # then does must be what a lease on every event would do, also for a restart's redo.
    path = tmp_path / "q.sqlite3"
    queue = SQLiteQueue(path)
    await queue.open()
    try:
        await queue.put([rec("a", n) for n in range(9)])
        a0, _, _, a3 = await queue.claim(1, now=NOW, lease=60, depth=4)
        await queue.ack(a3.id)  # the last event claimed goes first: a2 is the last leased now
        await queue.ack(a0.id)
        assert await queue.claim(1, now=NOW, lease=60, depth=5) == []  # a1 is leased
        await queue.close()
        queue = SQLiteQueue(path)
        await queue.open()
        assert queue.interrupted == 2  # a1 and a2 were being sent
        # The calls it made go again as they were: a1 and a2, not with a4 that waited.
        a1, a2 = await queue.claim(1, now=NOW, lease=60, depth=5)
        assert [a1.record["message_id"], a2.record["message_id"]] == ["a-1", "a-2"]
        await queue.ack_all([(a1.id, False), (a2.id, False)])
        # The head released, then a shallower claim: the events behind keep their lease.
        a4, _, _ = await queue.claim(1, now=NOW + 10, lease=60, depth=3)
        await queue.release(a4.id)
        [again] = await queue.claim(1, now=NOW + 20, lease=60, depth=1)
        await queue.ack(again.id)
        assert await queue.claim(1, now=NOW + 69, lease=60, depth=5) == []  # a5's lease
        a5, a6, _, _ = await queue.claim(1, now=NOW + 70, lease=60, depth=5)
        # An event inside the line released: it is due when it is the head, the others not.
        await queue.release(a6.id)
        await queue.ack(a5.id)
        rest = await queue.claim(1, now=NOW + 70, lease=60, depth=5)
        assert [item.record["message_id"] for item in rest] == ["a-6", "a-7", "a-8"]
    finally:
        await queue.close()
