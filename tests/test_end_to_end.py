"""Events over real HTTP into the collector, out of the relay, into the fake Outbound."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from conftest import SEED_EVENT, Collector, StartCollector, eventually
from fake_outbound import KEY, FakeOutbound, Fault


async def test_seed_example_reaches_outbound_with_key_and_body(
    collector: Collector, fake: FakeOutbound
) -> None:
    status, answer, _ = await collector.post("/e", SEED_EVENT)
    assert (status, answer) == (202, {"accepted": 1, "rejected": []})

    identify, track = await fake.wait_for(2)
    assert identify.endpoint == "identify"
    assert identify.body == {"user_id": "u123"}
    assert track.endpoint == "track"
    assert track.headers["X-Outbound-Key"] == KEY
    assert track.headers["Content-Type"] == "application/json"
    properties = track.body.pop("properties")
    assert track.body == {"user_id": "u123", "event": "renewMembership", "timestamp": 1529366403}
    assert properties["membership_valid"] is True
    assert properties["membership_renewalDate"] == "2018-06-12"
    assert set(properties["collector"]) == {"received_at", "user_agent"}  # no page, no locale
    assert track.headers["X-Outbound-GUID"] != identify.headers["X-Outbound-GUID"]


async def test_batch_delivers_every_event_in_order(
    collector: Collector, fake: FakeOutbound
) -> None:
    batch = [
        {"event": f"step{i}", "user_id": "u1", "properties": {"i": i}, "timestamp": 1700000000 + i}
        for i in range(5)
    ]
    status, answer, _ = await collector.post("/e", {"batch": batch, "sent_at": time.time()})
    assert (status, answer["accepted"]) == (202, 5)
    await fake.wait_for(6)
    assert [r.body["event"] for r in fake.tracks()] == [f"step{i}" for i in range(5)]


async def test_outbound_shaped_track_and_identify(collector: Collector, fake: FakeOutbound) -> None:
    identify = {
        "user_id": 42,
        "first_name": "Jane",
        "email": "jane@example.com",
        "attributes": {"plan": "gold"},
    }
    status, _, _ = await collector.post("/v2/identify", identify)
    assert status == 202
    await fake.wait_for(1)
    status, _, _ = await collector.post(
        "/v2/track", {"user_id": 42, "event": "renewMembership", "timestamp": 1529366403}
    )
    assert status == 202
    received = await fake.wait_for(2)
    assert received[0].endpoint == "identify"
    assert received[0].body == {
        "user_id": "42",
        "first_name": "Jane",
        "email": "jane@example.com",
        "attributes": {"plan": "gold"},
    }
    # The identify already introduced user 42: no second identify before the track.
    assert received[1].endpoint == "track"
    assert received[1].body["user_id"] == "42"
    assert received[1].body["timestamp"] == 1529366403


async def test_identify_with_anonymous_id_becomes_alias_then_track(
    collector: Collector, fake: FakeOutbound
) -> None:
    events = [
        {
            "type": "identify",
            "user_id": "u9",
            "anonymous_id": "anon-1",
            "traits": {"email": "a@b.c"},
        },
        {"type": "track", "event": "purchase", "user_id": "u9", "anonymous_id": "anon-1"},
    ]
    status, _, _ = await collector.post("/e", {"batch": events})
    assert status == 202
    identify, track = await fake.wait_for(2)
    assert identify.endpoint == "identify"
    assert identify.body == {"user_id": "u9", "previous_id": "anon:anon-1", "email": "a@b.c"}
    assert (track.endpoint, track.body["user_id"], track.body["event"]) == (
        "track",
        "u9",
        "purchase",
    )


async def test_page_view_becomes_track_of_page_event_name(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(page_event_name="Viewed page")
    page = {
        "type": "page",
        "anonymous_id": "anon-7",
        "context": {
            "url": "https://shop.example/a?b=1",
            "path": "/a",
            "title": "A",
            "referrer": "",
        },
    }
    status, _, _ = await collector.post("/e", page, headers={"User-Agent": "TestAgent/1"})
    assert status == 202
    _, track = await fake.wait_for(2)
    assert track.body["user_id"] == "anon:anon-7"  # anonymous ids have a namespace of their own
    assert track.body["event"] == "Viewed page"
    properties = track.body["properties"]
    assert properties["url"] == "https://shop.example/a?b=1"
    assert (properties["path"], properties["title"]) == ("/a", "A")
    assert "referrer" not in properties  # empty values are left out
    assert properties["collector"]["user_agent"] == "TestAgent/1"


async def test_server_context_forwarding_can_be_turned_off(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(context_property="")
    await collector.post("/e", SEED_EVENT)
    _, track = await fake.wait_for(2)
    assert track.body["properties"] == SEED_EVENT["properties"]


async def test_503_then_success_is_retried(collector: Collector, fake: FakeOutbound) -> None:
    fake.fail_next(Fault(503), Fault(503))
    await collector.post("/e", SEED_EVENT)
    await fake.wait_for(2)
    assert [status for _, _, status in fake.attempts] == [503, 503, 200, 200]


async def test_dropped_connection_and_timeout_are_retried(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(relay_timeout=0.3, lease_seconds=5.0)
    fake.fail_next(Fault(drop=True), Fault(status=200, delay=1.0))
    await collector.post("/e", SEED_EVENT)
    await fake.wait_for(2)
    assert len(fake.attempts) == 4


async def test_429_retry_after_is_honoured(collector: Collector, fake: FakeOutbound) -> None:
    fake.fail_next(Fault(429, retry_after="1"))
    await collector.post("/e", SEED_EVENT)
    await fake.wait_for(2)
    first, second = fake.attempts[0][1], fake.attempts[1][1]
    # retry_cap is 0.5 s in tests, so only Retry-After can explain a wait of a second.
    assert second - first >= 1.0


async def test_400_goes_to_dead_letters_with_the_response(
    collector: Collector, fake: FakeOutbound
) -> None:
    fake.fail_next(Fault(400, body="event name not allowed"))
    await collector.post("/e", SEED_EVENT)
    await eventually(lambda: len(fake.attempts) >= 1)

    async def dead_lettered() -> bool:
        return (await collector.queue.stats()).dead_letters == 1

    await eventually(dead_lettered)
    letters = await collector.queue.dead_letters()
    assert len(letters) == 1
    assert letters[0]["status"] == 400
    assert letters[0]["response"] == "event name not allowed"
    assert letters[0]["reason"] == "Outbound answered 400"
    assert (await collector.queue.stats()).depth == 0
    # The relay goes on with the next events.
    await collector.post("/e", {**SEED_EVENT, "event": "next"})
    tracks = [r for r in await fake.wait_for(2) if r.endpoint == "track"]
    assert tracks[0].body["event"] == "next"


async def test_401_pauses_relay_keeps_events_and_resumes(
    collector: Collector, fake: FakeOutbound, caplog: pytest.LogCaptureFixture
) -> None:
    fake.key = "rotated-key"
    for i in range(3):
        await collector.post("/e", {**SEED_EVENT, "event": f"e{i}", "user_id": f"u{i}"})
    await eventually(lambda: collector.relay.breaker.is_open)
    assert "PAUSED" in caplog.text
    assert KEY not in caplog.text
    status, ready, _ = await collector.get("/readyz")
    assert status == 503
    assert "relay circuit open: Outbound rejected the API key (401)" in ready["problems"]
    assert (await collector.queue.stats()).depth == 3
    assert (await collector.queue.stats()).dead_letters == 0

    fake.key = KEY  # the key works again: the next probe succeeds and the backlog drains
    await fake.wait_for(6)
    assert sorted(r.body["event"] for r in fake.tracks()) == ["e0", "e1", "e2"]
    assert not collector.relay.breaker.is_open


async def test_restart_keeps_queued_events_and_delivers_them(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503)
    first = await start_collector()
    for i in range(10):
        status, _, _ = await first.post("/e", {**SEED_EVENT, "event": f"e{i}"})
        assert status == 202
    await first.stop()
    assert not fake.received

    fake.always = None
    await start_collector()
    await fake.wait_for(11)
    assert [r.body["event"] for r in fake.tracks()] == [f"e{i}" for i in range(10)]


async def test_dry_run_logs_calls_without_payload_values(
    start_collector: StartCollector, fake: FakeOutbound, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector")
    collector = await start_collector(outbound_api_key=None)
    status, _, _ = await collector.post("/e", SEED_EVENT)
    assert status == 202
    await eventually(lambda: "dry run: would POST /v2/track 'renewMembership'" in caplog.text)

    async def drained() -> bool:
        return (await collector.queue.stats()).depth == 0

    await eventually(drained)
    assert "dry run: would POST /v2/identify 'identify'" in caplog.text
    assert "u123" not in caplog.text
    assert "2018-06-12" not in caplog.text
    assert not fake.attempts


async def test_events_of_one_user_stay_in_order_while_others_flow(
    collector: Collector, fake: FakeOutbound
) -> None:
    fake.fail_next(Fault(503), Fault(503), Fault(503))
    batch = [
        {"event": f"{user}-{i}", "user_id": user} for i in range(4) for user in ("alice", "bob")
    ]
    await collector.post("/e", {"batch": batch})
    await fake.wait_for(10)
    for user in ("alice", "bob"):
        mine = [r.body["event"] for r in fake.tracks() if r.body["user_id"] == user]
        assert mine == [f"{user}-{i}" for i in range(4)]


async def test_healthz_and_readyz(collector: Collector) -> None:
    status, body, _ = await collector.get("/healthz")
    assert (status, body) == (200, {"status": "alive"})
    status, body, _ = await collector.get("/readyz")
    assert status == 200
    assert body["status"] == "ready"
    assert body["queue"] == {"depth": 0, "oldest_received_at": None, "dead_letters": 0}


async def test_resent_event_is_accepted_and_delivered_once(
    collector: Collector, fake: FakeOutbound
) -> None:
    event = {**SEED_EVENT, "message_id": "m-resent-1"}
    assert (await collector.post("/e", event))[1] == {"accepted": 1, "rejected": []}
    await fake.wait_for(2)
    status, answer, _ = await collector.post(
        "/e", {"batch": [event, {**event, "message_id": "m-2"}]}
    )
    assert (status, answer) == (202, {"accepted": 2, "rejected": [], "duplicates": 1})
    await fake.wait_for(3)
    await asyncio.sleep(0.3)
    assert [r.headers["X-Outbound-GUID"] for r in fake.tracks()] == ["m-resent-1", "m-2"]
