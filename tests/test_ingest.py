"""Malformed and hostile requests over real HTTP: a clear answer, nothing stored, still up."""

from __future__ import annotations

import gzip
import logging
import sqlite3
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
from conftest import SEED_EVENT, Collector, StartCollector
from fake_outbound import FakeOutbound, Fault

from collector.config import Secret
from collector.ingest import RequestError, split_batch

TEXT = {"Content-Type": "text/plain;charset=UTF-8"}
JSON = {"Content-Type": "application/json"}


def body(value: object) -> bytes:
    return orjson.dumps(value)


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    status: int
    message: str
    path: str | None = None  # the JSON Pointer of the first problem, for per-event errors
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)
    endpoint: str = "/e"


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data)


GZIP = (("Content-Type", "application/json"), ("Content-Encoding", "gzip"))
EVENT = {"event": "x", "user_id": "u1"}

HOSTILE = [
    Hostile("broken JSON", b'{"event": "x", ', 400, "not valid JSON"),
    Hostile("empty body", b"", 400, "the body is empty"),
    Hostile("whitespace only", b"   ", 400, "not valid JSON"),
    Hostile(
        "form content type",
        b"event=x",
        415,
        "'application/x-www-form-urlencoded' is not accepted",
        headers=(("Content-Type", "application/x-www-form-urlencoded"),),
    ),
    Hostile(
        "multipart",
        b"--b\r\n\r\n--b--",
        415,
        "'multipart/form-data' is not accepted",
        headers=(("Content-Type", "multipart/form-data; boundary=b"),),
    ),
    Hostile("array at the top", b"[]", 400, "must be a JSON object"),
    Hostile("string at the top", b'"renewMembership"', 400, "must be a JSON object"),
    Hostile("null at the top", b"null", 400, "must be a JSON object"),
    Hostile("missing event name", body({"user_id": "u1"}), 400, "`event` is required", "/event"),
    Hostile("no user at all", body({"event": "x"}), 400, "needs `user_id` or `anonymous_id`", ""),
    Hostile("empty user_id", body({"event": "x", "user_id": ""}), 400, "non-empty", "/user_id"),
    Hostile(
        "user_id an object",
        body({"event": "x", "user_id": {"id": 1}}),
        400,
        "non-empty string",
        "/user_id",
    ),
    Hostile(
        "event a number",
        body({"event": 7, "user_id": "u1"}),
        400,
        "must be a string, not a whole number",
        "/event",
    ),
    Hostile(
        "empty event name", body({"event": "", "user_id": "u1"}), 400, "must not be empty", "/event"
    ),
    Hostile(
        "properties an array",
        body({**EVENT, "properties": [1, 2]}),
        400,
        "must be an object, not an array",
        "/properties",
    ),
    Hostile(
        "timestamp a string",
        body({**EVENT, "timestamp": "2018-06-12"}),
        400,
        "Unix time in seconds",
        "/timestamp",
    ),
    Hostile(
        "timestamp in milliseconds",
        body({**EVENT, "timestamp": 1529366403000}),
        400,
        "not milliseconds",
        "/timestamp",
    ),
    Hostile("negative timestamp", body({**EVENT, "timestamp": -5}), 400, "Unix time", "/timestamp"),
    Hostile(
        "boolean timestamp", body({**EVENT, "timestamp": True}), 400, "Unix time", "/timestamp"
    ),
    Hostile("unknown field", body({**EVENT, "userId": "u1"}), 400, "not a known field", "/userId"),
    Hostile("unknown type", body({**EVENT, "type": "alias"}), 400, "must be one of", "/type"),
    Hostile(
        "context url a number",
        body({**EVENT, "context": {"url": 5}}),
        400,
        "must be a string",
        "/context/url",
    ),
    Hostile(
        "deeply nested properties",
        body({**EVENT, "properties": nested(12)}),
        400,
        "nested deeper than 10 levels",
        "/properties" + "/a" * 10,
    ),
    Hostile("10,000-deep nesting", b"[" * 10_000 + b"]" * 10_000, 400, "not valid JSON"),
    Hostile(
        "oversized body",
        body({**EVENT, "properties": {"blob": "x" * 600_000}}),
        413,
        "over the limit of 524288 bytes",
    ),
    Hostile(
        "oversized event",
        body({**EVENT, "properties": {"blob": "x" * 40_000}}),
        400,
        "the limit is 32768",
        "",
    ),
    Hostile("batch of 101", body({"batch": [EVENT] * 101}), 413, "the limit is 100"),
    Hostile("batch not an array", body({"batch": EVENT}), 400, "non-empty array"),
    Hostile("empty batch", body({"batch": []}), 400, "non-empty array"),
    Hostile("batch with extra key", body({"batch": [EVENT], "user_id": "u"}), 400, "not `user_id`"),
    Hostile("batch sent_at a string", body({"batch": [EVENT], "sent_at": "now"}), 400, "sent_at"),
    Hostile(
        "every event of a batch invalid",
        body({"batch": [{"event": "x"}, {"user_id": "u"}]}),
        400,
        "needs `user_id` or `anonymous_id`",
        "",
    ),
    Hostile("broken gzip", b"not gzip at all", 400, "not valid gzip", headers=GZIP),
    Hostile(
        "truncated gzip", b"\x1f\x8b\x08\x00garbage", 400, "truncated or not gzip", headers=GZIP
    ),
    Hostile(
        "gzip bomb",
        gzip_of(b'{"event": "x", "user_id": "u", "properties": {"p": "' + b"0" * 5_000_000),
        413,
        "over the limit",
        headers=GZIP,
    ),
    Hostile("invalid UTF-8", b'{"event": "\xff\xfe", "user_id": "u"}', 400, "not valid JSON"),
    Hostile("NaN", b'{"event": "x", "user_id": "u", "timestamp": NaN}', 400, "not valid JSON"),
    Hostile("Infinity", b'{"event": "x", "user_id": "u", "timestamp": Infinity}', 400, "JSON"),
    Hostile("huge number", b'{"event": "x", "user_id": "u", "timestamp": 1e400}', 400, "JSON"),
    Hostile(
        "huge timestamp",
        body({**EVENT, "timestamp": 1e300}),
        400,
        "Unix time in seconds",
        "/timestamp",
    ),
    Hostile("lone surrogate", b'{"event": "\\ud800", "user_id": "u"}', 400, "not valid JSON"),
    Hostile(
        "10 MB string",
        body({**EVENT, "properties": {"s": "x" * 10_000_000}}),
        413,
        "over the limit",
    ),
    Hostile(
        "long string inside properties",
        body({**EVENT, "properties": {"note": "x" * 9000}}),
        400,
        "longer than 8192 characters",
        "/properties/note",
    ),
    Hostile(
        "too many keys",
        body({**EVENT, "properties": {f"k{i}": i for i in range(1001)}}),
        400,
        "more than 1000 keys",
        "/properties",
    ),
    Hostile("context an array", body({**EVENT, "context": []}), 400, "an object", "/context"),
    Hostile("traits a number", body({**EVENT, "traits": 5}), 400, "an object", "/traits"),
    Hostile("type an object", body({**EVENT, "type": {}}), 400, "must be one of", "/type"),
    Hostile(
        "message_id a number", body({**EVENT, "message_id": 7}), 400, "a string", "/message_id"
    ),
    Hostile("user_hash an array", body({**EVENT, "user_hash": []}), 400, "a string", "/user_hash"),
    Hostile(
        "Outbound identify email a number",
        body({"user_id": "u1", "email": 5}),
        400,
        "a string or null",
        "/email",
        endpoint="/v2/identify",
    ),
    Hostile(
        "reserved context property",
        body({**EVENT, "properties": {"collector": {"ip": "1.2.3.4"}}}),
        400,
        "reserved",
        "/properties/collector",
    ),
    Hostile(
        "Outbound track without event",
        body({"user_id": "u1"}),
        400,
        "`event` is required",
        "/event",
        endpoint="/v2/track",
    ),
    Hostile(
        "Outbound track with a browser field",
        body({"user_id": "u1", "event": "x", "anonymous_id": "a"}),
        400,
        "not a known field",
        "/anonymous_id",
        endpoint="/v2/track",
    ),
    Hostile(
        "Outbound identify without user_id",
        body({"email": "a@b.c"}),
        400,
        "`user_id` is required",
        "/user_id",
        endpoint="/v2/identify",
    ),
    Hostile(
        "Outbound identify attributes a string",
        body({"user_id": "u1", "attributes": "gold"}),
        400,
        "must be an object",
        "/attributes",
        endpoint="/v2/identify",
    ),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[case.name for case in HOSTILE])
async def test_hostile_request_is_refused_and_nothing_stored(
    collector: Collector, fake: FakeOutbound, case: Hostile, caplog: pytest.LogCaptureFixture
) -> None:
    status, answer, response = await collector.post(
        case.endpoint, data=case.data, headers=dict(case.headers)
    )
    assert status == case.status
    assert response.content_type == "application/json"
    if case.path is None:
        assert case.message in answer["error"]
    else:
        assert answer["accepted"] == 0
        errors = [error for rejected in answer["rejected"] for error in rejected["errors"]]
        assert any(case.message in error["message"] for error in errors), errors
        assert errors[0]["path"] == case.path
    stats = await collector.queue.stats()
    assert stats.depth == 0
    assert collector.queue.stored == 0

    # The server is still up and takes a good event afterwards, having logged no error.
    status, answer, _ = await collector.post("/e", SEED_EVENT)
    assert (status, answer["accepted"]) == (202, 1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_hostile_table_is_large_enough() -> None:
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize(
    ("name", "data", "check"),
    [
        (
            "duplicate keys: the last wins",
            b'{"event": "a", "event": "b", "user_id": "u"}',
            ("event", "b"),
        ),
        (
            "__proto__ key",
            b'{"event": "x", "user_id": "u", "properties": {"__proto__": {"admin": true}}}',
            ("properties", {"__proto__": {"admin": True}}),
        ),
        ("NUL bytes", b'{"event": "a\\u0000b", "user_id": "u"}', ("event", "a\x00b")),
        (
            "far-future timestamp is clamped",
            b'{"event": "x", "user_id": "u", "timestamp": 99999999999}',
            ("clamped_from", 99999999999),
        ),
        ("negative zero", b'{"event": "x", "user_id": "u", "timestamp": -0}', ("timestamp", 0)),
        ("numeric user_id", b'{"event": "x", "user_id": 123}', ("user_id", "123")),
    ],
)
async def test_odd_but_valid_bodies_are_stored_as_they_mean(
    collector: Collector, fake: FakeOutbound, name: str, data: bytes, check: tuple[str, object]
) -> None:
    fake.always = Fault(503)  # keep it queued to look at what was stored
    status, answer, _ = await collector.post("/e", data=data, headers=TEXT)
    assert (status, answer["accepted"]) == (202, 1), answer
    with sqlite3.connect(collector.queue.path) as db:
        (stored,) = db.execute("SELECT body FROM events").fetchone()
    key, expected = check
    assert orjson.loads(stored)[key] == expected


async def test_each_problem_is_reported_with_its_path(collector: Collector) -> None:
    event = {"event": 5, "user_id": "", "properties": [], "timestamp": "x"}
    status, answer, _ = await collector.post("/e", event)
    assert status == 400
    errors = {e["path"]: e["message"] for e in answer["rejected"][0]["errors"]}
    assert set(errors) == {"/event", "/user_id", "/properties", "/timestamp"}


async def test_batch_keeps_valid_events_and_reports_the_rest(
    collector: Collector, fake: FakeOutbound
) -> None:
    batch = [EVENT, {"event": "y"}, {**EVENT, "event": "z", "properties": "no"}]
    status, answer, _ = await collector.post("/e", {"batch": batch})
    assert status == 202
    assert answer["accepted"] == 1
    assert [r["index"] for r in answer["rejected"]] == [1, 2]
    assert answer["rejected"][1]["errors"] == [
        {"path": "/properties", "message": "must be an object, not a string"}
    ]
    await fake.wait_for(2)
    assert [r.body["event"] for r in fake.tracks()] == ["x"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        {"Content-Type": "text/plain;charset=UTF-8"},
        {"Content-Type": "application/vnd.api+json"},
        {},  # server clients that send no content type
    ],
    ids=["json", "text-plain", "plus-json", "none"],
)
async def test_accepted_content_types(collector: Collector, headers: dict[str, str]) -> None:
    status, answer, _ = await collector.post("/e", data=body(SEED_EVENT), headers=headers)
    assert (status, answer["accepted"]) == (202, 1)


async def test_gzip_body_is_accepted(collector: Collector, fake: FakeOutbound) -> None:
    status, answer, _ = await collector.post(
        "/e", data=gzip_of(body(SEED_EVENT)), headers=dict(GZIP)
    )
    assert (status, answer["accepted"]) == (202, 1)
    await fake.wait_for(2)


async def test_limits_are_configurable(start_collector: StartCollector) -> None:
    collector = await start_collector(max_batch_events=2, max_body_bytes=2048, max_event_bytes=300)
    status, answer, _ = await collector.post("/e", {"batch": [EVENT] * 3})
    assert (status, answer["error"]) == (413, "the batch has 3 events; the limit is 2")
    status, answer, _ = await collector.post("/e", {**EVENT, "properties": {"p": "x" * 3000}})
    assert status == 413
    status, answer, _ = await collector.post("/e", {**EVENT, "properties": {"p": "x" * 400}})
    assert status == 400
    assert "the limit is 300" in answer["rejected"][0]["errors"][0]["message"]


SHOP_ORIGIN = "https://shop.example"


def varies_on_origin(response: aiohttp.ClientResponse) -> bool:
    names = {name.strip().lower() for name in response.headers.get("Vary", "").split(",")}
    return "origin" in names


def readable_by(response: aiohttp.ClientResponse, origin: str) -> bool:
    """Whether a page on `origin` may read this answer (without credentials), as CORS says."""
    return (
        response.headers.get("Access-Control-Allow-Origin") == origin
        and "Access-Control-Allow-Credentials" not in response.headers
        and varies_on_origin(response)
    )


async def test_cors_headers_on_success_errors_and_preflight(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503)  # nothing leaves the queue: the third event fills it
    collector = await start_collector(
        allowed_origins=(SHOP_ORIGIN,),
        cors_max_age=600,
        max_batch_events=2,
        queue_max_events=2,
        queue_share_per_ip=1.0,
        queue_browser_share=1.0,
        breaker_threshold=1,
    )
    origin = {"Origin": SHOP_ORIGIN}
    status, _, response = await collector.post("/e", SEED_EVENT, headers=origin)
    assert status == 202
    assert readable_by(response, SHOP_ORIGIN)
    # Every error a page may meet is readable too, and says when to retry where it does.
    errors = [
        ({"event": 1}, {}, 400),
        (b"{", TEXT, 400),
        (b"event=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"batch": [EVENT] * 3}, {}, 413),
    ]
    for document, headers, expected in errors:
        raw = document if isinstance(document, bytes) else None
        status, _, response = await collector.post(
            "/e", None if raw else document, data=raw, headers={**headers, **origin}
        )
        assert status == expected
        assert readable_by(response, SHOP_ORIGIN), expected
    status, _, response = await collector.post("/e", {**SEED_EVENT, "event": "y"}, headers=origin)
    assert status == 202
    status, _, response = await collector.post("/e", {**SEED_EVENT, "event": "z"}, headers=origin)
    assert (status, response.headers["Retry-After"]) == (503, "5")
    assert readable_by(response, SHOP_ORIGIN)
    assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"

    assert collector.session is not None
    preflight = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with collector.session.options(collector.url("/e"), headers=preflight) as response:
        assert response.status == 200
        assert readable_by(response, SHOP_ORIGIN)
        assert response.headers["Access-Control-Max-Age"] == "600"
        assert response.headers["Access-Control-Allow-Methods"] == "POST"
        assert response.headers["Access-Control-Allow-Headers"].lower() == "content-type"
    # Refused preflights: aiohttp-cors answers 403 without CORS headers, so the browser
    # never sends the request itself.
    refused = [
        ({**preflight, "Origin": "https://evil.example"}, "https://evil.example"),
        ({**preflight, "Access-Control-Request-Headers": "content-type, x-custom"}, "x-custom"),
        ({**preflight, "Access-Control-Request-Method": "PUT"}, "PUT"),
    ]
    for headers, reason in refused:
        async with collector.session.options(
            collector.url("/v2/track"), headers=headers
        ) as response:
            assert response.status == 403
            assert "Access-Control-Allow-Origin" not in response.headers
            assert varies_on_origin(response)
            assert reason.lower() in (await response.text()).lower()


async def test_a_refused_origin_can_read_its_403_and_nothing_else(
    start_collector: StartCollector,
) -> None:
    """The page's script must see the 403 to drop its batch (a response it cannot read looks
    like a network error, and it would resend forever); only the refusal is readable."""
    token = "server-token-for-the-test-1"
    collector = await start_collector(
        allowed_origins=(SHOP_ORIGIN,), server_tokens=(Secret(token),)
    )
    evil = "https://evil.example"
    for path in ("/e", "/v2/track", "/v2/identify"):
        status, answer, response = await collector.post(path, SEED_EVENT, headers={"Origin": evil})
        assert status == 403
        assert answer == {"error": f"the origin '{evil}' is not allowed to send events"}
        assert readable_by(response, evil)
        assert "Access-Control-Expose-Headers" not in response.headers
    assert collector.queue.stored == 0
    # A back-end that says it is on that origin, with a valid token, is served; its answers
    # stay unreadable to a page on it.
    bearer = {"Origin": evil, "Authorization": f"Bearer {token}"}
    status, _, response = await collector.post("/e", SEED_EVENT, headers=bearer)
    assert status == 202
    assert "Access-Control-Allow-Origin" not in response.headers
    status, _, response = await collector.post("/e", {"event": 1}, headers=bearer)
    assert status == 400
    assert "Access-Control-Allow-Origin" not in response.headers
    # A rebound DNS name pointing at the collector (Host: evil.test) is no origin of its
    # own: refused, and that page reads its refusal like any other refused page.
    port = collector.url("/").split(":")[2].split("/")[0]
    rebound = f"http://evil.test:{port}"
    status, _, response = await collector.post(
        "/e", SEED_EVENT, headers={"Origin": rebound, "Host": f"evil.test:{port}"}
    )
    assert status == 403
    assert readable_by(response, rebound)
    # Refused by its Referer alone: no Origin, so no CORS at all.
    status, _, response = await collector.post(
        "/e", SEED_EVENT, headers={"Referer": f"{evil}/page"}
    )
    assert status == 403
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_cors_for_any_origin_with_a_star(start_collector: StartCollector) -> None:
    collector = await start_collector(allowed_origins=("*",))
    for anywhere in ("https://anywhere.example", "null"):
        status, _, response = await collector.post(
            "/v2/track", SEED_EVENT, headers={"Origin": anywhere}
        )
        assert status == 202
        assert readable_by(response, anywhere)  # echoed, never with credentials
        assert collector.session is not None
        preflight = {"Origin": anywhere, "Access-Control-Request-Method": "POST"}
        async with collector.session.options(
            collector.url("/v2/track"), headers=preflight
        ) as response:
            assert response.status == 200
            assert readable_by(response, anywhere)
    status, _, response = await collector.post("/v2/track", SEED_EVENT)
    assert "Access-Control-Allow-Origin" not in response.headers  # not a browser: no CORS
    assert varies_on_origin(response)  # but a cache must not hand this answer to one


@pytest.mark.parametrize("path", ["/in", "/v2/track", "/v2/identify"])
async def test_every_browser_route_has_cors(start_collector: StartCollector, path: str) -> None:
    collector = await start_collector(
        allowed_origins=(SHOP_ORIGIN,), event_path="/in", cors_max_age=0
    )
    assert collector.session is not None
    preflight = {
        "Origin": SHOP_ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with collector.session.options(collector.url(path), headers=preflight) as response:
        assert response.status == 200
        assert readable_by(response, SHOP_ORIGIN)
        assert response.headers["Access-Control-Max-Age"] == "0"
    body = {"user_id": "u1"} if path == "/v2/identify" else SEED_EVENT
    status, _, response = await collector.post(path, body, headers={"Origin": SHOP_ORIGIN, **JSON})
    assert status == 202
    assert readable_by(response, SHOP_ORIGIN)


@pytest.mark.parametrize("origin", [None, SHOP_ORIGIN, "https://evil.example"])
async def test_the_script_is_public_to_every_origin(
    start_collector: StartCollector, origin: str | None
) -> None:
    """/s.js keeps its constant `*` (pages pin it with integrity, and caches keep one copy);
    no CORS layer may add its own header beside it."""
    collector = await start_collector(allowed_origins=(SHOP_ORIGIN,))
    headers = {"Origin": origin} if origin else {}
    status, _, response = await collector.get("/s.js", headers=headers)
    assert status == 200
    assert response.headers.getall("Access-Control-Allow-Origin") == ["*"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    status, _, response = await collector.get(
        "/s.js", headers={**headers, "If-None-Match": response.headers["ETag"]}
    )
    assert status == 304
    assert response.headers.getall("Access-Control-Allow-Origin") == ["*"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"batch": [1], "sent_at": float("inf")}, "sent_at"),
        ({"batch": [1], "sent_at": -1}, "sent_at"),
        ({"batch": [1], "sent_at": False}, "sent_at"),
    ],
)
def test_split_batch_refuses_bad_sent_at(document: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        split_batch(document, 100)


def test_split_batch_single_and_batch() -> None:
    assert split_batch(EVENT, 10) == ([EVENT], None)
    assert split_batch({"batch": [EVENT, EVENT], "sent_at": 5}, 10) == ([EVENT, EVENT], 5)
