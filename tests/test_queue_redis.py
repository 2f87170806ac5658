"""The Redis queue's own behaviour, on a real redis-server: several collectors on one Redis
(shared dedupe and limits, partitions under leases, takeover, fencing), Redis going away and
coming back, a command cancelled mid-reply, and what Redis's configuration cannot promise.
What every queue does is the contract suite's (test_queue_contract.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound
from redis_server import RedisServer

from collector import cli
from collector.config import Secret, Settings, SettingsError, load_settings
from collector.identity import identify_guid, ids_key
from collector.keys import IDS_KEY, QUEUE
from collector.queue import QueueFull, QueueRefused, QueueUnavailable, RedisQueue, open_queue
from collector.queue.redis_streams import partition_of

PASSWORD = "s3cret-redis-password-42"
LEASE = 1.0  # seconds a partition stays with a collector that stopped renewing it


def record(n: int, user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": f"e{n}",
        "user_id": user,
        "message_id": f"m{n}",
        "received_at": time.time(),
        **extra,
    }


def browser_record(n: int, ip: str) -> dict[str, Any]:
    """A record as ingest stores a browser's: with a dedupe_key and its client's IP."""
    return record(n, user=f"b{n}", ip=ip, dedupe_key=f"browser:{n}")


QueueFactory = Callable[..., Any]


@pytest.fixture
async def queues(redis_server: RedisServer) -> AsyncIterator[QueueFactory]:
    """Open RedisQueues ("collectors") on the test's Redis; each is closed after."""
    opened: list[RedisQueue] = []

    async def make(**options: Any) -> RedisQueue:
        options.setdefault("lease", LEASE)
        queue = RedisQueue(options.pop("url", redis_server.url), **options)
        await queue.open()
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        with contextlib.suppress(Exception):
            await queue.close()


async def test_two_collectors_share_the_dedupe_window(queues: QueueFactory) -> None:
    one, two = await queues(), await queues()
    assert await one.put([record(1), record(2)]) == 0
    assert await two.put([record(2), record(3)]) == 1  # m2 came through the other collector
    assert (await two.stats()).depth == 3


async def test_two_collectors_share_the_limits(queues: QueueFactory) -> None:
    one = await queues(max_events=4, share_per_ip=0.5, browser_share=1.0)
    two = await queues(max_events=4, share_per_ip=0.5, browser_share=1.0)
    await one.put([browser_record(1, "203.0.113.7")])
    await two.put([browser_record(2, "203.0.113.7")])
    with pytest.raises(QueueFull) as refused:  # its third would be over half of 4
        await one.put([browser_record(3, "203.0.113.7")])
    assert refused.value.limit == "queue_share_per_ip"
    await two.put([record(4), browser_record(5, "198.51.100.1")])
    with pytest.raises(QueueFull) as full:
        await one.put([record(6)])
    assert full.value.limit == "queue_max_events"
    assert (await one.stats()).depth == 4  # nothing of the refused puts was stored


async def held_apart(one: RedisQueue, two: RedisQueue, partitions: int) -> bool:
    return len(one.held) == len(two.held) == partitions // 2 and not set(one.held) & set(two.held)


async def test_each_partition_is_relayed_by_one_collector(queues: QueueFactory) -> None:
    one = await queues(partitions=8)
    assert len(one.held) == 8  # alone, it takes them all
    two = await queues(partitions=8)
    # The first lets go of its extras once the second shows up: four each, never shared.
    await eventually(lambda: held_apart(one, two, 8), within=5 * LEASE)
    users = [f"user{i}" for i in range(40)]
    await one.put([record(i, user) for i, user in enumerate(users)])
    now = time.time()
    first = await one.claim(100, now=now, lease=60, depth=5)
    second = await two.claim(100, now=now, lease=60, depth=5)
    claimed_one = {item.record["user_id"] for item in first}
    claimed_two = {item.record["user_id"] for item in second}
    assert claimed_one | claimed_two == set(users)
    assert not claimed_one & claimed_two
    assert {partition_of(user, 8) for user in claimed_one} <= set(one.held)
    assert {partition_of(user, 8) for user in claimed_two} <= set(two.held)


async def stall(queue: RedisQueue) -> None:
    """Stop renewing the queue's leases without letting go of them: a process that hangs
    (or whose machine went away) rather than one that closes."""
    tender = queue._tender
    assert tender is not None
    tender.cancel()
    await asyncio.gather(tender, return_exceptions=True)


async def taken_over(one: RedisQueue, queues: QueueFactory, *, partitions: int) -> RedisQueue:
    """A second collector that takes every partition over from `one`, stalled."""
    await stall(one)
    two: RedisQueue = await queues(partitions=partitions)
    await eventually(lambda: len(two.held) == partitions, within=3 * LEASE)
    return two


async def test_takeover_after_the_lease_and_fencing_of_the_old_owner(
    queues: QueueFactory,
) -> None:
    one = await queues(partitions=4)
    await one.put([record(1, "alice"), record(2, "alice")])
    (taken,) = await one.claim(10, now=time.time(), lease=60)
    assert taken.record["message_id"] == "m1"
    await stall(one)
    two = await queues(partitions=4)
    assert two.held == {}  # the leases are still the first one's
    started = time.monotonic()
    await eventually(lambda: len(two.held) == 4, within=3 * LEASE)
    assert time.monotonic() - started < 2 * LEASE
    # The first still lists the partitions as its own, but Redis says they are not.
    assert await one.claim(10, now=time.time(), lease=60) == []
    # What the first had in flight goes again at once (its claim's 60 s lease is void).
    (again,) = await two.claim(10, now=time.time(), lease=60)
    assert again.record == taken.record
    assert two.interrupted == 1
    # The first comes back and acks its old claim: fenced, nothing changes.
    await one.ack(taken.id)
    assert one.fenced == 1
    assert (await two.stats()).depth == 2
    await two.ack(again.id)
    (second,) = await two.claim(10, now=time.time(), lease=60)
    assert second.record["message_id"] == "m2"
    assert (await two.stats()).depth == 1


async def test_a_line_taken_over_goes_again_as_the_same_batch(queues: QueueFactory) -> None:
    one = await queues(partitions=2)
    await one.put([record(n, "alice") for n in range(3)])
    batch = await one.claim(10, now=time.time(), lease=60, depth=100)
    assert [item.record["message_id"] for item in batch] == ["m0", "m1", "m2"]
    await one.put([record(n, "alice") for n in range(3, 5)])  # arrive while it is sent
    two = await taken_over(one, queues, partitions=2)
    # The same events, not the line as deep as it is now: the same X-Outbound-GUID.
    again = await two.claim(10, now=time.time(), lease=60, depth=100)
    assert [item.record for item in again] == [item.record for item in batch]
    await two.ack_all([(item.id, False) for item in again])
    rest = await two.claim(10, now=time.time(), lease=60, depth=100)
    assert [item.record["message_id"] for item in rest] == ["m3", "m4"]


async def test_a_line_taken_over_goes_again_as_far_as_its_last_event_still_leased(
    queues: QueueFactory,
) -> None:
    one = await queues(partitions=1)
    await one.put([record(n, "alice") for n in range(3)])
    now = time.time()
    batch = await one.claim(10, now=now, lease=60, depth=3)
    # The last event's outcome was stored before the owner died: it is not in flight.
    await one.release(batch[2].id)
    two = await taken_over(one, queues, partitions=1)
    again = await two.claim(10, now=now, lease=60, depth=3)
    assert [item.record["message_id"] for item in again] == ["m0", "m1"]


async def test_a_shorter_claim_after_leases_ran_out_keeps_the_longer_in_flight(
    queues: QueueFactory,
) -> None:
    one = await queues(partitions=1)
    await one.put([record(n, "alice") for n in range(3)])
    now = time.time()
    await one.claim(10, now=now, lease=1, depth=3)
    # Its leases ran out unsettled; a claim one deep takes the head again.
    assert len(await one.claim(10, now=now + 2, lease=60, depth=1)) == 1
    two = await taken_over(one, queues, partitions=1)
    again = await two.claim(10, now=now + 2, lease=60, depth=3)
    assert [item.record["message_id"] for item in again] == ["m0", "m1", "m2"]
    assert two.interrupted == 3


async def test_user_keys_that_look_like_the_queues_own_keys_stay_apart(
    queues: QueueFactory,
) -> None:
    """Key names are built from user keys (`prefix:line:<user>`), which a page chooses: a
    user named like another user's line or like the queue's own keys has a line of its own,
    in its own order, and leaves the queue's keys alone."""
    queue = await queues(partitions=4)
    users = ["alice", "alice:x", "line:alice", ":line:alice", "p:0", "p:0:heads", "seq", "ids"]
    # Each user's events interleaved with the others', three rounds deep.
    await queue.put([record(10 * n + i, user) for n in range(3) for i, user in enumerate(users)])
    delivered: dict[str, list[str]] = {}
    while claimed := await queue.claim(100, now=time.time(), lease=60, depth=2):
        for item in claimed:
            delivered.setdefault(item.record["user_id"], []).append(item.record["message_id"])
        await queue.ack_all([(item.id, False) for item in claimed])
    assert delivered == {user: [f"m{10 * n + i}" for n in range(3)] for i, user in enumerate(users)}
    assert (await queue.stats()).depth == 0
    # The sequence and the shared dedupe window still work after a user named "seq".
    assert await queue.put([record(99, "seq"), record(10, "alice")]) == 1


async def test_outcomes_redis_missed_are_stored_when_it_is_back(
    queues: QueueFactory, fsynced_redis: RedisServer
) -> None:
    redis_server = fsynced_redis
    queue = await queues(url=redis_server.url, partitions=2)
    await queue.put([record(1), record(2)])
    first, second = await queue.claim(10, now=time.time(), lease=60, depth=2)
    redis_server.kill()
    with pytest.raises(QueueUnavailable):
        await queue.ack(first.id)
    redis_server.start()
    # Without another call: the lease task stores the ack (not a minute's lease later).
    assert queue.depth == 2
    await eventually(lambda: queue.depth == 1, within=5 * LEASE)
    await queue.ack(second.id)
    assert (await queue.stats()).depth == 0


async def test_the_partition_count_recorded_first_wins(queues: QueueFactory) -> None:
    first = await queues(partitions=4)
    assert (first.partitions, first.warnings) == (4, [])
    later = await queues(partitions=8)  # a collector configured otherwise, later
    assert later.partitions == 4
    (warning,) = later.warnings
    assert "redis_partitions is 8 but the queue" in warning
    assert "made with 4 partitions, which it keeps" in warning


async def test_close_lets_go_of_the_partitions_at_once(queues: QueueFactory) -> None:
    one = await queues(partitions=4, lease=30.0)
    assert len(one.held) == 4
    await one.close()
    two = await queues(partitions=4, lease=30.0)  # no waiting out a 30 s lease
    assert len(two.held) == 4


@pytest.fixture
def fsynced_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with appendfsync always: what it acknowledged survives a SIGKILL
    (with everysec, Redis may answer before its AOF has the write)."""
    server = RedisServer(tmp_path / "fsynced", appendfsync="always").start()
    yield server
    server.kill()


async def test_redis_restarted_puts_fail_then_work_again_by_themselves(
    queues: QueueFactory, fsynced_redis: RedisServer
) -> None:
    redis_server = fsynced_redis
    queue = await queues(url=redis_server.url)
    await queue.put([record(1)])
    redis_server.kill()
    with pytest.raises(QueueUnavailable):
        await queue.put([record(2)])
    assert not queue.healthy
    assert not await queue.probe(time.time())
    redis_server.start()
    assert await queue.probe(time.time())  # the same queue, no reopening
    assert await queue.put([record(3)]) == 0
    assert (await queue.stats()).depth == 2  # m1 was in the AOF


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 in front of Redis that holds Redis's answers back for
    `delay` seconds: a command can then be cancelled after it was sent, before its reply."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )

        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, delayed: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if delayed and self.delay:
                        await asyncio.sleep(self.delay)
                    sink.write(data)
                    await sink.drain()
            sink.close()

        for task in (
            asyncio.create_task(pipe(reader, upstream_writer, False)),
            asyncio.create_task(pipe(upstream_reader, writer, True)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_a_put_cancelled_mid_reply_leaves_no_connection_out_of_step(
    queues: QueueFactory, redis_server: RedisServer
) -> None:
    proxy = DelayingProxy(redis_server.port)
    port = await proxy.start()
    try:
        # A long lease: the delayed answers must not cost this collector its partitions.
        queue = await queues(url=f"redis://127.0.0.1:{port}/0", lease=30.0)
        assert await queue.put([record(0)]) == 0  # Redis has the script: one command a put
        proxy.delay = 0.5
        with pytest.raises(TimeoutError):
            # Redis runs the put; its answer is still on the way when the put is cancelled.
            await asyncio.wait_for(queue.put([record(1)]), 0.1)
        # The next command's answer is its own: m1 is a duplicate, since the cancelled put
        # was stored. A connection left out of step would hand it the first put's answer (0).
        assert await queue.put([record(1), record(2)]) == 1
        assert (await queue.stats()).depth == 3
    finally:
        await proxy.close()


async def test_open_warns_when_redis_cannot_keep_durability(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({"appendonly": False}, "normal", "appendonly no: acknowledged events can be lost"),
        ({"appendfsync": "everysec"}, "full", "appendfsync everysec but durability is full"),
        ({"appendfsync": "always"}, "full", None),
        ({"appendfsync": "everysec"}, "normal", None),
    ]
    for index, (options, durability, warning) in enumerate(cases):
        server = RedisServer(tmp_path / f"redis{index}", **options).start()
        try:
            queue = RedisQueue(server.url, durability=durability, owner=False)
            await queue.open()
            await queue.close()
        finally:
            server.kill()
        if warning is None:
            assert queue.warnings == [], (options, durability)
        else:
            (said,) = queue.warnings
            assert warning in said


async def test_open_says_when_config_cannot_be_read(redis_server: RedisServer) -> None:
    with redis_server.client() as client:
        client.execute_command(
            "ACL", "SETUSER", "relay", "on", ">relay-password-1", "~*", "+@all", "-config"
        )
    url = f"redis://relay:relay-password-1@127.0.0.1:{redis_server.port}/0"
    queue = RedisQueue(url, durability="full", owner=False)
    await queue.open()
    await queue.close()
    (said,) = queue.warnings
    assert "could not check" in said
    assert "appendfsync always" in said
    assert "relay-password-1" not in said


def test_check_prints_the_warning_and_never_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis", password=PASSWORD, appendonly=False).start()
    try:
        monkeypatch.setenv("COLLECTOR_QUEUE_URL", server.url)
        code = cli.main(["check", "--port", "0", "--data-dir", str(tmp_path / "data")])
    finally:
        server.kill()
    out, err = capsys.readouterr()
    assert code == 0
    assert "appendonly no: acknowledged events can be lost when Redis restarts" in err
    assert f"redis://********@127.0.0.1:{server.port}/0" in out
    assert PASSWORD not in out + err


def test_check_fails_with_one_line_when_redis_is_unreachable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    server.kill()  # its port is now closed
    monkeypatch.setenv("COLLECTOR_QUEUE_URL", server.url)
    code = cli.main(["check", "--port", "0", "--data-dir", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert code == 2
    assert "cannot use Redis" in err
    assert f"127.0.0.1:{server.port}" in err
    assert PASSWORD not in out + err


def test_queue_url_is_checked_and_never_shown(tmp_path: Path) -> None:
    url = f"redis://collector:{PASSWORD}@127.0.0.1:6390/2"
    settings = load_settings(environ={"COLLECTOR_QUEUE_URL": url})
    assert settings.queue_url == Secret(url)
    assert settings.redacted()["queue_url"] == "redis://********@127.0.0.1:6390/2"
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in repr(RedisQueue(url))
    assert load_settings(environ={}).queue_url is None  # SQLite in data_dir
    for bad in (
        f"http://:{PASSWORD}@127.0.0.1:6379/0",
        "unix:///run/redis.sock",
        f"redis://:{PASSWORD}@127.0.0.1:6379/zero",
        f"redis://:{PASSWORD}@:6379/0",
    ):
        with pytest.raises(SettingsError) as error:
            load_settings(environ={"COLLECTOR_QUEUE_URL": bad})
        assert error.value.setting == "COLLECTOR_QUEUE_URL"
        assert PASSWORD not in str(error.value)


async def test_a_queue_that_cannot_reach_redis_is_refused_without_the_password(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", password="the-right-password-1").start()
    try:
        wrong = server.url.replace("the-right-password-1", PASSWORD)
        settings = Settings(data_dir=tmp_path / "data", queue_url=Secret(wrong))
        with pytest.raises(QueueRefused) as denied:
            await open_queue(settings)
        assert "invalid username-password pair" in str(denied.value)
        assert PASSWORD not in str(denied.value)
    finally:
        server.kill()
    with pytest.raises(QueueRefused) as refused:  # nothing listens there now
        await open_queue(settings)
    assert f"127.0.0.1:{server.port}" in str(refused.value)
    assert PASSWORD not in str(refused.value)


async def test_collector_on_redis_answers_503_while_redis_is_down_and_recovers(
    start_collector: StartCollector, fake: FakeOutbound, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        collector: Collector = await start_collector(queue_url=Secret(server.url))
        assert isinstance(collector.app and collector.app[QUEUE], RedisQueue)
        event = {"event": "signup", "user_id": "u1"}
        status, _, _ = await collector.post("/e", event)
        assert status == 202
        await fake.wait_for(2)  # the identify, then the track
        status, ready, _ = await collector.get("/readyz")
        assert (status, ready["status"]) == (200, "ready")

        server.kill()
        status, _, response = await collector.post("/e", {**event, "event": "second"})
        assert status == 503
        assert "Retry-After" in response.headers
        status, ready, _ = await collector.get("/readyz")
        assert status == 503
        assert any(f"127.0.0.1:{server.port}" in problem for problem in ready["problems"])
        assert PASSWORD not in str(ready)

        server.start()
        status, _, _ = await collector.post("/e", {**event, "event": "third"})
        assert status == 202
        await eventually(lambda: [r.body["event"] for r in fake.tracks()][-1:] == ["third"])
        status, ready, _ = await collector.get("/readyz")
        assert (status, ready["status"]) == (200, "ready")
    finally:
        server.kill()


async def test_two_collectors_on_one_redis_deliver_every_event_once_in_order(
    redis_server: RedisServer, start_collector: StartCollector, fake: FakeOutbound
) -> None:
    # redis_server first: it is stopped after the collectors (fixtures end in reverse).
    shared = {"queue_url": Secret(redis_server.url), "redis_lease": LEASE}
    collectors = [await start_collector(**shared), await start_collector(**shared)]
    users = [f"user{i}" for i in range(12)]
    for n in range(4):
        for index, user in enumerate(users):
            through = collectors[(index + n) % 2]  # each user's events through both
            status, _, _ = await through.post("/e", {"event": f"step{n}", "user_id": user})
            assert status == 202
    await eventually(lambda: len(fake.tracks()) >= 4 * len(users))
    sent: dict[str, list[str]] = {}
    for track in fake.tracks():
        sent.setdefault(track.body["user_id"], []).append(track.body["event"])
    assert sent == {user: [f"step{n}" for n in range(4)] for user in users}
    # Both relayed: the partitions were shared out between them.
    queues = [collector.app[QUEUE] for collector in collectors if collector.app]
    assert all(isinstance(queue, RedisQueue) for queue in queues)
    held = [queue.held for queue in queues if isinstance(queue, RedisQueue)]
    await eventually(lambda: all(held) and not set(held[0]) & set(held[1]), within=5 * LEASE)


async def test_collectors_on_one_redis_derive_the_same_ids(
    redis_server: RedisServer, start_collector: StartCollector, fake: FakeOutbound, tmp_path: Path
) -> None:
    # Each with a data directory of its own, as on two machines.
    collectors = [
        await start_collector(queue_url=Secret(redis_server.url), data_dir=tmp_path / name)
        for name in ("one", "two")
    ]
    event = {"event": "signup", "anonymous_id": "a1", "message_id": "0f0e-resent"}
    status, first, _ = await collectors[0].post("/e", event)
    assert (status, first.get("duplicates")) == (202, None)
    # The browser resends through the other collector: the same dedupe scope, stored once.
    status, again, _ = await collectors[1].post("/e", event)
    assert (status, again.get("duplicates")) == (202, 1)
    await eventually(lambda: len(fake.tracks()) >= 1)
    assert [track.body["event"] for track in fake.tracks()] == ["signup"]
    # The identify before the visitor's first track: its GUID is derived by whichever
    # collector relays, with the key in Redis, not with the key of its own data directory.
    [identify] = [r for r in fake.received if r.endpoint == "identify"]
    keys = [collector.app[IDS_KEY] for collector in collectors if collector.app is not None]
    guids = {identify_guid({"message_id": "0f0e-resent"}, key) for key in keys}
    assert identify.headers["X-Outbound-GUID"] in guids
    assert len(guids) == 1
    for name in ("one", "two"):
        own = identify_guid({"message_id": "0f0e-resent"}, ids_key(tmp_path / name))
        assert own not in guids


def test_stats_and_dead_letters_commands_read_the_redis_queue(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
) -> None:
    async def fill() -> None:
        queue = RedisQueue(redis_server.url, lease=LEASE)
        await queue.open()
        await queue.put([record(1, "alice"), record(2, "bob"), record(3, "bob")])
        alice, _ = await queue.claim(10, now=time.time(), lease=60)
        await queue.dead_letter(
            alice.id, reason="Outbound answered 400", status=400, response="no", now=time.time()
        )
        await queue.close()

    asyncio.run(fill())
    monkeypatch.setenv("COLLECTOR_QUEUE_URL", redis_server.url)
    data_dir = str(tmp_path / "no-such-dir")  # not needed: the queue is in Redis
    assert cli.main(["stats", "--json", "--data-dir", data_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["queued"], report["dead_letters"]) == (2, 1)
    assert report["dead_letters_by_reason"] == {"Outbound answered 400": 1}
    assert cli.main(["dead-letters", "list", "--data-dir", data_dir]) == 0
    assert "Outbound answered 400" in capsys.readouterr().out
    assert cli.main(["dead-letters", "replay", "--status", "400", "--data-dir", data_dir]) == 0
    assert "replayed 1 dead letter" in capsys.readouterr().out
    assert cli.main(["stats", "--json", "--data-dir", data_dir]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["queued"], report["dead_letters"]) == (3, 0)
