"""Issue 14, inbound: Outbound's own server libraries work unchanged against the collector.

Each test replays a library's exact request (headers, endpoint and body, as built by its
published source, cited where it is used) against a real collector on loopback with an
identity secret, and checks what the collector answers and what the fake Outbound gets.

The libraries cannot run here: `outbound` 1.2.1 on PyPI is Python 2 only (`print __HEADERS`
in `__subscription`, a SyntaxError on Python 3), and the Node, Ruby and PHP ones need their
runtimes' packages. So their requests are rebuilt from the source, byte for byte for Python
(`json.dumps` with its default separators).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import orjson
import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault

from collector.config import Secret

TOKEN = "server-token-for-the-libraries-0123456789"
SECRET = "identity-secret-for-the-libraries-0123456789"
SHOP = "https://shop.example"

# outboundio/lib-python, outbound/__init__.py (v1.2.1), `init`: every call's headers.
PYTHON_HEADERS = {
    "content-type": "application/json",
    "X-Outbound-Client": "Python/1.2.1",
    "X-Outbound-Key": TOKEN,
}
# zendesk/connect_node_sdk (was outboundio/lib-node), outbound.js (v1.3.0), `headers()`.
NODE_HEADERS = {
    "Content-type": "application/json",
    "X-Outbound-Client": "Javascript-Node/1.3.0",
    "X-Outbound-Key": TOKEN,
}
# outboundio/lib-ruby, lib/outbound.rb (v1.2.0), `Defaults::HEADERS` and `post`.
RUBY_HEADERS = {
    "Content-type": "application/json",
    "X-Outbound-Client": "Ruby/1.2.0",
    "X-Outbound-Key": TOKEN,
}
# outboundio/lib-php, lib/outbound.php (v2.2.0), `_execute`.
PHP_HEADERS = {
    "Content-type": "application/json",
    "X-Outbound-Key": TOKEN,
    "X-Outbound-Client": "PHP/2.2.0",
}


@pytest.fixture
async def guarded(start_collector: StartCollector) -> Collector:
    """A collector as the README sets one up for back-ends and pages together."""
    return await start_collector(
        identity_secret=Secret(SECRET), server_tokens=(Secret(TOKEN),), allowed_origins=(SHOP,)
    )


async def python_post(collector: Collector, endpoint: str, data: object) -> tuple[int, Any]:
    """What `outbound` 1.2.1 sends: `requests.post(url, data=json.dumps(data), headers=...)`."""
    status, answer, _ = await collector.post(
        f"/v2{endpoint}", data=json.dumps(data).encode(), headers=PYTHON_HEADERS
    )
    return status, answer


# Outbound's answer to a call it took: an empty body. lib-php's `_execute` takes any other
# body for an error (`OutboundApiException`); the others look at the status only.
ACCEPTED = b""


def stored_records(collector: Collector) -> list[dict[str, Any]]:
    """The records waiting in the queue's file, oldest first."""
    with sqlite3.connect(collector.queue.path) as db:
        rows = db.execute("SELECT body FROM events ORDER BY id").fetchall()
    return [orjson.loads(body) for (body,) in rows]


# -- X-Outbound-Key is a server credential ----------------------------------------------------


async def test_the_libraries_key_header_is_a_server_credential(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """With identity_secret set, a user id without a user_hash is a browser's claim; with
    the server token in X-Outbound-Key it is a back-end's, as with Authorization: Bearer."""
    status, answer = await python_post(guarded, "/identify", {"user_id": "u-7"})
    assert status == 202, answer
    status, answer = await python_post(
        guarded, "/track", {"user_id": "u-7", "event": "signedUp", "timestamp": 1529366403}
    )
    assert status == 202, answer
    identify, track = await fake.wait_for(2)
    assert identify.endpoint == "identify"
    assert identify.body == {"user_id": "u-7"}
    assert track.body["user_id"] == "u-7"
    assert track.body["event"] == "signedUp"


async def test_a_wrong_key_header_is_refused_and_stores_nothing(guarded: Collector) -> None:
    for headers in (
        {**PYTHON_HEADERS, "X-Outbound-Key": "not-the-token"},
        # Both headers: each must hold a server token.
        {**PYTHON_HEADERS, "X-Outbound-Key": "not-the-token", "Authorization": f"Bearer {TOKEN}"},
        {**PYTHON_HEADERS, "Authorization": "Bearer not-the-token"},
    ):
        status, answer, _ = await guarded.post(
            "/v2/identify", data=b'{"user_id": "u-7"}', headers=headers
        )
        assert (status, answer) == (401, {"error": "the server token is not valid"})
    assert guarded.queue.depth == 0


async def test_the_key_header_without_server_tokens_is_refused(
    start_collector: StartCollector,
) -> None:
    """A collector with no server tokens has no key to match: a library's key is refused,
    never taken for a browser's request."""
    collector = await start_collector(identity_secret=Secret(SECRET))
    status, answer = await python_post(collector, "/identify", {"user_id": "u-7"})
    assert (status, answer) == (401, {"error": "the server token is not valid"})


async def test_the_client_header_is_kept_in_the_record(
    guarded: Collector, fake: FakeOutbound
) -> None:
    fake.always = Fault(503)  # keep the records queued to read them
    await python_post(guarded, "/identify", {"user_id": "u-1"})
    await guarded.post(
        "/v2/identify", data=b'{"user_id": "u-2"}', headers={"Authorization": f"Bearer {TOKEN}"}
    )
    await eventually(lambda: guarded.queue.depth == 2)
    first, second = stored_records(guarded)
    assert first["client"] == "Python/1.2.1"
    assert "client" not in second


async def test_a_call_the_libraries_make_is_answered_as_outbound_does(
    guarded: Collector,
) -> None:
    """An empty body for a call taken (lib-php's `_execute` raises OutboundApiException for
    any other); the collector's JSON for Authorization: Bearer, and for every refusal."""
    body = b'{"user_id":"p-2"}'
    status, answer, response = await guarded.post("/v2/identify", data=body, headers=PHP_HEADERS)
    assert (status, answer, response.headers["Content-Length"]) == (202, b"", "0")
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status, answer, _ = await guarded.post("/v2/identify", data=body, headers=bearer)
    assert (status, answer) == (202, {"accepted": 1, "rejected": []})
    status, answer, _ = await guarded.post("/v2/identify", data=b"{}", headers=PHP_HEADERS)
    assert status == 400
    assert answer["rejected"][0]["errors"] == [
        {"path": "/user_id", "message": "`user_id` is required"}
    ]


# -- identify and track with every field the libraries send ---------------------------------

BROWSER = {"Origin": SHOP}


async def test_python_identify_with_every_field_reaches_outbound_as_sent(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """`identify(42, previous_id="v-1", group_id="g-1", group_attributes=..., first_name=...,
    apns_tokens="apns-1", gcm_tokens=[...], attributes=...)`: lib-python's `__user` makes
    a single apns token a list, and the user id stays a number in the body."""
    data: dict[str, Any] = {
        "previous_id": "v-1",
        "group_id": "g-1",
        "group_attributes": {"plan": "team"},
        "first_name": "Ann",
        "last_name": "Lee",
        "email": "ann@example.com",
        "phone_number": "+15550100",
        "apns": ["apns-1"],
        "gcm": ["gcm-1", "gcm-2"],
        "attributes": {"shoe_size": 38},
        "user_id": 42,
    }
    assert await python_post(guarded, "/identify", data) == (202, ACCEPTED)
    (identify,) = await fake.wait_for(1)
    assert identify.endpoint == "identify"
    # The same fields; the ids as Outbound stores them: text, and a previous id in the
    # anonymous namespace (a back-end's alias of a visitor, README "Security").
    assert identify.body == {**data, "user_id": "42", "previous_id": "anon:v-1"}


async def test_python_track_with_user_details_passes_the_user_on(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """`track(7, "bought", first_name="Ann", apns_tokens="apns-1", user_attributes=...,
    properties=...)`: lib-python puts the user details in a nested `user` object."""
    user = {"first_name": "Ann", "apns": ["apns-1"], "attributes": {"vip": True}}
    data = {
        "user_id": 7,
        "event": "bought",
        "user": user,
        "properties": {"sku": "b-1"},
        "timestamp": 1529366403,
    }
    assert await python_post(guarded, "/track", data) == (202, ACCEPTED)
    identify, track = await fake.wait_for(2)
    assert identify.body == {"user_id": "7"}  # the collector's identify before a first track
    assert track.endpoint == "track"
    assert track.body["user"] == user
    assert track.body["user_id"] == "7"
    assert track.body["timestamp"] == 1529366403
    assert track.body["properties"]["sku"] == "b-1"


async def test_the_other_libraries_identify_and_track_bodies_are_accepted(
    guarded: Collector, fake: FakeOutbound
) -> None:
    calls = [
        # zendesk/connect_node_sdk outbound.js (v1.3.0): `identify` merges `userObject`
        # (attributes, apnsTokens as an array) into {"user_id"}; `request` with `json:`
        # writes JSON.stringify's compact form.
        (
            NODE_HEADERS,
            "/v2/identify",
            b'{"user_id":"n-1","first_name":"Ann","group_id":"g-1",'
            b'"attributes":{"a":1},"apns":["apns-n"],"gcm":["gcm-n"]}',
        ),
        # outbound.js `track`: properties always present ({} when none given).
        (
            NODE_HEADERS,
            "/v2/track",
            b'{"user_id":"n-1","properties":{},"event":"opened","timestamp":1529366403}',
        ),
        # outboundio/lib-ruby lib/outbound.rb (v1.2.0): `identify` merges `user(info)`
        # (apns: info[:apns_tokens], nils dropped) into {user_id:}; `JSON.generate`.
        (
            RUBY_HEADERS,
            "/v2/identify",
            b'{"user_id":5,"email":"r@example.com","apns":["apns-r"],"previous_id":"v-r"}',
        ),
        (RUBY_HEADERS, "/v2/track", b'{"user_id":5,"event":"paid","timestamp":1529366403}'),
        # outboundio/lib-php lib/outbound.php (v2.2.0): `_build_user` keeps the known keys,
        # `array_filter` drops empty ones; `track` sends event, user_id, properties, timestamp.
        (PHP_HEADERS, "/v2/identify", b'{"gcm":["gcm-p"],"user_id":"p-1"}'),
        (
            PHP_HEADERS,
            "/v2/track",
            b'{"event":"viewed","user_id":"p-1","properties":{"x":1},"timestamp":1529366403}',
        ),
    ]
    for headers, path, body in calls:
        status, answer, _ = await guarded.post(path, data=body, headers=headers)
        assert (status, answer) == (202, ACCEPTED), (path, body)
    received = await fake.wait_for(6)
    identifies = {r.body["user_id"]: r.body for r in received if r.endpoint == "identify"}
    assert identifies["n-1"]["apns"] == ["apns-n"]
    assert identifies["n-1"]["gcm"] == ["gcm-n"]
    assert identifies["5"]["apns"] == ["apns-r"]
    assert identifies["5"]["previous_id"] == "anon:v-r"
    assert identifies["p-1"] == {"user_id": "p-1", "gcm": ["gcm-p"]}
    clients = {r.body["user_id"]: r for r in received if r.endpoint == "track"}
    assert set(clients) == {"n-1", "5", "p-1"}


# -- device tokens and subscriptions -------------------------------------------------------

# lib-python `__device_token` and `__subscription` (v1.2.1); lib-ruby `register`, `disable`,
# `disable_all`, `subscription`; lib-php `register_token`, `disable_token`,
# `disable_all_tokens`, `_make_subscription_call`; outbound.js `deviceToken`, `subscription`.
PYTHON_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("/apns/register", {"user_id": 42, "token": "apns-1"}),
    ("/gcm/register", {"user_id": 42, "token": "gcm-1"}),
    ("/apns/disable", {"user_id": 42, "token": "apns-1"}),
    ("/gcm/disable", {"user_id": 42, "all": True}),
    ("/subscribe/all", {"user_id": 42}),
    ("/unsubscribe/all", {"user_id": 42}),
    ("/subscribe/campaigns", {"user_id": 42, "campaign_ids": ["c-1", "c-2"]}),
    ("/unsubscribe/campaigns", {"user_id": 42, "campaign_ids": ["c-2"]}),
]


async def test_device_and_subscription_calls_are_relayed_as_the_same_calls_in_order(
    guarded: Collector, fake: FakeOutbound
) -> None:
    for endpoint, data in PYTHON_CALLS:
        assert await python_post(guarded, endpoint, data) == (202, ACCEPTED), endpoint
    received = await fake.wait_for(len(PYTHON_CALLS))
    assert [(f"/{r.endpoint}", r.body) for r in received] == [
        (endpoint, {**data, "user_id": "42"}) for endpoint, data in PYTHON_CALLS
    ]
    # Each under a GUID of its own, as every relayed call.
    guids = [r.headers["X-Outbound-GUID"] for r in received]
    assert len(set(guids)) == len(guids)


async def test_a_device_call_keeps_its_place_among_the_users_events(
    guarded: Collector, fake: FakeOutbound
) -> None:
    await python_post(guarded, "/identify", {"user_id": "u-9"})
    await python_post(guarded, "/apns/disable", {"user_id": "u-9", "all": True})
    await python_post(guarded, "/track", {"user_id": "u-9", "event": "loggedOut"})
    received = await fake.wait_for(3)
    assert [r.endpoint for r in received] == ["identify", "apns/disable", "track"]


async def test_a_device_call_is_retried_like_any_event(
    guarded: Collector, fake: FakeOutbound
) -> None:
    fake.fail_next(Fault(503), Fault(429, retry_after="0"))
    status, _ = await python_post(guarded, "/gcm/register", {"user_id": 3, "token": "gcm-3"})
    assert status == 202
    (call,) = await fake.wait_for(1)
    assert (call.endpoint, call.body) == ("gcm/register", {"user_id": "3", "token": "gcm-3"})
    assert [(a[0], a[2]) for a in fake.attempts] == [
        ("gcm/register", 503),
        ("gcm/register", 429),
        ("gcm/register", 200),
    ]


async def test_a_refused_device_call_is_dead_lettered_and_the_user_goes_on(
    guarded: Collector, fake: FakeOutbound
) -> None:
    fake.fail_next(Fault(400, body="unknown campaign"))
    await python_post(guarded, "/unsubscribe/campaigns", {"user_id": 4, "campaign_ids": [9]})
    await python_post(guarded, "/apns/register", {"user_id": 4, "token": "apns-4"})
    (call,) = await fake.wait_for(1)
    assert (call.endpoint, call.body) == ("apns/register", {"user_id": "4", "token": "apns-4"})

    async def dead_lettered() -> bool:
        return (await guarded.queue.stats()).dead_letters == 1

    await eventually(dead_lettered)
    with sqlite3.connect(guarded.queue.path) as db:
        (body, status) = db.execute("SELECT body, status FROM dead_letters").fetchone()
    record = orjson.loads(body)
    assert (record["type"], record["endpoint"], record["fields"], status) == (
        "call",
        "/v2/unsubscribe/campaigns",
        {"campaign_ids": [9]},
        400,
    )
    assert record["client"] == "Python/1.2.1"


@pytest.mark.parametrize(
    ("endpoint", "data", "path", "message"),
    [
        ("/apns/register", {"user_id": 1}, "/token", "`token` is required"),
        ("/gcm/register", {"user_id": 1, "token": ""}, "/token", "must be a device token"),
        ("/apns/disable", {"user_id": 1}, "", "needs `token` or `all`"),
        ("/apns/disable", {"user_id": 1, "all": False}, "/all", "must be one of true"),
        ("/subscribe/campaigns", {"user_id": 1}, "/campaign_ids", "`campaign_ids` is required"),
        ("/unsubscribe/campaigns", {"user_id": 1, "campaign_ids": []}, "/campaign_ids", ""),
        ("/subscribe/all", {"user_id": 1, "campaign_ids": ["c"]}, "/campaign_ids", "not a known"),
        ("/gcm/register", {"token": "t"}, "/user_id", "`user_id` is required"),
    ],
)
async def test_device_and_subscription_bodies_are_checked(
    guarded: Collector, endpoint: str, data: dict[str, Any], path: str, message: str
) -> None:
    status, answer = await python_post(guarded, endpoint, data)
    assert status == 400, answer
    errors = answer["rejected"][0]["errors"]
    assert any(e["path"] == path and message in e["message"] for e in errors), errors
    assert guarded.queue.depth == 0


SERVER_ONLY = [
    *(f"/v2{endpoint}" for endpoint, _ in PYTHON_CALLS),
    "/v2/track/batch",
    "/v2/identify/batch",
]


@pytest.mark.parametrize("path", SERVER_ONLY)
async def test_a_browser_cannot_make_the_server_only_calls(guarded: Collector, path: str) -> None:
    for headers in (BROWSER, {}):  # an allowed page, and a client with no token at all
        status, answer, _ = await guarded.post(
            path, data=b'{"user_id": "victim", "all": true}', headers=headers
        )
        assert status == 403, answer
        assert "server token" in answer["error"]
    assert guarded.queue.depth == 0


@pytest.mark.parametrize("path", SERVER_ONLY)
async def test_no_preflight_opens_the_server_only_calls_to_pages(
    guarded: Collector, path: str
) -> None:
    assert guarded.session is not None
    async with guarded.session.options(
        guarded.url(path),
        headers={"Origin": SHOP, "Access-Control-Request-Method": "POST"},
    ) as response:
        assert response.status >= 400
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_page_cannot_set_a_tracks_user_details(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """The Python library's `user` sets a profile as an identify does: from a page, the
    user id needs its user_hash, which /v2 bodies cannot carry, so it is refused whole."""
    user = {"email": "attacker@evil.test", "apns": ["attackers-phone"]}
    status, answer, _ = await guarded.post(
        "/v2/track", {"user_id": "victim", "event": "e", "user": user}, headers=BROWSER
    )
    assert status == 400, answer
    assert [e["path"] for e in answer["rejected"][0]["errors"]] == ["/user_hash"]
    status, answer = await python_post(
        guarded, "/track", {"user_id": "mine", "event": "e", "user": user}
    )
    assert status == 202, answer
    (_, track) = await fake.wait_for(2)
    assert (track.body["user_id"], track.body["user"]) == ("mine", user)


# -- Outbound's batch endpoints, inbound -----------------------------------------------------


async def test_node_track_batch_is_checked_item_by_item(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """outbound.js `trackBatch(events)` (v1.3.0): POST /track/batch with the array itself."""
    events = [
        {"user_id": "b-1", "event": "one", "properties": {}, "timestamp": 1529366403},
        {"user_id": "b-1", "event": 5},
        {"user_id": 9, "event": "two", "timestamp": 1529366404},
    ]
    status, answer, _ = await guarded.post(
        "/v2/track/batch", data=orjson.dumps(events), headers=NODE_HEADERS
    )
    assert status == 202
    assert answer["accepted"] == 2
    assert [r["index"] for r in answer["rejected"]] == [1]
    assert answer["rejected"][0]["errors"][0]["path"] == "/event"
    received = await fake.wait_for(4)
    tracks = [(r.body["user_id"], r.body["event"]) for r in received if r.endpoint == "track"]
    assert sorted(tracks) == [("9", "two"), ("b-1", "one")]


async def test_identify_batch_and_its_limits(guarded: Collector, fake: FakeOutbound) -> None:
    bodies = [{"user_id": f"i-{n}", "email": f"i{n}@example.com"} for n in range(100)]
    status, answer = await python_post(guarded, "/identify/batch", bodies)
    assert (status, answer["accepted"]) == (202, 100), answer
    status, answer = await python_post(guarded, "/identify/batch", [*bodies, bodies[0]])
    assert status == 413
    assert "limit is 100" in answer["error"]
    for wrong in (b"[]", b'{"user_id": "x"}', b'{"batch": [{"user_id": "x"}]}'):
        status, answer, _ = await guarded.post(
            "/v2/identify/batch", data=wrong, headers=PYTHON_HEADERS
        )
        assert status == 400, wrong
        assert "array" in answer["error"]
    received = await fake.wait_for(100)
    assert {r.body["email"] for r in received} == {f"i{n}@example.com" for n in range(100)}
