"""Ingest: who is sending, the body within its limits, decoded, and an answer for each event."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import SplitResult, urlsplit

import orjson
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiohttp.web_protocol import RequestPayloadError

from .config import Settings
from .enrich import (
    Record,
    Sender,
    client_ip,
    enrich,
    from_outbound_call,
    from_outbound_identify,
    from_outbound_track,
)
from .identity import (
    bearer_token,
    is_bot,
    protected_trait_problems,
    rate_key,
    stamp_ids,
    token_matches,
    truncated_ip,
    verify_user,
)
from .keys import (
    DEBUG_HUB,
    IDS_KEY,
    INGEST_LOG,
    IP_LIMITER,
    METRICS,
    QUEUE,
    RELAY,
    SETTINGS,
    USER_LIMITER,
    VALIDATOR,
)
from .limits import RateLimiter, ip_bucket, request_cost, retry_after
from .logs import clip
from .queue import QueueFull, QueueUnavailable
from .schema import Kind, Problem, pointer

log = logging.getLogger("collector.ingest")

JSON_TYPES = frozenset({"application/json", "text/plain"})
_RETRY_LATER = {"Retry-After": "5"}
# A refusal's sentence as logged: enough to see what was wrong, never what a client made long.
MAX_LOGGED_REFUSAL = 300
# The library an Outbound client says it is ("Python/1.2.1"), as kept in the record.
MAX_CLIENT_NAME = 100
# An X-Outbound-GUID longer than a message id may be is not taken for one.
MAX_GUID = 256
# What reading a body raises when its encoding cannot be undone.
BROKEN_STREAM = (RequestPayloadError, ContentEncodingError, zlib.error)


class RequestError(Exception):
    """The request as a whole cannot be used; `status` and a sentence for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers


_JSON_TYPE = {"Content-Type": "application/json"}


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    # The header as it is rather than `content_type=`, which aiohttp parses and writes again.
    return web.Response(
        body=orjson.dumps(body), status=status, headers={**_JSON_TYPE, **(headers or {})}
    )


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return json_response({"error": message}, status, headers)


async def read_body(request: web.Request, settings: Settings) -> bytes:
    """The body, decompressed by aiohttp when encoded, within the size, ratio and time limits."""
    declared = request.headers.get("Content-Type")
    if declared is not None and not (
        request.content_type in JSON_TYPES or request.content_type.endswith("+json")
    ):
        raise RequestError(
            415,
            f"Content-Type {shortened(request.content_type, MAX_ERROR_TEXT)!r} is not accepted; "
            "send JSON as text/plain or application/json",
        )
    limit = settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise RequestError(413, f"the body is over the limit of {limit} bytes")
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    # The ratio holds for every encoded body: against its declared length up front, and
    # against the bytes received so far as it is decoded (chunked bodies declare none).
    ratio = settings.max_gzip_ratio if encoding and encoding != "identity" else None
    if ratio is not None and length is not None:
        limit = min(limit, length * ratio)
    if request.content.is_eof():  # the whole body is here already: nothing to wait for
        try:
            body = request.content.read_nowait()
            _within_ratio(request, len(body), ratio)
            return _whole(body, limit, encoding)
        except BROKEN_STREAM:
            raise _broken(request, encoding) from None
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await _read_within(request, limit, encoding, ratio)
    except TimeoutError:
        request.content.feed_eof()
        raise RequestError(
            408, f"the body took longer than {settings.body_timeout:g} s to arrive", close=True
        ) from None


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, f"the body is over the limit of {limit} bytes once decoded", close=True
    )


def _within_ratio(request: web.Request, size: int, ratio: int | None) -> None:
    """RequestError 413 when `size` decoded bytes are more than `ratio` times what came."""
    if ratio is not None and size > ratio * _wire_bytes(request):
        raise RequestError(
            413,
            f"the body grows more than {ratio} times (max_gzip_ratio) once decoded",
            close=True,
        )


def _whole(body: bytes, limit: int, encoding: str) -> bytes:
    if len(body) > limit:
        raise _too_large(limit)
    if not body and encoding:
        raise RequestError(400, f"the body decoded to nothing: truncated or not {encoding}")
    if not body:
        raise RequestError(400, "the body is empty; send one event or a batch as JSON")
    return body


def _broken(request: web.Request, encoding: str) -> RequestError:
    # The stream is broken past repair: end it here so that aiohttp does not try to
    # drain it after the answer, and close the connection rather than reuse it.
    request.content.feed_eof()
    return RequestError(400, f"the body is not valid {encoding or 'data'}", close=True)


async def _read_within(request: web.Request, limit: int, encoding: str, ratio: int | None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            _within_ratio(request, size, ratio)
            chunks.append(chunk)
    except BROKEN_STREAM:
        raise _broken(request, encoding) from None
    return _whole(b"".join(chunks), limit, encoding)


async def _drained(request: web.Request, limit: int) -> bool:
    """Read and drop what is left of a refused request's body, so that the connection can
    serve the next request; False when that is not possible (too much, too slow, broken)."""
    if request.content.is_eof():
        return True
    size = 0
    try:
        async with asyncio.timeout(1.0):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    return False
    except BROKEN_STREAM:
        request.content.feed_eof()  # the stream is dead; aiohttp must not drain it again
        return False
    except TimeoutError:
        return False
    return True


# orjson parses 1,024 levels but encodes only 254, and each event is encoded again on its
# way to the queue: deeper bodies are refused whole, with room below orjson's limit.
MAX_JSON_DEPTH = 128


def decode(body: bytes) -> object:
    """The JSON document of a body; RequestError 400 when it is not JSON or nests too deep."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    # Nesting needs as many brackets as levels: most bodies have too few to look further.
    if body.count(b"{") + body.count(b"[") > MAX_JSON_DEPTH:
        where = too_deep(document, MAX_JSON_DEPTH)
        if where is not None:
            raise RequestError(
                400,
                f"the body nests deeper than {MAX_JSON_DEPTH} levels, at "
                f"{shortened(where, MAX_ERROR_TEXT)}",
            )
    return document


class _Step(NamedTuple):
    """A container met while measuring depth, and how it was reached (for its pointer)."""

    value: dict[str, Any] | list[Any]
    depth: int
    parent: _Step | None
    key: str | int


def too_deep(document: object, limit: int) -> str | None:
    """The JSON Pointer of the first object or array nested deeper than `limit`, or None."""
    if not isinstance(document, dict | list):
        return None
    # Without recursion, which such a document would exhaust.
    stack = [_Step(document, 1, None, "")]
    while stack:
        step = stack.pop()
        if step.depth > limit:
            keys: list[str | int] = []
            at: _Step | None = step
            while at is not None and at.parent is not None:
                keys.append(at.key)
                at = at.parent
            return pointer(keys[::-1])
        children = step.value.items() if isinstance(step.value, dict) else enumerate(step.value)
        for key, child in children:
            if isinstance(child, dict | list):
                stack.append(_Step(child, step.depth + 1, step, key))
    return None


def split_batch(document: object, max_events: int) -> tuple[list[object], float | None]:
    """The events of an `/e` body (one event, or a batch) and the batch's `sent_at`."""
    if not isinstance(document, dict):
        raise RequestError(400, 'the body must be a JSON object: one event, or {"batch": [...]}')
    if "batch" not in document:
        return [document], None
    extra = sorted(set(document) - {"batch", "sent_at"})
    if extra:
        unknown = shortened(extra[0], MAX_ERROR_TEXT)
        raise RequestError(400, f"a batch takes only `batch` and `sent_at`, not `{unknown}`")
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


OUTBOUND_BATCH_MAX = 100  # bodies in one of Outbound's batch calls, as its API takes them


def split_outbound_batch(document: object) -> list[object]:
    """The bodies of Outbound's /v2/track/batch or /v2/identify/batch: a JSON array."""
    if not isinstance(document, list) or not document:
        raise RequestError(400, "the body must be a non-empty JSON array of bodies")
    if len(document) > OUTBOUND_BATCH_MAX:
        raise RequestError(
            413, f"the batch has {len(document)} bodies; the limit is {OUTBOUND_BATCH_MAX}"
        )
    return document


def request_origin(origin: str | None, referer: str | None) -> str | None:
    """The origin a browser request comes from: its Origin header, else its Referer's."""
    if origin is not None:
        return origin.strip()
    if referer:
        parts = urlsplit(referer.strip())
        return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "null"
    return None


def origin_allowed(
    origin: str, allowed: tuple[str, ...], own_hosts: str | Collection[str] | None
) -> bool:
    """Whether a browser on `origin` may send: listed, '*', or this collector's own origin
    (`own_hosts`: its host[:port] as browsers reach it, from `own_hosts()`)."""
    if "*" in allowed or origin in allowed:
        return True
    if not own_hosts:
        return False
    parts = urlsplit(origin)
    own = (own_hosts,) if isinstance(own_hosts, str) else own_hosts
    return parts.scheme in {"http", "https"} and parts.netloc in own


def own_hosts(request: web.Request, settings: Settings) -> frozenset[str]:
    """The collector's own host[:port]s: `public_url`'s, and the address the connection came
    in on (with the loopback names when it is loopback). Never the Host header, which is
    whatever name the browser used: a rebound DNS name (evil.test -> 127.0.0.1) included."""
    hosts = set()
    if settings.public_url:
        hosts.add(_netloc(urlsplit(settings.public_url)))
    local = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(local, tuple) and len(local) >= 2:
        hosts.update(_local_hosts(str(local[0]), int(local[1])))
    return frozenset(hosts)


def _netloc(parts: SplitResult) -> str:
    """host[:port] as a browser writes it in an Origin: lower case, no default port."""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return host if parts.port in (None, default) else f"{host}:{parts.port}"


@functools.lru_cache(maxsize=64)
def _local_hosts(address: str, port: int) -> frozenset[str]:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return frozenset()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    names = [f"[{ip}]" if ip.version == 6 else str(ip)]
    if ip.is_loopback:
        names += ["localhost", "127.0.0.1", "[::1]"]
    with_port = {f"{name}:{port}" for name in names}
    return frozenset(with_port | set(names) if port in (80, 443) else with_port)


def server_tokens_presented(request: web.Request) -> list[str]:
    """The tokens a request presents: `Authorization: Bearer`, and `X-Outbound-Key`, the
    header Outbound's own libraries put their key in (so that code written for Outbound
    works with the server token as its key)."""
    presented = [bearer_token(request.headers.get("Authorization"))]
    presented += [key.strip() for key in request.headers.getall("X-Outbound-Key", [])]
    return [token for token in presented if token]


def is_server(request: web.Request, settings: Settings) -> bool:
    """Whether a trusted back-end sent this (a valid server token); refuses what may not send.

    A wrong token (in either header) is refused outright rather than treated as a browser,
    so that a back-end with a stale token learns of it. Without a token, a browser's origin
    must be allowed.
    """
    presented = server_tokens_presented(request)
    if presented:
        if settings.server_tokens and all(
            token_matches(settings.server_tokens, token) for token in presented
        ):
            return True
        raise RequestError(401, "the server token is not valid")
    origin = request_origin(request.headers.get("Origin"), request.headers.get("Referer"))
    if origin is not None and not browser_origin_allowed(origin, request, settings):
        raise RequestError(403, f"the origin {origin[:100]!r} is not allowed to send events")
    return False


def browser_origin_allowed(origin: str, request: web.Request, settings: Settings) -> bool:
    """`origin_allowed` for this request, working out the collector's own hosts only for an
    origin that is not listed."""
    allowed = settings.allowed_origins
    return origin_allowed(origin, allowed, None) or origin_allowed(
        origin, allowed, own_hosts(request, settings)
    )


def client_address(request: web.Request, settings: Settings) -> str | None:
    """The client's address as resolved through `trusted_proxies` (behind nginx the socket
    peer is always loopback): what rate limits, logs and "loopback only" go by."""
    return client_ip(
        request.remote, request.headers.getall("X-Forwarded-For", []), settings.trusted_proxies
    )


def from_loopback(request: web.Request, settings: Settings) -> bool:
    """Whether the client, as resolved through `trusted_proxies`, is on this machine."""
    address = client_address(request, settings)
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def sender_of(request: web.Request, settings: Settings, ip: str | None) -> Sender:
    """What the server knows of the sender; the IP as stored (truncated unless configured)."""
    client = request.headers.get("X-Outbound-Client")
    return Sender(
        ip=ip if settings.forward_ip == "full" else truncated_ip(ip),
        user_agent=request.headers.get("User-Agent"),
        origin=request.headers.get("Origin"),
        client=clip(client, MAX_CLIENT_NAME) if client else None,
    )


@dataclass(slots=True)
class Verdicts:
    """What became of each event of a request; `seen` feeds the live view while watched."""

    records: list[Record] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    anonymized: list[dict[str, Any]] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)


def judge(
    app: web.Application,
    events: list[object],
    kind: Kind,
    convert: Callable[[dict[str, Any]], dict[str, Any]],
    batch_sent_at: float | None,
    *,
    server: bool,
    sender: Sender,
    watched: bool = False,
) -> Verdicts:
    """Validate, check the sender's rights, and enrich each event; the rest say why not."""
    settings, validator = app[SETTINGS], app[VALIDATOR]
    key, prefix = app[IDS_KEY], settings.anonymous_id_prefix
    # Read once a request rather than once an event.
    max_event_bytes, reserved = settings.max_event_bytes, settings.context_property
    scopes: dict[str, str] = {}  # the visitors' scope digests, which a batch's events share
    received_at = time.time()
    verdicts = Verdicts()
    for index, event in enumerate(events):
        status, reason = "accepted", "invalid"
        encoded = orjson.dumps(event)
        if len(encoded) > max_event_bytes:
            problems, reason = _size_problem(len(encoded), max_event_bytes), "too_large"
        else:
            problems = validator.problems(event, kind, encoded)
        if not problems and reserved and isinstance(event, dict):
            problems = _reserved_problem(event, reserved)
        if not problems and isinstance(event, dict):
            problems = validator.registry_problems(
                event, server=server, unknown=settings.unknown_events
            )
            reason = "not_allowed"
        if not problems and isinstance(event, dict) and not server and settings.identity_secret:
            verdict, problems = verify_user(
                event, settings.identity_secret, on_failure=settings.unverified_users
            )
            reason = "unverified_user"
            if verdict == "anonymized":
                status = "anonymized"
                event = {k: v for k, v in event.items() if k not in {"user_id", "user_hash"}}
            if verdict != "refused" and event.get("user_id") is None:
                # Nobody vouches for this sender: contact traits and groups are not theirs
                # to set. (On /v2/identify the traits are the body's own fields.)
                on_v2 = kind == "outbound_identify"
                unvouched = protected_trait_problems(
                    event if on_v2 else event.get("traits"),
                    settings.protected_traits,
                    at="" if on_v2 else "/traits",
                )
                if unvouched:
                    status, reason, problems = "accepted", "protected_trait", problems + unvouched
            if status == "anonymized":
                verdicts.anonymized.append(
                    {"index": index, "errors": [p.as_json() for p in problems]}
                )
        record = None
        if problems and status != "anonymized":
            status = "rejected"
            verdicts.rejected.append({"index": index, "errors": [p.as_json() for p in problems]})
            verdicts.reasons[reason] = verdicts.reasons.get(reason, 0) + 1
        else:
            assert isinstance(event, dict)
            record = enrich(
                convert(event),
                sender,
                received_at=received_at,
                batch_sent_at=batch_sent_at,
                tolerance=settings.clock_skew_tolerance,
            )
            stamp_ids(record, server=server, key=key, prefix=prefix, scopes=scopes)
            verdicts.records.append(record)
        if watched:
            verdicts.seen.append(seen_item(event, status, problems, record, received_at))
    return verdicts


def seen_item(
    event: object,
    status: str,
    problems: list[Problem],
    record: Record | None,
    at: float,
) -> dict[str, Any]:
    """One event as the live view shows it: what came, what was wrong, what the server added."""
    fields = event if isinstance(event, dict) else {}
    item: dict[str, Any] = {
        "kind": "event",
        "at": at,
        "status": status,
        "type": fields.get("type", "track"),
        "event": fields.get("event") if isinstance(fields.get("event"), str) else None,
        "user_id": str(fields["user_id"]) if fields.get("user_id") is not None else None,
        "anonymous_id": fields.get("anonymous_id"),
        "errors": [p.as_json() for p in problems],
    }
    if record is not None:
        item["message_id"] = record["message_id"]
        item["enrichment"] = {
            key: record.get(key)
            for key in (
                "message_id",
                "received_at",
                "timestamp",
                "clamped_from",
                "ip",
                "user_agent",
                "origin",
            )
            if record.get(key) is not None
        }
    return item


def rate_limit_wait(app: web.Application, records: list[Record]) -> float:
    """Seconds this request must wait under the per-user limits; 0: it may pass. (The IP
    was charged for the whole request before validation, in `_answer`.)

    All or nothing: a request over any limit takes no tokens, so its retry is not charged twice.
    """
    user_limiter = app[USER_LIMITER]
    if not user_limiter.rate:
        return 0.0
    now = time.monotonic()
    per_user = Counter(rate_key(r) for r in records)
    wait = user_limiter.wait(per_user, now)
    if not wait:
        user_limiter.take(per_user, now)
    return wait


def _size_problem(size: int, limit: int) -> list[Problem]:
    return [Problem("", f"the event is {size} bytes as JSON; the limit is {limit}")]


def _reserved_problem(event: dict[str, Any], key: str) -> list[Problem]:
    """A problem when the event's properties hold `key`, the server context's property."""
    properties = event.get("properties")
    if isinstance(properties, dict) and key in properties:
        return [
            Problem(
                f"/properties/{key}",
                f"`{key}` is reserved for the collector's server context; rename the property",
            )
        ]
    return []


# An answer is bounded: a batch of events with hundreds of unknown keys (or keys of a
# hundred kilobytes) must not make an answer of megabytes. Enough to fix the first problems.
MAX_ERRORS_PER_EVENT = 10
MAX_ERROR_TEXT = 200


def bounded(rejection: dict[str, Any]) -> dict[str, Any]:
    """A rejected event's entry for the answer: its first errors, each shortened, and how
    many more there were (`more_errors`)."""
    errors: list[dict[str, str]] = rejection["errors"]
    shown = {
        **rejection,
        "errors": [
            {key: shortened(text, MAX_ERROR_TEXT) for key, text in error.items()}
            for error in errors[:MAX_ERRORS_PER_EVENT]
        ],
    }
    if len(errors) > MAX_ERRORS_PER_EVENT:
        shown["more_errors"] = len(errors) - MAX_ERRORS_PER_EVENT
    return shown


def shortened(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying how long it was when it is cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


async def store(app: web.Application, verdicts: Verdicts) -> web.Response:
    """Commit the valid records, then answer: 202 only once they are on disk."""
    duplicates = 0
    if verdicts.records:
        try:
            duplicates = await app[QUEUE].put(verdicts.records)
            if duplicates:
                app[METRICS].duplicates.inc(duplicates)
        # The queue logs its refusals (counted while they repeat, as on a full disk).
        except QueueFull as full:
            # Which limit: a client over its own share learns that it is the one to slow down.
            message = {
                "queue_share_per_ip": "this client holds its share of the queue",
                "queue_browser_share": "browsers hold their share of the queue",
            }.get(full.limit, "the queue is full")
            return json_response(
                {"error": f"{message}; nothing was stored, retry later", "limit": full.limit},
                503,
                _RETRY_LATER,
            )
        except QueueUnavailable:
            return error_response(
                503,
                "events cannot be stored right now; nothing was stored, retry later",
                _RETRY_LATER,
            )
        app[RELAY].wake()
    status = 202 if verdicts.records else 400
    answer: dict[str, Any] = {
        "accepted": len(verdicts.records),
        "rejected": [bounded(entry) for entry in verdicts.rejected],
    }
    if verdicts.anonymized:
        answer["anonymized"] = verdicts.anonymized  # accepted without their user_id
    if duplicates:
        answer["duplicates"] = duplicates  # accepted, already stored earlier under their ids
    return json_response(answer, status)


@dataclass(frozen=True, slots=True)
class Route:
    """What an ingest route takes: its kind of event and how one becomes a collector event;
    `server_only`: browsers are refused; `outbound_batch`: the body is Outbound's batch, a
    JSON array of bodies of the kind."""

    kind: Kind
    convert: Callable[[dict[str, Any]], dict[str, Any]]
    server_only: bool = False
    outbound_batch: bool = False


async def _handle(request: web.Request, route: Route) -> web.Response:
    started = time.perf_counter()
    app = request.app
    try:
        response = await _answer(request, app, route)
        if (
            response.status == 202
            and route.kind != "event"
            and not route.outbound_batch
            and request.headers.get("X-Outbound-Key")
        ):
            # Outbound's libraries (the header is theirs) get Outbound's answer to a call it
            # took: an empty body, which PHP's needs; any other body is an error to it. (The
            # body's one event was accepted: the JSON would say nothing more.)
            return web.Response(status=202)
        return response
    finally:
        app[METRICS].ingest_latency.observe(time.perf_counter() - started)


async def _answer(request: web.Request, app: web.Application, route: Route) -> web.Response:
    """Who sends, what they sent, what became of each event: the whole of one request."""
    settings, metrics, hub = app[SETTINGS], app[METRICS], app[DEBUG_HUB]
    kind, convert = route.kind, route.convert
    ip = client_address(request, settings)
    # Browsers pay for what they send before anything costly is done with it: an IP whose
    # bucket is empty is refused before its body is read, and every event received and
    # every byte read is charged before validation, so invalid input is not free.
    bucket, limiter = ip_bucket(ip, settings.ipv6_bucket_prefix), app[IP_LIMITER]
    per_event = settings.rate_bytes_per_event
    server = False
    size = 0
    try:
        server = is_server(request, settings)
        if route.server_only and not server:
            raise RequestError(
                403,
                f"{request.path} takes a server token only (X-Outbound-Key or Authorization: "
                "Bearer): a page cannot change a person's devices or subscriptions",
            )
        if not server:
            _pay(limiter, bucket, 1.0, take=False)  # an empty bucket: the body is not even read
        body = await read_body(request, settings)
        size = len(body)
        document = decode(body)
        if kind == "event":
            events, sent_at = split_batch(document, settings.max_batch_events)
        elif route.outbound_batch:
            events, sent_at = split_outbound_batch(document), None
        else:
            events, sent_at = [document], None
        if not server:
            _pay(limiter, bucket, request_cost(len(events), size, per_event))
    except RequestError as error:
        if not server and error.status != 429:
            # A refused body was read all the same (or is drained next): it is paid for.
            spent = request_cost(0, max(size, _wire_bytes(request)), per_event)
            limiter.take({bucket: spent}, time.monotonic())
        return await _refuse(request, app, error)
    if not server and is_bot(request.headers.get("User-Agent"), settings.bot_user_agents):
        metrics.bot_drops.inc(len(events))
        for event in events if hub.watched else ():
            hub.publish(seen_item(event, "dropped", [], None, time.time()))
        return json_response({"accepted": 0, "rejected": [], "dropped": len(events)}, 202)
    sender = sender_of(request, settings, ip)
    guid = request.headers.get("X-Outbound-GUID", "")
    if server and kind != "event" and not route.outbound_batch and 0 < len(guid) <= MAX_GUID:
        # Outbound dedupes a call by the GUID its client sends (Android SDK 0.4.0 keeps one
        # per call across its retries): a call sent again after its answer was lost is a
        # resend here too, within dedupe_window, as a server token's message_id is.
        convert = _with_message_id(convert, guid)
    verdicts = judge(
        app, events, kind, convert, sent_at, server=server, sender=sender, watched=hub.watched
    )
    if not server:
        wait = rate_limit_wait(app, verdicts.records)
        if wait:
            metrics.rate_limited.inc()
            return error_response(
                429, "too many events; retry later", {"Retry-After": retry_after(wait)}
            )
    response = await store(app, verdicts)
    if response.status == 400 and verdicts.rejected:
        _log_all_rejected(app, verdicts)
    if response.status in {202, 400}:  # not when the queue refused the lot
        if verdicts.records:
            metrics.accepted.inc(len(verdicts.records))
        for reason, count in verdicts.reasons.items():
            metrics.rejected.labels(reason).inc(count)
        for item in verdicts.seen:
            hub.publish(item)
    return response


def _pay(limiter: RateLimiter, bucket: str, cost: float, *, take: bool = True) -> None:
    """Charge `cost` to the sender's IP bucket (with `take=False`, only check that it could
    pay); RequestError 429 with Retry-After when it cannot, and then nothing is taken.

    The connection is closed: reading what is left of a refused body to keep it would be
    work done for the one client over its rate (a flood of large batches took 70% of the
    others' throughput that way); it is to wait Retry-After anyway."""
    if not limiter.rate:
        return  # no limit per IP: nothing to check or take
    now = time.monotonic()
    wait = limiter.charge(bucket, cost, now) if take else limiter.wait({bucket: cost}, now)
    if wait:
        raise RequestError(
            429,
            "too many events; retry later",
            close=True,
            headers={"Retry-After": retry_after(wait)},
        )


def _wire_bytes(request: web.Request) -> int:
    """Bytes of the body read off the connection so far, as sent (compressed or not)."""
    content = request.content
    # Not `total_raw_bytes`: the reader of an empty body lacks the attribute it reads.
    compressed = getattr(content, "total_compressed_bytes", None)
    return int(compressed) if compressed is not None else content.total_bytes


async def _refuse(request: web.Request, app: web.Application, error: RequestError) -> web.Response:
    """The answer to a request refused as a whole; the connection is kept when its body can
    be read to the end, closed otherwise."""
    settings, metrics = app[SETTINGS], app[METRICS]
    if error.status == 429:
        metrics.rate_limited.inc()
    else:
        metrics.refused_requests.labels(str(error.status)).inc()
    app[INGEST_LOG].log(
        logging.INFO,
        f"refused {error.status}",
        "refused %d: %s",
        error.status,
        clip(error.message, MAX_LOGGED_REFUSAL),
    )
    response = error_response(error.status, error.message, error.headers)
    if error.close or not await _drained(request, settings.max_body_bytes):
        response.force_close()
    return response


def _log_all_rejected(app: web.Application, verdicts: Verdicts) -> None:
    """One line for a request whose every event was rejected: counts by reason and where the
    first problem is, never the payload."""
    first = verdicts.rejected[0]["errors"]
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(verdicts.reasons.items()))
    app[INGEST_LOG].log(
        logging.INFO,
        "rejected",
        "rejected every event of a request (%s); the first at %s",
        reasons,
        clip(first[0]["path"] if first else "", MAX_LOGGED_REFUSAL) or "/",
    )


def _as_sent(event: dict[str, Any]) -> dict[str, Any]:
    return event  # enrich builds a new record; the event itself is left as it came


# Outbound's timestamps from here on are milliseconds: its Android SDK 1.0.0 and later send
# System.currentTimeMillis(). (In seconds this is the year 5138.)
_MILLISECONDS_FROM = 100_000_000_000


def _seconds(timestamp: float) -> float:
    return timestamp / 1000 if timestamp >= _MILLISECONDS_FROM else timestamp


def _named(
    convert: Callable[[dict[str, Any]], dict[str, Any]], body: dict[str, Any]
) -> dict[str, Any]:
    """`convert(body)`, where a body whose user is an `anon_id` (the anonymous user of
    Outbound's mobile SDKs, in place of `user_id`) becomes that anonymous id's event, which
    the anonymous namespace keeps apart from every known user."""
    if body.get("anon_id") is None:
        return convert(body)
    fields = {key: value for key, value in body.items() if key != "anon_id"}
    event = convert({**fields, "user_id": body["anon_id"]})
    event["anonymous_id"] = event.pop("user_id")
    return event


def _from_track(body: dict[str, Any]) -> dict[str, Any]:
    """A /v2/track body as a collector event, with its time in seconds."""
    event = _named(from_outbound_track, body)
    if "timestamp" in event:
        event["timestamp"] = _seconds(event["timestamp"])
    return event


def _from_identify(body: dict[str, Any]) -> dict[str, Any]:
    """A /v2/identify body as a collector event; the `timestamp` iOS 1.1 adds to every call
    is the record's time (Outbound's identify takes none), not a trait."""
    fields = {key: value for key, value in body.items() if key != "timestamp"}
    event = _named(from_outbound_identify, fields)
    if "timestamp" in body:
        event["timestamp"] = _seconds(body["timestamp"])
    return event


def _with_message_id(
    convert: Callable[[dict[str, Any]], dict[str, Any]], message_id: str
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`convert`, giving the event the message id its client chose."""

    def with_id(body: dict[str, Any]) -> dict[str, Any]:
        return {**convert(body), "message_id": message_id}

    return with_id


def _from_call(endpoint: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A device token or subscription call as a record made again as it came (its
    `timestamp`, when an SDK sends one, too)."""
    convert = from_outbound_call(endpoint)

    def from_body(body: dict[str, Any]) -> dict[str, Any]:
        return _named(convert, body)

    return from_body


_EVENT = Route("event", _as_sent)
_TRACK = Route("outbound_track", _from_track)
_IDENTIFY = Route("outbound_identify", _from_identify)
_TRACK_BATCH = Route("outbound_track", _from_track, server_only=True, outbound_batch=True)
_IDENTIFY_BATCH = Route("outbound_identify", _from_identify, server_only=True, outbound_batch=True)
# Outbound's device token and subscription calls by the kind of body each takes.
_CALL_ENDPOINTS: tuple[tuple[Kind, tuple[str, ...]], ...] = (
    ("outbound_register", ("/v2/apns/register", "/v2/gcm/register")),
    ("outbound_disable", ("/v2/apns/disable", "/v2/gcm/disable")),
    ("outbound_subscription", ("/v2/subscribe/all", "/v2/unsubscribe/all")),
    ("outbound_campaigns", ("/v2/subscribe/campaigns", "/v2/unsubscribe/campaigns")),
)
_CALLS = {
    endpoint: Route(kind, _from_call(endpoint), server_only=True)
    for kind, endpoints in _CALL_ENDPOINTS
    for endpoint in endpoints
}


async def post_event(request: web.Request) -> web.Response:
    """`POST /e`: one event or a batch, from browsers and API clients."""
    return await _handle(request, _EVENT)


async def post_outbound_track(request: web.Request) -> web.Response:
    """`POST /v2/track`: Outbound's track body, as its libraries send it."""
    return await _handle(request, _TRACK)


async def post_outbound_identify(request: web.Request) -> web.Response:
    """`POST /v2/identify`: Outbound's identify body, as its libraries send it."""
    return await _handle(request, _IDENTIFY)


async def post_outbound_track_batch(request: web.Request) -> web.Response:
    """`POST /v2/track/batch`: an array of track bodies (server tokens only)."""
    return await _handle(request, _TRACK_BATCH)


async def post_outbound_identify_batch(request: web.Request) -> web.Response:
    """`POST /v2/identify/batch`: an array of identify bodies (server tokens only)."""
    return await _handle(request, _IDENTIFY_BATCH)


def outbound_call_handlers() -> dict[str, Callable[[web.Request], Awaitable[web.Response]]]:
    """The handler of each of Outbound's device token and subscription calls, by path
    (server tokens only; each is relayed as the same call)."""

    def handler(route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def post_outbound_call(request: web.Request) -> web.Response:
            return await _handle(request, route)

        return post_outbound_call

    return {path: handler(route) for path, route in _CALLS.items()}
