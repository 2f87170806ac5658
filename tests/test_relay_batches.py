"""The relay's batch calls (/v2/track/batch, /v2/identify/batch) against the fake Outbound
over HTTP: order per user, splitting on a 4xx, the 404 fallback, retries, batch size 1."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import KEY, FakeOutbound, Fault, Received
from serve_process import ServeProcess

from collector.config import Settings
from collector.keys import METRICS
from collector.queue import SQLiteQueue

USERS = ("ana", "ben", "cho")


def events_of(users: tuple[str, ...], per_user: int) -> list[dict[str, Any]]:
    """Each user's events `<user>-<n>`, the users interleaved as a page would send them."""
    return [{"event": f"{u}-{i}", "user_id": u} for i in range(per_user) for u in users]


def tracks_of(fake: FakeOutbound, user: str) -> list[str]:
    return [r.body["event"] for r in fake.tracks() if r.body["user_id"] == user]


async def drained(collector: Collector, dead_letters: int = 0) -> None:
    async def empty() -> bool:
        stats = await collector.queue.stats()
        return (stats.depth, stats.dead_letters) == (0, dead_letters)

    await eventually(empty)


def counted(collector: Collector, name: str, endpoint: str, outcome: str = "2xx") -> float:
    metrics = collector.app[METRICS] if collector.app is not None else None
    assert metrics is not None
    return metrics.value(name, endpoint=endpoint, outcome=outcome)


async def test_a_users_events_go_in_batches_in_order_and_are_counted(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(relay_batch_size=8)
    status, answer, _ = await collector.post("/e", {"batch": events_of(USERS, 30)})
    assert (status, answer["accepted"]) == (202, 90)
    await fake.wait_for(3 + 90)  # an identify per user, then every track
    for user in USERS:
        assert tracks_of(fake, user) == [f"{user}-{i}" for i in range(30)]
    sizes = [r.batch for r in fake.tracks()]
    assert max(sizes) == 8  # batches, and none larger than relay_batch_size
    await drained(collector)

    track_events = counted(collector, "collector_relay_events_total", "/v2/track/batch")
    single_events = counted(collector, "collector_relay_events_total", "/v2/track")
    assert track_events + single_events == 90
    assert track_events == sum(1 for size in sizes if size)
    calls = counted(collector, "collector_relay_calls_total", "/v2/track/batch")
    assert calls == len({(r.headers["X-Outbound-GUID"], r.at) for r in fake.tracks() if r.batch})
    assert calls < track_events


async def test_an_identify_still_goes_before_a_users_first_track_in_a_batch(
    collector: Collector, fake: FakeOutbound
) -> None:
    batch = [{"type": "identify", "user_id": "ana", "traits": {"plan": str(i)}} for i in range(3)]
    batch += [{"event": f"ana-{i}", "user_id": "ana"} for i in range(5)]
    batch += [{"event": "ben-0", "user_id": "ben"}]
    status, _, _ = await collector.post("/e", {"batch": batch})
    assert status == 202
    await fake.wait_for(9 + 1)  # ben's first track needs an identify of its own
    ana = [(r.endpoint, r.batch) for r in fake.received if r.body["user_id"] == "ana"]
    assert ana == [("identify", 3)] * 3 + [("track", 5)] * 5
    ben = [r.endpoint for r in fake.received if r.body["user_id"] == "ben"]
    assert ben == ["identify", "track"]
    await drained(collector)


async def test_a_refused_event_is_found_by_splitting_and_only_it_is_dead_lettered(
    collector: Collector, fake: FakeOutbound
) -> None:
    fake.refuse = lambda item: item.get("event") == "ana-13"
    status, _, _ = await collector.post("/e", {"batch": events_of(("ana",), 40)})
    assert status == 202
    await fake.wait_for(1 + 39)
    await drained(collector, dead_letters=1)
    assert tracks_of(fake, "ana") == [f"ana-{i}" for i in range(40) if i != 13]
    [dead] = await collector.queue.dead_letters(limit=10)
    assert dead["record"]["event"] == "ana-13"
    assert dead["status"] == 400
    # Halves of halves: far fewer calls than one an event.
    assert len([a for a in fake.attempts if a[0] == "track/batch"]) < 15


async def test_a_404_on_a_batch_endpoint_switches_to_single_calls_and_says_so_once(
    collector: Collector, fake: FakeOutbound, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="collector.relay")
    fake.batches = False
    for round_ in range(2):
        events = [{"event": f"ana-{round_}-{i}", "user_id": "ana"} for i in range(10)]
        status, _, _ = await collector.post("/e", {"batch": events})
        assert status == 202
        await fake.wait_for(1 + 10 * (round_ + 1))
        await drained(collector)
    expected = [f"ana-{r}-{i}" for r in range(2) for i in range(10)]
    assert tracks_of(fake, "ana") == expected
    assert all(r.batch == 0 for r in fake.received)
    assert [a[2] for a in fake.attempts if a[0].endswith("/batch")] == [404]
    told = [r for r in caplog.records if "single calls instead" in r.getMessage()]
    assert len(told) == 1
    assert not collector.relay.breaker.is_open


async def test_a_failed_batch_is_retried_whole_with_the_same_guid(
    collector: Collector, fake: FakeOutbound
) -> None:
    status, _, _ = await collector.post("/e", {"event": "first", "user_id": "ana"})
    assert status == 202
    await fake.wait_for(2)
    await drained(collector)
    # Outbound takes the batch, and its answer is lost: the relay sends it again.
    fake.fail_next(Fault(drop_after=True), Fault(503))
    events = [{"event": f"ana-{i}", "user_id": "ana"} for i in range(10)]
    status, _, _ = await collector.post("/e", {"batch": events})
    assert status == 202
    await fake.wait_for(2 + 20)
    await drained(collector)
    again = fake.tracks()[1:]
    assert [r.body["event"] for r in again] == [f"ana-{i}" for i in range(10)] * 2
    assert {r.batch for r in again} == {10}
    assert len({r.headers["X-Outbound-GUID"] for r in again}) == 1
    assert [a[2] for a in fake.attempts if a[0] == "track/batch"] == [503, 503, 200]
    assert collector.app is not None
    assert collector.app[METRICS].value("collector_retries_total") == 2 * 10  # events


def calls_of(received: list[Received]) -> list[tuple[str, list[str]]]:
    """The track calls that reached the fake: each one's GUID and the events it carried."""
    calls: list[tuple[str, list[str]]] = []
    previous = None
    for item in received:
        call = (item.headers["X-Outbound-GUID"], item.at)
        if call != previous:
            calls.append((call[0], []))
            previous = call
        calls[-1][1].append(item.body["event"])
    return calls


# Ways a batch's answer is lost after Outbound processed it (the fake holds the call until
# `gate` is set), and the collector's settings for each.
LOST: dict[str, Callable[[asyncio.Event], tuple[Fault, dict[str, Any]]]] = {
    "connection closed": lambda gate: (Fault(drop_after=True, hold=gate), {"relay_timeout": 30}),
    "500": lambda gate: (Fault(500, taken=True, hold=gate), {"relay_timeout": 30}),
    "no answer in time": lambda gate: (
        Fault(200, taken=True, delay=2.5, hold=gate),
        {"relay_timeout": 1.5},
    ),
    # The circuit opens on that failure: the probe is the line's first call, the same batch.
    "circuit opened": lambda gate: (
        Fault(drop_after=True, hold=gate),
        {"relay_timeout": 30, "breaker_threshold": 1},
    ),
}


@pytest.mark.parametrize("lost", LOST)
async def test_a_batch_whose_answer_was_lost_goes_again_as_the_same_events_and_guid(
    start_collector: StartCollector, fake: FakeOutbound, lost: str
) -> None:
    gate = asyncio.Event()
    fault, settings = LOST[lost](gate)
    collector = await start_collector(**settings)
    status, _, _ = await collector.post("/e", {"event": "first", "user_id": "ana"})
    assert status == 202
    await fake.wait_for(2)  # identified: the user's line is tracks only from here
    await drained(collector)
    fake.fail_next(fault)
    status, _, _ = await collector.post("/e", {"batch": events_of(("ana",), 5)})
    assert status == 202
    await eventually(lambda: len(fake.attempts) == 3)  # the batch is at Outbound, held
    # More of the user's events arrive while its answer is awaited (202: on disk).
    later = [{"event": f"ana-{i}", "user_id": "ana"} for i in range(5, 8)]
    status, _, _ = await collector.post("/e", {"batch": later})
    assert status == 202
    gate.set()
    await fake.wait_for(2 + 5 + 5 + 3)
    await drained(collector)

    calls = calls_of(fake.tracks()[1:])
    tried = [f"ana-{i}" for i in range(5)]
    assert [events for _, events in calls] == [tried, tried, ["ana-5", "ana-6", "ana-7"]]
    [first, again, after] = [guid for guid, _ in calls]
    assert again == first  # Outbound drops it as the resend it is
    assert after != first
    assert collector.app is not None
    assert collector.app[METRICS].value("collector_retries_total") == 5  # events


async def test_a_batch_cut_short_by_a_crash_goes_again_as_the_same_events_and_guid(
    start_collector: StartCollector, fake: FakeOutbound, settings: Settings, tmp_path: Path
) -> None:
    gate = asyncio.Event()
    fake.fail_next(Fault(200, taken=True), Fault(200, taken=True, hold=gate))  # the 2nd held
    env = {"OUTBOUND_API_KEY": KEY, "COLLECTOR_OUTBOUND_URL": fake.url}
    args = ["--data-dir", str(settings.data_dir)]
    first = await asyncio.to_thread(ServeProcess, args, env=env, log=tmp_path / "first.log")
    try:
        async with aiohttp.ClientSession() as session:

            async def post(events: list[dict[str, Any]]) -> None:
                url = f"{first.base_url}/e"
                async with session.post(url, json={"batch": events}) as answer:
                    assert answer.status == 202

            await post(events_of(("ana",), 5))
            await eventually(lambda: len(fake.attempts) == 2)  # the batch is at Outbound, held
            await post([{"event": f"ana-{i}", "user_id": "ana"} for i in range(5, 8)])
    finally:
        # Killed while the batch is in flight; then Outbound processes it, and nobody hears.
        assert await asyncio.to_thread(first.stop, signal.SIGKILL) == -signal.SIGKILL
    gate.set()
    await fake.wait_for(1 + 5)

    collector = await start_collector()  # the same data directory
    assert collector.queue.interrupted == 5
    await fake.wait_for(1 + 5 + 1 + 5 + 3)  # identify, batch; again; then the 3 that came
    await drained(collector)
    calls = calls_of(fake.tracks())
    tried = [f"ana-{i}" for i in range(5)]
    assert [events for _, events in calls] == [tried, tried, ["ana-5", "ana-6", "ana-7"]]
    [before, again, after] = [guid for guid, _ in calls]
    assert again == before
    assert after != before


async def test_a_probe_claims_deeper_when_it_may_have_cut_a_call_it_did_not_see_fail(
    start_collector: StartCollector, fake: FakeOutbound, settings: Settings
) -> None:
    # A collector sends ana's 5 events as one batch, which fails (to be tried in an hour).
    fake.fail_next(Fault(200, taken=True), Fault(503, retry_after="3600"))
    before = await start_collector()
    status, _, _ = await before.post("/e", {"batch": events_of(("ana",), 5)})
    assert status == 202
    await eventually(lambda: [a[0] for a in fake.attempts] == ["identify", "track/batch"])

    def attempts() -> list[int]:
        with sqlite3.connect(settings.data_dir / "queue.sqlite3") as connection:
            return [a for (a,) in connection.execute("SELECT attempts FROM events ORDER BY id")]

    await eventually(lambda: attempts() == [1] * 5)
    await before.stop()
    # Another process, which has not seen that call, opens its circuit on bob's failure: all
    # is due, and its probes (one line: ana's, the oldest) go by what it saw fail (1 event).
    fake.always = Fault(503)
    collector = await start_collector(breaker_threshold=1)
    status, _, _ = await collector.post("/e", {"event": "bob-0", "user_id": "bob"})
    assert status == 202
    await eventually(lambda: collector.relay.breaker.is_open)
    fake.always = None
    await fake.wait_for(1 + 1 + 5 + 2)  # identify; ana's identify and batch; bob's
    await drained(collector)
    calls = calls_of([r for r in fake.tracks() if r.body["user_id"] == "ana"])
    assert [events for _, events in calls] == [[f"ana-{i}" for i in range(5)]]


async def test_batch_size_1_makes_one_call_an_event_as_before(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(relay_batch_size=1)
    status, _, _ = await collector.post("/e", {"batch": events_of(USERS, 5)})
    assert status == 202
    await fake.wait_for(3 + 15)
    await drained(collector)
    for user in USERS:
        assert tracks_of(fake, user) == [f"{user}-{i}" for i in range(5)]
    assert {a[0] for a in fake.attempts} == {"identify", "track"}
    assert counted(collector, "collector_relay_calls_total", "/v2/track") == 15


async def test_the_fake_takes_a_batch_of_100_and_refuses_101(fake: FakeOutbound) -> None:
    item = {"user_id": "ana", "event": "e"}
    async with aiohttp.ClientSession(headers={"X-Outbound-Key": KEY}) as session:
        for size, status in ((100, 200), (101, 400), (0, 400)):
            async with session.post(f"{fake.url}/v2/track/batch", json=[item] * size) as answer:
                assert answer.status == status
        fake.always = Fault(503)  # a fault is the whole batch's
        async with session.post(f"{fake.url}/v2/track/batch", json=[item] * 3) as answer:
            assert answer.status == 503
    assert len(fake.received) == 100


async def test_a_claim_leases_a_line_several_events_deep(tmp_path: Path) -> None:
    now = 1_700_000_000.0
    queue = SQLiteQueue(tmp_path / "q.sqlite3", dedupe_window=0)
    await queue.open()
    try:
        await queue.put(
            [
                {"message_id": f"{u}-{n}", "user_id": u, "received_at": now, "event": "e"}
                for n in range(5)
                for u in ("a", "b")
                if u == "a" or n < 2
            ]
        )
        claimed = await queue.claim(10, now=now, lease=60, depth=3)
        assert [c.record["message_id"] for c in claimed] == ["a-0", "a-1", "a-2", "b-0", "b-1"]
        assert await queue.claim(10, now=now, lease=60, depth=3) == []  # leased
        await queue.ack(claimed[0].id)
        assert await queue.claim(10, now=now, lease=60, depth=3) == []  # a-1 still leased
    finally:
        await queue.close()
    # A process that died held those leases: the next one voids them all.
    again = SQLiteQueue(tmp_path / "q.sqlite3", dedupe_window=0)
    await again.open()
    try:
        assert again.interrupted == 4
        claimed = await again.claim(10, now=now, lease=60, depth=10)
        # Both heads due since the same moment: the line whose head came first goes first.
        # Each goes as far as the claim before (the same batches), and no further.
        expected = ["b-0", "b-1", "a-1", "a-2"]
        assert [c.record["message_id"] for c in claimed] == expected
        await again.ack_all([(c.id, False) for c in claimed])
        claimed = await again.claim(10, now=now, lease=60, depth=10)
        assert [c.record["message_id"] for c in claimed] == ["a-3", "a-4"]
    finally:
        await again.close()
