"""The SQLite queue on real files: order per user, leases, retries, dead letters, group commit."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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


def ids(claimed: list[Any]) -> list[str]:
    return [c.record["message_id"] for c in claimed]


async def test_claim_hands_out_only_the_head_of_each_user(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1), rec("b", 1), rec("a", 2), rec("c", 1), rec("b", 2)])
    first = await queue.claim(10, now=NOW, lease=60)
    assert ids(first) == ["a-1", "b-1", "c-1"]
    # Leased heads block their users; nothing else is claimable yet.
    assert await queue.claim(10, now=NOW, lease=60) == []
    await queue.ack(first[0].id)
    assert ids(await queue.claim(10, now=NOW, lease=60)) == ["a-2"]


async def test_claim_respects_the_limit_in_arrival_order(queue: SQLiteQueue) -> None:
    await queue.put([rec(f"u{i}", 1) for i in range(5)])
    assert ids(await queue.claim(2, now=NOW, lease=60)) == ["u0-1", "u1-1"]
    assert ids(await queue.claim(2, now=NOW, lease=60)) == ["u2-1", "u3-1"]


async def test_expired_lease_makes_an_event_claimable_again(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1)])
    assert len(await queue.claim(1, now=NOW, lease=60)) == 1
    assert await queue.claim(1, now=NOW + 59, lease=60) == []
    assert ids(await queue.claim(1, now=NOW + 60, lease=60)) == ["a-1"]


async def test_retry_delays_the_event_and_keeps_the_users_order(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1), rec("a", 2)])
    [head] = await queue.claim(5, now=NOW, lease=60)
    await queue.retry(head.id, available_at=NOW + 30, error="Outbound answered 503")
    assert await queue.claim(5, now=NOW + 10, lease=60) == []  # a-2 must wait behind a-1
    [again] = await queue.claim(5, now=NOW + 30, lease=60)
    assert (again.record["message_id"], again.attempts) == ("a-1", 1)


async def test_release_returns_a_claim_without_counting_an_attempt(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1)])
    [head] = await queue.claim(1, now=NOW, lease=60)
    await queue.release(head.id)
    [again] = await queue.claim(1, now=NOW, lease=60)
    assert again.attempts == 0


async def test_dead_letter_moves_the_event_with_its_reason(queue: SQLiteQueue) -> None:
    await queue.put([rec("a", 1), rec("a", 2)])
    [head] = await queue.claim(5, now=NOW, lease=60)
    await queue.dead_letter(
        head.id, reason="Outbound answered 400", status=400, response="no", now=NOW
    )
    letters = await queue.dead_letters()
    assert [(d["message_id"], d["status"], d["response"], d["attempts"]) for d in letters] == [
        ("a-1", 400, "no", 1)
    ]
    assert letters[0]["record"] == rec("a", 1)
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters) == (1, 1)
    assert ids(await queue.claim(5, now=NOW, lease=60)) == ["a-2"]


async def test_events_survive_reopening_and_leases_of_the_dead_process_are_void(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.sqlite3"
    first = SQLiteQueue(path)
    await first.open()
    await first.put([rec("a", 1), rec("b", 1)])
    assert len(await first.claim(5, now=NOW, lease=3600)) == 2
    await first.close()

    second = SQLiteQueue(path)
    await second.open()
    try:
        assert ids(await second.claim(5, now=NOW, lease=60)) == ["a-1", "b-1"]
        stats = await second.stats()
        assert (stats.depth, stats.oldest_received_at) == (2, NOW)
    finally:
        await second.close()


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


async def test_closed_queue_refuses_work(tmp_path: Path) -> None:
    from collector.queue import QueueUnavailable

    q = SQLiteQueue(tmp_path / "q.sqlite3")
    await q.open()
    await q.close()
    with pytest.raises(QueueUnavailable):
        await q.put([rec("a", 1)])


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


async def test_dedupe_can_be_turned_off(tmp_path: Path) -> None:
    q = SQLiteQueue(tmp_path / "q.sqlite3", dedupe_window=0)
    await q.open()
    try:
        assert await q.put([rec("a", 1), rec("a", 1)]) == 0
        assert (await q.stats()).depth == 2
    finally:
        await q.close()


async def test_bounds_refuse_a_put_whole_and_free_up_on_ack(tmp_path: Path) -> None:
    from collector.queue import QueueFull

    q = SQLiteQueue(tmp_path / "q.sqlite3", max_events=3, max_bytes=100_000)  # on disk
    await q.open()
    try:
        await q.put([rec("a", 1), rec("b", 1)])
        with pytest.raises(QueueFull):
            await q.put([rec("c", 1), rec("d", 1)])  # would make 4: none of them is stored
        assert (await q.stats()).depth == 2
        big = {**rec("e", 1), "blob": "x" * 100_000}
        with pytest.raises(QueueFull):
            await q.put([big])  # over the bytes bound
        [first, _] = await q.claim(5, now=NOW, lease=60)
        await q.ack(first.id)
        await q.put([rec("c", 1), rec("d", 1)])
        assert (q.depth, (await q.stats()).depth) == (3, 3)
    finally:
        await q.close()


async def test_a_replay_by_another_process_is_counted_by_the_serving_queue(
    queue: SQLiteQueue,
) -> None:
    from collector.queue import DeadLetterFilter

    await queue.put([rec("a", 1), rec("b", 1)])
    [first, _] = await queue.claim(5, now=NOW, lease=60)
    await queue.dead_letter(
        first.id, reason="Outbound answered 400", status=400, response="", now=NOW
    )
    assert (await queue.stats()).depth == 1

    tool = SQLiteQueue(queue.path, owner=False)  # what `dead-letters replay` opens
    await tool.open()
    try:
        assert await tool.replay_dead_letters(DeadLetterFilter()) == 1
    finally:
        await tool.close()
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters) == (2, 0)
    assert queue.depth == 2
