"""Outbound: the v2 calls an event becomes, and the client that makes them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
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


class HttpOutbound:
    """Outbound's REST API over one pooled session, with the key in its header only."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, key: Secret, timeout: float
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._key = key
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def __repr__(self) -> str:
        return f"HttpOutbound({self._base_url!r})"

    async def send(self, call: Call) -> Answer:
        headers = {
            "X-Outbound-Key": self._key.reveal(),
            "X-Outbound-GUID": call.guid,
            "Content-Type": "application/json",
        }
        try:
            async with self._session.post(
                self._base_url + call.endpoint,
                data=orjson.dumps(call.body),
                headers=headers,
                timeout=self._timeout,
            ) as response:
                detail = (await response.content.read(2048)).decode("utf-8", "replace")
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), now=time.time()
                )
                return Answer(response.status, detail, retry_after)
        except TimeoutError:
            return Answer(None, f"no answer within {self._timeout.total:g} s")
        except (aiohttp.ClientError, OSError) as error:
            return Answer(None, f"{type(error).__name__}: {error}")


class DryRunOutbound:
    """Stands in for Outbound when no key is set: says what it would send, sends nothing."""

    async def send(self, call: Call) -> Answer:
        size = len(orjson.dumps(call.body))
        log.info("dry run: would POST %s %r (%d bytes)", call.endpoint, call.name, size)
        await asyncio.sleep(0)
        return Answer(202, "dry run")
