"""Outbound: the v2 calls an event becomes, and the client that makes them."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from .config import Secret, redact_url
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
    "apns",  # device token arrays, as the libraries send them (protected_traits)
    "gcm",
)
PAGE_FIELDS = ("url", "path", "title", "referrer")
# GUIDs of records queued before `identity.stamp_ids` gave new ones theirs (derived
# GUIDs of new records are keyed with the server's key instead).
_GUID_NAMESPACE = uuid.UUID("5b1c7a3e-4f0e-4a8e-9d55-0c8a52f3b6a1")
# The namespace given to the anonymous ids of records queued before there was one.
LEGACY_ANONYMOUS_PREFIX = "anon:"


@dataclass(frozen=True, slots=True)
class Call:
    """One request to Outbound: the endpoint, its JSON body, and an id Outbound can dedupe on."""

    endpoint: str
    body: dict[str, Any]
    guid: str
    name: str
    batch: tuple[dict[str, Any], ...] = ()  # a batch call's items, sent instead of `body`

    @property
    def payload(self) -> dict[str, Any] | list[dict[str, Any]]:
        """What the call sends: its body, or a batch call's items as a JSON array."""
        return list(self.batch) if self.batch else self.body


# Outbound's batch form of a call: a JSON array of the bodies the single calls carry.
BATCH_ENDPOINTS = {"/v2/track": "/v2/track/batch", "/v2/identify": "/v2/identify/batch"}


def batch_call(calls: Sequence[Call]) -> Call:
    """One batch call of these calls to one endpoint, their bodies in order.

    X-Outbound-GUID is per call, and a batch's items carry none, so the batch's GUID is
    derived from its events' GUIDs in order: the same batch sent again (its answer lost) is
    the same call for Outbound's dedupe, and any other batch, a half after a split among
    them, is another call that a GUID of one of its events must not make a duplicate of.
    """
    endpoint = calls[0].endpoint
    assert all(call.endpoint == endpoint and not call.batch for call in calls), "single calls"
    guid = str(uuid.uuid5(_GUID_NAMESPACE, "batch\n" + "\n".join(c.guid for c in calls)))
    items = tuple(call.body for call in calls)
    return Call(BATCH_ENDPOINTS[endpoint], {}, guid, f"batch of {len(items)}", items)


@dataclass(frozen=True, slots=True)
class Answer:
    """What came back: a status, or None when no answer came (network error, timeout)."""

    status: int | None
    detail: str = ""
    retry_after: float | None = None
    dry_run: bool = False  # nothing was sent: no key is set

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


# What a call leaves out as empty (compared by ==: 0 and False are kept). Built once: written
# in the function, the tuple's dict and list were built again on every call.
_ABSENT: tuple[object, ...] = (None, "", {}, [])


def _present(value: object) -> bool:
    return value not in _ABSENT


def _page(client: dict[str, Any]) -> dict[str, Any]:
    """The page fields of a record's client context, empty ones left out."""
    return {key: value for key in PAGE_FIELDS if (value := client.get(key)) not in _ABSENT}


def anonymous(record: Record) -> str | None:
    """The anonymous id as Outbound knows it: in its namespace, so never a user's id. A record
    queued before the namespace existed gets the default prefix here."""
    anonymous_id = record.get("anonymous_id")
    if anonymous_id is None or "anonymous_prefix" in record:
        return anonymous_id
    return LEGACY_ANONYMOUS_PREFIX + str(anonymous_id)


def subject(record: Record) -> str:
    """The id Outbound knows this person by: the known user id, else the anonymous id."""
    user_id = record.get("user_id")
    if user_id is not None and user_id != "":
        return str(user_id)
    who = anonymous(record)
    if who is None:
        raise ValueError("a record needs a user_id or an anonymous_id")
    return who


def server_context(record: Record, *, with_ip: bool = False) -> dict[str, Any]:
    """What the server knows of an event that a campaign may use, empty parts left out.

    The IP only when the operator forwards it (as stored: truncated unless set to full).
    """
    client = record.get("context", {})
    context: dict[str, Any] = {}  # in this order: page, locale, user_agent, received_at, ip
    page = _page(client)
    if page:
        context["page"] = page
    if (locale := client.get("locale")) not in _ABSENT:
        context["locale"] = locale
    if (user_agent := record.get("user_agent")) not in _ABSENT:
        context["user_agent"] = user_agent
    context["received_at"] = int(record["received_at"])  # a number: never left out
    if with_ip and (ip := record.get("ip")) not in _ABSENT:
        context["ip"] = ip
    return context


def identify_body(record: Record) -> dict[str, Any]:
    traits = dict(record.get("traits", {}))
    body: dict[str, Any] = {"user_id": subject(record)}
    previous = anonymous(record)
    if previous is not None and body["user_id"] != previous:  # an alias: only ever from one
        body["previous_id"] = previous
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
        page = _page(client)
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
    if record.get("user"):  # the Python library's user details, passed on as they came
        body["user"] = record["user"]
    return body


def calls_for(
    record: Record,
    *,
    key: Secret,
    identified: bool,
    page_event_name: str,
    context_property: str,
    forward_ip: bool = False,
) -> list[Call]:
    """The calls one record becomes, in order: Outbound wants an identify before a first track
    (`key`: the ids key, identity.ids_key, the same for every collector on one queue)."""
    guid = record.get("guid") or header_safe_guid(record["message_id"])
    if record["type"] == "identify":
        return [Call("/v2/identify", identify_body(record), guid, "identify")]
    if record["type"] == "call":  # a device token or subscription call: the same call again
        body = {"user_id": subject(record), **record["fields"]}
        return [Call(record["endpoint"], body, guid, record["endpoint"].removeprefix("/v2/"))]
    track = track_body(
        record,
        page_event_name=page_event_name,
        context_property=context_property,
        forward_ip=forward_ip,
    )
    calls = [Call("/v2/track", track, guid, track["event"])]
    if "anonymous_prefix" not in record and not record.get("user_id"):
        # Queued before the namespace: its user was marked identified under the bare id.
        identified = False
    if not identified:
        identify = Call(
            "/v2/identify", {"user_id": track["user_id"]}, _identify_guid(record, key), "identify"
        )
        calls.insert(0, identify)
    return calls


def _identify_guid(record: Record, key: Secret) -> str:
    """The GUID of the identify before a record's first track, the same on every retry and
    whichever collector relays it."""
    if "identify_guid" in record:  # stored at ingest, before the relay derived it
        return str(record["identify_guid"])
    if "dedupe_key" in record or "guid" in record:  # stamped (identity.stamp_ids)
        # Imported here: identity imports this module (guid_safe) at its top.
        from .identity import identify_guid

        return identify_guid(record, key)
    # Queued before records were stamped: no keyed GUID of its own to derive from.
    return str(uuid.uuid5(_GUID_NAMESPACE, f"{record['message_id']}/identify"))


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
# How much of an answer's body is read past the detail, to find its end (a body cut off
# is a failed call) and to keep its connection; a longer one is left unread, its
# connection closed, and its status stands.
MAX_BODY_BYTES = 1 << 20
_READ_BYTES = 64 * 1024


class HttpOutbound:
    """Outbound's REST API through one aiohttp session, the key in its header only.

    Keep-alive connections to the one host, at most `concurrency` of them; the proxy from
    HTTPS_PROXY/HTTP_PROXY unless NO_PROXY names the host; `tls` for https (the system's
    authorities by default).
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
        self._key = key
        self._timeout = timeout
        self._concurrency = concurrency
        self._tls = tls
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._headers = {  # with every call
            "X-Outbound-Key": key.reveal(),
            "Content-Type": "application/json",
            "User-Agent": "outbound-collector",
        }
        # The proxy HTTPS_PROXY or HTTP_PROXY names for this URL, unless NO_PROXY names its
        # host: aiohttp's own lookup, run once here. A session with trust_env=True runs it,
        # and a netrc lookup, on a thread for every call: 3-4 times the CPU per call.
        self._proxy: URL | None = None
        self._proxy_headers: dict[str, str] | None = None
        try:
            self._proxy, auth = get_env_proxy_for_url(URL(self._base_url))
        except LookupError:
            auth = None
        else:
            log.info("calls to Outbound go through the proxy %s", self._proxy)  # no credentials
        if auth is not None:  # the variable's user:password@, or the proxy's line in netrc
            credentials = {"Proxy-Authorization": auth.encode()}
            # aiohttp sends proxy_headers with a tunnel's CONNECT only; a plain http request
            # goes to the proxy itself and carries them (the proxy takes them off).
            if parts.scheme == "https":
                self._proxy_headers = credentials
            else:
                self._headers.update(credentials)

    def __repr__(self) -> str:
        return f"HttpOutbound({redact_url(self._base_url)!r})"

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use, on the loop that runs the relay: a session belongs to one loop.
        connector = aiohttp.TCPConnector(
            limit=self._concurrency,
            limit_per_host=self._concurrency,
            ssl=self._tls if self._tls is not None else True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            proxy=self._proxy,
            headers=self._headers,
        )
        return self._session

    def _url(self, endpoint: str) -> URL:
        url = self._urls.get(endpoint)
        if url is None:
            url = self._urls[endpoint] = URL(self._base_url + endpoint)
        return url

    async def send(self, call: Call) -> Answer:
        """POST the call; what came back, or why nothing did (never raises for that)."""
        session = self._session or self._open()
        try:
            async with session.post(
                self._url(call.endpoint),
                data=orjson.dumps(call.payload),
                headers={"X-Outbound-GUID": header_safe_guid(call.guid)},
                proxy_headers=self._proxy_headers,
            ) as response:
                detail = await _read_detail(response)
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), now=time.time()
                )
                return Answer(response.status, detail.decode("utf-8", "replace"), retry_after)
        except TimeoutError as error:  # aiohttp's own timeouts are TimeoutErrors too
            return Answer(None, f"{type(error).__name__}: no answer within {self._timeout:g} s")
        except (aiohttp.ClientError, OSError) as error:
            # One line; and a parser error quotes what came back, which may echo the request.
            message = " ".join(str(error).split()).replace(self._key.reveal(), "[key]")
            return Answer(None, f"{type(error).__name__}: {message}")

    async def get(self, endpoint: str, *, limit: int) -> tuple[int, bytes] | str:
        """GET the endpoint with the key: its status and body, or why there is none (no
        answer within the timeout, a body over `limit` bytes); never raises for that."""
        session = self._session or self._open()
        try:
            # Not through _url's memo: the paths asked for here vary (an SDK's version in it).
            async with session.get(
                URL(self._base_url + endpoint), proxy_headers=self._proxy_headers
            ) as response:
                body = bytearray()
                while len(body) <= limit:
                    chunk = await response.content.read(limit + 1 - len(body))
                    if not chunk:
                        return response.status, bytes(body)
                    body += chunk
                return f"the answer is over {limit} bytes"
        except TimeoutError:
            return f"no answer within {self._timeout:g} s"
        except (aiohttp.ClientError, OSError) as error:
            message = " ".join(str(error).split()).replace(self._key.reveal(), "[key]")
            return f"{type(error).__name__}: {message}"

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()


async def _read_detail(response: aiohttp.ClientResponse) -> bytes:
    """The body's first DETAIL_BYTES, the rest read to its end up to MAX_BODY_BYTES.

    Raises aiohttp.ClientPayloadError when the body stops short of its end.
    """
    detail = bytearray()
    while len(detail) < DETAIL_BYTES:
        chunk = await response.content.read(DETAIL_BYTES - len(detail))
        if not chunk:
            return bytes(detail)
        detail += chunk
    rest = 0
    while rest <= MAX_BODY_BYTES:
        chunk = await response.content.read(_READ_BYTES)
        if not chunk:
            return bytes(detail)
        rest += len(chunk)
    return bytes(detail)  # the rest left unread: aiohttp closes the connection on release


def header_safe_guid(guid: str) -> str:
    """The GUID as a header value, one-to-one: a message id a header would not carry exactly
    (a line break; a space at either end, which HTTP trims) becomes a UUID derived from it,
    the same on every retry. New records come with a keyed one (`identity.stamp_ids`)."""
    if guid_safe(guid):
        return guid
    return str(uuid.uuid5(_GUID_NAMESPACE, guid))


def guid_safe(guid: str) -> bool:
    """Whether a header carries `guid` exactly as it is: printable ASCII, and no space at
    either end, which HTTP trims (" order-1" would arrive as "order-1")."""
    return guid.isascii() and guid.isprintable() and guid == guid.strip(" ")


class DryRunOutbound:
    """Stands in for Outbound when no key is set: says what it would send, sends nothing."""

    async def send(self, call: Call) -> Answer:
        size = len(orjson.dumps(call.payload))
        log.info("dry run: would POST %s %r (%d bytes)", call.endpoint, call.name, size)
        await asyncio.sleep(0)
        return Answer(202, "dry run", dry_run=True)
