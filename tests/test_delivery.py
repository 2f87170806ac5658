"""Delivery through outages, a full queue and a full disk: acknowledged events are never lost."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import SEED_EVENT, Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault

USERS = ("ana", "ben", "cho")


def batch_for_users(per_user: int = 4) -> list[dict[str, object]]:
    return [{"event": f"{user}-{i}", "user_id": user} for i in range(per_user) for user in USERS]


def delivered_in_order(fake: FakeOutbound, per_user: int = 4) -> bool:
    for user in USERS:
        mine = [r.body["event"] for r in fake.tracks() if r.body["user_id"] == user]
        if mine != [f"{user}-{i}" for i in range(per_user)]:
            return False
    return True


Outage = Callable[[FakeOutbound], Awaitable[Callable[[], Awaitable[None]]]]


async def answers_503(fake: FakeOutbound) -> Callable[[], Awaitable[None]]:
    fake.always = Fault(503)

    async def end() -> None:
        fake.always = None

    return end


async def resets_connections(fake: FakeOutbound) -> Callable[[], Awaitable[None]]:
    fake.always = Fault(drop=True)

    async def end() -> None:
        fake.always = None

    return end


async def hangs_past_the_timeout(fake: FakeOutbound) -> Callable[[], Awaitable[None]]:
    fake.always = Fault(status=200, delay=3.0)

    async def end() -> None:
        fake.always = None

    return end


async def refuses_connections(fake: FakeOutbound) -> Callable[[], Awaitable[None]]:
    port = fake.port
    await fake.close()

    async def end() -> None:
        await fake.start(port)

    return end


async def rate_limits(fake: FakeOutbound) -> Callable[[], Awaitable[None]]:
    fake.always = Fault(429, retry_after="1")

    async def end() -> None:
        fake.always = None

    return end


OUTAGES = [
    answers_503,
    resets_connections,
    hangs_past_the_timeout,
    refuses_connections,
    rate_limits,
]


@pytest.fixture
async def fragile(start_collector: StartCollector) -> Collector:
    """A collector whose circuit opens quickly and whose backoffs are long."""
    return await start_collector(
        breaker_threshold=3,
        probe_interval=0.3,
        relay_timeout=0.5,
        lease_seconds=5.0,
        retry_base=5.0,  # long enough that only the breaker's reset explains a quick drain
        retry_cap=120.0,
    )


@pytest.mark.parametrize("outage", OUTAGES, ids=[o.__name__ for o in OUTAGES])
async def test_outage_waits_on_disk_backs_off_and_drains_in_order(
    fragile: Collector, fake: FakeOutbound, outage: Outage
) -> None:
    collector = fragile
    end_outage = await outage(fake)
    status, answer, _ = await collector.post("/e", {"batch": batch_for_users()})
    assert (status, answer["accepted"]) == (202, 12)

    await eventually(lambda: collector.relay.breaker.is_open)
    status, ready, _ = await collector.get("/readyz")
    assert status == 503
    assert any(p.startswith("relay circuit open") for p in ready["problems"])
    # Ingest still takes events while Outbound is down.
    status, _, _ = await collector.post("/e", {**SEED_EVENT, "user_id": "dan"})
    assert status == 202

    # Open, the relay probes once per interval instead of hammering Outbound or the queue.
    attempts, commits = len(fake.attempts), collector.queue.commits
    await asyncio.sleep(1.5)
    assert len(fake.attempts) - attempts <= 7
    assert collector.queue.commits - commits <= 25
    assert (await collector.queue.stats()).depth == 13

    await end_outage()
    # Every track (the users' 12 and dan's): counting all calls would also count identifies
    # that Outbound took after the relay had given up on them (the hang outlasts the timeout).
    await eventually(lambda: len(fake.tracks()) >= 13, within=8)
    assert delivered_in_order(fake)
    await eventually(lambda: not collector.relay.breaker.is_open)

    async def drained() -> bool:  # the last ack commits just after its call was answered
        return (await collector.queue.stats()).depth == 0

    await eventually(drained)
    status, _, _ = await collector.get("/readyz")
    assert status == 200


async def test_rate_limit_is_honoured_between_probes(
    fragile: Collector, fake: FakeOutbound
) -> None:
    fake.always = Fault(429, retry_after="1")
    await fragile.post("/e", {"batch": batch_for_users()})
    await eventually(lambda: fragile.relay.breaker.is_open)
    opened = len(fake.attempts)
    await eventually(lambda: len(fake.attempts) >= opened + 3, within=10)
    times = [at for _, at, _ in fake.attempts[opened - 1 :]]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 0.95, gaps  # Retry-After: 1, though probes could go every 0.3 s


async def test_full_queue_answers_503_and_stores_nothing(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503)
    collector = await start_collector(
        queue_max_events=5, queue_share_per_ip=1.0, queue_browser_share=1.0, breaker_threshold=1
    )
    for i in range(5):
        status, _, _ = await collector.post("/e", {**SEED_EVENT, "event": f"e{i}"})
        assert status == 202
    status, answer, response = await collector.post("/e", {"batch": [SEED_EVENT, SEED_EVENT]})
    assert status == 503
    assert answer == {
        "error": "the queue is full; nothing was stored, retry later",
        "limit": "queue_max_events",
    }
    assert response.headers["Retry-After"] == "5"
    assert (await collector.queue.stats()).depth == 5

    fake.always = None
    await eventually(lambda: len(fake.tracks()) == 5)
    status, _, _ = await collector.post("/e", SEED_EVENT)
    assert status == 202


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at `path` (the test runs as root, as CI does)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    assert os.geteuid() == 0, "the full-disk test mounts a small tmpfs and needs root"
    with small_filesystem(tmp_path / "disk", "16m") as disk:
        yield disk


async def test_full_disk_answers_503_loses_nothing_and_recovers(
    start_collector: StartCollector, fake: FakeOutbound, tiny_disk: Path
) -> None:
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 4 * 1024 * 1024)  # what the operator will clean up
    fake.always = Fault(503)
    collector = await start_collector(
        data_dir=tiny_disk / "data", breaker_threshold=1, lease_seconds=5.0
    )
    acknowledged: list[str] = []
    refused = None
    for i in range(2000):
        event = {
            **SEED_EVENT,
            "message_id": f"m{i}",
            # The id in a property too: a batch call carries one GUID for its events.
            "properties": {"id": f"m{i}", **{f"part{n}": "x" * 5_000 for n in range(4)}},
        }
        status, answer, response = await collector.post("/e", event)
        if status == 202:
            acknowledged.append(f"m{i}")
            continue
        refused = (status, answer, response.headers.get("Retry-After"))
        break
    assert refused == (
        503,
        {"error": "events cannot be stored right now; nothing was stored, retry later"},
        "5",
    )
    assert not collector.queue.healthy
    assert acknowledged, "the disk was full before the first event"

    # Space comes back (the operator cleans up): the collector recovers by itself.
    filler.unlink()
    fake.always = None
    await fake.wait_for(1 + len(acknowledged), timeout=30)
    after = {**SEED_EVENT, "message_id": "after", "properties": {"id": "after"}}
    status, _, _ = await collector.post("/e", after)
    assert status == 202

    def delivered_ids() -> set[str]:
        return {r.body["properties"]["id"] for r in fake.tracks()}

    await eventually(lambda: "after" in delivered_ids())
    delivered = delivered_ids()
    assert set(acknowledged) <= delivered
    with sqlite3.connect(collector.queue.path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def make_dead_letters(collector: Collector, fake: FakeOutbound) -> None:
    fake.fail_next(Fault(400, body="bad event"), Fault(422, body="unprocessable"))
    await collector.post("/e", {**SEED_EVENT, "event": "first", "message_id": "dl-1"})
    await collector.post("/e", {**SEED_EVENT, "event": "second", "message_id": "dl-2"})
    await collector.post("/e", {**SEED_EVENT, "event": "third", "message_id": "dl-3"})

    async def three_dead() -> bool:
        return (await collector.queue.stats()).dead_letters == 2

    await eventually(three_dead)


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", "dead-letters", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def with_dead_letters(collector: Collector, fake: FakeOutbound) -> Path:
    await make_dead_letters(collector, fake)
    return collector.settings.data_dir


async def test_dead_letters_list_and_show(with_dead_letters: Path) -> None:
    listed = cli(with_dead_letters, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "first" in lines[1]
    assert "400" in lines[1]
    assert "second" in lines[2]
    assert "2 dead letters in all:" in listed.stdout
    assert "       1  Outbound answered 400" in listed.stdout
    assert "       1  Outbound answered 422" in listed.stdout

    only = cli(with_dead_letters, "list", "--status", "422")
    assert "second" in only.stdout
    assert "first" not in only.stdout

    shown = cli(with_dead_letters, "show", "1")
    assert shown.returncode == 0
    assert '"response": "bad event"' in shown.stdout
    assert '"message_id": "dl-1"' in shown.stdout
    assert cli(with_dead_letters, "show", "99").returncode == 2


async def test_dead_letters_replay_keeps_original_ids(
    collector: Collector, fake: FakeOutbound, with_dead_letters: Path
) -> None:
    refused = cli(with_dead_letters, "replay")
    assert refused.returncode == 2
    assert "--all" in refused.stderr

    replayed = cli(with_dead_letters, "replay", "--event", "first")
    assert replayed.returncode == 0
    assert "replayed 1 dead letter\n" in replayed.stdout
    collector.relay.wake()
    await eventually(lambda: any(r.headers["X-Outbound-GUID"] == "dl-1" for r in fake.tracks()))
    assert (await collector.queue.stats()).dead_letters == 1

    purged = cli(with_dead_letters, "purge", "--reason", "422")
    assert "purged 1 dead letter\n" in purged.stdout
    assert (await collector.queue.stats()).dead_letters == 0
    assert "0 dead letters in all" in cli(with_dead_letters, "list").stdout


async def test_event_past_its_retry_window_is_dead_lettered(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503, body="down")
    collector = await start_collector(retry_window=0.5, breaker_threshold=1000)
    await collector.post("/e", SEED_EVENT)

    async def dead() -> bool:
        return (await collector.queue.stats()).dead_letters == 1

    await eventually(dead)
    [letter] = await collector.queue.dead_letters()
    assert letter["reason"].startswith("still failing after")
    assert letter["reason"].endswith("Outbound answered 503")
    assert letter["response"] == "down"


async def test_stats_reads_the_data_directory(
    collector: Collector, fake: FakeOutbound, with_dead_letters: Path
) -> None:
    fake.always = Fault(503)
    await collector.post("/e", {**SEED_EVENT, "user_id": "waiting"})

    async def one_waiting() -> bool:
        return (await collector.queue.stats()).depth == 1

    await eventually(one_waiting)
    await eventually(lambda: collector.relay.breaker.is_open)
    await asyncio.sleep(0.2)  # the relay notes its state in the data directory
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "collector", "stats", "--data-dir", str(with_dead_letters)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "queue:        1 event waiting" in result.stdout
    assert "dead letters: 2" in result.stdout
    assert "1  Outbound answered 400" in result.stdout
    assert "relay:        circuit opened (Outbound answered 503)" in result.stdout
    as_json = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "collector",
            "stats",
            "--json",
            "--data-dir",
            str(with_dead_letters),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(as_json.stdout)
    assert report["queued"] == 1
    assert report["dead_letters_by_reason"] == {
        "Outbound answered 400": 1,
        "Outbound answered 422": 1,
    }


async def test_users_identified_before_a_restart_are_not_identified_again(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    async def deliver(collector: Collector, event: str) -> None:
        batch = [{"event": event, "user_id": user} for user in USERS]
        status, _, _ = await collector.post("/e", {"batch": batch})
        assert status == 202

        async def drained() -> bool:  # the acks, which remember the identifies, committed
            return (await collector.queue.stats()).depth == 0

        await eventually(drained)

    first = await start_collector()
    await deliver(first, "before")
    await first.stop()
    second = await start_collector()  # the same data directory
    await deliver(second, "after")
    assert sorted(r.body["user_id"] for r in fake.received if r.endpoint == "identify") == sorted(
        USERS
    )
    assert [r.body["event"] for r in fake.tracks()] == ["before"] * 3 + ["after"] * 3


async def test_404_on_every_call_pauses_the_relay_and_readyz_says_why(
    collector: Collector, fake: FakeOutbound
) -> None:
    """A wrong outbound_url must not dead-letter the whole queue."""
    fake.always = Fault(404)
    batch = [{"event": "e", "user_id": f"user{i}"} for i in range(10)]
    status, _, _ = await collector.post("/e", {"batch": batch})
    assert status == 202
    await eventually(lambda: collector.relay.breaker.is_open)
    status, ready, _ = await collector.get("/readyz")
    assert status == 503
    [problem] = ready["problems"]
    assert "404" in problem
    assert "outbound_url" in problem
    stats = await collector.queue.stats()
    assert (stats.depth, stats.dead_letters) == (10, 0)

    fake.always = None  # the URL put right: a probe goes through, the relay resumes
    await fake.wait_for(20)  # an identify and a track for each user

    async def drained() -> bool:
        stats = await collector.queue.stats()
        return (stats.depth, stats.dead_letters) == (0, 0)

    await eventually(drained)


async def test_a_404_for_one_event_among_delivered_ones_dead_letters_it(
    collector: Collector, fake: FakeOutbound
) -> None:
    status, _, _ = await collector.post("/e", {"event": "first", "user_id": "ana"})
    assert status == 202
    await fake.wait_for(2)
    fake.fail_next(Fault(404))  # ben's identify
    status, _, _ = await collector.post("/e", {"event": "second", "user_id": "ben"})
    assert status == 202

    async def dead_lettered() -> bool:
        return (await collector.queue.stats()).dead_letters == 1

    await eventually(dead_lettered)
    assert not collector.relay.breaker.is_open


async def test_readyz_stays_not_ready_while_the_disk_is_full(
    start_collector: StartCollector,
    fake: FakeOutbound,
    tiny_disk: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A failed transaction leaves room behind it (log frames past the last commit): a probe
    # must write as much as the writes that failed, or it fits there and says "ready".
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 4 * 1024 * 1024)
    fake.always = Fault(503)
    collector = await start_collector(data_dir=tiny_disk / "data", breaker_threshold=1)
    event = {**SEED_EVENT, "properties": {f"part{n}": "x" * 5_000 for n in range(4)}}
    for i in range(2000):
        status, _, _ = await collector.post("/e", {**event, "message_id": f"m{i}"})
        if status != 202:
            break
    assert status == 503
    for _ in range(3):
        status, answer, _ = await collector.get("/readyz")
        assert status == 503
        assert "queue: cannot store events (the last write failed)" in answer["problems"]
        refused, _, _ = await collector.post("/e", {**event, "message_id": "still-full"})
        assert refused == 503  # what /readyz said holds for a real write
    # Onto the same full disk, the log gets one line of each, not one a request or a poll.
    for i in range(20):
        assert (await collector.post("/e", {**event, "message_id": f"again{i}"}))[0] == 503
    # The first claim since the disk filled (the circuit is open: a probe every 0.3 s).
    await eventually(lambda: any("relay cannot claim" in r.getMessage() for r in caplog.records))
    for _ in range(10):  # more claims that fail: 3 s of probes
        await asyncio.sleep(0.3)
        collector.relay.wake()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("queue refused" in line for line in lines) == 1
    assert sum("relay cannot claim" in line for line in lines) == 1

    filler.unlink()  # space comes back: the probe alone makes it ready again
    fake.always = None

    async def ready() -> bool:
        status, _, _ = await collector.get("/readyz")
        return status == 200

    await eventually(ready)
    assert (await collector.post("/e", {**event, "message_id": "after"}))[0] == 202
