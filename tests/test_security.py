"""Origins, rate limits, bots, privacy, slow clients, headers and secret hygiene, over HTTP."""

from __future__ import annotations

import asyncio
import gzip
import logging
import re
import sqlite3

import orjson
import pytest
from conftest import SEED_EVENT, Collector, StartCollector, eventually
from fake_outbound import KEY, FakeOutbound, Fault

from collector.config import Secret
from collector.ingest import origin_allowed, request_origin
from collector.keys import METRICS
from collector.limits import RateLimiter, refill, retry_after, wait_for

SHOP = "https://shop.example.com"
EVENT = {"event": "x", "anonymous_id": "a1"}


@pytest.mark.parametrize(
    ("origin", "allowed", "expected"),
    [
        (SHOP, (SHOP,), True),
        ("https://evil.example", (SHOP,), False),
        ("null", (SHOP,), False),
        ("https://shop.example.com.evil.net", (SHOP,), False),  # look-alike
        ("http://shop.example.com", (SHOP,), False),  # wrong scheme
        ("https://shop.example.com:8443", (SHOP,), False),  # wrong port
        ("https://SHOP.example.com", (SHOP,), False),  # browsers send lower case
        ("https://anything.example", ("*",), True),
        ("null", ("*",), True),
        ("http://127.0.0.1:8080", (), True),  # the collector's own origin (its demo page)
        ("http://127.0.0.1:8081", (), False),
        ("https://127.0.0.1:8080", (), True),  # behind TLS termination: same host
    ],
)
def test_origin_allowed(origin: str, allowed: tuple[str, ...], expected: bool) -> None:
    assert origin_allowed(origin, allowed, "127.0.0.1:8080") is expected


@pytest.mark.parametrize(
    ("origin", "referer", "expected"),
    [
        (SHOP, None, SHOP),
        (None, f"{SHOP}/cart?x=1", SHOP),
        (None, "not a url", "null"),
        (None, None, None),
        (SHOP, "https://other.example/", SHOP),  # Origin wins
    ],
)
def test_request_origin(origin: str | None, referer: str | None, expected: str | None) -> None:
    assert request_origin(origin, referer) == expected


ORIGIN_CASES = [
    ({"Origin": SHOP}, 202),
    ({"Origin": "https://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({}, 202),  # no Origin: a server client
    ({"Origin": "https://shop.example.com.evil.net"}, 403),
    ({"Origin": "http://shop.example.com"}, 403),
    ({"Origin": "https://shop.example.com:444"}, 403),
    ({"Referer": f"{SHOP}/page"}, 202),
    ({"Referer": "https://evil.example/page"}, 403),
]


@pytest.mark.parametrize(("headers", "status"), ORIGIN_CASES)
async def test_origin_rules_for_events(
    start_collector: StartCollector, headers: dict[str, str], status: int
) -> None:
    collector = await start_collector(allowed_origins=(SHOP,))
    got, answer, response = await collector.post("/e", EVENT, headers=headers)
    assert got == status
    if status == 403:
        assert "is not allowed to send events" in answer["error"]
    assert collector.queue.stored == (1 if status == 202 else 0)
    # A page can read its answer, the refusal too (so that its script drops the batch);
    # without an Origin there is no CORS.
    assert response.headers.get("Access-Control-Allow-Origin") == headers.get("Origin")
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (SHOP, True),
        ("https://evil.example", False),
        ("null", False),
        ("https://shop.example.com.evil.net", False),
        ("http://shop.example.com", False),
        ("https://shop.example.com:444", False),
    ],
)
async def test_origin_rules_for_preflights(
    start_collector: StartCollector, origin: str, allowed: bool
) -> None:
    collector = await start_collector(allowed_origins=(SHOP,))
    assert collector.session is not None
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with collector.session.options(collector.url("/e"), headers=headers) as response:
        assert (response.headers.get("Access-Control-Allow-Origin") == origin) is allowed
        assert (response.status == 200) is allowed
        assert "Access-Control-Allow-Credentials" not in response.headers
        assert "Origin" in response.headers["Vary"]


async def test_rate_limit_per_ip_answers_429_with_retry_after(
    start_collector: StartCollector,
) -> None:
    collector = await start_collector(rate_limit_per_ip=1.0, rate_burst_per_ip=5)
    batch = [{**EVENT, "anonymous_id": f"a{i}"} for i in range(5)]
    status, _, _ = await collector.post("/e", {"batch": batch})
    assert status == 202
    status, answer, response = await collector.post("/e", {"batch": batch[:2]})
    assert (status, answer) == (429, {"error": "too many events; retry later"})
    # Refused before its body is read (the bucket is empty), so it is told when the bucket
    # holds a token again, not what its two events will cost.
    assert response.headers["Retry-After"] == "1"
    assert collector.queue.stored == 5  # the refused request stored nothing
    assert collector.app is not None
    assert collector.app[METRICS].value("collector_rate_limited_requests_total") == 1


async def test_rate_limit_per_user(start_collector: StartCollector) -> None:
    collector = await start_collector(rate_limit_per_user=0.5, rate_burst_per_user=3)
    for _ in range(3):
        status, _, _ = await collector.post("/e", {"event": "x", "anonymous_id": "same"})
        assert status == 202
    status, _, response = await collector.post("/e", {"event": "x", "anonymous_id": "same"})
    assert status == 429
    assert response.headers["Retry-After"] == "2"
    status, _, _ = await collector.post("/e", {"event": "x", "anonymous_id": "other"})
    assert status == 202


async def test_server_token_is_not_rate_limited(start_collector: StartCollector) -> None:
    token = "server-token-for-rate-tests-1"
    collector = await start_collector(
        rate_limit_per_ip=1.0, rate_burst_per_ip=1, server_tokens=(Secret(token),)
    )
    auth = {"Authorization": f"Bearer {token}"}
    for _ in range(3):
        status, _, _ = await collector.post("/e", {"batch": [EVENT, EVENT]}, headers=auth)
        assert status == 202


@pytest.mark.parametrize(
    ("tokens", "elapsed", "rate", "burst", "expected"),
    [(0, 1, 10, 100, 10), (95, 1, 10, 100, 100), (-20, 3, 10, 100, 10), (5, -1, 10, 100, 5)],
)
def test_refill(tokens: float, elapsed: float, rate: float, burst: float, expected: float) -> None:
    assert refill(tokens, elapsed, rate=rate, burst=burst) == expected


@pytest.mark.parametrize(
    ("tokens", "cost", "rate", "expected"), [(10, 5, 1, 0), (2, 5, 1, 3), (-5, 5, 2, 5)]
)
def test_wait_for(tokens: float, cost: float, rate: float, expected: float) -> None:
    assert wait_for(tokens, cost, rate=rate) == expected


def test_rate_limiter_is_bounded_and_all_or_nothing() -> None:
    limiter = RateLimiter(rate=1, burst=2, max_keys=2)
    # A cost over the burst is charged as the burst when waiting, or it could never pass.
    assert limiter.wait({"a": 2, "b": 3}, now=0) == 0
    limiter.take({"a": 2, "b": 3}, now=0)  # a: 0 tokens left, b: -1
    assert limiter.wait({"a": 1}, now=0) == 1
    assert limiter.wait({"b": 1}, now=0) == 2
    assert limiter.wait({"a": 1, "b": 1}, now=1) == 1  # all or nothing: the slowest decides
    limiter.take({"c": 1}, now=1)  # a third key: a, the oldest, is forgotten
    assert limiter.wait({"a": 2}, now=1) == 0  # and starts full again
    assert retry_after(0.2) == "1"
    assert retry_after(2.01) == "3"


async def test_bots_are_dropped_and_counted(collector: Collector, fake: FakeOutbound) -> None:
    crawler = {"User-Agent": "Mozilla/5.0 (compatible; Googlebot/2.1)"}
    status, answer, _ = await collector.post("/e", {"batch": [EVENT, EVENT]}, headers=crawler)
    assert (status, answer) == (202, {"accepted": 0, "rejected": [], "dropped": 2})
    headless = {"User-Agent": "Mozilla/5.0 HeadlessChrome/120.0"}
    await collector.post("/e", EVENT, headers=headless)
    assert collector.app is not None
    assert collector.app[METRICS].value("collector_bot_events_dropped_total") == 3
    assert collector.queue.stored == 0
    status, _, _ = await collector.post("/e", EVENT, headers={"User-Agent": "Mozilla/5.0 Chrome"})
    assert status == 202


async def test_bot_filter_is_configurable(start_collector: StartCollector) -> None:
    collector = await start_collector(bot_user_agents=re.compile("acme-monitor", re.IGNORECASE))
    _, answer, _ = await collector.post("/e", EVENT, headers={"User-Agent": "Acme-Monitor/1"})
    assert answer["dropped"] == 1
    _, answer, _ = await collector.post("/e", EVENT, headers={"User-Agent": "Googlebot/2"})
    assert answer["accepted"] == 1


@pytest.mark.parametrize(
    ("forward_ip", "stored", "forwarded"),
    [
        ("off", "127.0.0.0", None),
        ("truncated", "127.0.0.0", "127.0.0.0"),
        ("full", "127.0.0.1", "127.0.0.1"),
    ],
)
async def test_ip_is_truncated_and_forwarded_only_when_configured(
    start_collector: StartCollector,
    fake: FakeOutbound,
    forward_ip: str,
    stored: str,
    forwarded: str | None,
) -> None:
    fake.always = Fault(503)  # keep the event queued long enough to look at it
    collector = await start_collector(forward_ip=forward_ip, breaker_threshold=1000)
    await collector.post("/e", SEED_EVENT)
    with sqlite3.connect(collector.queue.path) as db:
        (body,) = db.execute("SELECT body FROM events").fetchone()
    assert orjson.loads(body)["ip"] == stored
    fake.always = None
    _, track = await fake.wait_for(2)
    assert track.body["properties"]["collector"].get("ip") == forwarded


async def test_slow_body_gets_408(start_collector: StartCollector) -> None:
    collector = await start_collector(body_timeout=0.5)
    assert collector.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", collector.port)
    writer.write(
        b"POST /e HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        b'Content-Length: 100\r\n\r\n{"event"'
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.startswith(b"HTTP/1.1 408")
    writer.close()
    status, _, _ = await collector.post("/e", EVENT)
    assert status == 202


async def test_gzip_ratio_is_capped(collector: Collector) -> None:
    bomb = gzip.compress(
        b'{"event": "x", "anonymous_id": "a", "properties": {"p": "' + b"0" * 200_000
    )
    assert len(bomb) * 100 < 200_000
    status, answer, _ = await collector.post(
        "/e", data=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )
    assert status == 413
    assert "once decoded" in answer["error"]


async def test_security_headers_everywhere(start_collector: StartCollector) -> None:
    collector = await start_collector(allowed_origins=(SHOP,))
    for method, path in [("GET", "/s.js"), ("GET", "/healthz"), ("GET", "/nope"), ("POST", "/e")]:
        assert collector.session is not None
        async with collector.session.request(method, collector.url(path), data=b"{") as response:
            assert response.headers["X-Content-Type-Options"] == "nosniff", path
    _, _, response = await collector.get("/s.js")
    assert response.headers["Cross-Origin-Resource-Policy"] == "cross-origin"


async def test_secrets_appear_nowhere(
    start_collector: StartCollector, fake: FakeOutbound, caplog: pytest.LogCaptureFixture
) -> None:
    """After the suite's kinds of scenarios, no response, header, log line or script holds
    the Outbound key, the identity secret or a server token."""
    caplog.set_level(logging.DEBUG)
    identity, token = "identity-secret-never-shown-0123456789", "server-token-never-shown-1"
    collector = await start_collector(
        identity_secret=Secret(identity),
        server_tokens=(Secret(token),),
        allowed_origins=(SHOP,),
        breaker_threshold=1,
        probe_interval=0.2,
    )
    seen: list[str] = []

    async def record(method: str, path: str, **kwargs: object) -> None:
        assert collector.session is not None
        async with collector.session.request(method, collector.url(path), **kwargs) as response:  # type: ignore[arg-type]
            seen.append(str(response.status) + str(dict(response.headers)) + await response.text())

    bodies = [
        (b'{"event": "x", "user_id": "u1", "anonymous_id": "a"}', {}),
        (b'{"event": "x", "user_id": "u1"}', {}),
        (b"{", {}),
        (b'{"event": "x", "user_id": "u1"}', {"Authorization": f"Bearer {token}"}),
        (b'{"event": "x", "user_id": "u1"}', {"Authorization": f"Bearer {token}z"}),
        (b'{"event": "x", "user_id": "u1"}', {"Authorization": f"Bearer {KEY}"}),
        (b'{"event": "x", "anonymous_id": "a"}', {"Origin": "https://evil.example"}),
        (b'{"event": "x", "anonymous_id": "a"}', {"Origin": SHOP}),
    ]
    for body, headers in bodies:
        await record("POST", "/e", data=body, headers={"Content-Type": "text/plain", **headers})
        await record("POST", "/v2/track", data=body, headers=headers)
    fake.key = "rotated"  # the relay meets a 401 and pauses
    await collector.post("/e", {"event": "y", "anonymous_id": "b"})
    await eventually(lambda: collector.relay.breaker.is_open)
    fake.key = KEY
    await eventually(lambda: not collector.relay.breaker.is_open, within=5)
    for path in ("/s.js", "/healthz", "/readyz"):
        await record("GET", path)
    await record("OPTIONS", "/e", headers={"Origin": SHOP, "Access-Control-Request-Method": "POST"})
    everything = "\n".join([*seen, caplog.text, repr(collector.settings)])
    for secret in (KEY, identity, token):
        assert secret not in everything
