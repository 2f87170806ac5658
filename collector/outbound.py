"""Outbound: the v2 calls an event becomes, and the client that makes them."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from .config import Secret
from .enrich import Record

log = logging.getLogger("collector.outbound")

# Outbound's identify takes these at the top level; every other trait goes into attributes.
PROFILE_FIELDS = (
    "first_name",
    "last_name",
    "email",
    "phone_number",
    "timezone",
    "group_id",
    "group_attributes",
)
PAGE_FIELDS = ("url", "path", "title", "referrer")
_GUID_NAMESPACE = uuid.UUID("5b1c7a3e-4f0e-4a8e-9d55-0c8a52f3b6a1")


@dataclass(frozen=True, slots=True)
class Call:
    """One request to Outbound: the endpoint, its JSON body, and an id Outbound can dedupe on."""

    endpoint: str
    body: dict[str, Any]
    guid: str
    name: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back: a status, or None when no answer came (network error, timeout)."""

    status: int | None
    detail: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _present(value: object) -> bool:
    return value not in (None, "", {}, [])


def subject(record: Record) -> str:
    """The id Outbound knows this person by: the known user id, else the anonymous id."""
    return str(record.get("user_id") or record["anonymous_id"])


def server_context(record: Record, *, with_ip: bool = False) -> dict[str, Any]:
    """What the server knows of an event that a campaign may use, empty parts left out.

    The IP only when the operator forwards it (as stored: truncated unless set to full).
    """
    client = record.get("context", {})
    page = {key: client[key] for key in PAGE_FIELDS if _present(client.get(key))}
    context = {
        "page": page,
        "locale": client.get("locale"),
        "user_agent": record.get("user_agent"),
        "received_at": int(record["received_at"]),
        "ip": record.get("ip") if with_ip else None,
    }
    return {key: value for key, value in context.items() if _present(value)}


def identify_body(record: Record) -> dict[str, Any]:
    traits = dict(record.get("traits", {}))
    body: dict[str, Any] = {"user_id": subject(record)}
    if record.get("user_id") and record.get("anonymous_id"):
        body["previous_id"] = record["anonymous_id"]
    for name in PROFILE_FIELDS:
        value = traits.pop(name, None)
        if _present(value):
            body[name] = value
    attributes = traits.pop("attributes", None)
    attributes = {**(attributes if isinstance(attributes, dict) else {}), **traits}
    if attributes:
        body["attributes"] = attributes
    return body


def track_body(
    record: Record, *, page_event_name: str, context_property: str, forward_ip: bool = False
) -> dict[str, Any]:
    properties = dict(record.get("properties", {}))
    if record["type"] == "page":
        name = page_event_name
        client = record.get("context", {})
        page = {key: client[key] for key in PAGE_FIELDS if _present(client.get(key))}
        properties = {**page, **properties}
    else:
        name = record["event"]
    if context_property:
        properties[context_property] = server_context(record, with_ip=forward_ip)
    body: dict[str, Any] = {
        "user_id": subject(record),
        "event": name,
        "timestamp": int(record["timestamp"]),
    }
    if properties:
        body["properties"] = properties
    return body


def calls_for(
    record: Record,
    *,
    identified: bool,
    page_event_name: str,
    context_property: str,
    forward_ip: bool = False,
) -> list[Call]:
    """The calls one record becomes, in order: Outbound wants an identify before a first track."""
    message_id = record["message_id"]
    if record["type"] == "identify":
        return [Call("/v2/identify", identify_body(record), message_id, "identify")]
    track = track_body(
        record,
        page_event_name=page_event_name,
        context_property=context_property,
        forward_ip=forward_ip,
    )
    calls = [Call("/v2/track", track, message_id, track["event"])]
    if not identified:
        guid = str(uuid.uuid5(_GUID_NAMESPACE, f"{message_id}/identify"))
        calls.insert(0, Call("/v2/identify", {"user_id": track["user_id"]}, guid, "identify"))
    return calls


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


class Outbound(Protocol):
    """Sends one call and says what happened; never raises for a failed call."""

    async def send(self, call: Call) -> Answer: ...


DETAIL_BYTES = 2048  # of an answer's body, kept to explain a refusal
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 20  # an answer larger than this ends its connection


class MalformedAnswer(Exception):
    """What came back is not HTTP/1.x as this client reads it."""


@dataclass(frozen=True, slots=True)
class Response:
    """One HTTP answer as read from a connection's bytes."""

    status: int
    headers: dict[str, str]  # names in lower case
    detail: bytes  # the body's first DETAIL_BYTES
    keep_alive: bool
    size: int  # how many bytes of the buffer it took


def parse_response(data: bytes, *, eof: bool = False) -> Response | None:
    """The first whole answer in `data`, or None while more bytes must come.

    `eof`: the server closed its side, which ends a body that has no length. Informational
    (1xx) answers are skipped. Raises MalformedAnswer for what cannot be HTTP/1.x.
    """
    start = 0
    while True:
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            if len(data) - start > MAX_HEAD_BYTES:
                raise MalformedAnswer("the answer's head is too large")
            return None
        lines = data[start:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit() or rest[3:4] not in ("", " "):
            raise MalformedAnswer(f"not an HTTP status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise MalformedAnswer(f"not a header line: {line[:80]!r}")
            headers[name.lower()] = value.strip()
        status, body_start = int(code), end + 4
        if 100 <= status < 200:
            start = body_start
            continue
        break
    keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        return Response(status, headers, b"", keep_alive, body_start)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _chunked(data, body_start, status, headers, keep_alive)
    length = headers.get("content-length")
    if length is None:  # the body runs until the server closes the connection
        if not eof:
            if len(data) - body_start > MAX_BODY_BYTES:
                raise MalformedAnswer("the answer's body is too large")
            return None
        return Response(status, headers, data[body_start:][:DETAIL_BYTES], False, len(data))
    if not length.isdigit():
        raise MalformedAnswer(f"not a Content-Length: {length[:40]!r}")
    size = int(length)
    if size > MAX_BODY_BYTES:
        raise MalformedAnswer("the answer's body is too large")
    if len(data) < body_start + size:
        if eof:
            raise MalformedAnswer("the connection closed before the body ended")
        return None
    detail = data[body_start : body_start + min(size, DETAIL_BYTES)]
    return Response(status, headers, detail, keep_alive, body_start + size)


def _chunked(
    data: bytes, at: int, status: int, headers: dict[str, str], keep_alive: bool
) -> Response | None:
    detail = bytearray()
    total = 0
    while True:
        line_end = data.find(b"\r\n", at)
        if line_end < 0:
            return None
        size_text = data[at:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MalformedAnswer(f"not a chunk size: {size_text[:20]!r}") from None
        total += size
        if size < 0 or total > MAX_BODY_BYTES:
            raise MalformedAnswer("the answer's body is too large")
        if size == 0:  # the last chunk; then trailers, if any, and an empty line
            trailers_end = data.find(b"\r\n\r\n", line_end)
            if data.startswith(b"\r\n", line_end + 2):
                return Response(status, headers, bytes(detail), keep_alive, line_end + 4)
            if trailers_end < 0:
                return None
            return Response(status, headers, bytes(detail), keep_alive, trailers_end + 4)
        chunk_start, chunk_end = line_end + 2, line_end + 2 + size
        if len(data) < chunk_end + 2:
            return None
        if data[chunk_end : chunk_end + 2] != b"\r\n":
            raise MalformedAnswer("a chunk does not end where its size says")
        detail += data[chunk_start : min(chunk_end, chunk_start + DETAIL_BYTES - len(detail))]
        at = chunk_end + 2


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed: the request never got an answer."""


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a request at a time, its answer read by parse_response."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""
        self._eof = False
        self._waiter: asyncio.Future[Response] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._read()

    def eof_received(self) -> bool:
        self._eof = True
        self._read()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            if self._buffer:
                self._waiter.set_exception(ConnectionError("the connection closed mid-answer"))
            else:
                self._waiter.set_exception(_StaleConnection(str(exc or "closed")))

    def _read(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            if self._buffer or self._eof:
                self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            response = parse_response(self._buffer, eof=self._eof)
        except MalformedAnswer as error:
            waiter.set_exception(error)
            self.close()
            return
        if response is not None:
            self._buffer = self._buffer[response.size :]
            waiter.set_result(response)

    async def request(self, message: bytes) -> Response:
        assert self._transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(message)
        try:
            response = await self._waiter
        finally:
            self._waiter = None
        if not response.keep_alive or self._buffer or self._eof:
            self.close()
        return response

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class HttpOutbound:
    """Outbound's REST API over kept-alive HTTP/1.1 connections, the key in its header only.

    A client of its own rather than aiohttp's: the relay is bound by CPU, and an aiohttp
    call cost ~100 µs of it here against ~25 µs for this one (see bench/RESULTS.md).
    """

    def __init__(
        self,
        base_url: str,
        key: Secret,
        timeout: float,
        *,
        concurrency: int = 32,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rsplit("@", 1)[-1]
        self._key = key
        self._timeout = timeout
        self._max_idle = concurrency * 2
        self._idle: list[_Connection] = []

    def __repr__(self) -> str:
        return f"HttpOutbound({self._base_url!r})"

    async def send(self, call: Call) -> Answer:
        message = self._message(call)
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._exchange(message)
        except TimeoutError:
            return Answer(None, f"no answer within {self._timeout:g} s")
        except _StaleConnection:
            return Answer(None, "the connection closed before an answer came")
        except (OSError, MalformedAnswer) as error:
            return Answer(None, f"{type(error).__name__}: {error}")
        retry_after = parse_retry_after(response.headers.get("retry-after"), now=time.time())
        return Answer(response.status, response.detail.decode("utf-8", "replace"), retry_after)

    def _message(self, call: Call) -> bytes:
        body = orjson.dumps(call.body)
        head = (
            f"POST {self._prefix}{call.endpoint} HTTP/1.1\r\n"
            f"Host: {self._host_header}\r\n"
            f"X-Outbound-Key: {self._key.reveal()}\r\n"
            f"X-Outbound-GUID: {header_safe_guid(call.guid)}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "User-Agent: outbound-collector\r\n\r\n"
        )
        return head.encode("latin-1") + body

    async def _exchange(self, message: bytes) -> Response:
        # A kept-alive connection may have been closed by the server while it waited: then
        # the request goes again on a fresh one (Outbound drops a resend by its GUID).
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            try:
                return self._recycle(connection, await connection.request(message))
            except _StaleConnection:
                continue
            except BaseException:
                connection.close()  # cancelled or timed out mid-answer: not reusable
                raise
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            _Connection,
            self._host,
            self._port,
            ssl=self._tls,
            server_hostname=self._host if self._tls else None,
        )
        try:
            return self._recycle(connection, await connection.request(message))
        except BaseException:
            connection.close()
            raise

    def _recycle(self, connection: _Connection, response: Response) -> Response:
        if not connection.closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()
        return response

    async def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close


def header_safe_guid(guid: str) -> str:
    """The GUID as a header value: a message id with characters a header cannot carry (a
    client chose it) becomes a UUID derived from it, the same on every retry."""
    if guid.isascii() and guid.isprintable():
        return guid
    return str(uuid.uuid5(_GUID_NAMESPACE, guid))


class DryRunOutbound:
    """Stands in for Outbound when no key is set: says what it would send, sends nothing."""

    async def send(self, call: Call) -> Answer:
        size = len(orjson.dumps(call.body))
        log.info("dry run: would POST %s %r (%d bytes)", call.endpoint, call.name, size)
        await asyncio.sleep(0)
        return Answer(202, "dry run")
