"""Enrichment as pure functions: event time with skew correction, client IP, records."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from collector.enrich import (
    MAX_CLIENT_WAIT,
    Sender,
    client_ip,
    enrich,
    event_time,
    from_outbound_identify,
    from_outbound_track,
    time_ordered_id,
)

RECEIVED = 1_700_000_000.0


@pytest.mark.parametrize(
    ("timestamp", "sent_at", "expected", "clamped"),
    [
        (None, None, RECEIVED, False),  # no client time: the server's
        (None, RECEIVED + 500, RECEIVED, False),  # sent_at alone says nothing of the event
        (RECEIVED - 30, None, RECEIVED - 30, False),  # a plain past time is kept
        (1529366403, None, 1529366403, False),  # an old back-fill is kept as sent
        (RECEIVED + 30, None, RECEIVED + 30, False),  # within the tolerance of 60 s
        (RECEIVED + 61, None, RECEIVED, True),  # beyond it: clamped
        (RECEIVED + 86400 * 365, None, RECEIVED, True),  # a year ahead: clamped
        # The client clock is an hour fast: sent_at - timestamp = 5 s, whatever the clock.
        (RECEIVED + 3600 - 5, RECEIVED + 3600, RECEIVED - 5, False),
        # The client clock is a day slow: same correction.
        (RECEIVED - 86400 - 5, RECEIVED - 86400, RECEIVED - 5, False),
        # Queued offline for an hour on a correct clock.
        (RECEIVED - 3600, RECEIVED, RECEIVED - 3600, False),
        # sent before it happened (a broken client): lands in the future, clamped.
        (RECEIVED + 500, RECEIVED, RECEIVED, True),
        (RECEIVED, RECEIVED - 30, RECEIVED + 30, False),  # inside the tolerance after correction
        # sent_at far ahead of timestamp, both within the schema: the client claims the event
        # waited decades before it was sent. The correction would give a time before the
        # epoch or decades old; the timestamp is taken as sent instead.
        (RECEIVED, 1e11, RECEIVED, False),
        (RECEIVED - 10, RECEIVED + 86400 * 365 * 80, RECEIVED - 10, False),
        (0, 1e9, 0, False),  # a client clock at the epoch, a sent_at of 2001: kept as sent
        (1529366403, 1e11, 1529366403, False),  # a back-fill with an absurd sent_at
        (RECEIVED + 86400 * 365, 1e11, RECEIVED, True),  # as sent, then the future clamp
        # The longest wait the correction is believed for, and just past it.
        (RECEIVED - 5, RECEIVED - 5 + MAX_CLIENT_WAIT, RECEIVED - MAX_CLIENT_WAIT, False),
        (RECEIVED - 5, RECEIVED - 4 + MAX_CLIENT_WAIT, RECEIVED - 5, False),
        # A back-fill from a server with a right clock: the same either way.
        (1529366403, RECEIVED, 1529366403, False),
    ],
)
def test_event_time(
    timestamp: float | None, sent_at: float | None, expected: float, clamped: bool
) -> None:
    assert event_time(timestamp, sent_at, received_at=RECEIVED, tolerance=60) == (
        expected,
        clamped,
    )


PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.9", [], PROXIES, "203.0.113.9"),  # direct client
        ("203.0.113.9", ["198.51.100.1"], PROXIES, "203.0.113.9"),  # untrusted peer: header ignored
        ("10.0.0.2", ["198.51.100.1"], PROXIES, "198.51.100.1"),  # one trusted proxy
        ("10.0.0.2", ["1.1.1.1, 198.51.100.1"], PROXIES, "198.51.100.1"),  # left-most is forged
        ("10.0.0.2", ["198.51.100.1, 10.0.0.7"], PROXIES, "198.51.100.1"),  # two proxies
        ("10.0.0.2", ["1.1.1.1", "198.51.100.1"], PROXIES, "198.51.100.1"),  # repeated headers
        ("10.0.0.2", ["10.0.0.3, 10.0.0.4"], PROXIES, "10.0.0.3"),  # all trusted: the farthest
        ("10.0.0.2", [], PROXIES, "10.0.0.2"),  # proxy sent no header
        ("10.0.0.2", ["1.1.1.1, garbage"], PROXIES, "10.0.0.2"),  # unparseable: stop at proxy
        ("10.0.0.2", ["198.51.100.1:4711"], PROXIES, "198.51.100.1"),  # with a port
        ("10.0.0.2", ["[2001:db8::1]:443"], PROXIES, "2001:db8::1"),
        ("::1", ["2001:db8::5"], PROXIES, "2001:db8::5"),  # IPv6 proxy
        ("::ffff:10.0.0.2", ["198.51.100.1"], PROXIES, "198.51.100.1"),  # IPv4-mapped peer
        ("10.0.0.2", ["198.51.100.1"], (), "10.0.0.2"),  # no trusted proxies configured
        (None, ["198.51.100.1"], PROXIES, None),  # no peer (a unix socket)
        ("", [], PROXIES, None),
        ("not an address", [], (), None),
        ("not an address", ["198.51.100.1"], PROXIES, None),
        ("::ffff:203.0.113.9", [], (), "203.0.113.9"),  # IPv4-mapped, no proxy configured
    ],
)
def test_client_ip(
    peer: str | None,
    forwarded: list[str],
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    expected: str | None,
) -> None:
    assert client_ip(peer, forwarded, trusted) == expected


SENDER = Sender(ip="203.0.113.9", user_agent="UA/1", origin="https://shop.example")


def test_enrich_seed_event() -> None:
    event = {"event": "renewMembership", "user_id": 123, "timestamp": 1529366403}
    record = enrich(event, SENDER, received_at=RECEIVED, tolerance=60, new_id=lambda: "generated")
    assert record == {
        "type": "track",
        "message_id": "generated",
        "user_id": "123",  # Outbound stores numeric ids as strings
        "anonymous_id": None,
        "event": "renewMembership",
        "properties": {},
        "traits": {},
        "timestamp": 1529366403,
        "received_at": RECEIVED,
        "context": {},
        "ip": "203.0.113.9",
        "user_agent": "UA/1",
        "origin": "https://shop.example",
    }


def test_enrich_keeps_client_message_id_and_records_clamp() -> None:
    event = {"event": "x", "anonymous_id": "a", "message_id": "m-1", "timestamp": RECEIVED + 999}
    record = enrich(event, SENDER, received_at=RECEIVED, tolerance=60)
    assert record["message_id"] == "m-1"
    assert record["timestamp"] == RECEIVED
    assert record["clamped_from"] == RECEIVED + 999


def test_enrich_uses_batch_sent_at_when_event_has_none() -> None:
    event = {"event": "x", "anonymous_id": "a", "timestamp": 1000.0}
    record = enrich(event, SENDER, received_at=RECEIVED, batch_sent_at=1010.0, tolerance=60)
    assert record["timestamp"] == RECEIVED - 10


def test_enrich_generates_unique_message_ids() -> None:
    event = {"event": "x", "anonymous_id": "a"}
    ids = {
        enrich(event, SENDER, received_at=RECEIVED, tolerance=60)["message_id"] for _ in range(50)
    }
    assert len(ids) == 50


def test_generated_ids_are_uuid7_ordered_by_time() -> None:
    at = 1_764_187_200_123_456_789
    made = [time_ordered_id(at + step * 1_000_000) for step in range(100)]
    assert made == sorted(made)  # a millisecond apart: in order, whatever the random bits
    for text in made:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == text
    assert int(made[0].replace("-", "")[:12], 16) == at // 1_000_000
    assert len({time_ordered_id(at) for _ in range(1000)}) == 1000  # random past the time


def test_outbound_bodies_become_events() -> None:
    assert from_outbound_track({"user_id": "u", "event": "e"}) == {
        "type": "track",
        "user_id": "u",
        "event": "e",
    }
    identify = {"user_id": "u", "previous_id": 7, "email": "a@b.c", "attributes": {"x": 1}}
    assert from_outbound_identify(identify) == {
        "type": "identify",
        "user_id": "u",
        "anonymous_id": "7",
        "traits": {"email": "a@b.c", "attributes": {"x": 1}},
    }
