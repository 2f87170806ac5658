"""Ingest: read a request's body within its limits, decode it, and answer for each event."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError

from .config import Settings
from .enrich import Record, Sender, client_ip, enrich, from_outbound_identify, from_outbound_track
from .keys import QUEUE, RELAY, SETTINGS, VALIDATOR
from .queue import QueueFull, QueueUnavailable
from .schema import Kind, Problem

log = logging.getLogger("collector.ingest")

JSON_TYPES = frozenset({"application/json", "text/plain"})
_RETRY_LATER = {"Retry-After": "5"}


class RequestError(Exception):
    """The request as a whole cannot be used; `status` and a sentence for the client."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response({"error": message}, status, headers)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, decompressed by aiohttp when gzip-encoded, never more than `limit` bytes."""
    declared = request.headers.get("Content-Type")
    if declared is not None and not (
        request.content_type in JSON_TYPES or request.content_type.endswith("+json")
    ):
        raise RequestError(
            415,
            f"Content-Type {request.content_type!r} is not accepted; "
            "send JSON as text/plain or application/json",
        )
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, f"the body is over the limit of {limit} bytes")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except (RequestPayloadError, ContentEncodingError, zlib.error):
        # The stream is broken past repair: end it here so that aiohttp does not try to
        # drain it after the answer, and close the connection rather than reuse it.
        request.content.feed_eof()
        raise RequestError(400, f"the body is not valid {encoding or 'data'}", close=True) from None
    if not size and encoding:
        raise RequestError(400, f"the body decoded to nothing: truncated or not {encoding}")
    if not size:
        raise RequestError(400, "the body is empty; send one event or a batch as JSON")
    return b"".join(chunks)


def decode(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None


def split_batch(document: object, max_events: int) -> tuple[list[object], float | None]:
    """The events of an `/e` body (one event, or a batch) and the batch's `sent_at`."""
    if not isinstance(document, dict):
        raise RequestError(400, 'the body must be a JSON object: one event, or {"batch": [...]}')
    if "batch" not in document:
        return [document], None
    extra = sorted(set(document) - {"batch", "sent_at"})
    if extra:
        raise RequestError(400, f"a batch takes only `batch` and `sent_at`, not `{extra[0]}`")
    events, sent_at = document["batch"], document.get("sent_at")
    if not isinstance(events, list) or not events:
        raise RequestError(400, "`batch` must be a non-empty array of events")
    if len(events) > max_events:
        raise RequestError(413, f"the batch has {len(events)} events; the limit is {max_events}")
    if sent_at is not None and (
        isinstance(sent_at, bool) or not isinstance(sent_at, int | float) or not 0 <= sent_at < 1e11
    ):
        raise RequestError(400, "`sent_at` must be Unix time in seconds")
    return events, sent_at


def sender_of(request: web.Request, settings: Settings) -> Sender:
    return Sender(
        ip=client_ip(
            request.remote, request.headers.getall("X-Forwarded-For", []), settings.trusted_proxies
        ),
        user_agent=request.headers.get("User-Agent"),
        origin=request.headers.get("Origin"),
    )


@dataclass(frozen=True, slots=True)
class Verdicts:
    records: list[Record]
    rejected: list[dict[str, Any]]


def judge(
    request: web.Request,
    events: list[object],
    kind: Kind,
    convert: Callable[[dict[str, Any]], dict[str, Any]],
    batch_sent_at: float | None,
) -> Verdicts:
    """Validate and enrich each event; the valid become records, the others say why."""
    settings, validator = request.app[SETTINGS], request.app[VALIDATOR]
    sender, received_at = sender_of(request, settings), time.time()
    records: list[Record] = []
    rejected: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        problems = _size_problem(event, settings) or validator.problems(event, kind)
        if not problems and isinstance(event, dict):
            problems = _reserved_problem(event, settings)
        if problems:
            rejected.append({"index": index, "errors": [p.as_json() for p in problems]})
            continue
        assert isinstance(event, dict)
        records.append(
            enrich(
                convert(event),
                sender,
                received_at=received_at,
                batch_sent_at=batch_sent_at,
                tolerance=settings.clock_skew_tolerance,
            )
        )
    return Verdicts(records, rejected)


def _size_problem(event: object, settings: Settings) -> list[Problem]:
    size = len(orjson.dumps(event))
    if size > settings.max_event_bytes:
        limit = settings.max_event_bytes
        return [Problem("", f"the event is {size} bytes as JSON; the limit is {limit}")]
    return []


def _reserved_problem(event: dict[str, Any], settings: Settings) -> list[Problem]:
    key = settings.context_property
    properties = event.get("properties")
    if key and isinstance(properties, dict) and key in properties:
        return [
            Problem(
                f"/properties/{key}",
                f"`{key}` is reserved for the collector's server context; rename the property",
            )
        ]
    return []


async def store(request: web.Request, verdicts: Verdicts) -> web.Response:
    """Commit the valid records, then answer: 202 only once they are on disk."""
    duplicates = 0
    if verdicts.records:
        try:
            duplicates = await request.app[QUEUE].put(verdicts.records)
        except QueueFull as error:
            log.warning("queue refused %d events: %s", len(verdicts.records), error)
            return error_response(
                503, "the queue is full; nothing was stored, retry later", _RETRY_LATER
            )
        except QueueUnavailable as error:
            log.error("queue refused %d events: %s", len(verdicts.records), error)
            return error_response(
                503,
                "events cannot be stored right now; nothing was stored, retry later",
                _RETRY_LATER,
            )
        request.app[RELAY].wake()
    status = 202 if verdicts.records else 400
    answer: dict[str, Any] = {"accepted": len(verdicts.records), "rejected": verdicts.rejected}
    if duplicates:
        answer["duplicates"] = duplicates  # accepted, already stored earlier under their ids
    return json_response(answer, status)


async def _handle(
    request: web.Request,
    kind: Kind,
    convert: Callable[[dict[str, Any]], dict[str, Any]],
) -> web.Response:
    settings = request.app[SETTINGS]
    try:
        document = decode(await read_body(request, settings.max_body_bytes))
        if kind == "event":
            events, sent_at = split_batch(document, settings.max_batch_events)
        else:
            events, sent_at = [document], None
    except RequestError as error:
        response = error_response(error.status, error.message)
        if error.close:
            response.force_close()
        return response
    return await store(request, judge(request, events, kind, convert, sent_at))


async def post_event(request: web.Request) -> web.Response:
    """`POST /e`: one event or a batch, from browsers and API clients."""
    return await _handle(request, "event", dict)


async def post_outbound_track(request: web.Request) -> web.Response:
    """`POST /v2/track`: exactly Outbound's track body."""
    return await _handle(request, "outbound_track", from_outbound_track)


async def post_outbound_identify(request: web.Request) -> web.Response:
    """`POST /v2/identify`: exactly Outbound's identify body."""
    return await _handle(request, "outbound_identify", from_outbound_identify)
