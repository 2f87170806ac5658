"""Issue 17, identity: a stranger's browser cannot act for someone else's account.

Each test is an attack tried over HTTP against a collector on loopback with an identity
secret, a server token and an allowed origin, and what reaches the fake Outbound.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Received

from collector.cli import banner
from collector.config import Secret, Settings, SettingsError
from collector.identity import _as_uuid4, identify_guid, ids_key, rate_key, stamp_ids
from collector.outbound import Call, HttpOutbound, calls_for, header_safe_guid

SECRET = "identity-secret-for-hostile-tests-0123456789"
TOKEN = "server-token-for-hostile-tests-0123456789"
SHOP = "https://shop.example.com"
BROWSER = {"Origin": SHOP}
SERVER = {"Authorization": f"Bearer {TOKEN}"}


def signed(user_id: str) -> str:
    return hmac.new(SECRET.encode(), user_id.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
async def guarded(start_collector: StartCollector) -> Collector:
    return await start_collector(
        identity_secret=Secret(SECRET), server_tokens=(Secret(TOKEN),), allowed_origins=(SHOP,)
    )


async def settled(collector: Collector, fake: FakeOutbound, marker: str) -> list[Received]:
    """Everything Outbound got once the relay reached a marker event sent after the attack
    (each user's events go in order, and the marker's user is a fresh one)."""
    status, _, _ = await collector.post(
        "/e", {"event": marker, "anonymous_id": f"marker-{marker}"}, headers=BROWSER
    )
    assert status == 202
    await eventually(lambda: any(r.body.get("event") == marker for r in fake.tracks()))
    await eventually(lambda: collector.queue.depth == 0)  # every other user's events too
    return [r for r in fake.received if r.body.get("user_id") != f"anon:marker-{marker}"]


def ids_at_outbound(received: list[Received]) -> set[str]:
    """Every id Outbound was told about: as the user, or as the alias's previous id."""
    return {
        str(r.body[key]) for r in received for key in ("user_id", "previous_id") if key in r.body
    }


# -- 1. Anonymous ids live in a namespace of their own ----------------------------------------

ANONYMOUS_ATTACKS = [
    ("identify", {"type": "identify", "anonymous_id": "victim42", "traits": {"plan": "gold"}}),
    ("track", {"event": "passwordReset", "anonymous_id": "victim42"}),
    ("page", {"type": "page", "anonymous_id": "victim42"}),
    (
        "verified alias",
        {
            "type": "identify",
            "user_id": "attacker7",
            "user_hash": signed("attacker7"),
            "anonymous_id": "victim42",
        },
    ),
    (
        "verified track",
        {
            "event": "x",
            "user_id": "attacker7",
            "user_hash": signed("attacker7"),
            "anonymous_id": "victim42",
        },
    ),
    (
        "anonymized identify",
        {"type": "identify", "user_id": "victim42", "anonymous_id": "victim42"},
    ),
    ("anonymized track", {"event": "x", "user_id": "victim42", "anonymous_id": "victim42"}),
    ("anonymized page", {"type": "page", "user_id": "victim42", "anonymous_id": "victim42"}),
]


@pytest.mark.parametrize("unverified", ["anonymize", "reject"])
@pytest.mark.parametrize(
    ("name", "attack"), ANONYMOUS_ATTACKS, ids=[n for n, _ in ANONYMOUS_ATTACKS]
)
async def test_an_anonymous_id_never_reaches_outbound_as_a_user_id(
    start_collector: StartCollector,
    fake: FakeOutbound,
    name: str,
    attack: dict[str, Any],
    unverified: str,
) -> None:
    collector = await start_collector(
        identity_secret=Secret(SECRET),
        allowed_origins=(SHOP,),
        unverified_users=unverified,
    )
    status, answer, _ = await collector.post("/e", attack, headers=BROWSER)
    anonymized = "user_id" in attack and "user_hash" not in attack
    assert status == (400 if anonymized and unverified == "reject" else 202), answer
    received = await settled(collector, fake, "after-" + name.replace(" ", "-"))
    assert "victim42" not in ids_at_outbound(received)
    if status == 202 and "user_hash" not in attack:  # it went, under the visitor's namespace
        assert "anon:victim42" in ids_at_outbound(received)
    for call in received:
        if "previous_id" in call.body:
            assert call.body["previous_id"].startswith("anon:")


async def test_the_outbound_shaped_endpoints_from_a_browser_cannot_name_a_user(
    guarded: Collector, fake: FakeOutbound
) -> None:
    attacks = [
        ("/v2/identify", {"user_id": "victim42", "email": "attacker@evil.test"}),
        ("/v2/identify", {"user_id": "victim42", "previous_id": "victim42"}),
        ("/v2/identify", {"user_id": "attacker7", "previous_id": "victim42"}),
        ("/v2/track", {"user_id": "victim42", "event": "passwordReset"}),
    ]
    for path, body in attacks:
        status, answer, _ = await guarded.post(path, body, headers=BROWSER)
        assert status == 400, (path, body, answer)
        assert answer["rejected"][0]["errors"][0]["path"] == "/user_hash"
    received = await settled(guarded, fake, "after-v2")
    assert not {"victim42", "attacker7"} & ids_at_outbound(received)


async def test_a_server_token_names_users_as_given_and_visitors_in_their_namespace(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """A back-end's alias from a visitor's anonymous id (read from the page) must meet the
    visitor's events, which went under the prefix: previous_id is namespaced too."""
    status, _, _ = await guarded.post(
        "/v2/identify", {"user_id": 7, "previous_id": "visitor-1"}, headers=SERVER
    )
    assert status == 202
    status, _, _ = await guarded.post(
        "/e", {"event": "server-side", "anonymous_id": "visitor-2"}, headers=SERVER
    )
    assert status == 202
    received = await settled(guarded, fake, "after-server")
    assert {"user_id": "7", "previous_id": "anon:visitor-1"} in [r.body for r in received]
    assert ("track", "anon:visitor-2") in [(r.endpoint, r.body["user_id"]) for r in received]


async def test_the_prefix_is_a_setting(start_collector: StartCollector, fake: FakeOutbound) -> None:
    collector = await start_collector(anonymous_id_prefix="visitor/")
    await collector.post("/e", {"event": "x", "anonymous_id": "a1"})
    identify, track = await fake.wait_for(2)
    assert identify.body["user_id"] == track.body["user_id"] == "visitor/a1"


async def test_a_user_and_an_anonymous_id_that_look_alike_have_separate_lines(
    guarded: Collector, fake: FakeOutbound
) -> None:
    await guarded.post("/e", {"event": "a", "anonymous_id": "victim42"}, headers=BROWSER)
    await guarded.post(
        "/e",
        {"event": "b", "user_id": "victim42", "user_hash": signed("victim42")},
        headers=BROWSER,
    )
    await settled(guarded, fake, "after-lines")
    tracks = {(r.body["event"], r.body["user_id"]) for r in fake.tracks()}
    assert {("a", "anon:victim42"), ("b", "victim42")} <= tracks
    # Two identifies: the visitor's and the user's, each before its own first track.
    identified = [r.body["user_id"] for r in fake.received if r.endpoint == "identify"]
    assert {"anon:victim42", "victim42"} <= set(identified)


async def test_a_lookalike_anonymous_id_does_not_spend_the_users_rate_limit(
    start_collector: StartCollector,
) -> None:
    collector = await start_collector(
        identity_secret=Secret(SECRET),
        allowed_origins=(SHOP,),
        rate_limit_per_user=0.01,
        rate_burst_per_user=3,
    )
    attack = {"batch": [{"event": "flood", "anonymous_id": "victim88"}] * 3}
    status, _, _ = await collector.post("/e", attack, headers=BROWSER)
    assert status == 202
    status, _, _ = await collector.post("/e", attack, headers=BROWSER)
    assert status == 429  # the attacker's own bucket is empty
    mine = {"event": "login", "user_id": "victim88", "user_hash": signed("victim88")}
    status, answer, _ = await collector.post("/e", mine, headers=BROWSER)
    assert (status, answer["accepted"]) == (202, 1)


def queued_before_the_prefix(**fields: Any) -> dict[str, Any]:
    """A record as the collector queued it before anonymous ids had a namespace."""
    now = time.time()
    record: dict[str, Any] = {
        "type": "track",
        "message_id": f"legacy-{uuid.uuid4()}",
        "user_id": None,
        "anonymous_id": "victim42",
        "event": "queued",
        "properties": {},
        "traits": {},
        "timestamp": now,
        "received_at": now,
        "context": {},
        "ip": None,
        "user_agent": None,
        "origin": None,
    }
    return {**record, **fields}


async def test_records_queued_before_the_prefix_go_under_it(
    guarded: Collector, fake: FakeOutbound
) -> None:
    old = [
        queued_before_the_prefix(),
        queued_before_the_prefix(type="identify", event=None, traits={"plan": "x"}),
        queued_before_the_prefix(
            type="identify", event=None, user_id="attacker7", anonymous_id="victim43"
        ),
    ]
    await guarded.queue.put(old)
    guarded.relay.wake()
    received = await settled(guarded, fake, "after-legacy")
    assert not {"victim42", "victim43"} & ids_at_outbound(received)
    assert [r.body for r in received if r.endpoint == "track"] == [
        {
            "user_id": "anon:victim42",
            "event": "queued",
            "timestamp": int(old[0]["timestamp"]),
            "properties": {"collector": {"received_at": int(old[0]["received_at"])}},
        }
    ]
    assert {"user_id": "attacker7", "previous_id": "anon:victim43"} in [r.body for r in received]


# -- 2. Contact details and groups only from verified users and server tokens ------------------

PROTECTED = [
    "email",
    "phone_number",
    "group_id",
    "group_attributes",
    "first_name",
    "last_name",
    "apns",
    "gcm",
]


def protected_value(name: str) -> object:
    return {"group_attributes": {"plan": "free"}, "apns": ["tok"], "gcm": ["tok"]}.get(
        name, "attacker@evil.test"
    )


@pytest.mark.parametrize("trait", PROTECTED)
@pytest.mark.parametrize("where", ["traits", "traits.attributes"])
async def test_a_stranger_cannot_set_contact_traits(
    guarded: Collector, fake: FakeOutbound, trait: str, where: str
) -> None:
    traits: dict[str, Any] = {trait: protected_value(trait)}
    if where == "traits.attributes":
        traits = {"attributes": traits}
    path = "/traits/" + ("attributes/" if where == "traits.attributes" else "") + trait
    attacks = [
        {"type": "identify", "anonymous_id": "attacker", "traits": traits},
        # anonymized: the forged user id is dropped, and so the traits have no verified owner
        {"type": "identify", "user_id": "victim", "anonymous_id": "attacker", "traits": traits},
    ]
    for attack in attacks:
        status, answer, _ = await guarded.post("/e", attack, headers=BROWSER)
        assert status == 400, answer
        [rejected] = answer["rejected"]
        assert rejected["errors"][-1]["path"] == path
        assert "verified" in rejected["errors"][-1]["message"]
    received = await settled(guarded, fake, f"after-{trait}")
    assert not [r for r in received if r.endpoint == "identify" and len(r.body) > 1]


async def test_verified_users_and_servers_set_contact_traits(
    guarded: Collector, fake: FakeOutbound
) -> None:
    mine = {
        "type": "identify",
        "user_id": "u1",
        "user_hash": signed("u1"),
        "traits": {"email": "u1@example.com", "group_id": "g1"},
    }
    status, _, _ = await guarded.post("/e", mine, headers=BROWSER)
    assert status == 202
    status, _, _ = await guarded.post(
        "/v2/identify", {"user_id": "u2", "phone_number": "+15550100"}, headers=SERVER
    )
    assert status == 202
    received = await settled(guarded, fake, "after-verified")
    bodies = [r.body for r in received]
    assert {"user_id": "u1", "email": "u1@example.com", "group_id": "g1"} in bodies
    assert {"user_id": "u2", "phone_number": "+15550100"} in bodies


async def test_the_protected_traits_are_a_setting(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(identity_secret=Secret(SECRET), protected_traits=("email",))
    status, _, _ = await collector.post(
        "/e", {"type": "identify", "anonymous_id": "a", "traits": {"first_name": "Ann"}}
    )
    assert status == 202
    status, _, _ = await collector.post(
        "/e", {"type": "identify", "anonymous_id": "a", "traits": {"email": "x@evil.test"}}
    )
    assert status == 400


# -- 3. Dedupe per sender, GUIDs one-to-one and not forgeable ----------------------------------


async def test_a_browser_cannot_pre_empt_a_back_ends_message_id(
    guarded: Collector, fake: FakeOutbound
) -> None:
    await guarded.post(
        "/e",
        {"event": "fake-order", "anonymous_id": "a", "message_id": "order-10001"},
        headers=BROWSER,
    )
    status, answer, _ = await guarded.post(
        "/e", {"event": "order", "user_id": "u1", "message_id": "order-10001"}, headers=SERVER
    )
    assert (status, answer) == (202, {"accepted": 1, "rejected": []})
    await eventually(lambda: any(r.body.get("event") == "order" for r in fake.tracks()))
    guids = {r.body["event"]: r.headers["X-Outbound-GUID"] for r in fake.tracks()}
    assert guids["order"] != guids["fake-order"]  # nor at Outbound's end


async def test_browsers_ids_are_scoped_by_their_visitor(
    guarded: Collector, fake: FakeOutbound
) -> None:
    first = {"event": "e", "anonymous_id": "a", "message_id": "m-1"}
    assert (await guarded.post("/e", first, headers=BROWSER))[1] == {"accepted": 1, "rejected": []}
    # Another visitor's m-1 is its own; the same visitor's m-1 again is a resend.
    other = {**first, "anonymous_id": "b"}
    assert (await guarded.post("/e", other, headers=BROWSER))[1] == {"accepted": 1, "rejected": []}
    again = await guarded.post("/e", first, headers=BROWSER)
    assert again[1] == {"accepted": 1, "rejected": [], "duplicates": 1}
    user = {"event": "e", "user_id": "u9", "user_hash": signed("u9"), "message_id": "m-1"}
    assert (await guarded.post("/e", user, headers=BROWSER))[1] == {"accepted": 1, "rejected": []}
    assert (await guarded.post("/e", user, headers=BROWSER))[1]["duplicates"] == 1
    await settled(guarded, fake, "after-scope")
    assert sorted(r.body["user_id"] for r in fake.tracks() if r.body["event"] == "e") == [
        "anon:a",
        "anon:b",
        "u9",
    ]


async def test_derived_guids_are_keyed_with_a_secret_kept_in_the_data_directory(
    start_collector: StartCollector, fake: FakeOutbound, settings: Settings
) -> None:
    collector = await start_collector()
    await collector.post("/e", {"event": "x", "user_id": "u1", "message_id": "order-10002"})
    identify, _ = await fake.wait_for(2)
    guid = identify.headers["X-Outbound-GUID"]
    unkeyed = uuid.uuid5(uuid.UUID("5b1c7a3e-4f0e-4a8e-9d55-0c8a52f3b6a1"), "order-10002/identify")
    assert guid != str(unkeyed)  # what any client could compute, and send first
    key = settings.data_dir / "ids.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_bytes()) >= 32
    kept = key.read_bytes()
    await collector.stop()
    # A restart keeps the key, so that a resend after it gets the same GUIDs.
    again = await start_collector()
    status, _, _ = await again.post("/e", {"event": "x", "user_id": "u1"})
    assert status == 202
    assert key.read_bytes() == kept


@pytest.mark.parametrize("lookalike", [" order-10003", "order-10003 ", "order-10003\t"])
async def test_message_ids_map_one_to_one_onto_guids(
    collector: Collector, fake: FakeOutbound, lookalike: str
) -> None:
    await collector.post("/e", {"event": "real", "user_id": "u1", "message_id": "order-10003"})
    await collector.post("/e", {"event": "fake", "user_id": "u1", "message_id": lookalike})
    await fake.wait_for(3)
    guids = {r.body["event"]: r.headers["X-Outbound-GUID"] for r in fake.tracks()}
    assert guids["real"] == "order-10003"
    assert guids["fake"] != "order-10003"


# -- 11. Every event type against the schema of the Outbound event it becomes ------------------


@pytest.fixture
async def strict(start_collector: StartCollector, tmp_path: Path) -> Collector:
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    closed = {
        "type": "object",
        "properties": {"url": {"type": "string"}},
        "additionalProperties": False,
    }
    (schemas / "pageView.json").write_text(json.dumps(closed))
    (schemas / "renewMembership.json").write_text("{}")
    return await start_collector(schemas_dir=schemas, unknown_events="reject")


SCHEMA_BYPASSES = [
    ("/e", {"type": "page", "anonymous_id": "a", "properties": {"discount_code": "FREE100"}}),
    (
        "/e",
        {
            "type": "page",
            "anonymous_id": "a",
            "event": "renewMembership",
            "properties": {"discount_code": "FREE100"},
        },
    ),
    ("/e", {"type": "identify", "anonymous_id": "a", "event": "totallyUnknown"}),
    ("/e", {"type": "identify", "anonymous_id": "a", "event": "renewMembership"}),
    ("/e", {"type": "track", "anonymous_id": "a", "event": "totallyUnknown"}),
    ("/v2/track", {"user_id": "u1", "event": "totallyUnknown"}),
]


@pytest.mark.parametrize(("path", "body"), SCHEMA_BYPASSES)
async def test_no_event_type_bypasses_the_schemas(
    strict: Collector, fake: FakeOutbound, path: str, body: dict[str, Any]
) -> None:
    status, answer, _ = await strict.post(path, body)
    assert status == 400, answer
    assert answer["accepted"] == 0


async def test_pages_need_the_page_schema_under_unknown_reject(
    start_collector: StartCollector, tmp_path: Path
) -> None:
    schemas = tmp_path / "only-tracks"
    schemas.mkdir()
    (schemas / "renewMembership.json").write_text("{}")
    collector = await start_collector(schemas_dir=schemas, unknown_events="reject")
    status, answer, _ = await collector.post("/e", {"type": "page", "anonymous_id": "a"})
    assert status == 400
    assert answer["rejected"][0]["errors"] == [
        {
            "path": "/type",
            "message": "'pageView' (a page view) is not a known event (no schema in schemas_dir)",
        }
    ]


async def test_valid_pages_pass_the_page_schema(strict: Collector, fake: FakeOutbound) -> None:
    status, _, _ = await strict.post(
        "/e", {"type": "page", "anonymous_id": "a", "properties": {"url": "https://x.example/"}}
    )
    assert status == 202
    _, track = await fake.wait_for(2)
    assert track.body["event"] == "pageView"


# -- 14. The collector's own origin comes from settings, not the Host header -------------------


async def test_dns_rebinding_is_refused(collector: Collector) -> None:
    status, answer, _ = await collector.post(
        "/e",
        {"event": "x", "anonymous_id": "a"},
        headers={"Origin": "http://evil.test", "Host": "evil.test"},
    )
    assert status == 403, answer
    port = collector.port
    status, _, _ = await collector.post(
        "/e",
        {"event": "x", "anonymous_id": "a"},
        headers={"Origin": f"http://evil.test:{port}", "Host": f"evil.test:{port}"},
    )
    assert status == 403


async def test_the_collectors_own_origin_may_send(
    start_collector: StartCollector, tmp_path: Path
) -> None:
    collector = await start_collector()
    for host in ("127.0.0.1", "localhost"):
        origin = f"http://{host}:{collector.port}"
        status, _, _ = await collector.post(
            "/e", {"event": "x", "anonymous_id": "a"}, headers={"Origin": origin}
        )
        assert status == 202, origin
    public = await start_collector(
        public_url="https://collect.example.com", data_dir=tmp_path / "public"
    )
    status, _, _ = await public.post(
        "/e",
        {"event": "x", "anonymous_id": "a"},
        headers={"Origin": "https://collect.example.com", "Host": "collect.example.com"},
    )
    assert status == 202


# -- 16. Credentials in outbound_url, and user ids with a fraction ------------------------------


@pytest.mark.parametrize(
    ("path", "body", "where"),
    [
        ("/e", {"event": "x", "user_id": 42.0}, "/user_id"),
        ("/v2/track", {"event": "x", "user_id": 42.0}, "/user_id"),
        ("/v2/identify", {"user_id": 42.5}, "/user_id"),
        ("/v2/identify", {"user_id": 42, "previous_id": 41.0}, "/previous_id"),
        ("/v2/identify", {"user_id": 42, "group_id": 7.0}, "/group_id"),
        (
            "/e",
            {"type": "identify", "user_id": 42, "traits": {"group_id": 7.0}},
            "/traits/group_id",
        ),
    ],
)
async def test_ids_with_a_fraction_are_refused(
    collector: Collector, path: str, body: dict[str, Any], where: str
) -> None:
    status, answer, _ = await collector.post(path, body)
    assert status == 400, answer
    [error] = answer["rejected"][0]["errors"]
    assert error["path"] == where
    assert "whole number" in error["message"]


async def test_whole_number_ids_go_as_strings(collector: Collector, fake: FakeOutbound) -> None:
    status, _, _ = await collector.post("/v2/track", {"event": "x", "user_id": 42})
    assert status == 202
    identify, track = await fake.wait_for(2)
    assert identify.body["user_id"] == track.body["user_id"] == "42"


def test_credentials_in_the_outbound_url_are_never_printed(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        outbound_url="https://gw-user:gw-pass@gateway.example.com/outbound",
        outbound_api_key=Secret("k" * 20),
    )
    shown = settings.redacted()["outbound_url"]
    assert shown == "https://********@gateway.example.com/outbound"
    assert "gw-pass" not in banner(settings, 8080, 0)
    assert "gw-user" not in banner(settings, 8080, 0)
    assert "gw-pass" not in repr(HttpOutbound(settings.outbound_url, Secret("k" * 20), 1.0))


# -- The pieces, as functions --------------------------------------------------------------


def test_header_safe_guid_is_one_to_one() -> None:
    assert header_safe_guid("order-10003") == "order-10003"
    lookalikes = [" order-10003", "order-10003 ", "order-10003\r\n", "order-10003\t"]
    guids = {header_safe_guid(guid) for guid in lookalikes}
    assert len(guids) == len(lookalikes)
    assert "order-10003" not in guids


def test_a_record_queued_before_the_namespace_is_identified_again_under_it() -> None:
    old = queued_before_the_prefix(anonymous_id="a1")
    calls = calls_for(
        old, key=KEY, identified=True, page_event_name="pageView", context_property=""
    )
    assert [(c.endpoint, c.body["user_id"]) for c in calls] == [
        ("/v2/identify", "anon:a1"),
        ("/v2/track", "anon:a1"),
    ]
    assert calls[1].guid == old["message_id"]  # as before: a resend is still dropped


KEY = Secret("ab" * 32)


def stamped(server: bool, **fields: Any) -> dict[str, Any]:
    record = queued_before_the_prefix(**{"message_id": "m-1", "anonymous_id": "a1", **fields})
    stamp_ids(record, server=server, key=KEY, prefix="anon:")
    return record


def first_calls(record: dict[str, Any]) -> list[Call]:
    """The calls of a record whose user Outbound has not had an identify for."""
    return calls_for(record, key=KEY, identified=False, page_event_name="p", context_property="")


def test_stamp_ids() -> None:
    browser = stamped(False)
    assert browser["anonymous_id"] == "anon:a1"
    assert browser["dedupe_key"].startswith("m-1#")
    assert len(browser["dedupe_key"]) == 4 + 32
    assert "guid" not in browser  # the message id itself
    assert browser["dedupe_key"] != stamped(False, anonymous_id="a2")["dedupe_key"]
    assert browser["dedupe_key"] != stamped(False, user_id="a1")["dedupe_key"]
    assert browser["dedupe_key"] == stamped(False)["dedupe_key"]  # a resend
    server = stamped(True)
    assert "dedupe_key" not in server  # the message id, which no browser's key equals
    assert uuid.UUID(server["guid"])
    assert server["guid"] != browser.get("guid", "m-1")
    assert "identify_guid" not in browser  # the relay derives it, about once a user
    assert identify_guid(browser, KEY) != identify_guid(server, KEY)
    assert [c.guid for c in first_calls(browser)] == [identify_guid(browser, KEY), "m-1"]
    unsafe = queued_before_the_prefix(message_id=" m-1", anonymous_id="a1")
    stamp_ids(unsafe, server=False, key=Secret("ab" * 32), prefix="anon:")
    assert uuid.UUID(unsafe["guid"])
    other_key = queued_before_the_prefix(message_id=" m-1", anonymous_id="a1")
    stamp_ids(other_key, server=False, key=Secret("cd" * 32), prefix="anon:")
    assert other_key["guid"] != unsafe["guid"]


def test_derived_ids_stay_the_same_across_versions() -> None:
    # Queued records and Outbound's dedupe hold these ids: a resend after an upgrade must
    # get the ids its first send got. (Values from the code of ef709b2.)
    browser, server = stamped(False), stamped(True)
    assert browser["dedupe_key"] == "m-1#40c7af8975a85d21dfae61db8f8ecaac"
    assert identify_guid(browser, KEY) == "508f1049-e273-4285-8fe3-5b78308d5189"
    assert server["guid"] == "bc5f2ae2-2a46-4176-bba7-88d2383e167b"
    assert identify_guid(server, KEY) == "9d93e41f-c4c3-4983-a472-de9fd886bbbb"
    assert stamped(False, message_id=" m-1")["guid"] == "e641e06b-af4e-4b61-8c52-b0cd3ace776d"
    assert stamped(False, user_id="u1")["dedupe_key"] == "m-1#0cdf879597be19a8c955882561c64e10"


def test_the_relay_derives_the_identify_guid_ingest_stored_before() -> None:
    # Until ingest stopped storing identify_guid (records queued then still carry it), a
    # record's identify had these GUIDs (ingest's stamp_ids of 9b0f71e, the same record and
    # key): the relay now derives the same, so Outbound drops a resend across the upgrade.
    before = {
        "browser": ({}, "508f1049-e273-4285-8fe3-5b78308d5189"),
        "server": ({}, "9d93e41f-c4c3-4983-a472-de9fd886bbbb"),
        "unsafe message id": ({"message_id": " m-1"}, "0d6ac79c-3e82-422e-a309-5f3918c8804e"),
    }
    for name, (fields, guid) in before.items():
        record = stamped(name == "server", **fields)
        assert "identify_guid" not in record
        identify, track = first_calls(record)
        assert (identify.endpoint, identify.guid) == ("/v2/identify", guid), name
        assert track.endpoint == "/v2/track"


def test_a_record_stored_with_its_identify_guid_keeps_it() -> None:
    queued = {**stamped(False), "identify_guid": "3c1c3c3e-0000-4000-8000-00000000beef"}
    identify, _ = first_calls(queued)
    assert identify.guid == "3c1c3c3e-0000-4000-8000-00000000beef"


def test_derived_guids_are_the_text_of_uuid4s() -> None:
    # Version and variant are set by hand (uuid.UUID costs more than the MAC): as uuid's.
    for digest in (bytes(16), b"\xff" * 16, *(bytes([n] * 16) for n in range(0, 256, 17))):
        assert _as_uuid4(digest.hex()) == str(uuid.UUID(bytes=digest, version=4))


def test_a_request_s_scope_digests_are_each_visitor_s_own() -> None:
    # One request's events share the digests of their visitors (`scopes`): each event still
    # gets its own visitor's, as when stamped alone, whatever the order.
    visitors = [("a1", {}), ("a2", {}), ("a1", {}), ("a1", {"user_id": "u1"}), ("a2", {})]
    scopes: dict[str, str] = {}
    batch = []
    for n, (visitor, fields) in enumerate(visitors):
        record = queued_before_the_prefix(message_id=f"m-{n}", anonymous_id=visitor, **fields)
        stamp_ids(record, server=False, key=Secret("ab" * 32), prefix="anon:", scopes=scopes)
        batch.append(record["dedupe_key"])
    alone = [
        stamped(False, message_id=f"m-{n}", anonymous_id=visitor, **fields)["dedupe_key"]
        for n, (visitor, fields) in enumerate(visitors)
    ]
    assert batch == alone
    assert len({key.partition("#")[2] for key in batch}) == 3


def test_the_ids_key_is_made_once_and_private(tmp_path: Path) -> None:
    made = ids_key(tmp_path / "new")
    assert stat.S_IMODE((tmp_path / "new" / "ids.key").stat().st_mode) == 0o600
    assert ids_key(tmp_path / "new") == made
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["ids.key"]  # no temporary left
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ids.key").write_text("guessable\n")
    with pytest.raises(SettingsError, match="not a key the collector made"):
        ids_key(tmp_path / "bad")


def test_rate_buckets_of_users_and_anonymous_ids_differ() -> None:
    assert rate_key({"user_id": "anon:x"}) != rate_key({"user_id": None, "anonymous_id": "anon:x"})
