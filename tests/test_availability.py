"""Hostile clients (issue 17, availability): no client degrades the others. Each attack runs
against a real collector on loopback; two client IPs are played through X-Forwarded-For
with 127.0.0.1 as the trusted proxy."""

from __future__ import annotations

import ipaddress

import orjson
import pytest
from conftest import Collector, StartCollector

from collector import limits
from collector.config import Settings
from collector.keys import METRICS

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
ATTACKER = "203.0.113.7"
VISITOR = "198.51.100.2"
EVENT_PATHS = ["/e", "/v2/track", "/v2/identify"]


def valid_body(path: str, n: int = 0) -> dict[str, object]:
    if path == "/e":
        return {"event": "ok", "anonymous_id": f"visitor-{n}"}
    if path == "/v2/track":
        return {"event": "ok", "user_id": f"visitor-{n}"}
    return {"user_id": f"visitor-{n}"}


def junk_event(keys: int) -> dict[str, object]:
    """An event with `keys` unknown top-level keys: each is one error."""
    return {"event": "x", "anonymous_id": "a", **{f"unknown_{i}": i for i in range(keys)}}


def junk_body(path: str, keys: int = 300, events: int = 10) -> dict[str, object]:
    if path == "/e":
        return {"batch": [junk_event(keys) for _ in range(events)]}
    return {"user_id": "u", **{f"unknown_{i}": i for i in range(keys)}}


async def limited(start_collector: StartCollector, **overrides: object) -> Collector:
    """A collector behind a trusted proxy on loopback, with a small per-IP bucket."""
    limits_ = {"rate_limit_per_ip": 1.0, "rate_burst_per_ip": 30, **overrides}
    return await start_collector(trusted_proxies=LOOPBACK, **limits_)


def sent_from(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


# Finding 4: invalid input is free.


@pytest.mark.parametrize("path", EVENT_PATHS)
async def test_only_invalid_batches_get_429_and_others_are_unaffected(
    start_collector: StartCollector, path: str
) -> None:
    collector = await limited(start_collector)
    statuses = []
    for _ in range(40):
        status, _, _ = await collector.post(path, junk_body(path), headers=sent_from(ATTACKER))
        statuses.append(status)
    assert statuses[0] == 400  # the first invalid requests are answered as such...
    assert statuses[-1] == 429  # ...until the sender's bucket is spent on them
    assert 429 in statuses[: 30 // (10 if path == "/e" else 1) + 1]
    status, answer, _ = await collector.post(path, valid_body(path), headers=sent_from(VISITOR))
    assert (status, answer["accepted"]) == (202, 1)
    assert collector.queue.stored == 1


async def test_a_429_comes_before_the_body_is_read_and_says_when_to_retry(
    start_collector: StartCollector,
) -> None:
    collector = await limited(start_collector)
    status, _, _ = await collector.post(
        "/e", junk_body("/e", events=30), headers=sent_from(ATTACKER)
    )
    assert status == 400
    status, answer, response = await collector.post(
        "/e", valid_body("/e"), headers=sent_from(ATTACKER)
    )
    assert (status, answer) == (429, {"error": "too many events; retry later"})
    assert int(response.headers["Retry-After"]) >= 1
    assert collector.queue.stored == 0
    assert collector.app is not None
    assert collector.app[METRICS].value("collector_rate_limited_requests_total") == 1


async def test_a_429_closes_the_connection_rather_than_read_what_it_refused(
    start_collector: StartCollector,
) -> None:
    """Reading a refused body to keep its connection is work done for the one client that
    is over its rate: under a flood of large batches it took 70% of everyone's throughput."""
    collector = await limited(start_collector)
    spend = junk_body("/e", events=30)
    assert (await collector.post("/e", spend, headers=sent_from(ATTACKER)))[0] == 400
    status, _, response = await collector.post(
        "/e", junk_body("/e", events=30), headers=sent_from(ATTACKER)
    )
    assert status == 429
    assert response.headers["Connection"] == "close"


async def test_bytes_are_charged_too(start_collector: StartCollector) -> None:
    """Bodies that hold no event at all (not JSON) still pay for what was read."""
    collector = await limited(start_collector, rate_bytes_per_event=1024)
    garbage = b"{" + b" " * 20_000  # 20 KB of nothing: 20 tokens each, of a burst of 30
    statuses = [
        (await collector.post("/e", data=garbage, headers=sent_from(ATTACKER)))[0] for _ in range(3)
    ]
    # The second is read while 10 tokens are left, and leaves the bucket 10 in debt.
    assert statuses == [400, 400, 429]
    status, _, _ = await collector.post("/e", valid_body("/e"), headers=sent_from(VISITOR))
    assert status == 202


@pytest.mark.parametrize("path", EVENT_PATHS)
async def test_an_answer_lists_a_few_errors_per_event_and_counts_the_rest(
    collector: Collector, path: str
) -> None:
    status, answer, _ = await collector.post(path, junk_body(path, keys=200, events=100))
    assert status == 400
    for rejection in answer["rejected"]:
        assert len(rejection["errors"]) == 10
        assert rejection["more_errors"] >= 190
    # 10 errors an event, not 20,000 errors (about 1.5 MB) for a batch of 100
    assert len(orjson.dumps(answer)) < 100_000


async def test_error_texts_in_answers_are_cut_short(collector: Collector) -> None:
    key = "k" * 20_000
    status, answer, _ = await collector.post("/e", {"event": "x", "anonymous_id": "a", key: 1})
    assert status == 400
    (error,) = answer["rejected"][0]["errors"]
    assert error["path"].endswith("(20001 characters)")
    assert len(orjson.dumps(answer)) < 1_000


def test_request_cost() -> None:
    assert limits.request_cost(10, 500, 4096) == 10  # small events: one token each
    assert limits.request_cost(1, 40_960, 4096) == 10  # one large event: by its bytes
    assert limits.request_cost(0, 0, 4096) == 1  # nothing at all still costs one


def test_settings_defaults_for_ip_charging() -> None:
    assert Settings().rate_bytes_per_event == 4096
    assert orjson.dumps(junk_body("/e", keys=1, events=1))  # the helper makes JSON


# Finding 9: IPv6 buckets per /64, scope ids stripped.


@pytest.mark.parametrize(
    ("address", "prefix", "bucket"),
    [
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:aaaa::1", 128, "2001:db8:1:2:aaaa::1"),
        ("fe80::1%eth0", 128, "fe80::1"),
        ("fe80::1%2", 64, "fe80::/64"),
        ("::ffff:192.0.2.1", 64, "192.0.2.1"),
        ("192.0.2.1", 64, "192.0.2.1"),
        (None, 64, "unknown"),
    ],
)
def test_ip_bucket(address: str | None, prefix: int, bucket: str) -> None:
    assert limits.ip_bucket(address, prefix) == bucket


async def test_one_slash_64_shares_one_bucket(start_collector: StartCollector) -> None:
    collector = await limited(start_collector, rate_burst_per_ip=5)
    network = "2001:db8:77:1"
    status, _, _ = await collector.post(
        "/e", {"batch": [valid_body("/e", i) for i in range(5)]}, headers=sent_from(f"{network}::1")
    )
    assert status == 202
    # Twelve more addresses of the same /64 find its bucket spent; another /64 does not.
    for host in range(2, 14):
        status, _, _ = await collector.post(
            "/e", valid_body("/e", host), headers=sent_from(f"{network}::{host:x}")
        )
        assert status == 429, host
    status, _, _ = await collector.post(
        "/e", valid_body("/e"), headers=sent_from("2001:db8:77:2::1")
    )
    assert status == 202


async def test_per_address_buckets_when_configured(start_collector: StartCollector) -> None:
    collector = await limited(start_collector, rate_burst_per_ip=1, ipv6_bucket_prefix=128)
    for host in range(1, 4):
        status, _, _ = await collector.post(
            "/e", valid_body("/e", host), headers=sent_from(f"2001:db8:77:1::{host}")
        )
        assert status == 202


# Finding 6: nesting that parses but cannot be encoded again.


def nested(depth: int) -> str:
    """JSON text of `depth` levels of arrays and objects, alternating: [{"a": [{"a": 1}]}].
    Written as text: orjson would refuse to encode it past 254 levels."""
    opening = "".join('{"a": ' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    return f"{opening}1{closing}"


def deep_body(path: str, depth: int) -> bytes:
    """A body of `path` nested `depth` levels deep in all (the levels around it included)."""
    if path == "/e":
        event = f'{{"event": "x", "anonymous_id": "a", "properties": {{"p": {nested(depth - 4)}}}}}'
        return f'{{"batch": [{event}]}}'.encode()
    field = "properties" if path == "/v2/track" else "attributes"
    return f'{{"event": "x", "user_id": "u", "{field}": {{"p": {nested(depth - 2)}}}}}'.encode()


def test_deep_body_is_as_deep_as_said() -> None:
    def depth(value: object) -> int:
        if isinstance(value, dict):
            value = list(value.values())
        if not isinstance(value, list):
            return 0
        return 1 + max((depth(child) for child in value), default=0)

    for path in EVENT_PATHS:
        assert depth(orjson.loads(deep_body(path, 200))) == 200


@pytest.mark.parametrize("path", EVENT_PATHS)
@pytest.mark.parametrize("depth", [129, 253, 254, 255, 256, 500, 1000, 1023, 1024])
async def test_deep_bodies_get_400_naming_the_path(
    collector: Collector, path: str, depth: int, caplog: pytest.LogCaptureFixture
) -> None:
    status, answer, _ = await collector.post(path, data=deep_body(path, depth))
    assert status == 400
    if depth <= 1024:  # orjson itself refuses more, with its own message
        where = "/batch/0/properties/" if path == "/e" else "/"
        assert "nests deeper than 128 levels, at " + where in answer["error"]
    assert not [r for r in caplog.records if r.levelno >= 40]
    assert collector.queue.stored == 0
    status, _, _ = await collector.post(path, valid_body(path))
    assert status == 202


async def test_nesting_within_the_limit_is_judged_per_event(collector: Collector) -> None:
    # 128 levels in all parse, encode and are refused per event by max_property_depth.
    status, answer, _ = await collector.post("/e", data=deep_body("/e", 128))
    assert status == 400
    assert answer["rejected"][0]["errors"][0]["path"].startswith("/properties")
