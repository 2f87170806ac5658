"""One client cannot fill the queue for everyone (issue 17, item 10), on a real collector and
real files: each browser client (IP bucket, as rate limits and the records have it) holds at
most its share, server tokens keep a reserve, the bytes bound counts what is on disk, and
dead letters have a cap and a retention."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import SEED_EVENT, Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault

from collector.config import Secret
from collector.queue import QueueFull, SQLiteQueue

TOKEN = "server-token-0123456789"
ATTACKER = {"X-Forwarded-For": "198.51.100.7"}
VISITOR = {"X-Forwarded-For": "203.0.113.9"}
BACKEND = {"Authorization": f"Bearer {TOKEN}"}
NOW = 1_700_000_000.0


async def down_collector(start_collector: StartCollector, fake: FakeOutbound) -> Collector:
    """A collector whose Outbound is down (nothing leaves the queue): 20 events at most,
    5 a client (0.25), browsers 15 together (0.75)."""
    fake.always = Fault(503)
    return await start_collector(
        queue_max_events=20,
        queue_share_per_ip=0.25,
        queue_browser_share=0.75,
        breaker_threshold=1,
        trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),),
        server_tokens=(Secret(TOKEN),),
    )


def event(n: int) -> dict[str, Any]:
    return {**SEED_EVENT, "event": f"e{n}", "message_id": f"m-{n}"}


async def test_a_client_over_its_share_gets_503_and_others_do_not(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await down_collector(start_collector, fake)
    status, _, _ = await collector.post(
        "/e", {"batch": [event(n) for n in range(5)]}, headers=ATTACKER
    )
    assert status == 202
    status, answer, response = await collector.post("/e", event(5), headers=ATTACKER)
    assert status == 503
    assert answer == {
        "error": "this client holds its share of the queue; nothing was stored, retry later",
        "limit": "queue_share_per_ip",
    }
    assert response.headers["Retry-After"] == "5"
    # Another browser and a back-end are not affected.
    status, _, _ = await collector.post("/e", event(6), headers=VISITOR)
    assert status == 202
    status, _, _ = await collector.post("/e", event(7), headers=BACKEND)
    assert status == 202
    assert collector.queue.depth == 7


async def test_browsers_leave_a_reserve_for_server_tokens(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await down_collector(start_collector, fake)
    for client in range(3):  # three browsers of 5 events each: the browsers' 15
        headers = {"X-Forwarded-For": f"192.0.{client}.1"}
        batch = [event(client * 10 + n) for n in range(5)]
        status, _, _ = await collector.post("/e", {"batch": batch}, headers=headers)
        assert status == 202
    status, answer, _ = await collector.post("/e", event(99), headers=VISITOR)
    assert (status, answer["limit"]) == (503, "queue_browser_share")
    for n in range(5):  # the rest is the back-ends'
        status, _, _ = await collector.post("/e", event(100 + n), headers=BACKEND)
        assert status == 202
    status, answer, _ = await collector.post("/e", event(105), headers=BACKEND)
    assert (status, answer["limit"]) == (503, "queue_max_events")


async def test_shares_are_counted_again_at_open_and_freed_by_delivery(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await down_collector(start_collector, fake)
    status, _, _ = await collector.post(
        "/e", {"batch": [event(n) for n in range(5)]}, headers=ATTACKER
    )
    assert status == 202
    held = dict(collector.queue.clients)
    assert list(held.values()) == [(5, collector.queue.bytes)]
    await collector.stop()

    again = await down_collector(start_collector, fake)
    assert again.queue.clients == held  # counted from the records (their IP as stored)
    status, answer, _ = await again.post("/e", event(5), headers=ATTACKER)
    assert (status, answer["limit"]) == (503, "queue_share_per_ip")
    fake.always = None
    await eventually(lambda: again.queue.depth == 0, within=15)
    assert again.queue.clients == {}
    status, _, _ = await again.post("/e", event(5), headers=ATTACKER)
    assert status == 202


async def test_the_bytes_bound_counts_what_is_on_disk(tmp_path: Path) -> None:
    queue = SQLiteQueue(tmp_path / "q.sqlite3", max_bytes=200_000)
    await queue.open()
    try:
        # Small bodies, but their dedupe rows and indexes take pages too.
        puts = [
            [
                {"message_id": f"m{n:08}", "user_id": f"u{n}", "received_at": NOW}
                for n in range(start, start + 100)
            ]
            for start in range(0, 5000, 100)
        ]
        refused = None
        for records in puts:
            try:
                await queue.put(records)
            except QueueFull as full:
                refused = full
                break
        assert refused is not None
        assert refused.limit == "queue_max_bytes"
        assert queue.bytes < 200_000 <= queue.disk_bytes + 100 * 100
    finally:
        await queue.close()


async def test_a_resent_event_takes_no_share(tmp_path: Path) -> None:
    # A put counts against its client's share only the events it stores: not those the
    # dedupe finds again, from an earlier put or earlier in the same group commit.
    queue = SQLiteQueue(tmp_path / "q.sqlite3")
    await queue.open()
    try:
        records = [
            {"message_id": f"m{n}", "dedupe_key": f"m{n}/v", "user_id": "u", "received_at": NOW}
            | {"ip": "203.0.113.9"}
            for n in range(4)
        ]
        assert await queue.put(records[:2]) == 0
        assert list(await asyncio.gather(queue.put(records[1:]), queue.put(records[3:]))) == [1, 1]
        size = sum(len(orjson.dumps(record)) for record in records)
        assert queue.clients == {"203.0.113.9": (4, size)}
        assert (
            (queue.browser_events, queue.browser_bytes) == (4, size) == (queue.depth, queue.bytes)
        )
    finally:
        await queue.close()


async def dead_letter_all(queue: SQLiteQueue, count: int, now: float) -> None:
    await queue.put(
        [
            {"message_id": f"d{now}-{n}", "user_id": f"u{now}-{n}", "received_at": now}
            for n in range(count)
        ]
    )
    for claimed in await queue.claim(count, now=now, lease=60):
        await queue.dead_letter(claimed.id, reason="400", status=400, response="", now=now)


async def test_dead_letters_have_a_cap_and_a_retention(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dropped: list[int] = []
    now = time.time()  # stats drop by the clock too
    queue = SQLiteQueue(
        tmp_path / "q.sqlite3", dead_letters_max=5, dead_letter_days=1, on_dropped=dropped.append
    )
    await queue.open()
    try:
        with caplog.at_level(logging.WARNING, logger="collector.queue"):
            await dead_letter_all(queue, 8, now)
        assert (await queue.stats()).dead_letters == 5
        kept = [letter["message_id"] for letter in await queue.dead_letters()]
        assert kept == [f"d{now}-{n}" for n in range(3, 8)]  # the oldest went
        assert sum(dropped) == 3
        assert "dropped 1 dead letter, the oldest: 5 are kept at most" in caplog.text

        later = now + 86400 + 120  # a day and more on: those 5 are past their retention
        await dead_letter_all(queue, 2, later)
        assert (await queue.stats()).dead_letters == 2
        assert sum(dropped) == 8
        assert "dropped 5 dead letters, older than 1 day (dead_letter_days)" in caplog.text
    finally:
        await queue.close()


async def test_dropped_dead_letters_are_a_metric(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    fake.always = Fault(400)  # each event is dead-lettered at once
    collector = await start_collector(dead_letters_max=2)
    for n in range(4):
        status, _, _ = await collector.post("/e", event(n))
        assert status == 202
    await eventually(lambda: collector.queue.depth == 0 and collector.queue.dead_count == 2)
    _, text, _ = await collector.get("/metrics")
    assert b"collector_dead_letters_dropped_total 2.0" in text
    await asyncio.sleep(0)
