"""The calls a record becomes, Retry-After parsing, and the HTTP client that sends them."""

from __future__ import annotations

import asyncio
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from collector.config import Secret
from collector.outbound import (
    DETAIL_BYTES,
    MAX_BODY_BYTES,
    Call,
    HttpOutbound,
    MalformedAnswer,
    Response,
    calls_for,
    header_safe_guid,
    identify_body,
    parse_response,
    parse_retry_after,
    server_context,
)

NOW = 1_700_000_000.0


def record(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "track",
        "message_id": "m1",
        "user_id": None,
        "anonymous_id": "anon",
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
        rec, identified=identified, page_event_name="pageView", context_property=context
    )
    return [(call.endpoint, call.body) for call in calls]


@pytest.mark.parametrize(
    ("rec", "identified", "expected"),
    [
        (
            record(),
            True,
            [("/v2/track", {"user_id": "anon", "event": "clicked", "timestamp": 1529366403})],
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
            [("/v2/identify", {"user_id": "u1", "previous_id": "anon"})],
        ),
        (
            record(type="identify", event=None, traits={"first_name": "Jane", "plan": "gold"}),
            True,
            [
                (
                    "/v2/identify",
                    {"user_id": "anon", "first_name": "Jane", "attributes": {"plan": "gold"}},
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
                        "user_id": "anon",
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
    first = calls_for(record(), identified=False, page_event_name="p", context_property="")
    again = calls_for(record(), identified=False, page_event_name="p", context_property="")
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


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = (
    b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nuser_\r\n0b\r\nid required\r\n0\r\nX-Trailer: t\r\n\r\n"
)
CHUNKED_HEADERS = {"transfer-encoding": "chunked"}
CLOSING = b"HTTP/1.1 503 X\r\nRetry-After: 7\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
CLOSING_HEADERS = {"retry-after": "7", "connection": "close", "content-length": "0"}
HTTP10 = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\n\r\nuntil the end"


@pytest.mark.parametrize(
    ("data", "eof", "expected"),
    [
        (OK, False, Response(200, {"content-length": "2"}, b"ok", True, len(OK))),
        (
            CHUNKED,
            False,
            Response(400, CHUNKED_HEADERS, b"user_id required", True, len(CHUNKED)),
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
            False,
            Response(200, {"content-length": "2"}, b"ok", True, len(OK) + 25),
        ),
        (CLOSING, False, Response(503, CLOSING_HEADERS, b"", False, len(CLOSING))),
        (HTTP10, False, Response(200, {"content-length": "0"}, b"", False, len(HTTP10))),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False, Response(204, {}, b"", True, 27)),
        (UNTIL_CLOSE, False, None),  # no length: the body ends when the connection does
        (UNTIL_CLOSE, True, Response(200, {}, b"until the end", False, len(UNTIL_CLOSE))),
        (OK + b"HTTP/1.1 200", False, Response(200, {"content-length": "2"}, b"ok", True, len(OK))),
    ],
)  # fmt: skip
def test_parse_response(data: bytes, eof: bool, expected: Response | None) -> None:
    assert parse_response(data, eof=eof) == expected


@pytest.mark.parametrize("data", [OK, CHUNKED, b"HTTP/1.1 204 No Content\r\n\r\n"])
def test_a_response_cut_anywhere_is_waited_for(data: bytes) -> None:
    for end in range(len(data)):
        assert parse_response(data[:end]) is None, data[:end]
    assert parse_response(data) is not None


@pytest.mark.parametrize(
    ("data", "eof", "message"),
    [
        (b"SMTP ready\r\n\r\n", False, "not an HTTP status line"),
        (b"HTTP/1.1 2xx OK\r\n\r\n", False, "not an HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", False, "not a header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, "not a Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
            False,
            "too large",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", False, "chunk"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", True, "closed before"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, False, "head is too large"),
    ],
)
def test_malformed_answers_are_named(data: bytes, eof: bool, message: str) -> None:
    with pytest.raises(MalformedAnswer, match=message):
        parse_response(data, eof=eof)


def test_only_the_start_of_a_long_body_is_kept() -> None:
    body = b"x" * 5000
    response = parse_response(b"HTTP/1.1 400 X\r\nContent-Length: 5000\r\n\r\n" + body)
    assert response is not None
    assert response.detail == body[:DETAIL_BYTES]


def test_a_guid_a_header_cannot_carry_becomes_a_stable_uuid() -> None:
    assert header_safe_guid("0190aa5e-7c2f-7000-8000-000000000001") == (
        "0190aa5e-7c2f-7000-8000-000000000001"
    )
    unsafe = header_safe_guid("id\r\nX-Outbound-Key: stolen")
    assert unsafe == header_safe_guid("id\r\nX-Outbound-Key: stolen")
    assert uuid.UUID(unsafe).version == 5
    assert header_safe_guid("é") != header_safe_guid("è")


Script = Callable[[int, bytes], list[bytes | float | None]]


class RawServer:
    """Reads requests on loopback and answers what a script says: bytes to write, a pause
    in seconds, or None to close the connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                for step in self.script(len(self.requests), request):
                    if step is None:
                        writer.close()
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Any]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> tuple[RawServer, HttpOutbound]:
        server = RawServer(script)
        servers.append(server)
        return server, HttpOutbound(await server.start(), Secret("k-123"), 1.0)

    yield start
    for server in servers:
        assert server.server is not None
        server.server.close()


CALL = Call("/v2/track", {"user_id": "u1", "event": "clicked"}, "g-1", "clicked")


async def test_the_client_keeps_connections_alive(raw_server: Any) -> None:
    server, client = await raw_server(lambda n, request: [OK])
    answers = [await client.send(CALL) for _ in range(3)]
    assert [(a.status, a.detail) for a in answers] == [(200, "ok")] * 3
    assert server.connections == 1
    request = server.requests[0]
    assert request.startswith(b"POST /v2/track HTTP/1.1\r\n")
    assert b"\r\nX-Outbound-Key: k-123\r\n" in request
    assert b"\r\nX-Outbound-GUID: g-1\r\n" in request
    assert request.endswith(b'\r\n\r\n{"user_id":"u1","event":"clicked"}')
    await client.close()


async def test_a_connection_closed_while_idle_is_replaced(raw_server: Any) -> None:
    # The server answers, then closes the kept-alive connection (as idle timeouts do).
    server, client = await raw_server(lambda n, request: [OK, 0.05, None])
    first = await client.send(CALL)
    await asyncio.sleep(0.2)
    second = await client.send(CALL)
    assert (first.status, second.status) == (200, 200)
    assert server.connections == 2
    await client.close()


async def test_a_request_on_a_connection_the_server_just_dropped_goes_again(
    raw_server: Any,
) -> None:
    # The second request reaches a connection the server closes without answering: the
    # client cannot tell it from an idle timeout racing the request, so it goes again.
    server, client = await raw_server(lambda n, request: [None] if n == 2 else [OK])
    assert (await client.send(CALL)).status == 200
    assert (await client.send(CALL)).status == 200
    assert len(server.requests) == 3
    await client.close()


async def test_answers_in_pieces_closing_and_garbage(raw_server: Any) -> None:
    pieces: list[bytes | float | None] = [bytes([b]) for b in CHUNKED]
    scripts: dict[int, list[bytes | float | None]] = {
        1: [*pieces[:20], 0.05, *pieces[20:]],
        2: [CLOSING.replace(b"503", b"429").replace(b"7", b"3")],
        3: [b"garbage\r\n\r\n"],
        4: [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", None],
    }
    _, client = await raw_server(lambda n, request: scripts.get(n, [OK]))
    first = await client.send(CALL)
    assert (first.status, first.detail) == (400, "user_id required")
    second = await client.send(CALL)
    assert (second.status, second.retry_after) == (429, 3.0)
    third = await client.send(CALL)
    assert third.status is None
    assert "not an HTTP status line" in third.detail
    fourth = await client.send(CALL)
    assert (fourth.status, fourth.detail) == (
        None,
        "MalformedAnswer: the connection closed before the body ended",
    )
    assert (await client.send(CALL)).status == 200  # and the client goes on
    await client.close()


async def test_no_answer_within_the_timeout(raw_server: Any) -> None:
    server, client = await raw_server(lambda n, request: [5.0, OK] if n == 1 else [OK])
    answer = await client.send(CALL)
    assert (answer.status, answer.detail) == (None, "no answer within 1 s")
    assert (await client.send(CALL)).status == 200  # on a fresh connection
    assert server.connections == 2
    await client.close()


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
    try:
        trusting = ssl.create_default_context(cafile=TLS / "localhost.crt")
        client = HttpOutbound(url, Secret("k-123"), 5.0, tls=trusting)
        answered = await client.send(CALL)
        assert (answered.status, answered.detail) == (200, "ok")
        assert seen[0].startswith(b"POST /v2/track HTTP/1.1\r\n")
        await client.close()
        # With the system's authorities only, a self-signed certificate is refused.
        strict = HttpOutbound(url, Secret("k-123"), 5.0)
        refused = await strict.send(CALL)
        assert refused.status is None
        assert "CERTIFICATE_VERIFY_FAILED" in refused.detail
        await strict.close()
    finally:
        server.close()
