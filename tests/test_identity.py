"""Who may speak for a user: HMAC user hashes, server tokens, server-only and unknown events."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound

from collector.config import Secret
from collector.identity import bearer_token, hash_matches, token_matches, truncated_ip, user_hash
from collector.identity import verify_user as verify

SECRET = "identity-secret-for-tests-1-0123456789"
TOKEN = "server-token-for-tests-0123456789"


def expected_hash(user_id: str, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


def test_user_hash_is_hex_hmac_sha256() -> None:
    assert user_hash(Secret(SECRET), "u123") == expected_hash("u123")
    assert hash_matches(Secret(SECRET), "u123", expected_hash("u123"))
    assert hash_matches(Secret(SECRET), "u123", expected_hash("u123").upper())
    assert not hash_matches(Secret(SECRET), "u124", expected_hash("u123"))
    assert not hash_matches(Secret(SECRET), "u123", expected_hash("u123", "other"))
    assert not hash_matches(Secret(SECRET), "u123", None)
    assert not hash_matches(Secret(SECRET), "u123", 12)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_token_matches_any_configured_token() -> None:
    tokens = (Secret("first-token-aaaaaaaa"), Secret("second-token-bbbbbbb"))
    assert token_matches(tokens, "second-token-bbbbbbb")
    assert not token_matches(tokens, "second-token-bbbbbbc")
    assert not token_matches((), "anything")


@pytest.mark.parametrize(
    ("event", "on_failure", "verdict", "path"),
    [
        ({"anonymous_id": "a"}, "reject", "trusted", None),
        ({"user_id": "u1", "user_hash": expected_hash("u1")}, "reject", "trusted", None),
        ({"user_id": 42, "user_hash": expected_hash("42")}, "reject", "trusted", None),
        ({"user_id": "u1", "anonymous_id": "a"}, "anonymize", "anonymized", "/user_hash"),
        ({"user_id": "u1", "anonymous_id": "a"}, "reject", "refused", "/user_hash"),
        ({"user_id": "u1"}, "anonymize", "refused", "/user_hash"),  # nothing to fall back to
        (
            {"user_id": "u1", "user_hash": expected_hash("u2"), "anonymous_id": "a"},
            "anonymize",
            "anonymized",
            "/user_hash",
        ),
    ],
)
def test_verify_user(
    event: dict[str, Any], on_failure: str, verdict: str, path: str | None
) -> None:
    got, problems = verify(event, Secret(SECRET), on_failure=on_failure)
    assert got == verdict
    assert [p.path for p in problems] == ([] if path is None else [path])


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("203.0.113.77", "203.0.113.0"),
        ("2001:db8:abcd:1234::1", "2001:db8:abcd::"),
        ("::1", "::"),
        ("garbage", None),
        (None, None),
    ],
)
def test_truncated_ip(address: str | None, network: str | None) -> None:
    assert truncated_ip(address) == network


@pytest.fixture
async def guarded(start_collector: StartCollector) -> Collector:
    return await start_collector(identity_secret=Secret(SECRET), server_tokens=(Secret(TOKEN),))


FORGERIES = [
    ("no hash", {}),
    ("wrong hash", {"user_hash": "0" * 64}),
    ("hash of another user", {"user_hash": expected_hash("attacker")}),
    ("right hash with a suffix", {"user_hash": expected_hash("victim") + "00"}),
    ("truncated right hash", {"user_hash": expected_hash("victim")[:32]}),
    ("hash under another secret", {"user_hash": expected_hash("victim", "guessed-secret")}),
]


@pytest.mark.parametrize("kind", ["track", "identify"])
@pytest.mark.parametrize(("name", "forged"), FORGERIES, ids=[n for n, _ in FORGERIES])
async def test_forged_identity_never_reaches_outbound_as_that_user(
    guarded: Collector, fake: FakeOutbound, kind: str, name: str, forged: dict[str, Any]
) -> None:
    event = {"type": kind, "user_id": "victim", "anonymous_id": "anon-attacker", **forged}
    if kind == "track":
        event["event"] = "passwordResetRequested"
    status, answer, _ = await guarded.post("/e", event)
    # Anonymized by default: accepted, but only under the sender's own anonymous id.
    assert (status, answer["accepted"]) == (202, 1)
    assert answer["anonymized"][0]["errors"][0]["path"] == "/user_hash"
    # Without an anonymous id to fall back to, the event is refused outright.
    bare = {k: v for k, v in event.items() if k != "anonymous_id"}
    status, answer, _ = await guarded.post("/e", bare)
    assert (status, answer["accepted"]) == (400, 0)

    # A valid event after them is the marker that the relay has processed everything before.
    await guarded.post("/e", {"event": "marker", "anonymous_id": "anon-attacker"})
    await eventually(lambda: any(r.body.get("event") == "marker" for r in fake.tracks()))
    assert all(r.body["user_id"] != "victim" for r in fake.received)
    assert all("previous_id" not in r.body for r in fake.received)


async def test_a_hash_replayed_for_another_id_is_refused(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    collector = await start_collector(identity_secret=Secret(SECRET), unverified_users="reject")
    stolen = {"user_id": "alice", "user_hash": expected_hash("alice")}
    status, _, _ = await collector.post("/e", {**stolen, "event": "ok"})
    assert status == 202
    status, answer, _ = await collector.post(
        "/e", {**stolen, "user_id": "bob", "event": "replayed", "anonymous_id": "a"}
    )
    assert status == 400
    assert answer["rejected"][0]["errors"] == [
        {
            "path": "/user_hash",
            "message": "does not match user_id: a user_id from a browser needs the user_hash "
            "from your back-end",
        }
    ]
    await fake.wait_for(2)
    await asyncio.sleep(0.3)
    assert [(r.endpoint, r.body["user_id"]) for r in fake.received] == [
        ("identify", "alice"),
        ("track", "alice"),
    ]


async def test_valid_hash_identifies_and_aliases(guarded: Collector, fake: FakeOutbound) -> None:
    identify = {
        "type": "identify",
        "user_id": "u42",
        "anonymous_id": "anon-9",
        "user_hash": expected_hash("u42"),
        "traits": {"email": "u42@example.com"},
    }
    status, answer, _ = await guarded.post("/e", identify)
    assert (status, answer) == (202, {"accepted": 1, "rejected": []})
    [received] = await fake.wait_for(1)
    assert received.body == {
        "user_id": "u42",
        "previous_id": "anon:anon-9",
        "email": "u42@example.com",
    }


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (f"Bearer {TOKEN}", 202),
        ("Bearer not-the-token-at-all-000", 401),
        (f"Bearer {TOKEN}x", 401),
        (f"Basic {TOKEN}", 400),  # not a bearer token: a browser-like request, and no hash
        (None, 400),
    ],
    ids=["right", "wrong", "almost", "other scheme", "missing"],
)
async def test_server_token_allows_any_user_id(
    guarded: Collector, fake: FakeOutbound, authorization: str | None, status: int
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    got, answer, _ = await guarded.post(
        "/v2/track", {"user_id": "u7", "event": "invoicePaid"}, headers=headers
    )
    assert got == status
    if status == 401:
        assert answer == {"error": "the server token is not valid"}
    if status == 202:
        _, track = await fake.wait_for(2)
        assert track.body["user_id"] == "u7"


async def test_server_only_events_need_a_token(
    start_collector: StartCollector, tmp_path: Path
) -> None:
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    (schemas / "passwordReset.json").write_text(json.dumps({"x-server-only": True}))
    (schemas / "renewMembership.json").write_text("{}")
    collector = await start_collector(
        schemas_dir=schemas, server_tokens=(Secret(TOKEN),), unknown_events="reject"
    )
    event = {"event": "passwordReset", "user_id": "u1"}
    status, answer, _ = await collector.post("/e", event)
    assert status == 400
    assert answer["rejected"][0]["errors"] == [
        {"path": "/event", "message": "'passwordReset' may only be sent with a server token"}
    ]
    status, _, _ = await collector.post("/e", event, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 202
    status, answer, _ = await collector.post("/e", {"event": "madeUp", "user_id": "u1"})
    assert status == 400
    assert "not a known event" in answer["rejected"][0]["errors"][0]["message"]
    status, _, _ = await collector.post("/e", {"event": "renewMembership", "user_id": "u1"})
    assert status == 202


def test_sign_command_prints_the_hash(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "collector", "sign", "u123"],
        env={"COLLECTOR_IDENTITY_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == expected_hash("u123")
    unset = subprocess.run(
        [sys.executable, "-m", "collector", "sign", "u123"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unset.returncode == 2
    assert "identity_secret: not set" in unset.stderr
