"""Enrich: server time, skew-corrected event time, client IP, user agent, origin, message id."""

from __future__ import annotations

import functools
import ipaddress
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import IPNetwork

Record = dict[str, Any]
# The longest an event is believed to have waited on its client (sent_at - timestamp) for the
# skew correction: beyond it the two client times contradict each other (or it is a
# back-fill), and correcting by them could give a time decades old or before the epoch.
MAX_CLIENT_WAIT = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class Sender:
    """What the server itself knows about who sent a request."""

    ip: str | None
    user_agent: str | None
    origin: str | None
    client: str | None = None  # X-Outbound-Client: the Outbound library that sent it


def event_time(
    timestamp: float | None, sent_at: float | None, *, received_at: float, tolerance: float
) -> tuple[float, bool]:
    """When the event happened on the server's clock, and whether it had to be clamped.

    With both client times, the client's clock error cancels out: the event happened
    (sent_at - timestamp) before the server received it, when that wait is at most
    MAX_CLIENT_WAIT; a longer one is not believed and the timestamp is taken as sent. A
    time in the future beyond `tolerance` is clamped to `received_at`; past times are kept,
    since back-fills are legitimate.
    """
    if timestamp is None:
        return received_at, False
    when = timestamp
    if sent_at is not None and sent_at - timestamp <= MAX_CLIENT_WAIT:
        when = received_at - (sent_at - timestamp)
    if when > received_at + tolerance:
        return received_at, True
    return when, False


@functools.lru_cache(maxsize=4096)  # the same few addresses come again and again
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.9:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def _address_text(text: str) -> str | None:
    """`_address` written out, as the client's address is kept."""
    address = _address(text)
    return None if address is None else str(address)


def client_ip(
    peer: str | None, forwarded_for: Sequence[str], trusted: Iterable[IPNetwork]
) -> str | None:
    """The client's address: the socket peer, or the right-most X-Forwarded-For hop not trusted.

    X-Forwarded-For is believed only as far as it was written by trusted proxies; the
    left-most entries are whatever the client chose to send. An unparseable hop stops the
    walk at the last trusted proxy.
    """
    trusted = tuple(trusted)
    if not peer:
        return None
    if not forwarded_for or not trusted:
        # No hop to walk (the common case): the peer, written out once an address.
        return _address_text(peer)
    current = _address(peer)

    def is_trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address.version == net.version and address in net for net in trusted)

    if current is None:
        return None
    hops = [hop for header in forwarded_for for hop in header.split(",") if hop.strip()]
    while is_trusted(current) and hops:
        nearer = _address(hops.pop())
        if nearer is None:
            break
        current = nearer
    return str(current)


def time_ordered_id(now_ns: int | None = None) -> str:
    """A UUIDv7: milliseconds first, then 74 random bits, so that ids made one after
    another sit side by side in the queue's index of recent ids."""
    millis = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    random = int.from_bytes(os.urandom(10), "big")
    value = (millis & (1 << 48) - 1) << 80 | 0x7 << 76 | (random >> 62 & 0xFFF) << 64
    value |= 0b10 << 62 | random & (1 << 62) - 1
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def enrich(
    event: dict[str, Any],
    sender: Sender,
    *,
    received_at: float,
    batch_sent_at: float | None = None,
    tolerance: float,
    new_id: Callable[[], str] = time_ordered_id,
) -> Record:
    """A valid `/e` event as the record the queue keeps and the relay sends."""
    sent_at = event.get("sent_at", batch_sent_at)
    when, clamped = event_time(
        event.get("timestamp"), sent_at, received_at=received_at, tolerance=tolerance
    )
    user_id = event.get("user_id")
    record: Record = {
        "type": event.get("type", "track"),
        "message_id": event.get("message_id") or new_id(),
        "user_id": None if user_id is None else str(user_id),
        "anonymous_id": event.get("anonymous_id"),
        "event": event.get("event"),
        "properties": event.get("properties", {}),
        "traits": event.get("traits", {}),
        "timestamp": when,
        "received_at": received_at,
        "context": event.get("context", {}),
        "ip": sender.ip,
        "user_agent": sender.user_agent,
        "origin": sender.origin,
    }
    if clamped:
        record["clamped_from"] = event.get("timestamp")
    if "user_hash" in event:
        record["user_hash"] = event["user_hash"]
    if sender.client is not None:
        record["client"] = sender.client
    if event.get("user"):  # a /v2/track's user details (the Python library's `user`)
        record["user"] = event["user"]
    if record["type"] == "call":
        record["endpoint"], record["fields"] = event["endpoint"], event["fields"]
    return record


_IDENTIFY_ENVELOPE_FIELDS = {"user_id", "previous_id"}


def from_outbound_track(body: dict[str, Any]) -> dict[str, Any]:
    """Outbound's /v2/track body as a collector event (the shapes already agree)."""
    return {"type": "track", **body}


def from_outbound_identify(body: dict[str, Any]) -> dict[str, Any]:
    """Outbound's /v2/identify body as a collector event: the profile fields become traits."""
    event: dict[str, Any] = {"type": "identify", "user_id": body["user_id"]}
    if body.get("previous_id") is not None:
        event["anonymous_id"] = str(body["previous_id"])
    event["traits"] = {k: v for k, v in body.items() if k not in _IDENTIFY_ENVELOPE_FIELDS}
    return event


def from_outbound_call(endpoint: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The converter of a device token or subscription call (`/v2/apns/register`...): a
    record of type "call" that the relay makes again as it came, to the same endpoint."""

    def convert(body: dict[str, Any]) -> dict[str, Any]:
        fields = {key: value for key, value in body.items() if key != "user_id"}
        return {"type": "call", "user_id": body["user_id"], "endpoint": endpoint, "fields": fields}

    return convert
