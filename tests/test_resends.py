"""No silent resends: every call that reaches Outbound is an attempt the relay counted."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
from conftest import SEED_EVENT, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault

from collector.keys import METRICS


async def test_connections_closed_after_outbound_took_the_call(
    start_collector: StartCollector, fake: FakeOutbound, caplog: pytest.LogCaptureFixture
) -> None:
    # One call in five is taken by Outbound, then its connection closes without an answer.
    # A client that sends it again on its own (as the hand-written one did, up to the pool
    # size plus one) delivers duplicates that no metric or log line accounts for.
    caplog.set_level(logging.INFO, logger="collector.relay")
    closes = Fault(status=599, drop_after=True)  # the status marks it in fake.attempts
    fake.every = (5, closes)
    # One call an event, so that each call's GUID names its event (a batch's names the batch).
    collector = await start_collector(relay_concurrency=8, relay_batch_size=1)
    guids = [f"m{i}" for i in range(200)]
    for start in range(0, len(guids), 20):
        batch = [
            {**SEED_EVENT, "user_id": f"u{i % 25}", "message_id": guid}
            for i, guid in enumerate(guids[start : start + 20], start)
        ]
        assert (await collector.post("/e", {"batch": batch}))[0] == 202

    await fake.wait_for(len(guids) + 25, timeout=60)  # 200 tracks and 25 identifies at least

    async def drained() -> bool:
        return (await collector.queue.stats()).depth == 0

    await eventually(drained, within=60)
    tracked = Counter(r.headers["X-Outbound-GUID"] for r in fake.tracks())
    assert set(tracked) == set(guids)  # every event arrived

    assert collector.app is not None
    metrics = collector.app[METRICS]
    counted = {
        (endpoint, outcome): metrics.value(
            "collector_relay_calls_total", endpoint=endpoint, outcome=outcome
        )
        for endpoint in ("/v2/track", "/v2/identify")
        for outcome in ("2xx", "network")
    }
    dropped = sum(1 for _, _, status in fake.attempts if status == closes.status)
    # Every request Outbound saw is a call the relay counted: no resend it did not count.
    assert len(fake.attempts) == sum(counted.values())
    assert dropped == counted["/v2/track", "network"] + counted["/v2/identify", "network"]
    assert dropped > 0
    # Each closed connection came after Outbound had the call, so each retry of it is a
    # duplicate there: exactly as many duplicates as failed attempts the relay counted.
    calls = Counter((r.endpoint, r.headers["X-Outbound-GUID"]) for r in fake.received)
    duplicates = sum(count - 1 for count in calls.values())
    assert duplicates == dropped
    assert metrics.value("collector_retries_total") == dropped
    retried = [r for r in caplog.records if "to retry" in r.getMessage()]
    assert len(retried) == dropped
