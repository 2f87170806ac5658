"""Metrics after a scripted scenario, request ids, and the log formats."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import SEED_EVENT, Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault
from prometheus_client.parser import text_string_to_metric_families

from collector.config import Secret
from collector.keys import METRICS


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_counters_say_exactly_what_happened(collector: Collector, fake: FakeOutbound) -> None:
    fake.fail_next(Fault(503))  # the first call fails once: one retry
    await collector.post("/e", {**SEED_EVENT, "message_id": "m-ok"})
    await fake.wait_for(2)
    fake.fail_next(Fault(400))  # the next track is refused: one dead letter
    await collector.post("/e", {**SEED_EVENT, "event": "refused", "message_id": "m-dead"})
    await collector.post("/e", {"event": 5, "user_id": "u1"})  # invalid
    await collector.post("/e", SEED_EVENT, headers={"User-Agent": "Googlebot/2.1"})  # bot
    await collector.post("/e", data=b"{", headers={"Content-Type": "text/plain"})  # refused 400

    async def settled() -> bool:
        return (await collector.queue.stats()).dead_letters == 1

    await eventually(settled)
    status, text, response = await collector.get("/metrics")
    assert status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    got = samples(text.decode())
    assert got[("collector_events_accepted_total", ())] == 2
    assert got[("collector_events_rejected_total", (("reason", "invalid"),))] == 1
    assert got[("collector_requests_refused_total", (("status", "400"),))] == 1
    assert got[("collector_bot_events_dropped_total", ())] == 1
    assert got[("collector_retries_total", ())] == 1
    assert got[("collector_dead_lettered_total", ())] == 1
    calls = {
        labels: value
        for (name, labels), value in got.items()
        if name == "collector_relay_calls_total" and value
    }
    assert calls == {
        (("endpoint", "/v2/identify"), ("outcome", "5xx")): 1,
        (("endpoint", "/v2/identify"), ("outcome", "2xx")): 1,
        (("endpoint", "/v2/track"), ("outcome", "2xx")): 1,
        (("endpoint", "/v2/track"), ("outcome", "4xx")): 1,
    }
    assert got[("collector_queue_depth", ())] == 0
    assert got[("collector_dead_letters", ())] == 1
    assert got[("collector_breaker_open", ())] == 0
    assert got[("collector_ingest_seconds_count", ())] == 5
    assert got[("collector_relay_call_seconds_count", (("endpoint", "/v2/track"),))] == 2


async def test_metrics_token_is_required_when_set(start_collector: StartCollector) -> None:
    collector = await start_collector(metrics_token=Secret("metrics-token-123456"))
    status, _, _ = await collector.get("/metrics")
    assert status == 401
    status, _, _ = await collector.get(
        "/metrics", headers={"Authorization": "Bearer metrics-token-123456"}
    )
    assert status == 200


async def test_breaker_and_queue_gauges(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503)
    collector = await start_collector(breaker_threshold=1)
    await collector.post("/e", SEED_EVENT)
    await eventually(lambda: collector.relay.breaker.is_open)
    _, text, _ = await collector.get("/metrics")
    got = samples(text.decode())
    assert got[("collector_breaker_open", ())] == 1
    assert got[("collector_queue_depth", ())] == 1
    assert got[("collector_queue_oldest_age_seconds", ())] >= 0
    assert collector.app is not None
    assert collector.app[METRICS].value("collector_breaker_open") == 1


async def test_request_id_is_answered_and_logged(
    collector: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collector")
    _, _, response = await collector.post(
        "/e", data=b"{", headers={"Content-Type": "text/plain", "X-Request-ID": "req-42"}
    )
    assert response.headers["X-Request-ID"] == "req-42"
    _, _, response = await collector.post("/e", SEED_EVENT, headers={"X-Request-ID": "bad id!"})
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers["X-Request-ID"])
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused 400")]
    assert refused == [
        "refused 400: the body is not valid JSON: unexpected end of data: line 1 column 2 (char 1)"
    ]


def test_json_log_lines() -> None:
    from collector.logs import REQUEST_ID, JsonLines, RequestIdFilter

    record = logging.LogRecord("collector.ingest", logging.INFO, "x", 1, "refused %d", (413,), None)
    token = REQUEST_ID.set("abc")
    try:
        RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    line = json.loads(JsonLines().format(record))
    assert line["level"] == "info"
    assert line["logger"] == "collector.ingest"
    assert line["request_id"] == "abc"
    assert line["message"] == "refused 413"
    assert line["time"].endswith("Z")


async def test_rejections_are_counted_by_what_was_wrong(start_collector: StartCollector) -> None:
    collector = await start_collector(
        identity_secret=Secret("metrics-identity-secret-0123456789ab")
    )
    await collector.post("/e", {"event": "x", "anonymous_id": "a", "properties": {"collector": 1}})
    await collector.post("/e", {"event": "x", "user_id": "u1"})  # no hash, no anonymous id
    await collector.post(
        "/e", {"event": "x", "anonymous_id": "a", "properties": {"s": "x" * 40_000}}
    )
    assert collector.app is not None
    metrics = collector.app[METRICS]
    assert metrics.value("collector_events_rejected_total", reason="invalid") == 1
    assert metrics.value("collector_events_rejected_total", reason="unverified_user") == 1
    assert metrics.value("collector_events_rejected_total", reason="too_large") == 1
    assert metrics.value("collector_events_rejected_total", reason="not_allowed") == 0


async def test_labelled_counters_are_there_at_zero_from_the_start(collector: Collector) -> None:
    # Alerts on absence ("no 5xx calls", rate() over a series) need every series from the
    # start; these are the label values the README lists.
    _, text, _ = await collector.get("/metrics")
    got = samples(text.decode())
    expected: list[tuple[str, tuple[tuple[str, str], ...]]] = [
        ("collector_events_rejected_total", (("reason", reason),))
        for reason in ("invalid", "too_large", "not_allowed", "unverified_user")
    ]
    expected += [
        ("collector_requests_refused_total", (("status", status),))
        for status in ("400", "401", "403", "408", "413", "415")
    ]
    for endpoint in ("/v2/identify", "/v2/track"):
        expected += [
            ("collector_relay_calls_total", (("endpoint", endpoint), ("outcome", outcome)))
            for outcome in ("2xx", "4xx", "5xx", "network", "dry_run")
        ]
        expected.append(("collector_relay_call_seconds_count", (("endpoint", endpoint),)))
    for key in expected:
        assert got.get(key) == 0, key


async def test_a_dry_runs_calls_have_their_own_outcome(start_collector: StartCollector) -> None:
    collector = await start_collector(outbound_api_key=None)
    assert (await collector.post("/e", SEED_EVENT))[0] == 202

    async def logged() -> bool:
        _, text, _ = await collector.get("/metrics")
        track = (("endpoint", "/v2/track"), ("outcome", "dry_run"))
        return samples(text.decode()).get(("collector_relay_calls_total", track)) == 1

    await eventually(logged)
    _, text, _ = await collector.get("/metrics")
    sent = {
        labels
        for (name, labels), value in samples(text.decode()).items()
        if name == "collector_relay_calls_total" and value
    }
    # Nothing left the machine: no call is counted as answered by Outbound.
    assert sent == {
        (("endpoint", "/v2/identify"), ("outcome", "dry_run")),
        (("endpoint", "/v2/track"), ("outcome", "dry_run")),
    }
