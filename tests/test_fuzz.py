"""Fuzzing the live server: generated bodies, headers and content types never get a 5xx nor
an unhandled exception, and a normal event goes through afterwards.

FUZZ_EXAMPLES sets how many requests (300 by default; more for a longer hunt)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
from typing import Any

import pytest
from conftest import SEED_EVENT, Collector, StartCollector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.config import Secret

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
TOKEN = "fuzz-server-token-0123456789"

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
events = st.fixed_dictionaries(
    {},
    optional={
        "event": st.text(max_size=30) | values,
        "type": st.sampled_from(["track", "identify", "page"]) | values,
        "user_id": st.text(max_size=20) | st.integers() | values,
        "anonymous_id": st.text(max_size=20) | values,
        "user_hash": st.text(alphabet="0123456789abcdef", max_size=64) | values,
        "properties": st.dictionaries(st.text(max_size=10), values, max_size=6) | values,
        "traits": st.dictionaries(st.text(max_size=10), values, max_size=4) | values,
        "timestamp": st.floats(allow_nan=False, allow_infinity=False) | st.integers() | values,
        "sent_at": st.floats(allow_nan=False, allow_infinity=False) | values,
        "message_id": st.text(max_size=40) | values,
        "context": st.dictionaries(st.sampled_from(["url", "path", "title", "x"]), values) | values,
        "previous_id": values,
        "email": values,
    },
)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


def deep(depth: int, inside: str) -> bytes:
    """JSON nested `depth` levels (as text: orjson encodes at most 254), inside an event's
    properties, a batch, or bare; bodies that parse, then could not be encoded again."""
    opening = "".join('{"a": ' if level % 2 else "[" for level in range(depth))
    closing = "".join("}" if level % 2 else "]" for level in reversed(range(depth)))
    value = f"{opening}1{closing}"
    if inside == "event":
        return f'{{"event": "x", "user_id": "u", "properties": {{"p": {value}}}}}'.encode()
    if inside == "batch":
        return f'{{"batch": [{{"event": "x", "anonymous_id": "a", "traits": {value}}}]}}'.encode()
    return value.encode()


# 254 to 1,023 levels parse and cannot be encoded; the edges around them too.
DEPTHS = st.integers(min_value=120, max_value=1030) | st.sampled_from([253, 254, 1023, 1024])
deep_bodies = st.builds(deep, DEPTHS, st.sampled_from(["event", "batch", "bare"]))
# Every route the collector has with the debugger, the demo and metrics on; the streams are
# POSTed to (405), as a GET would stream until closed.
PATHS = [
    "/e",
    "/v2/track",
    "/v2/identify",
    "/debug",
    "/debug/login",
    "/debug/events",
    "/demo",
    "/demo/events",
    "/metrics",
    "/healthz",
    "/readyz",
    "/s.js",
    "/_collector/live.js",
]

bodies = st.one_of(
    deep_bodies,
    st.binary(max_size=600),
    events.map(encode),
    st.lists(events, max_size=4).map(lambda batch: encode({"batch": batch})),
    st.tuples(st.lists(events, max_size=3), values).map(
        lambda pair: encode({"batch": pair[0], "sent_at": pair[1]})
    ),
    values.map(encode),
    st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
)
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
content_types = (
    st.sampled_from(
        [
            "text/plain",
            "text/plain;charset=UTF-8",
            "application/json",
            "application/ld+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain; charset=latin-1",
            "",
            None,
        ]
    )
    | header_text
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Origin": st.sampled_from(["https://shop.example", "null", "https://evil.example"])
        | header_text,
        "Referer": header_text,
        "Authorization": st.sampled_from([f"Bearer {TOKEN}", "Bearer nope", "Basic x"])
        | header_text,
        "User-Agent": st.sampled_from(["Googlebot/2.1", "Mozilla/5.0"]) | header_text,
        "X-Forwarded-For": header_text,
        "Content-Encoding": st.sampled_from(["gzip", "deflate", "identity", "br", "x-unknown"]),
    },
)


@pytest.fixture
async def target(start_collector: StartCollector) -> Collector:
    return await start_collector(
        allowed_origins=("https://shop.example",),
        identity_secret=Secret("fuzz-identity-secret-0123456789abcdef"),
        server_tokens=(Secret(TOKEN),),
        rate_limit_per_ip=0.0,
        admin_token=Secret("fuzz-admin-token-0123456789"),
        demo="on",
    )


async def test_generated_requests_never_get_a_5xx(
    target: Collector, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    statuses: dict[int, int] = {}
    loop = asyncio.get_running_loop()

    def call(path: str, body: bytes, sent: dict[str, str]) -> int:
        # Hypothesis drives from a thread; the server keeps running on this test's loop.
        future = asyncio.run_coroutine_threadsafe(target.post(path, data=body, headers=sent), loop)
        return future.result(timeout=30)[0]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        path=st.sampled_from(["/e", "/v2/track", "/v2/identify"]) | st.sampled_from(PATHS),
        body=bodies,
        content_type=content_types,
        extra=headers,
        compress=st.booleans(),
    )
    def one_request(
        path: str, body: bytes, content_type: str | None, extra: dict[str, str], compress: bool
    ) -> None:
        sent = dict(extra)
        if content_type is not None:
            sent["Content-Type"] = content_type
        if compress and sent.get("Content-Encoding") == "gzip":
            body = gzip.compress(body)
        status = call(path, body, sent)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (path, body[:200], sent)

    await asyncio.to_thread(one_request)
    print(f"\nfuzz: {EXAMPLES} examples, statuses {dict(sorted(statuses.items()))}")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    status, answer, _ = await target.post(
        "/e", SEED_EVENT, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert (status, answer["accepted"]) == (202, 1)


@pytest.mark.parametrize("inside", ["event", "batch", "bare"])
async def test_deep_bodies_on_every_route(
    target: Collector, inside: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each route, each depth around orjson's limits: a 4xx (400 on the event routes), never a
    5xx nor an error in the log."""
    caplog.set_level(logging.WARNING)
    assert target.app is not None
    routes = {resource.canonical for resource in target.app.router.resources()}
    assert routes >= set(PATHS) - {"/_collector/live.js"}  # the list above misses none
    for path in PATHS:
        for depth in (253, 254, 255, 600, 1023, 1024, 1025):
            status, _, _ = await target.post(path, data=deep(depth, inside))
            assert status < 500, (path, depth)
            if path in {"/e", "/v2/track", "/v2/identify"}:
                assert status == 400, (path, depth)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
