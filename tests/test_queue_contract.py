"""One contract for every queue: each test runs against the SQLite queue (a file in tmp_path)
and the Redis Streams queue (a real redis-server on loopback), and says what base.Queue and
the tools (`stats`, `dead-letters`) may count on from either.

Time is the `now=` the relay passes to claims and outcomes (a fixed NOW), except where a
queue reads the clock itself: the dedupe window (Redis keys expire by the server's clock, SQLite
prunes by the records' `received_at`) and the retention that `stats` applies (time.time()).
What is specific to one implementation (SQLite's files, WAL and VM steps; Redis's partitions,
leases between processes, fencing) is tested beside it (test_queue*.py, test_queue_redis.py).
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import redis
from redis_server import RedisServer

from collector.queue import (
    Claimed,
    DeadLetterFilter,
    Queue,
    QueueFull,
    QueueUnavailable,
    SQLiteQueue,
)

NOW = 1_700_000_000.0
KINDS = ("sqlite", "redis")
T = TypeVar("T")


class ContractQueue(Queue, Protocol):
    """base.Queue, and what the app and the tools use beside it (both queues offer it)."""

    interrupted: int

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def notes(self) -> dict[str, Any]: ...

    async def dead_letters(
        self, which: DeadLetterFilter | None = None, *, limit: int = -1
    ) -> list[dict[str, Any]]: ...

    async def dead_letter_reasons(self) -> list[tuple[str, int]]: ...

    async def replay_dead_letters(
        self,
        which: DeadLetterFilter,
        *,
        chunk: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int: ...

    async def purge_dead_letters(
        self,
        which: DeadLetterFilter,
        *,
        chunk: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> int: ...


def redis_queue_class() -> Any:
    """RedisQueue, imported only by the Redis half (the SQLite half runs without it)."""
    return importlib.import_module("collector.queue.redis_streams").RedisQueue


class Store:
    """Where one test's queues keep their events: SQLite files in a directory, or one
    redis-server (a key prefix a queue name). Opens queues, and closes them after the test."""

    def __init__(self, kind: str, directory: Path, redis: RedisServer | None) -> None:
        self.kind = kind
        self.directory = directory
        self.redis = redis
        self.opened: list[ContractQueue] = []

    def make(self, name: str = "q", **settings: Any) -> ContractQueue:
        """A queue named `name` in this store (not opened); settings are the queues' own."""
        if self.kind == "sqlite":
            settings.pop("partition_lease", None)  # Redis's alone
            return SQLiteQueue(self.directory / f"{name}.sqlite3", **settings)
        assert self.redis is not None
        # A partition lease longer than any test: a loaded machine must not make a queue
        # lose its partitions between two steps (taking over is test_queue_redis.py's).
        settings["lease"] = settings.pop("partition_lease", 60.0)
        queue: ContractQueue = redis_queue_class()(
            self.redis.url, prefix=f"contract-{name}", **settings
        )
        return queue

    async def open(self, name: str = "q", **settings: Any) -> ContractQueue:
        """Open a queue named `name` (the same name is the same queue: its events, letters...)."""
        queue = self.make(name, **settings)
        await queue.open()
        self.opened.append(queue)
        return queue

    async def close(self, queue: ContractQueue) -> None:
        self.opened.remove(queue)
        await queue.close()

    async def reopen(self, queue: ContractQueue, name: str = "q", **settings: Any) -> ContractQueue:
        """Close `queue` and open its store again, as the next process does. A redis-server is
        stopped and started again in between: what the queue kept must be in its AOF. (By
        SIGTERM: with appendfsync everysec, a SIGKILL may lose what Redis acknowledged in its
        last second or two, as Redis documents; test_queue_redis.py kills it under `always`.)"""
        await self.close(queue)
        if self.redis is not None:
            self.redis.restart(kill=False)
        return await self.open(name, **settings)

    async def close_all(self) -> None:
        for queue in reversed(self.opened):
            await queue.close()
        self.opened.clear()

    async def cost(self, queue: ContractQueue, operation: Awaitable[T]) -> tuple[T, int]:
        """What `operation` returns, and the work it took the store: SQLite's virtual machine
        steps, or the commands Redis ran (scripts' own included; INFO commandstats)."""
        if self.kind == "sqlite":
            assert isinstance(queue, SQLiteQueue)
            return await sqlite_steps(queue, operation)
        assert self.redis is not None
        with self.redis.client() as client:
            before = redis_commands(client.info("commandstats"))
            result = await operation
            after = redis_commands(client.info("commandstats"))
        return result, after - before


async def sqlite_steps(queue: SQLiteQueue, operation: Awaitable[T]) -> tuple[T, int]:
    """What `operation` returns, and the SQLite steps that its commit took."""
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


def redis_commands(stats: dict[str, Any]) -> int:
    """Commands run, from INFO commandstats, leaving out the INFO calls that read it."""
    return sum(
        int(entry["calls"])
        for name, entry in stats.items()
        if name not in ("cmdstat_info", "cmdstat_hello", "cmdstat_client|setinfo")
    )


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    redis = request.getfixturevalue("redis_server") if request.param == "redis" else None
    opened = Store(request.param, tmp_path, redis)
    yield opened
    await opened.close_all()


MakeQueue = Callable[..., Awaitable[ContractQueue]]


@pytest.fixture
def make_queue(store: Store) -> MakeQueue:
    """Open a queue with these settings (closed after the test)."""
    return store.open


@pytest.fixture
async def queue(make_queue: MakeQueue) -> ContractQueue:
    return await make_queue()


def rec(user: str, n: int, **more: Any) -> dict[str, Any]:
    return {
        "message_id": f"{user}-{n}",
        "user_id": user,
        "received_at": NOW,
        "event": f"e{n}",
        **more,
    }


def browser(ip: str, n: int) -> dict[str, Any]:
    """A record as ingest stores a browser's: a dedupe key scoped to it, and its IP."""
    return rec(f"visitor{n}", n, ip=ip, dedupe_key=f"{ip}/{n}", message_id=f"{ip}-{n}")


def ids(claimed: Sequence[Claimed]) -> list[str]:
    return [c.record["message_id"] for c in claimed]


async def claim(queue: ContractQueue, now: float = NOW, **options: Any) -> list[str]:
    """The message ids a claim (limit 100, lease 60 s) hands out."""
    return ids(await queue.claim(options.pop("limit", 100), now=now, lease=60, **options))


# Order per user, leases, outcomes.


async def test_a_claim_hands_out_only_the_head_of_each_user(queue: ContractQueue) -> None:
    await queue.put([rec("a", 1), rec("b", 1), rec("a", 2), rec("c", 1), rec("b", 2)])
    first = await queue.claim(10, now=NOW, lease=60)
    assert ids(first) == ["a-1", "b-1", "c-1"]
    assert [(c.attempts, c.received_at, c.identified) for c in first] == [(0, NOW, False)] * 3
    assert first[0].record == rec("a", 1)
    assert await claim(queue) == []  # leased heads hold back their users' lines
    await queue.ack(first[0].id)
    assert await claim(queue) == ["a-2"]


async def test_a_claim_takes_at_most_its_limit_in_arrival_order(queue: ContractQueue) -> None:
    await queue.put([rec(f"u{i}", 1) for i in range(5)])
    assert await claim(queue, limit=2) == ["u0-1", "u1-1"]
    assert await claim(queue, limit=2) == ["u2-1", "u3-1"]
    assert await claim(queue, limit=2) == ["u4-1"]


async def test_a_claim_leases_a_line_several_events_deep(queue: ContractQueue) -> None:
    await queue.put([rec(u, n) for n in range(5) for u in ("a", "b") if u == "a" or n < 2])
    claimed = await queue.claim(10, now=NOW, lease=60, depth=3)
    assert ids(claimed) == ["a-0", "a-1", "a-2", "b-0", "b-1"]
    assert await claim(queue, depth=3) == []  # all leased
    await queue.ack(claimed[0].id)
    assert await claim(queue, depth=3) == []  # a-1 is still leased: a's line waits for it
    await queue.ack_all([(claimed[1].id, False), (claimed[2].id, False)])
    assert await claim(queue, depth=3) == ["a-3", "a-4"]


async def test_a_lease_that_runs_out_makes_the_event_claimable_again(
    queue: ContractQueue,
) -> None:
    await queue.put([rec("a", 1)])
    assert await claim(queue) == ["a-1"]
    assert await claim(queue, NOW + 59) == []
    [again] = await queue.claim(1, now=NOW + 60, lease=60)
    assert (again.record["message_id"], again.attempts) == ("a-1", 0)


async def test_a_retry_holds_back_its_own_user_only_and_counts_an_attempt(
    queue: ContractQueue,
) -> None:
    await queue.put([rec("a", 1), rec("a", 2), rec("b", 1), rec("b", 2)])
    a, b = await queue.claim(5, now=NOW, lease=60)
    await queue.retry(a.id, available_at=NOW + 30, error="Outbound answered 503")
    await queue.ack(b.id)
    assert await claim(queue, NOW + 10) == ["b-2"]  # a-2 waits behind a-1, b goes on
    [again] = await queue.claim(5, now=NOW + 30, lease=60)
    assert (again.record["message_id"], again.attempts) == ("a-1", 1)
    await queue.retry(again.id, available_at=NOW + 40, error="Outbound answered 503")
    [third] = await queue.claim(5, now=NOW + 40, lease=60)
    assert (third.record["message_id"], third.attempts) == ("a-1", 2)


async def test_due_lines_go_in_the_order_they_became_due(queue: ContractQueue) -> None:
    await queue.put([rec("a", 0), rec("b", 0), rec("c", 0), rec("a", 1), rec("b", 1)])
    a, b, c = await queue.claim(3, now=NOW, lease=60)
    await queue.retry(a.id, available_at=NOW + 20, error="503")
    await queue.retry(b.id, available_at=NOW + 10, error="503")
    await queue.ack(c.id)
    assert await claim(queue, NOW + 30) == ["b-0", "a-0"]


async def test_a_release_gives_a_claim_back_without_an_attempt(queue: ContractQueue) -> None:
    await queue.put([rec("a", 1), rec("a", 2)])
    [head] = await queue.claim(1, now=NOW, lease=60)
    await queue.release(head.id)
    [again] = await queue.claim(1, now=NOW, lease=60)
    assert (again.record["message_id"], again.attempts) == ("a-1", 0)


async def test_reset_backoff_makes_every_waiting_event_due_now(queue: ContractQueue) -> None:
    await queue.put([rec("a", 1), rec("b", 1), rec("c", 1)])
    a, b, _ = await queue.claim(3, now=NOW, lease=60)
    await queue.retry(a.id, available_at=NOW + 3600, error="503")
    await queue.retry(b.id, available_at=NOW + 7200, error="503")
    assert await claim(queue, NOW + 1) == []  # c is leased, a and b in backoff
    await queue.reset_backoff(NOW + 1)
    claimed = await queue.claim(5, now=NOW + 1, lease=60)
    assert ids(claimed) == ["a-1", "b-1"]  # the lease of c stays
    assert [item.attempts for item in claimed] == [1, 1]


async def test_acks_say_whether_the_user_was_identified_also_after_reopening(
    store: Store,
) -> None:
    queue = await store.open(dedupe_window=0)
    await queue.put([rec(u, n) for n in (1, 2) for u in "abc"])
    a, b, c = await queue.claim(5, now=NOW, lease=60)
    assert (a.identified, b.identified, c.identified) == (False, False, False)
    await queue.ack(a.id, identified=True)
    await queue.ack_all([(b.id, False), (c.id, True)])
    assert queue.depth == 3
    queue = await store.reopen(queue, dedupe_window=0)
    claimed = await queue.claim(5, now=NOW, lease=60)
    assert [(item.record["message_id"], item.identified) for item in claimed] == [
        ("a-2", True),
        ("b-2", False),
        ("c-2", True),
    ]


async def test_ack_all_of_nothing_does_nothing(queue: ContractQueue) -> None:
    await queue.put([rec("a", 1)])
    await queue.ack_all([])
    assert (await queue.stats()).depth == 1


# Reopening: what a put stored, and what a dead process had in flight.


async def test_reopening_keeps_everything_and_voids_the_leases_of_the_process_before(
    store: Store,
) -> None:
    queue = await store.open()
    await queue.put([rec("a", 1), rec("b", 1), rec("a", 2), rec("c", 1)])
    *_, c = await queue.claim(5, now=NOW, lease=3600)
    await queue.dead_letter(c.id, reason="Outbound answered 400", status=400, response="", now=NOW)
    await queue.note("relay", {"state": "open", "since": NOW})
    queue = await store.reopen(queue)
    stats = await queue.stats()
    assert (stats.depth, stats.oldest_received_at, stats.dead_letters) == (3, NOW, 1)
    assert queue.depth == 3
    assert (await queue.notes())["relay"] == {"state": "open", "since": NOW}
    assert [letter["message_id"] for letter in await queue.dead_letters()] == ["c-1"]
    # a-1 and b-1 were in flight in the process before: they go again, long before an hour.
    assert await claim(queue) == ["a-1", "b-1"]
    assert await queue.put([rec("a", 1)]) == 1  # and the dedupe window is kept too


async def test_reopening_counts_the_events_it_found_in_flight(store: Store) -> None:
    queue = await store.open()
    await queue.put([rec("a", n) for n in range(4)] + [rec("b", 1)])
    await queue.claim(5, now=NOW, lease=3600, depth=3)
    queue = await store.reopen(queue)
    assert queue.interrupted == 4  # a-0, a-1, a-2, b-1 (the app says so at start)
    # Those leases are void, not only the heads': a-1 goes right after a-0.
    a0, b1 = await queue.claim(5, now=NOW, lease=60)
    assert ids([a0, b1]) == ["a-0", "b-1"]
    await queue.ack(a0.id)
    assert await claim(queue) == ["a-1"]


async def test_a_claim_is_leased_by_the_callers_clock_while_the_queue_keeps_time(
    make_queue: MakeQueue,
) -> None:
    # The relay's `now` is the queue's only clock for leases and backoff: a Redis queue that
    # renews its partitions meanwhile (every lease/3 of real time) must not judge a claim's
    # lease by its own clock.
    queue = await make_queue(partition_lease=0.3)
    await queue.put([rec("a", 1), rec("a", 2), rec("b", 1)])
    a, b = await queue.claim(5, now=NOW, lease=60)
    await asyncio.sleep(0.5)  # renewals of the partitions go on meanwhile
    await queue.ack(a.id)
    await queue.retry(b.id, available_at=NOW + 30, error="503")
    assert (await queue.stats()).depth == 2
    [again] = await queue.claim(5, now=NOW + 1, lease=60)
    assert (again.record["message_id"], again.attempts) == ("a-2", 0)


async def test_a_closed_queue_refuses_a_put(store: Store) -> None:
    queue = await store.open()
    await store.close(queue)
    with pytest.raises(QueueUnavailable):
        await queue.put([rec("a", 1)])


# Dedupe.


async def test_a_resent_message_id_is_stored_once_within_the_window(
    queue: ContractQueue,
) -> None:
    assert await queue.put([rec("a", 1), rec("a", 2)]) == 0
    assert await queue.put([rec("a", 2), rec("a", 3)]) == 1
    assert await queue.put([rec("a", 4), rec("a", 4)]) == 1  # twice in one put: the first
    [head] = await queue.claim(5, now=NOW, lease=60)
    await queue.ack(head.id)
    # Delivered and gone from the queue, but remembered within the window.
    assert await queue.put([rec("a", 1)]) == 1
    assert (await queue.stats()).depth == 3
    assert await claim(queue, depth=5) == ["a-2", "a-3", "a-4"]


async def test_dedupe_goes_by_the_dedupe_key_when_there_is_one(queue: ContractQueue) -> None:
    first = rec("a", 1, dedupe_key="client/1")
    assert await queue.put([first]) == 0
    # Another sender's event with the same message id is not a resend of it...
    assert await queue.put([rec("a", 1, dedupe_key="other/1")]) == 0
    # ...while the same key under another message id is.
    assert await queue.put([rec("a", 9, dedupe_key="client/1")]) == 1
    assert (await queue.stats()).depth == 2


async def test_dedupe_forgets_a_message_id_after_its_window(make_queue: MakeQueue) -> None:
    # The window by the clock: Redis's keys expire by the server's, SQLite forgets by the
    # records' received_at (pruning as later events come in).
    queue = await make_queue(dedupe_window=0.5)
    assert await queue.put([rec("a", 1, received_at=time.time())]) == 0
    assert await queue.put([rec("a", 1, received_at=time.time())]) == 1
    await asyncio.sleep(0.8)
    assert await queue.put([rec("b", 1, received_at=time.time())]) == 0
    assert await queue.put([rec("a", 1, received_at=time.time())]) == 0
    assert (await queue.stats()).depth == 3


async def test_dedupe_can_be_turned_off(make_queue: MakeQueue) -> None:
    queue = await make_queue(dedupe_window=0)
    assert await queue.put([rec("a", 1), rec("a", 1)]) == 0
    assert await queue.put([rec("a", 1)]) == 0
    assert (await queue.stats()).depth == 3


# Limits: a put that does not fit is refused whole, naming the limit.


async def refused(queue: ContractQueue, records: list[dict[str, Any]]) -> str:
    """The limit that refuses this put (it must be refused), with nothing of it stored."""
    depth = (await queue.stats()).depth
    with pytest.raises(QueueFull) as full:
        await queue.put(records)
    assert (await queue.stats()).depth == queue.depth == depth
    return full.value.limit


async def test_max_events_refuses_a_put_whole_and_an_ack_makes_room(
    make_queue: MakeQueue,
) -> None:
    queue = await make_queue(max_events=3)
    await queue.put([rec("a", 1), rec("b", 1)])
    assert await refused(queue, [rec("c", 1), rec("d", 1)]) == "queue_max_events"
    [first, _] = await queue.claim(5, now=NOW, lease=60)
    await queue.ack(first.id)
    await queue.put([rec("c", 1), rec("d", 1)])
    assert (queue.depth, (await queue.stats()).depth) == (3, 3)
    assert await claim(queue) == ["c-1", "d-1"]  # b-1 is still leased


async def test_max_bytes_refuses_a_put_that_would_go_over(make_queue: MakeQueue) -> None:
    queue = await make_queue(max_bytes=100_000)
    await queue.put([rec("a", 1), rec("b", 1)])
    assert await refused(queue, [rec("e", 1, blob="x" * 100_000)]) == "queue_max_bytes"
    await queue.put([rec("c", 1)])
    assert (await queue.stats()).depth == 3


LIMITED: dict[str, Any] = {
    "max_events": 20,
    "share_per_ip": 0.25,
    "browser_share": 0.75,
}  # 5 an IP, 15 browsers


async def test_a_browser_client_gets_its_share_and_others_are_not_affected(
    make_queue: MakeQueue,
) -> None:
    queue = await make_queue(**LIMITED)
    assert await refused(queue, [browser("198.51.100.7", n) for n in range(6)]) == (
        "queue_share_per_ip"
    )
    await queue.put([browser("198.51.100.7", n) for n in range(5)])
    assert await refused(queue, [browser("198.51.100.7", 5)]) == "queue_share_per_ip"
    await queue.put([browser("203.0.113.9", 0)])  # another browser
    await queue.put([rec("server", n) for n in range(3)])  # a server token's events
    assert queue.depth == 9


async def test_an_ipv6_client_is_its_prefix(make_queue: MakeQueue) -> None:
    queue = await make_queue(**LIMITED, ipv6_prefix=64)
    await queue.put([browser(f"2001:db8:1:2::{n}", n) for n in range(1, 6)])
    assert await refused(queue, [browser("2001:db8:1:2:ffff::1", 9)]) == "queue_share_per_ip"
    await queue.put([browser("2001:db8:1:3::1", 9)])  # another /64


async def test_browsers_leave_a_reserve_for_server_tokens(make_queue: MakeQueue) -> None:
    queue = await make_queue(**LIMITED)
    for client in range(3):  # three browsers of 5 events each: the browsers' 15
        await queue.put([browser(f"192.0.{client}.1", client * 10 + n) for n in range(5)])
    assert await refused(queue, [browser("203.0.113.9", 99)]) == "queue_browser_share"
    await queue.put([rec("server", n) for n in range(5)])  # the rest is the back-ends'
    assert await refused(queue, [rec("server", 5)]) == "queue_max_events"


async def test_shares_are_freed_by_acks_and_counted_again_at_reopening(store: Store) -> None:
    queue = await store.open(**LIMITED)
    await queue.put([browser("198.51.100.7", n) for n in range(5)])
    queue = await store.reopen(queue, **LIMITED)
    assert await refused(queue, [browser("198.51.100.7", 5)]) == "queue_share_per_ip"
    claimed = await queue.claim(5, now=NOW, lease=60)
    assert len(claimed) == 5
    await queue.ack(claimed[0].id)
    await queue.dead_letter(claimed[1].id, reason="400", status=400, response="", now=NOW)
    await queue.put([browser("198.51.100.7", n) for n in (5, 6)])
    assert await refused(queue, [browser("198.51.100.7", 7)]) == "queue_share_per_ip"


# Stats, notes, probe.


async def test_stats_say_depth_the_oldest_in_line_and_dead_letters(queue: ContractQueue) -> None:
    assert (await queue.stats()).depth == 0
    assert (await queue.stats()).oldest_received_at is None
    await queue.put([rec("a", 1, received_at=NOW + 1), rec("b", 1, received_at=NOW + 2)])
    await queue.put([rec("c", 1, received_at=NOW + 3)])
    stats = await queue.stats()
    assert (stats.depth, stats.oldest_received_at, stats.dead_letters) == (3, NOW + 1, 0)
    assert queue.depth == 3
    a, b, c = await queue.claim(5, now=NOW + 3, lease=60)
    await queue.ack(a.id)
    await queue.dead_letter(b.id, reason="400", status=400, response="", now=NOW)
    stats = await queue.stats()
    assert (stats.depth, stats.oldest_received_at, stats.dead_letters) == (1, NOW + 3, 1)
    await queue.ack(c.id)
    stats = await queue.stats()
    assert (stats.depth, stats.oldest_received_at, stats.dead_letters) == (0, None, 1)
    assert queue.depth == 0


async def test_notes_keep_small_facts(queue: ContractQueue) -> None:
    await queue.note("relay", {"state": "closed"})
    await queue.note("count", 3)
    await queue.note("relay", {"state": "open"})  # the last one counts
    notes = await queue.notes()
    assert (notes["relay"], notes["count"]) == ({"state": "open"}, 3)


async def test_a_probe_writes_and_leaves_nothing(queue: ContractQueue) -> None:
    await queue.put([rec("a", 1)])
    assert queue.healthy
    assert await queue.probe(time.time()) is True
    assert await queue.probe(time.time()) is True
    assert (await queue.stats()).depth == 1
    assert "probe" not in await queue.notes()
    assert await claim(queue) == ["a-1"]


# Dead letters and the `dead-letters` command.


async def four_dead_letters(queue: ContractQueue) -> None:
    """a-1 (400), b-1 (422), c-1 (no status, still failing) and d-2 (400), in that order;
    a-2 and b-2 wait in the queue."""
    await queue.put([rec("a", 1), rec("b", 1), rec("c", 1), rec("d", 2), rec("a", 2), rec("b", 2)])
    a, b, c, d = await queue.claim(5, now=NOW, lease=60)
    await queue.dead_letter(
        a.id, reason="Outbound answered 400", status=400, response="no", now=NOW
    )
    await queue.dead_letter(
        b.id, reason="Outbound answered 422", status=422, response='{"e":1}', now=NOW + 1
    )
    await queue.retry(c.id, available_at=NOW + 5, error="503")
    for item in await queue.claim(5, now=NOW + 5, lease=60):
        if item.record["message_id"] == "c-1":
            c = item  # its second attempt
        else:
            await queue.release(item.id)  # a-2, b-2: due since their lines' heads went
    await queue.dead_letter(
        c.id, reason="still failing after 2 attempts", status=None, response="", now=NOW + 6
    )
    await queue.dead_letter(d.id, reason="Outbound answered 400", status=400, response="", now=NOW)


def letter_ids(letters: list[dict[str, Any]]) -> list[str]:
    return [letter["message_id"] for letter in letters]


async def test_a_dead_letter_keeps_the_event_its_reason_and_the_answer(
    queue: ContractQueue,
) -> None:
    await four_dead_letters(queue)
    letters = await queue.dead_letters()
    assert letter_ids(letters) == ["a-1", "b-1", "c-1", "d-2"]
    first, second, third, _ = letters
    assert set(first) == {
        "id",
        "message_id",
        "reason",
        "status",
        "response",
        "attempts",
        "failed_at",
        "record",
    }
    assert (first["reason"], first["status"], first["response"], first["attempts"]) == (
        "Outbound answered 400",
        400,
        "no",
        1,
    )
    assert (first["record"], first["failed_at"]) == (rec("a", 1), NOW)
    assert (second["status"], second["response"], second["failed_at"]) == (422, '{"e":1}', NOW + 1)
    assert (third["status"], third["attempts"]) == (None, 2)
    assert len({letter["id"] for letter in letters}) == 4
    assert await queue.dead_letters(limit=2) == letters[:2]
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters) == (2, 4)
    assert await claim(queue) == ["a-2", "b-2"]  # the lines went on


async def test_dead_letters_are_chosen_by_every_criterion_given(queue: ContractQueue) -> None:
    await four_dead_letters(queue)
    letters = await queue.dead_letters()
    by_id = {letter["message_id"]: letter["id"] for letter in letters}

    async def chosen(**criteria: Any) -> list[str]:
        return letter_ids(await queue.dead_letters(DeadLetterFilter(**criteria)))

    assert await chosen() == ["a-1", "b-1", "c-1", "d-2"]
    assert await chosen(ids=(by_id["b-1"], by_id["d-2"])) == ["b-1", "d-2"]
    assert await chosen(reason="400") == ["a-1", "d-2"]  # a part of the reason
    assert await chosen(reason="still failing") == ["c-1"]
    assert await chosen(status=422) == ["b-1"]
    assert await chosen(event="e1") == ["a-1", "b-1", "c-1"]
    assert await chosen(event="e1", status=400) == ["a-1"]
    assert await chosen(ids=(by_id["a-1"],), status=422) == []
    assert await queue.dead_letter_reasons() == [
        ("Outbound answered 400", 2),
        ("Outbound answered 422", 1),
        ("still failing after 2 attempts", 1),
    ]


async def test_a_replay_puts_letters_back_at_the_end_of_their_lines(
    queue: ContractQueue,
) -> None:
    await four_dead_letters(queue)
    done: list[int] = []
    # In chunks of one: progress says how many are done after each.
    assert (
        await queue.replay_dead_letters(
            DeadLetterFilter(reason="Outbound"), chunk=1, progress=done.append
        )
        == 3
    )
    assert done == [1, 2, 3]
    assert letter_ids(await queue.dead_letters()) == ["c-1"]
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters, queue.depth) == (5, 1, 5)
    # Back behind what waits (with their message ids: the dedupe window does not stop them),
    # with their attempts counted anew.
    claimed = await queue.claim(10, now=NOW, lease=60, depth=5)
    lines: dict[str, list[str]] = {}
    for item in claimed:
        lines.setdefault(item.record["user_id"], []).append(item.record["message_id"])
        assert item.attempts == 0
        assert item.record == rec(item.record["user_id"], int(item.record["message_id"][2:]))
    assert lines == {"a": ["a-2", "a-1"], "b": ["b-2", "b-1"], "d": ["d-2"]}


async def test_a_purge_deletes_letters_for_good(queue: ContractQueue) -> None:
    await four_dead_letters(queue)
    assert await queue.purge_dead_letters(DeadLetterFilter(status=400)) == 2
    assert letter_ids(await queue.dead_letters()) == ["b-1", "c-1"]
    done: list[int] = []
    assert await queue.purge_dead_letters(DeadLetterFilter(), chunk=1, progress=done.append) == 2
    assert done == [1, 2]
    stats = await queue.stats()
    assert (stats.depth, stats.dead_letters) == (2, 0)
    assert await queue.replay_dead_letters(DeadLetterFilter()) == 0


async def test_the_serving_queue_counts_what_a_tool_replayed_and_purged(store: Store) -> None:
    serving = await store.open()
    await four_dead_letters(serving)
    tool = await store.open(owner=False)  # what the `dead-letters` command opens
    assert (await tool.stats()).dead_letters == 4
    assert await tool.replay_dead_letters(DeadLetterFilter(status=422)) == 1
    assert await tool.purge_dead_letters(DeadLetterFilter(status=400)) == 2
    await store.close(tool)
    stats = await serving.stats()
    assert (stats.depth, stats.dead_letters) == (3, 1)
    assert serving.depth == 3
    assert await claim(serving, depth=5) == ["a-2", "b-2", "b-1"]


async def test_a_tool_takes_no_events(store: Store) -> None:
    serving = await store.open()
    await serving.put([rec("a", 1)])
    tool = await store.open(owner=False)
    assert (await tool.stats()).depth == 1
    await store.close(tool)
    assert await claim(serving) == ["a-1"]


async def dead_letter_all(queue: ContractQueue, count: int, now: float) -> None:
    await queue.put([rec(f"u{now}-{n}", n, received_at=now) for n in range(count)])
    for claimed in await queue.claim(count, now=now, lease=60):
        await queue.dead_letter(claimed.id, reason="400", status=400, response="", now=now)


async def test_dead_letters_have_a_cap_and_a_retention(make_queue: MakeQueue) -> None:
    dropped: list[int] = []
    now = time.time()  # stats apply the retention by the clock too
    queue = await make_queue(dead_letters_max=5, dead_letter_days=1, on_dropped=dropped.append)
    await dead_letter_all(queue, 8, now)
    assert (await queue.stats()).dead_letters == 5
    kept = letter_ids(await queue.dead_letters())
    assert kept == [f"u{now}-{n}-{n}" for n in range(3, 8)]  # the oldest went
    assert sum(dropped) == 3
    later = now + 86400 + 120  # a day and more on: those 5 are past their retention
    await dead_letter_all(queue, 2, later)
    assert (await queue.stats()).dead_letters == 2
    assert letter_ids(await queue.dead_letters()) == [f"u{later}-{n}-{n}" for n in range(2)]
    assert sum(dropped) == 8


# Cost: a claim reads `limit` lines, not the backlog.


async def filled(store: Store, name: str, lines: dict[str, int]) -> ContractQueue:
    """A queue named `name` holding, for each user, that many events (users in turn)."""
    queue = await store.open(name, dedupe_window=0)
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


async def test_a_claim_costs_the_same_with_a_hundred_times_the_backlog(store: Store) -> None:
    users = ("a", "b", "c", "d", "e")
    small = await filled(store, "small", dict.fromkeys(users, 20))
    large = await filled(store, "large", dict.fromkeys(users, 2000))
    # Fewer due lines than the limit: where a scan for more would read everything.
    small_claimed, small_cost = await store.cost(small, small.claim(16, now=NOW, lease=60))
    large_claimed, large_cost = await store.cost(large, large.claim(16, now=NOW, lease=60))
    assert ids(small_claimed) == ids(large_claimed) == [f"{u}-0" for u in users]
    assert large_cost <= small_cost * 1.2, (small_cost, large_cost)
    # Leased lines are not read again either: nothing is due.
    assert (await store.cost(large, large.claim(16, now=NOW, lease=60)))[1] <= small_cost


async def test_a_user_in_backoff_costs_the_others_nothing(store: Store) -> None:
    light = {f"light{i}": 1 for i in range(10)}
    alone = await filled(store, "alone", light)
    beside = await filled(store, "beside", {"heavy": 5000, **light})
    [head] = await beside.claim(1, now=NOW, lease=60)
    assert head.record["message_id"] == "heavy-0"
    await beside.retry(head.id, available_at=NOW + 3600, error="Outbound answered 503")
    alone_claimed, alone_cost = await store.cost(alone, alone.claim(16, now=NOW + 1, lease=60))
    beside_claimed, beside_cost = await store.cost(beside, beside.claim(16, now=NOW + 1, lease=60))
    assert ids(beside_claimed) == ids(alone_claimed) == [f"light{i}-0" for i in range(10)]
    assert beside_cost <= alone_cost * 1.2, (alone_cost, beside_cost)
    for item in beside_claimed:
        await beside.ack(item.id)
    # Its time come, the heavy user's head goes again, and its line after it.
    [again] = await beside.claim(16, now=NOW + 3600, lease=60)
    assert (again.record["message_id"], again.attempts) == ("heavy-0", 1)
    await beside.ack(again.id)
    assert await claim(beside, NOW + 3600) == ["heavy-1"]


async def test_outcomes_cost_the_same_with_a_hundred_times_the_backlog(store: Store) -> None:
    costs: list[list[int]] = []
    for name, count in (("small", 20), ("large", 2000)):
        queue = await filled(store, name, dict.fromkeys("abcde", count))
        _, put = await store.cost(queue, queue.put([rec(u, 10**6) for u in "abcdefgh"]))
        first, second, *_ = await queue.claim(16, now=NOW, lease=60)
        _, ack = await store.cost(queue, queue.ack(first.id))
        retry = queue.retry(second.id, available_at=NOW + 60, error="503")
        _, retried = await store.cost(queue, retry)
        _, reset = await store.cost(queue, queue.reset_backoff(NOW))
        costs.append([put, ack, retried, reset])
    small, large = costs
    assert all(big <= few * 1.2 for few, big in zip(small, large, strict=True)), costs


# The store itself (the queues' tests stand on it).


def test_a_killed_redis_server_comes_back_with_what_its_log_had(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always", password="pw-0123").start()
    try:
        with server.client() as client:
            client.set("kept", "yes")
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("save") == {"save": ""}
        port = server.port
        server.restart()  # SIGKILL: no shutdown to write anything more
        assert server.port == port
        with server.client() as client:
            assert client.get("kept") == b"yes"
        with (
            redis.Redis(host="127.0.0.1", port=server.port) as stranger,
            pytest.raises(redis.AuthenticationError),
        ):
            stranger.ping()  # requirepass holds
    finally:
        server.kill()
