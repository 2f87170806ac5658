"""The calls a record becomes, and Retry-After parsing."""

from __future__ import annotations

from typing import Any

import pytest

from collector.outbound import calls_for, identify_body, parse_retry_after, server_context

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
