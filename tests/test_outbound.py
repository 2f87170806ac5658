"""The calls a record becomes, Retry-After parsing, and aiohttp's client sending them to a fake
Outbound that misbehaves on the wire."""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import ssl
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import eventually

from collector.config import Secret
from collector.outbound import (
    DETAIL_BYTES,
    Call,
    HttpOutbound,
    calls_for,
    header_safe_guid,
    identify_body,
    parse_retry_after,
    server_context,
)

NOW = 1_700_000_000.0
IDS_KEY = Secret("ab" * 32)


def record(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track",
        "message_id": "m1",
        "user_id": None,
        "anonymous_id": "anon:a1",  # as ingest stores it: in the anonymous namespace
        "anonymous_prefix": "anon:",
        "event": "clicked",
        "properties": {},
        "traits": {},
        "timestamp": 1529366403.9,
        "received_at": NOW,
        "context": {},
        "ip": "203.0.113.9",
        "user_agent": None,
        "origin": None,
    }
    return {**base, **fields}


def bodies(
    rec: dict[str, Any], identified: bool = True, context: str = ""
) -> list[tuple[str, Any]]:
    calls = calls_for(
        rec,
        key=IDS_KEY,
        identified=identified,
        page_event_name="pageView",
        context_property=context,
    )
    return [(call.endpoint, call.body) for call in calls]


@pytest.mark.parametrize(
    ("rec", "identified", "expected"),
    [
        (
            record(),
            True,
            [("/v2/track", {"user_id": "anon:a1", "event": "clicked", "timestamp": 1529366403})],
        ),
        (
            record(user_id="u1", properties={"a": {"b": 1}}),
            False,
            [
                ("/v2/identify", {"user_id": "u1"}),
                (
                    "/v2/track",
                    {
                        "user_id": "u1",
                        "event": "clicked",
                        "timestamp": 1529366403,
                        "properties": {"a": {"b": 1}},
                    },
                ),
            ],
        ),
        (
            record(type="identify", user_id="u1", event=None),
            False,
            [("/v2/identify", {"user_id": "u1", "previous_id": "anon:a1"})],
        ),
        (
            record(type="identify", event=None, traits={"first_name": "Jane", "plan": "gold"}),
            True,
            [
                (
                    "/v2/identify",
                    {"user_id": "anon:a1", "first_name": "Jane", "attributes": {"plan": "gold"}},
                )
            ],
        ),
        (
            record(
                type="identify",
                user_id="u1",
                anonymous_id=None,
                event=None,
                traits={"email": "", "attributes": {"x": 1}, "last_name": None, "y": 2},
            ),
            True,
            [("/v2/identify", {"user_id": "u1", "attributes": {"x": 1, "y": 2}})],
        ),
        (
            record(
                type="page",
                event=None,
                context={"url": "https://a.example/p", "path": "/p", "title": "", "locale": "de"},
                properties={"variant": "b"},
            ),
            True,
            [
                (
                    "/v2/track",
                    {
                        "user_id": "anon:a1",
                        "event": "pageView",
                        "timestamp": 1529366403,
                        "properties": {"url": "https://a.example/p", "path": "/p", "variant": "b"},
                    },
                )
            ],
        ),
    ],
    ids=["anonymous track", "first track of a user", "alias", "traits", "empty traits", "page"],
)
def test_calls_for(rec: dict[str, Any], identified: bool, expected: list[tuple[str, Any]]) -> None:
    assert bodies(rec, identified) == expected


def test_server_context_is_forwarded_under_its_key_without_the_ip() -> None:
    rec = record(context={"url": "https://a.example/", "locale": "en-GB"}, user_agent="UA/1")
    [(_, track)] = bodies(rec, context="collector")
    assert track["properties"]["collector"] == {
        "page": {"url": "https://a.example/"},
        "locale": "en-GB",
        "user_agent": "UA/1",
        "received_at": int(NOW),
    }
    assert "203.0.113.9" not in str(track)
    assert server_context(record()) == {"received_at": int(NOW)}


def test_identify_body_keeps_given_attributes_first() -> None:
    body = identify_body(record(type="identify", traits={"attributes": {"a": 1}, "a": 2}))
    assert body["attributes"] == {"a": 2}


def test_guids_are_stable_per_event_and_distinct_per_call() -> None:
    first = calls_for(
        record(), key=IDS_KEY, identified=False, page_event_name="p", context_property=""
    )
    again = calls_for(
        record(), key=IDS_KEY, identified=False, page_event_name="p", context_property=""
    )
    assert [c.guid for c in first] == [c.guid for c in again]
    assert first[1].guid == "m1"
    assert first[0].guid != first[1].guid


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("-5", None),
        ("soon", None),
        ("1.5", None),  # not an HTTP delay-seconds value
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),  # NOW + 30 s
        ("Tue, 14 Nov 2023 22:12:00 GMT", 0.0),  # already past
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW) == expected


def test_a_guid_a_header_cannot_carry_becomes_a_stable_uuid() -> None:
    assert header_safe_guid("0190aa5e-7c2f-7000-8000-000000000001") == (
        "0190aa5e-7c2f-7000-8000-000000000001"
    )
    unsafe = header_safe_guid("id\r\nX-Outbound-Key: stolen")
    assert unsafe == header_safe_guid("id\r\nX-Outbound-Key: stolen")
    assert uuid.UUID(unsafe).version == 5
    assert header_safe_guid("é") != header_safe_guid("è")


# Warnings are errors here: an unclosed session or connection fails the test that left it.
pytestmark = pytest.mark.filterwarnings("error")

RESET = "reset"  # a step: end the connection with a TCP reset rather than a close
Step = bytes | float | str | None
Script = Callable[[int, bytes], Iterable[Step]]


class RawServer:
    """Reads requests on loopback and answers what a script says, given the request's number
    and bytes: bytes to write, a pause in seconds, None to close the connection, or RESET."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.active = 0
        self.most_active = 0  # requests waiting for their answer at once, at most
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Listen on 127.0.0.1; the port."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                assert length is not None
                request = head + await reader.readexactly(int(length[1]))
                self.requests.append(request)
                if not await self._answer(request, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client left, or the test is over
        finally:
            writer.close()
            self._handlers.discard(handler)

    async def _answer(self, request: bytes, writer: asyncio.StreamWriter) -> bool:
        """Play the script for one request; False when it ended the connection."""
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            for step in self.script(len(self.requests), request):
                if step is None:
                    return False
                if step == RESET:
                    linger = struct.pack("ii", 1, 0)  # on, 0 s: close() sends a reset
                    writer.get_extra_info("socket").setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, linger
                    )
                    writer.transport.abort()
                    return False
                if isinstance(step, float):
                    await asyncio.sleep(step)
                else:
                    assert isinstance(step, bytes)
                    writer.write(step)
                    await writer.drain()
            return True
        finally:
            self.active -= 1

    async def close(self) -> None:
        """Stop listening and end every connection, a script still playing included."""
        if self.server is not None:
            self.server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


StartRaw = Callable[..., Awaitable[tuple[RawServer, HttpOutbound]]]


@pytest.fixture
async def raw_server() -> AsyncIterator[StartRaw]:
    """Start a RawServer and an HttpOutbound to it; both are closed after the test."""
    started: list[tuple[RawServer, HttpOutbound]] = []

    async def start(
        script: Script,
        *,
        timeout: float = 1.0,
        concurrency: int = 32,
        host: str = "127.0.0.1",
        path: str = "",
    ) -> tuple[RawServer, HttpOutbound]:
        server = RawServer(script)
        url = f"http://{host}:{await server.start()}{path}"
        client = HttpOutbound(url, Secret("k-123"), timeout, concurrency=concurrency)
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        await client.close()
        await server.close()


CALL = Call("/v2/track", {"user_id": "u1", "event": "clicked"}, "g-1", "clicked")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = (
    b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nuser_\r\n0b\r\nid required\r\n0\r\nX-Trailer: t\r\n\r\n"
)
HEAD = b"HTTP/1.1 200 OK\r\n"
EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
PIECES: list[Step] = [CHUNKED[i : i + 1] for i in range(len(CHUNKED))]
LONG = b"0123456789" * 500


def then_ok(first: list[Step]) -> Script:
    """The first request gets `first`; every later one a plain 200."""
    return lambda n, request: first if n == 1 else [OK]


@pytest.mark.parametrize(
    ("first", "status", "detail", "connections"),
    [
        ([OK], 200, "ok", 1),
        ([*PIECES[:20], 0.05, *PIECES[20:]], 400, "user_id required", 1),
        ([b"HTTP/1.1 200 OK\r\n\r\nuntil the end", None], 200, "until the end", 2),
        ([b"HTTP/1.0 400 Bad Request\r\n\r\nold", None], 400, "old", 2),
        (
            [b"HTTP/1.1 100 Continue\r\n\r\n", EARLY_HINTS, OK],
            200,
            "ok",
            1,
        ),
        ([b"HTTP/1.1 204 No Content\r\n\r\n"], 204, "", 1),
        (
            [b"HTTP/1.1 400 X\r\nContent-Length: %d\r\n\r\n%s" % (len(LONG), LONG)],
            400,
            LONG[:DETAIL_BYTES].decode(),
            1,
        ),
        ([b"HTTP/1.1 400 X\r\nContent-Length: 4\r\n\r\n\xff\xfeok"], 400, "\ufffd\ufffdok", 1),
    ],
    ids=[
        "Content-Length",
        "chunked, in pieces, with an extension and a trailer",
        "no length: the body ends with the connection",
        "HTTP/1.0",
        "1xx answers before the answer",
        "204",
        "a body longer than the detail: its start",
        "not UTF-8",
    ],
)  # fmt: skip
async def test_answers_as_they_come_on_the_wire(
    raw_server: StartRaw, first: list[Step], status: int, detail: str, connections: int
) -> None:
    server, client = await raw_server(then_ok(first))
    answer = await client.send(CALL)
    assert (answer.status, answer.detail, answer.retry_after) == (status, detail, None)
    # The next call goes on the same connection unless this answer ended it.
    assert (await client.send(CALL)).status == 200
    assert (server.connections, len(server.requests)) == (connections, 2)


def http_date(seconds_from_now: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (lambda: "7", 7.0),
        (lambda: http_date(120), pytest.approx(120, abs=5)),
        (lambda: http_date(-60), 0.0),
        (lambda: "soon", None),
    ],
    ids=["seconds", "a date", "a date past", "neither"],
)
async def test_retry_after_as_seconds_or_a_date(
    raw_server: StartRaw, header: Callable[[], str], expected: object
) -> None:
    def answer(n: int, request: bytes) -> list[Step]:
        return [
            b"HTTP/1.1 429 X\r\nRetry-After: %s\r\nContent-Length: 0\r\n\r\n" % header().encode()
        ]

    _, client = await raw_server(answer)
    got = await client.send(CALL)
    assert (got.status, got.retry_after) == (429, expected)


CUT = HEAD + b"Content-Length: 10\r\n\r\nabc"
CUT_CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"


@pytest.mark.parametrize(
    ("first", "error", "saying"),
    [
        ([None], "ServerDisconnectedError", "Server disconnected"),
        ([RESET], "ClientOSError", "Connection reset by peer"),
        ([CUT, None], "ClientPayloadError", "received 3 of 10 bytes"),
        ([CUT, RESET], "ClientPayloadError", "Response payload is not completed"),
        ([CUT_CHUNKED, None], "ClientPayloadError", "Not enough data to satisfy transfer length"),
        ([b"garbage\r\n\r\n"], "ClientResponseError", "Bad status line"),
        ([b"HTTP/1.1 2xx OK\r\n\r\n"], "ClientResponseError", "Invalid status code"),
        ([HEAD + b"no colon here\r\n\r\n"], "ClientResponseError", "Invalid header token"),
        (
            [HEAD + b"Content-Length: -1\r\n\r\n"],
            "ClientResponseError",
            "Invalid character in Content-Length",
        ),
        (
            [HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"],
            "ClientResponseError",
            "Invalid character in chunk size",
        ),
        ([HEAD + b"X: y\r\n" * 20000 + b"\r\n"], "ClientResponseError", "Too many headers"),
        ([3.0, OK], "TimeoutError", "no answer within 1 s"),
        ([OK[:-2], 3.0, b"ok"], "TimeoutError", "no answer within 1 s"),
    ],
    ids=[
        "closed before any answer",
        "reset before any answer",
        "closed mid-body",
        "reset mid-body",
        "chunked, cut off",
        "garbage instead of a status line",
        "a status that is not a number",
        "a header line without a colon",
        "a negative Content-Length",
        "a chunk size that is not hexadecimal",
        "a head too large",
        "no answer within the timeout",
        "the body not within the timeout",
    ],
)  # fmt: skip
async def test_a_broken_answer_is_a_failed_call(
    raw_server: StartRaw, first: list[Step], error: str, saying: str
) -> None:
    server, client = await raw_server(then_ok(first))
    answer = await client.send(CALL)
    assert answer.status is None
    assert answer.detail.startswith(f"{error}: "), answer.detail
    assert saying in answer.detail
    # The call was not sent again (Outbound drops a resend by GUID, but the relay's retry
    # policy decides when), and the next call goes on a fresh connection.
    assert len(server.requests) == 1
    assert (await client.send(CALL)).status == 200
    assert (len(server.requests), server.connections) == (2, 2)


def request_head(request: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = request.partition(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (f.partition(": ") for f in fields)}
    return line, headers, body


async def test_calls_share_a_kept_alive_connection_with_the_key_in_its_header_only(
    raw_server: StartRaw,
) -> None:
    with_cookie = b"HTTP/1.1 200 OK\r\nSet-Cookie: s=1; Path=/\r\nContent-Length: 2\r\n\r\nok"
    # By name, not by address: a cookie jar keeps no cookie from an IP address anyway.
    server, client = await raw_server(then_ok([with_cookie]), host="localhost", path="/api/")
    unsafe = Call("/v2/identify", {"user_id": "u1"}, "id\r\nX-Outbound-Key: stolen", "identify")
    answers = [await client.send(call) for call in (CALL, unsafe, CALL)]
    assert [(a.status, a.detail) for a in answers] == [(200, "ok")] * 3
    assert server.connections == 1
    line, headers, body = request_head(server.requests[0])
    assert line == "POST /api/v2/track HTTP/1.1"
    assert headers["x-outbound-key"] == "k-123"
    assert headers["x-outbound-guid"] == "g-1"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "outbound-collector"
    assert body == orjson.dumps(CALL.body)
    line, headers, body = request_head(server.requests[1])
    assert line == "POST /api/v2/identify HTTP/1.1"
    assert headers["x-outbound-guid"] == header_safe_guid(unsafe.guid)
    assert b"stolen" not in server.requests[1]
    assert all(request.count(b"k-123") == 1 for request in server.requests)
    assert not any(b"\r\nCookie:" in request for request in server.requests)  # none kept


async def test_connection_close_is_honoured(raw_server: StartRaw) -> None:
    # The server says it closes but keeps the connection open: a client that ignored the
    # header would send the next call on it.
    closing = b"HTTP/1.1 503 X\r\nRetry-After: 7\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    server, client = await raw_server(then_ok([closing]))
    first = await client.send(CALL)
    assert (first.status, first.retry_after) == (503, 7.0)
    assert (await client.send(CALL)).status == 200
    assert server.connections == 2


async def test_a_connection_closed_while_idle_is_replaced(raw_server: StartRaw) -> None:
    # The server answers, then closes the kept-alive connection (as idle timeouts do).
    server, client = await raw_server(lambda n, request: [OK, 0.05, None])
    first = await client.send(CALL)
    await eventually(lambda: server.active == 0)
    await asyncio.sleep(0.1)
    second = await client.send(CALL)
    assert (first.status, second.status) == (200, 200)
    assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_call_the_server_closes_on_unanswered_is_one_failed_attempt(
    raw_server: StartRaw,
) -> None:
    # aiohttp retries a request on a kept-alive connection that closes before any answer only
    # for idempotent methods (client.py, `retry_persistent_connection`); POST is not one, so
    # this is one failed attempt for the relay's retry policy, not a resend behind its back.
    server, client = await raw_server(lambda n, request: [None] if n == 2 else [OK])
    assert (await client.send(CALL)).status == 200
    failed = await client.send(CALL)
    assert (failed.status, failed.detail) == (None, "ServerDisconnectedError: Server disconnected")
    assert len(server.requests) == 2
    assert (await client.send(CALL)).status == 200
    assert len(server.requests) == 3


async def test_an_endless_body_is_not_read_to_its_end(raw_server: StartRaw) -> None:
    head = b"HTTP/1.1 400 X\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
    server, client = await raw_server(
        lambda n, request: itertools.chain([head], itertools.repeat(chunk)) if n == 1 else [OK]
    )
    answer = await client.send(CALL)
    assert (answer.status, answer.detail) == (400, "x" * DETAIL_BYTES)
    assert (await client.send(CALL)).status == 200  # on a new connection: that one was given up
    assert server.connections == 2


async def test_calls_beyond_the_concurrency_wait_for_a_connection(raw_server: StartRaw) -> None:
    server, client = await raw_server(lambda n, request: [0.05, OK], concurrency=2)
    answers = await asyncio.gather(*(client.send(CALL) for _ in range(6)))
    assert [a.status for a in answers] == [200] * 6
    assert (server.connections, server.most_active) == (2, 2)


async def test_a_cancelled_send_is_cancelled(raw_server: StartRaw) -> None:
    server, client = await raw_server(lambda n, request: [3.0, OK])
    sending = asyncio.create_task(client.send(CALL))
    await eventually(lambda: len(server.requests) == 1)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_the_key_never_reaches_an_error_message(raw_server: StartRaw) -> None:
    # A broken server that echoes the request's key line as its status line: aiohttp's parser
    # error quotes it.
    def echo_key(n: int, request: bytes) -> list[Step]:
        [line] = [line for line in request.split(b"\r\n") if line.startswith(b"X-Outbound-Key")]
        return [line + b"\r\n\r\n"]

    _, client = await raw_server(echo_key)
    answer = await client.send(CALL)
    assert answer.status is None
    assert "X-Outbound-Key: [key]" in answer.detail
    assert "k-123" not in answer.detail


def test_the_client_shows_its_url_but_never_its_key() -> None:
    client = HttpOutbound("https://api.outbound.io", Secret("k-123"), 5.0, concurrency=4)
    assert repr(client) == str(client) == "HttpOutbound('https://api.outbound.io')"
    with pytest.raises(ValueError, match="not an http"):
        HttpOutbound("api.outbound.io", Secret("k-123"), 5.0)


TLS = Path(__file__).parent / "tls"


async def test_https_with_the_certificate_checked() -> None:
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(TLS / "localhost.crt", TLS / "localhost.key")
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head)
            await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
            writer.write(OK)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    trusting = ssl.create_default_context(cafile=TLS / "localhost.crt")
    client = HttpOutbound(url, Secret("k-123"), 5.0, tls=trusting)
    strict = HttpOutbound(url, Secret("k-123"), 5.0)
    try:
        answered = await client.send(CALL)
        assert (answered.status, answered.detail) == (200, "ok")
        assert seen[0].startswith(b"POST /v2/track HTTP/1.1\r\n")
        # With the system's authorities only, a self-signed certificate is refused.
        refused = await strict.send(CALL)
        assert refused.status is None
        assert refused.detail.startswith("ClientConnectorCertificateError: ")
        assert "CERTIFICATE_VERIFY_FAILED" in refused.detail
        assert len(seen) == 1
    finally:
        await client.close()
        await strict.close()
        server.close()
        await server.wait_closed()
