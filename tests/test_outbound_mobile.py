"""Issue 14, inbound: what Outbound's mobile SDKs send, replayed against a real collector.

Their published source is the history of Zendesk's repositories (Outbound became Zendesk
Connect), each release a tag; every request below is rebuilt from it, cited where it is used:

- Android 0.4.0 (`io.outbound.sdk`): zendesk/connect-android-sdk, tag 0.4.0, commit
  f1a021940239d6f27681281a222609ee7e0aae5d, src/main/java/io/outbound/sdk/.
- iOS 1.1.1 (Objective-C, `Outbound/`): zendesk/connect-ios-sdk, tag 1.1.1, commit
  f44bfeed480a676c2567f38fe6c15aadd837a218 (it says it is 1.1.0 on the wire).
- iOS 1.2.0 (Swift, `Connect/`, the first to batch): zendesk/connect-ios-sdk, tag 1.2.0,
  commit cf95607b3ae9ae0177378e50e67a8fdf88812203.
- Android 1.0.0 (`com.zendesk.connect`, the first to batch): zendesk/connect-android-sdk,
  tag v1.0.0, commit 1b63270f3e3036eee3be89c7328910d93bc5ec1b.

None of them can run here (they need an Android or iOS runtime), and none can be pointed at
the collector without a change: each has Outbound's address as a constant (`URL` in
OutboundRequest.java, `OBServerUrl` in Outbound-Prefix.pch, `OutboundHostDomain` in
ConnectApiClient.swift, `CONNECT_BASE_URL` in ConnectNetworkModule.java). So the tests post
each SDK's headers and bytes as its source builds them, to the collector instead.

Each SDK sends the key it was initialised with in X-Outbound-Key (their docs: "your Outbound
environment's private API key"): here that is a server token, see README "Outbound's libraries".
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound, Fault, Received

from collector import sdk_config
from collector.config import Secret

TOKEN = "server-token-for-the-mobile-apps-0123456789"
SECRET = "identity-secret-for-the-mobile-apps-0123456789"
SHOP = "https://shop.example"
ANON = "anon:"  # the anonymous namespace at Outbound (anonymous_id_prefix's default)

# Android 0.4.0, RequestHandler.sendRequest and OutboundRequest.getBuilder: the key, the
# client, a GUID per request (kept across its retries); OkHttp 3.9's
# RequestBody.create(MediaType "application/json", String) adds the charset.
ANDROID_0_4_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "X-Outbound-GUID": "0b3c1c2e-8a0e-4d43-9f0e-6f4d3c2b1a00",
    "X-Outbound-Key": TOKEN,
    "X-Outbound-Client": "Android/0.4.0",
    "User-Agent": "okhttp/3.9.0",
}
# iOS 1.1.1, OBNetwork +requestWithPath:APIKey: (OBClientName "ios", OBClientVersion "1.1.0").
IOS_1_1_HEADERS = {
    "Content-Type": "application/json",
    "X-Outbound-Key": TOKEN,
    "X-Outbound-GUID": "9F0C5E1A-2B7D-4E8C-A1F3-5D6B7C8E9A0B",
    "X-Outbound-Client": "ios/1.1.0",
    "User-Agent": "Shop/1 CFNetwork/901.1 Darwin/17.6.0",
}
# iOS 1.2.0, NSMutableURLRequest+Extension.swift (content type, accept) and the decorators
# Connect.swift installs (OutboundClientDecorator "ios/1.2.0", OutboundKeyDecorator,
# ConnectGUIDDecorator).
IOS_1_2_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "Accept": "application/json; charset=utf-8",
    "X-Outbound-Client": "ios/1.2.0",
    "X-Outbound-Key": TOKEN,
    "X-Outbound-GUID": "1D7E2C3B-4A5F-4B6C-8D9E-0F1A2B3C4D5E",
}
# Android 1.0.0, ConnectNetworkModule's interceptors ("Android/%s", a GUID, the key);
# Retrofit's GsonConverterFactory writes "application/json; charset=UTF-8".
ANDROID_1_0_HEADERS = {
    "Content-Type": "application/json; charset=UTF-8",
    "X-Outbound-Client": "Android/1.0.0",
    "X-Outbound-GUID": "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "X-Outbound-Key": TOKEN,
    "User-Agent": "okhttp/3.11.0",
}


@pytest.fixture
async def guarded(start_collector: StartCollector) -> Collector:
    """A collector as the README sets one up for back-ends and pages together."""
    return await start_collector(
        identity_secret=Secret(SECRET), server_tokens=(Secret(TOKEN),), allowed_origins=(SHOP,)
    )


async def send(
    collector: Collector, headers: dict[str, str], path: str, body: bytes, *, guid: str = ""
) -> tuple[int, Any]:
    """One call as an SDK makes it: its headers, with a GUID of the call's own (a new UUID
    written as that SDK writes them, unless `guid` is the one to send), and its bytes."""
    sample = headers["X-Outbound-GUID"]
    fresh = str(uuid.uuid4())
    headers = {**headers, "X-Outbound-GUID": guid or (fresh.upper() if sample.isupper() else fresh)}
    status, answer, _ = await collector.post(path, data=body, headers=headers)
    return status, answer


def of_user(received: list[Received], user_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls Outbound got for one user, in the order it got them."""
    return [(r.endpoint, r.body) for r in received if r.body["user_id"] == user_id]


def without_context(body: dict[str, Any]) -> dict[str, Any]:
    """A relayed track without the `collector` property the server adds to every track."""
    properties = {k: v for k, v in body.get("properties", {}).items() if k != "collector"}
    return {**body, "properties": properties}


# -- Android 0.4.0 (Outbound) -----------------------------------------------------------------


async def test_android_0_4_anonymous_user_then_login(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """OutboundClient.java: `track` before any identify makes an anonymous user
    (User.newAnonymousUser, a random UUID) and identifies it first; Gson
    (LOWER_CASE_WITH_UNDERSCORES, @Expose fields in declaration order, nulls left out)
    writes the User as `anon_id` rather than `user_id`, and the Event likewise. Logging in
    identifies the new user with `previous_id` = the anonymous id (setUser), a new FCM
    token is registered with the one it replaces (`register(tokenToReplace)`: `replace`),
    and `disable` sends the current token. (User.Builder.setGroupAttributes assigns the
    field to itself, so group_attributes is never sent.)"""
    anon = "5f0e7a52-3c1d-4b8e-9a6f-2d4c8b1e0f37"
    calls = [
        (
            "/v2/identify",
            b'{"anon_id":"%s","gcm":["fcm-1"],"timezone":"Europe/Paris"}' % anon.encode(),
        ),
        (
            "/v2/track",
            b'{"anon_id":"%s","event":"addedToCart","properties":{"sku":"b-1"},'
            b'"timestamp":1529366403}' % anon.encode(),
        ),
        (
            "/v2/identify",
            b'{"user_id":"u-42","first_name":"Ann","last_name":"Lee","email":"ann@example.com",'
            b'"phone_number":"+15550100","attributes":{"plan":"gold"},"gcm":["fcm-1"],'
            b'"group_id":"g-1","previous_id":"%s","timezone":"Europe/Paris"}' % anon.encode(),
        ),
        ("/v2/gcm/register", b'{"user_id":"u-42","token":"fcm-2","replace":"fcm-1"}'),
        (
            "/v2/track",
            b'{"user_id":"u-42","event":"checkedOut","properties":{},"timestamp":1529366410}',
        ),
        ("/v2/gcm/disable", b'{"user_id":"u-42","token":"fcm-2"}'),
    ]
    for path, body in calls:
        # RequestHandler.sendQueuedRequest: 2xx is done, 5xx is retried, the rest dropped.
        assert await send(guarded, ANDROID_0_4_HEADERS, path, body) == (202, b""), body
    received = await fake.wait_for(6)
    anonymous, user = of_user(received, ANON + anon), of_user(received, "u-42")
    assert anonymous[0] == (
        "identify",
        {"user_id": ANON + anon, "gcm": ["fcm-1"], "timezone": "Europe/Paris"},
    )
    assert anonymous[1][0] == "track"
    assert without_context(anonymous[1][1]) == {
        "user_id": ANON + anon,
        "event": "addedToCart",
        "properties": {"sku": "b-1"},
        "timestamp": 1529366403,
    }
    assert user[0] == (
        "identify",
        {
            "user_id": "u-42",
            "previous_id": ANON + anon,  # the alias the SDK meant, in the same namespace
            "first_name": "Ann",
            "last_name": "Lee",
            "email": "ann@example.com",
            "phone_number": "+15550100",
            "attributes": {"plan": "gold"},
            "gcm": ["fcm-1"],
            "group_id": "g-1",
            "timezone": "Europe/Paris",
        },
    )
    assert user[1] == (
        "gcm/register",
        {"user_id": "u-42", "token": "fcm-2", "replace": "fcm-1"},
    )
    assert user[2][0] == "track"
    assert without_context(user[2][1]) == {
        "user_id": "u-42",
        "event": "checkedOut",
        "properties": {},
        "timestamp": 1529366410,
    }
    assert user[3] == ("gcm/disable", {"user_id": "u-42", "token": "fcm-2"})
    assert received[0].headers["X-Outbound-Key"] != TOKEN  # Outbound gets the relay's key


# -- iOS 1.1.1 (Outbound) ---------------------------------------------------------------------


async def test_ios_1_1_temporary_user_then_login(guarded: Collector, fake: FakeOutbound) -> None:
    """OBCall -sendCallWithCompletion: adds `user_id`, or `anon_id` (the cache's tempUserId,
    an NSUUID string) when no user is set, and `timestamp` (floor of the call's creation
    time, in seconds) to every call's parameters; NSJSONSerialization writes them compactly.
    Outbound.m: trackEvent:withProperties: ({event, properties}), registerDeviceToken:
    (OBMainController: "v2/apns/register" {token: hex}), identifyUserWithId:attributes:
    (the attributes at the top, plus `timezone`), which first aliases the temporary user
    (OBCallsCache -setUserId: {user_id, previous_id: tempUserId}),
    identifyGroupWithId:userId:groupAttributes:andUserAttributes: (`timezone` inside
    `attributes`), disableDeviceToken ("v2/apns/disable" {token})."""
    temp = "E621E1F8-C36C-495A-93FC-0C247A3E6E5F"
    apns = "9a3f" * 16  # 32 bytes as hex, OBMainController -registerDeviceToken:
    calls = [
        (
            "/v2/track",
            b'{"event":"openedApp","properties":{"source":"push"},"anon_id":"%s",'
            b'"timestamp":1529366403}' % temp.encode(),
        ),
        (
            "/v2/apns/register",
            b'{"token":"%s","anon_id":"%s","timestamp":1529366404}'
            % (apns.encode(), temp.encode()),
        ),
        (
            "/v2/identify",
            b'{"user_id":"u-7","previous_id":"%s","timestamp":1529366405}' % temp.encode(),
        ),
        (
            "/v2/identify",
            b'{"first_name":"Ann","email":"ann@example.com","attributes":{"plan":"gold"},'
            b'"timezone":"Europe/Paris","user_id":"u-7","timestamp":1529366405}',
        ),
        (
            "/v2/identify",
            b'{"group_id":"g-1","group_attributes":{"plan":"team"},'
            b'"attributes":{"role":"admin","timezone":"Europe/Paris"},"user_id":"u-7",'
            b'"timestamp":1529366406}',
        ),
        (
            "/v2/track",
            b'{"event":"paid","properties":{"total":45},"user_id":"u-7","timestamp":1529366407}',
        ),
        (
            "/v2/apns/disable",
            b'{"token":"%s","user_id":"u-7","timestamp":1529366408}' % apns.encode(),
        ),
    ]
    for path, body in calls:
        # OBCall: a status of 0 (no answer) or 500 and up is retried; anything else is done.
        assert await send(guarded, IOS_1_1_HEADERS, path, body) == (202, b""), body
    received = await fake.wait_for(1 + 7)  # the identify before a first track, and the calls
    anonymous, user = of_user(received, ANON + temp), of_user(received, "u-7")
    assert [endpoint for endpoint, _ in anonymous] == ["identify", "track", "apns/register"]
    assert without_context(anonymous[1][1]) == {
        "user_id": ANON + temp,
        "event": "openedApp",
        "properties": {"source": "push"},
        "timestamp": 1529366403,
    }
    # A call's fields go on as the SDK sent them, its timestamp too.
    assert anonymous[2][1] == {"user_id": ANON + temp, "token": apns, "timestamp": 1529366404}
    assert [endpoint for endpoint, _ in user] == [
        "identify",
        "identify",
        "identify",
        "track",
        "apns/disable",
    ]
    # An identify's timestamp is the record's time; Outbound's identify takes none.
    assert user[0][1] == {"user_id": "u-7", "previous_id": ANON + temp}
    assert user[1][1] == {
        "user_id": "u-7",
        "first_name": "Ann",
        "email": "ann@example.com",
        "attributes": {"plan": "gold"},
        "timezone": "Europe/Paris",
    }
    assert user[2][1] == {
        "user_id": "u-7",
        "group_id": "g-1",
        "group_attributes": {"plan": "team"},
        "attributes": {"role": "admin", "timezone": "Europe/Paris"},
    }
    assert without_context(user[3][1])["timestamp"] == 1529366407
    assert user[4][1] == {"user_id": "u-7", "token": apns, "timestamp": 1529366408}


async def test_ios_1_1_alias_of_a_known_user(guarded: Collector, fake: FakeOutbound) -> None:
    """Outbound.m +alias: sends {user_id: the new id, previous_id: the current user id}. The
    collector reads `previous_id` on /v2/identify as a visitor's anonymous id (README
    "Security"), so the alias Outbound gets is from `anon:u-7`, not from the user u-7."""
    body = b'{"user_id":"u-8","previous_id":"u-7","timestamp":1529366409}'
    assert await send(guarded, IOS_1_1_HEADERS, "/v2/identify", body) == (202, b"")
    (identify,) = await fake.wait_for(1)
    assert identify.body == {"user_id": "u-8", "previous_id": ANON + "u-7"}


# -- iOS 1.2.0 and Android 1.0.0 (Zendesk Connect, the batch calls) ----------------------------


async def test_ios_1_2_single_and_batch_calls(guarded: Collector, fake: FakeOutbound) -> None:
    """ConnectApiClient.swift: EventOperation and IdentifyOperation send a queue's head as
    one call when it holds one item, else up to 100 as /v2/track/batch (/v2/identify/batch);
    JSONEncoder writes Event (`timestamp` = Date().timeIntervalSince1970, seconds with a
    fraction) and User (User.alias: the previous user's fields, `previous_id` its id);
    `register`/`disable` post PushRegistration {timestamp, user_id, token} to
    /v2/apns/{register,disable}. An anonymous user is User.createAnonymous(): a UUID sent
    as `user_id` (this SDK has no anon_id)."""
    anon = "C0FFEE00-1111-4222-8333-944445555666"
    one = (
        b'{"user_id":"%s","timestamp":1539553363.125,"properties":{"screen":"home"},'
        b'"event":"opened"}' % anon.encode()
    )
    batch = b"[%s]" % b",".join(
        b'{"user_id":"u-9","timestamp":%d.5,"event":"viewed%d"}' % (1539553364 + n, n)
        for n in range(3)
    )
    identify_batch = (
        b'[{"first_name":"Ann","email":"ann@example.com","user_id":"u-9","previous_id":"%s",'
        b'"timezone":"Europe/Paris","apns":["%s"]},'
        b'{"first_name":"Ann","email":"ann@example.com","attributes":{"plan":"gold"},'
        b'"user_id":"u-9","timezone":"Europe/Paris","apns":["%s"]}]'
        % (anon.encode(), b"ab" * 32, b"ab" * 32)
    )
    registration = b'{"timestamp":1539553370.25,"user_id":"u-9","token":"%s"}' % (b"ab" * 32)
    assert await send(guarded, IOS_1_2_HEADERS, "/v2/track", one) == (202, b"")
    # Resource.parse takes any answer to a call whose response type is Empty for success.
    status, answer = await send(guarded, IOS_1_2_HEADERS, "/v2/identify/batch", identify_batch)
    assert (status, answer["accepted"], answer["rejected"]) == (202, 2, [])
    status, answer = await send(guarded, IOS_1_2_HEADERS, "/v2/track/batch", batch)
    assert (status, answer["accepted"], answer["rejected"]) == (202, 3, [])
    for path in ("/v2/apns/register", "/v2/apns/disable"):
        assert await send(guarded, IOS_1_2_HEADERS, path, registration) == (202, b"")
    received = await fake.wait_for(2 + 2 + 3 + 2)  # the anonymous user's identify first
    (opened,) = [r for r in received if r.endpoint == "track" and r.body["user_id"] == anon]
    assert without_context(opened.body) == {
        "user_id": anon,
        "event": "opened",
        "properties": {"screen": "home"},
        "timestamp": 1539553363,  # whole seconds, as Outbound documents them
    }
    user = of_user(received, "u-9")
    assert [endpoint for endpoint, _ in user] == [
        "identify",
        "identify",
        "track",
        "track",
        "track",
        "apns/register",
        "apns/disable",
    ]
    # The anonymous UUID went as a user id, the alias names it as an anonymous id: the
    # collector's rule for previous_id (README "Outbound's libraries").
    assert user[0][1]["previous_id"] == ANON + anon
    assert user[1][1]["attributes"] == {"plan": "gold"}
    assert user[1][1]["apns"] == ["ab" * 32]
    assert [(body["event"], body["timestamp"]) for _, body in user[2:5]] == [
        ("viewed0", 1539553364),
        ("viewed1", 1539553365),
        ("viewed2", 1539553366),
    ]
    token = {"user_id": "u-9", "token": "ab" * 32, "timestamp": 1539553370.25}
    assert user[5][1] == user[6][1] == token


async def test_android_1_0_milliseconds_and_batches(guarded: Collector, fake: FakeOutbound) -> None:
    """EventFactory.createEvent and PushRegistrationFactory.create set `timestamp` to
    System.currentTimeMillis(): milliseconds, unlike every other client. Gson with
    LOWER_CASE_WITH_UNDERSCORES (ConnectModule) writes Event {user_id, timestamp,
    properties, event} and User (`fcm` as "gcm"); QueuedRequestsJobProcessor sends a
    queue's head alone or up to 100 as a batch (MAX_BATCH_SIZE); PushService posts
    /v2/gcm/{register,disable} with its own "Content-Type:application/json". On /v2/track
    a timestamp past 10^11 is read as milliseconds (a time in seconds that large is in the
    year 5138); Outbound gets whole seconds."""
    single = (
        b'{"user_id":"u-5","timestamp":1539553363123,"properties":{"sku":"b-1"},"event":"bought"}'
    )
    batch = (
        b'[{"user_id":"u-5","timestamp":1539553364999,"event":"viewed"},'
        b'{"user_id":"u-5","timestamp":1539553365000,"properties":{},"event":"shared"}]'
    )
    identify_batch = (
        b'[{"user_id":"u-5","first_name":"Ann","timezone":"Europe/Paris","gcm":["fcm-5"]},'
        b'{"user_id":"u-5","previous_id":"d4e5f6a7-0000-4000-8000-000000000001",'
        b'"timezone":"Europe/Paris","gcm":["fcm-5"]}]'
    )
    registration = b'{"timestamp":1539553366000,"user_id":"u-5","token":"fcm-5"}'
    push_headers = {**ANDROID_1_0_HEADERS, "Content-Type": "application/json"}
    status, answer = await send(guarded, ANDROID_1_0_HEADERS, "/v2/identify/batch", identify_batch)
    assert (status, answer["accepted"]) == (202, 2), answer
    assert await send(guarded, ANDROID_1_0_HEADERS, "/v2/track", single) == (202, b"")
    status, answer = await send(guarded, ANDROID_1_0_HEADERS, "/v2/track/batch", batch)
    assert (status, answer["accepted"]) == (202, 2), answer
    assert await send(guarded, push_headers, "/v2/gcm/register", registration) == (202, b"")
    assert await send(guarded, push_headers, "/v2/gcm/disable", registration) == (202, b"")
    received = await fake.wait_for(2 + 1 + 2 + 2)
    user = of_user(received, "u-5")
    assert [endpoint for endpoint, _ in user] == [
        "identify",
        "identify",
        "track",
        "track",
        "track",
        "gcm/register",
        "gcm/disable",
    ]
    assert user[0][1] == {
        "user_id": "u-5",
        "first_name": "Ann",
        "timezone": "Europe/Paris",
        "gcm": ["fcm-5"],
    }
    assert [(body["event"], body["timestamp"]) for _, body in user[2:5]] == [
        ("bought", 1539553363),
        ("viewed", 1539553364),
        ("shared", 1539553365),
    ]
    # A call goes on as the SDK sent it, its milliseconds too.
    token = {"user_id": "u-5", "token": "fcm-5", "timestamp": 1539553366000}
    assert user[5][1] == user[6][1] == token


async def test_a_call_sent_again_with_its_guid_is_a_resend(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """Android 0.4.0 keeps each call's X-Outbound-GUID with it (RequestStorage's `guid`
    column; OutboundRequest.getBuilder makes one only when it has none) and sends it again
    under the same GUID after a 5xx or no answer; Outbound dedupes by it, and so does the
    collector, within dedupe_window. (iOS 1.1.1 and the Connect SDKs make a GUID per
    attempt: nothing to go by.)"""
    fake.always = Fault(503)  # keep the records queued, to count them
    track = b'{"user_id":"u-3","event":"paid","properties":{},"timestamp":1529366403}'
    guid = "4a8d2f0e-5b6c-4d7e-8f90-a1b2c3d4e5f6"
    for _ in range(2):  # the answer to the first was lost: the SDK sends it again
        status = await send(guarded, ANDROID_0_4_HEADERS, "/v2/track", track, guid=guid)
        assert status == (202, b"")
    # The same body again is another call, under a GUID of its own.
    assert await send(guarded, ANDROID_0_4_HEADERS, "/v2/track", track) == (202, b"")
    assert guarded.queue.depth == 2
    fake.always = None
    received = await fake.wait_for(1 + 2)
    assert [r.endpoint for r in received] == ["identify", "track", "track"]


async def test_a_browser_cannot_name_its_calls_with_a_guid(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """Only a server token's GUID stands for its call's message id. From a page, a GUID
    copied from another call (a server's, or the page's own earlier call) would have a call
    dropped as a resend: the header is ignored there, and each call is an event of its own,
    under a GUID of the collector's making."""
    fake.always = Fault(503)  # keep the records queued, to count them
    guid = "4a8d2f0e-5b6c-4d7e-8f90-a1b2c3d4e5f6"
    server = b'{"user_id":"u-9","event":"paid","properties":{},"timestamp":1529366403}'
    assert await send(guarded, ANDROID_0_4_HEADERS, "/v2/track", server, guid=guid) == (202, b"")
    page = {"Origin": SHOP, "Content-Type": "text/plain", "X-Outbound-GUID": guid}
    for event in (b"paid", b"left"):
        body = b'{"anon_id":"visitor-1","event":"%s","properties":{}}' % event
        status, answer, _ = await guarded.post("/v2/track", data=body, headers=page)
        assert status == 202, answer
    assert guarded.queue.depth == 3
    fake.always = None
    received = await fake.wait_for(3 + 2)  # and an identify before each user's first track
    tracks = {
        r.body["event"]: r for r in received if r.endpoint == "track" and r.body["user_id"] != "u-9"
    }
    assert sorted(tracks) == ["left", "paid"]
    assert guid not in {r.headers["X-Outbound-GUID"] for r in tracks.values()}


# -- their configuration (GET /i/config/sdk/<platform>/<version>) -------------------------------

# Android 0.4.0's config call: OutboundClient.loadConfig makes an OutboundRequest of Type.CONFIG
# (its payload the key, which the GET leaves out: `method()` answers no method name for it and
# OkHttp's builder stays a GET), RequestHandler.sendRequest adds the key and the client.
ANDROID_0_4_CONFIG_HEADERS = {
    k: v for k, v in ANDROID_0_4_HEADERS.items() if k != "Content-Type"
} | {"Accept-Encoding": "gzip"}
# Each SDK's config path and headers: OutboundRequest.ENDPOINT_CONFIG (Android 0.4.0),
# OBConfig +getSdkConfigWithCompletion: (iOS 1.1.1, OBClientVersion "1.1.0"),
# ConfigResource.swift (iOS 1.2.0), ConfigService.java's @Headers (Android 1.0.0).
SDK_CONFIG_CALLS = [
    ("/i/config/sdk/android/0.4.0", ANDROID_0_4_CONFIG_HEADERS),
    ("/i/config/sdk/ios/1.1.0", {k: v for k, v in IOS_1_1_HEADERS.items() if k != "Content-Type"}),
    ("/i/config/sdk/ios/1.2.0", IOS_1_2_HEADERS),
    (
        "/i/config/sdk/android/1.0.0",
        {**ANDROID_1_0_HEADERS, "Content-Type": "application/json", "Accept": "application/json"},
    ),
]


async def get_config(collector: Collector, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """The config call as an SDK makes it: a GET with its headers and a fresh GUID."""
    assert collector.session is not None
    headers = {**headers, "X-Outbound-GUID": str(uuid.uuid4())}
    async with collector.session.get(collector.url(path), headers=headers) as response:
        return response.status, await response.read()


def android_0_4_ready(status: int, body: bytes) -> bool:
    """Whether Android 0.4.0 sends its queue after this answer to its config call.

    RequestHandler.sendQueuedRequest: only a 2xx (`isSuccessful`) reaches
    OutboundRequest.onSuccess -> OutboundClient.setConfig, which stores the body and sets
    the handler ready; anything else schedules the config call again (loadConfig(attempts)).
    checkEnabled then reads `enabled` with org.json (a body it cannot parse leaves the SDK
    on); false switches it off: `track` and `identify` return at once."""
    if not 200 <= status < 300:
        return False
    try:
        config = orjson.loads(body)
    except orjson.JSONDecodeError:
        return True
    return not (isinstance(config, dict) and config.get("enabled") is False)


async def test_android_0_4_sends_once_its_config_is_answered(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """Android 0.4.0 starts with its config call and sends nothing before a 2xx to it. The
    collector asks Outbound for the same path with the relay's key (never the app's token)
    and passes Outbound's config on, the account's prompt settings with it; then the SDK's
    queued identify and first track reach Outbound."""
    status, body = await get_config(guarded, *SDK_CONFIG_CALLS[0])
    assert status == 200, body
    assert orjson.loads(body) == fake.config
    assert android_0_4_ready(status, body)
    ((path, headers),) = fake.config_calls
    assert path == "/i/config/sdk/android/0.4.0"
    assert headers["X-Outbound-Key"] == fake.key  # the relay's key: Outbound took it
    assert TOKEN not in str(headers)  # the app's token stays here
    assert fake.key.encode() not in body
    anon = "0d2b5e8a-6c4f-4a1e-9b3d-7e5f1a2c4b6d"
    queued = [  # OutboundClient.track: ensureUser identifies the anonymous user first
        ("/v2/identify", b'{"anon_id":"%s","timezone":"Europe/Paris"}' % anon.encode()),
        (
            "/v2/track",
            b'{"anon_id":"%s","event":"openedApp","properties":{},"timestamp":1529366403}'
            % anon.encode(),
        ),
    ]
    for call_path, call in queued:
        assert await send(guarded, ANDROID_0_4_HEADERS, call_path, call) == (202, b"")
    identify, track = await fake.wait_for(2)
    assert (identify.endpoint, identify.body) == (
        "identify",
        {"user_id": ANON + anon, "timezone": "Europe/Paris"},
    )
    assert (track.endpoint, track.body["event"]) == ("track", "openedApp")
    # The next start asks again: the answer is remembered, Outbound is not asked twice.
    assert await get_config(guarded, *SDK_CONFIG_CALLS[0]) == (200, body)
    assert len(fake.config_calls) == 1


@pytest.mark.parametrize(("path", "headers"), SDK_CONFIG_CALLS)
async def test_each_sdk_gets_a_config_that_keeps_it_on(
    guarded: Collector, fake: FakeOutbound, path: str, headers: dict[str, str]
) -> None:
    """What each reads: `enabled` (org.json in Android 0.4.0, OBConfig -completeWithData: in
    iOS 1.1.1; Config.swift and Gson's Config in the Connect SDKs read it as false when
    absent and keep the answer: a config without it switches them off), and `account` (iOS
    1.1.1 reads it as a dictionary, iOS 1.2.0 as AccountConfig)."""
    status, body = await get_config(guarded, path, headers)
    config = orjson.loads(body)
    assert (status, config["enabled"]) == (200, True)
    assert isinstance(config["account"], dict)
    assert [called for called, _ in fake.config_calls] == [path]


async def test_the_config_takes_a_server_token(guarded: Collector, fake: FakeOutbound) -> None:
    """Server-only like the /v2 calls the SDKs make with the same key: no token, or one that
    is not a server token, is a 401, and Outbound is not asked."""
    path = SDK_CONFIG_CALLS[0][0]
    without = {k: v for k, v in ANDROID_0_4_CONFIG_HEADERS.items() if k != "X-Outbound-Key"}
    status, body = await get_config(guarded, path, without)
    assert status == 401
    assert "takes a server token" in orjson.loads(body)["error"]
    wrong = {**ANDROID_0_4_CONFIG_HEADERS, "X-Outbound-Key": "not-a-server-token"}
    status, body = await get_config(guarded, path, wrong)
    assert (status, orjson.loads(body)) == (401, {"error": "the server token is not valid"})
    assert not android_0_4_ready(status, body)
    assert fake.config_calls == []


async def test_app_starts_at_once_make_one_call_to_outbound(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """Config calls that arrive while Outbound is being asked wait for that one answer."""
    held = asyncio.Event()
    fake.config_fault = Fault(200, body=orjson.dumps(fake.config).decode(), hold=held)
    starts = [asyncio.create_task(get_config(guarded, *SDK_CONFIG_CALLS[0])) for _ in range(5)]
    try:
        await eventually(lambda: len(guarded.requests) == 5 and len(fake.config_calls) == 1)
    finally:
        held.set()
    answers = await asyncio.gather(*starts)
    assert [(status, orjson.loads(body)) for status, body in answers] == [(200, fake.config)] * 5
    assert len(fake.config_calls) == 1


LOCAL_CONFIG = {"enabled": True, "account": {}, "sdk": {}}


@pytest.mark.parametrize(
    "failure", ["down", "503", "no answer", "not json", "no enabled", "an array", "too large"]
)
async def test_the_config_when_outbound_gives_none(
    start_collector: StartCollector,
    fake: FakeOutbound,
    failure: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Outbound down, failing, too slow (the app's start waits: FETCH_TIMEOUT), or answering
    what is not a config: the collector answers one that keeps the SDK on, and remembers it
    a while (RETRY_AFTER_FAILURE) rather than asking Outbound on every app's start."""
    monkeypatch.setattr(sdk_config, "FETCH_TIMEOUT", 0.3)
    guarded = await start_collector(
        identity_secret=Secret(SECRET), server_tokens=(Secret(TOKEN),), allowed_origins=(SHOP,)
    )
    held = asyncio.Event()
    if failure == "down":
        await fake.close()
    elif failure == "503":
        fake.config_fault = Fault(503, body="unavailable")
    elif failure == "no answer":
        fake.config_fault = Fault(hold=held)
    elif failure == "not json":
        fake.config_fault = Fault(200, body="<html>ok</html>")
    elif failure == "no enabled":
        fake.config = {"account": {}}
    elif failure == "too large":  # over MAX_CONFIG_BYTES
        fake.config = {"enabled": True, "account": {"pre_prompt": {"title": "x" * 70_000}}}
    else:
        fake.config_fault = Fault(200, body='[{"enabled": true}]')
    try:
        for _ in range(2):
            status, body = await get_config(guarded, *SDK_CONFIG_CALLS[0])
            assert (status, orjson.loads(body)) == (200, LOCAL_CONFIG)
            assert android_0_4_ready(status, body)
    finally:
        held.set()
    assert len(fake.config_calls) == (0 if failure == "down" else 1)
    (warning,) = [r for r in caplog.records if r.name == "collector.sdk_config"]
    assert "/i/config/sdk/android/0.4.0" in warning.getMessage()
    assert fake.key not in caplog.text
    assert TOKEN not in caplog.text


async def test_a_dry_run_answers_the_config_itself(
    start_collector: StartCollector, fake: FakeOutbound
) -> None:
    """Without OUTBOUND_API_KEY nothing leaves the machine: the config is the local one."""
    dry = await start_collector(outbound_api_key=None, server_tokens=(Secret(TOKEN),))
    status, body = await get_config(dry, *SDK_CONFIG_CALLS[0])
    assert (status, orjson.loads(body)) == (200, LOCAL_CONFIG)
    assert fake.config_calls == []


# -- the rules around the mobile SDKs' fields -------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "where", "message"),
    [
        ("/v2/track", {"event": "e"}, "/user_id", "`user_id` is required"),
        ("/v2/identify", {"timezone": "Europe/Paris"}, "/user_id", "`user_id` is required"),
        ("/v2/track", {"event": "e", "user_id": "u", "anon_id": "a"}, "/user_id", "one user"),
        ("/v2/identify", {"anon_id": "a", "previous_id": "p"}, "/previous_id", "anon_id"),
        ("/v2/track", {"event": "e", "anon_id": ""}, "/anon_id", "non-empty"),
        ("/v2/track", {"event": "e", "anon_id": 5}, "/anon_id", "must be a non-empty string"),
        ("/v2/track", {"event": "e", "user_id": "u", "timestamp": 10**14 + 1}, "/timestamp", ""),
        ("/v2/identify", {"user_id": "u", "timestamp": "today"}, "/timestamp", "Unix time"),
        ("/v2/gcm/register", {"anon_id": "a"}, "/token", "`token` is required"),
        ("/v2/gcm/register", {"user_id": "u", "token": "t", "replace": ""}, "/replace", "token"),
        ("/v2/apns/disable", {"anon_id": "a", "timestamp": -1}, "/timestamp", "Unix time"),
    ],
)
async def test_the_mobile_fields_are_checked(
    guarded: Collector, path: str, body: dict[str, Any], where: str, message: str
) -> None:
    status, answer, _ = await guarded.post(path, data=orjson.dumps(body), headers=IOS_1_1_HEADERS)
    assert status == 400, answer
    errors = answer["rejected"][0]["errors"]
    assert any(e["path"] == where and message in e["message"] for e in errors), errors
    assert guarded.queue.depth == 0


async def test_milliseconds_stay_refused_on_the_event_endpoint(guarded: Collector) -> None:
    """Only Outbound's /v2/track takes them, for the SDK that sends them; /e and the script
    keep the sentence that catches the mistake."""
    event = {"event": "e", "user_id": "u", "timestamp": 1539553363123}
    status, answer, _ = await guarded.post(
        "/e", data=orjson.dumps(event), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 400, answer
    assert answer["rejected"][0]["errors"][0]["path"] == "/timestamp"


async def test_an_anon_id_is_an_anonymous_visitor_whoever_sends_it(
    guarded: Collector, fake: FakeOutbound
) -> None:
    """`anon_id` is the mobile SDKs' anonymous user: like the script's anonymous_id it goes
    into the anonymous namespace, so it can never name a customer, and without a server
    token it sets no protected trait (README "Security")."""
    page = {"Origin": SHOP}
    status, answer, _ = await guarded.post(
        "/v2/identify", {"anon_id": "u-42", "email": "attacker@evil.test"}, headers=page
    )
    assert status == 400, answer
    assert [e["path"] for e in answer["rejected"][0]["errors"]] == ["/email"]
    status, answer, _ = await guarded.post(
        "/v2/track", {"anon_id": "u-42", "event": "e"}, headers=page
    )
    assert status == 202, answer
    identify, track = await fake.wait_for(2)
    assert identify.body == {"user_id": ANON + "u-42"}
    assert track.body["user_id"] == ANON + "u-42"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        # Android 0.4.0 OutboundRequest: ENDPOINT_RECEIVE, OPENED, TRACKER, PAIR.
        ("POST", "/i/android/received", {"_oid": "n-1"}),
        ("POST", "/i/android/opened", {"_oid": "n-1"}),
        ("POST", "/i/android/uninstall_tracker", {"i": "n-1", "revoked": False}),
        (
            "POST",
            "/i/testsend/push/pair/android",
            {"code": 1234, "deviceToken": "fcm-1", "deviceName": "Google Pixel"},
        ),
        # iOS 1.1.1 OBMainController, Outbound.m.
        ("POST", "/i/ios/permissions/requested", {"anon_id": "T", "timestamp": 1529366403}),
        ("POST", "/i/ios/permissions/granted", {"anon_id": "T", "timestamp": 1529366403}),
        ("POST", "/i/ios/received", {"_oid": "n-1", "user_id": "u", "timestamp": 1529366403}),
        ("POST", "/i/ios/opened", {"_oid": "n-1", "user_id": "u", "timestamp": 1529366403}),
        ("POST", "/i/ios/uninstall_tracker", {"i": "n-1", "user_id": "u", "timestamp": 1}),
        # iOS 1.2.0 PushResource.swift.
        ("POST", "/i/ios/permissions/requested", {"user_id": "u"}),
    ],
)
async def test_outbounds_internal_calls_are_not_taken(
    guarded: Collector, fake: FakeOutbound, method: str, path: str, body: object
) -> None:
    """The SDKs' other /i/ calls (push receipts, uninstall trackers, permission prompts, the
    test-send pairing) are Outbound's own, not its API: the collector answers 404 and keeps
    nothing. Both Outbound-era SDKs drop a call answered 4xx without retrying it."""
    assert guarded.session is not None
    headers = {k: v for k, v in ANDROID_0_4_HEADERS.items() if k != "Content-Type" or body}
    async with guarded.session.request(
        method, guarded.url(path), data=orjson.dumps(body) if body else None, headers=headers
    ) as response:
        assert response.status == 404
    assert guarded.queue.depth == 0
    assert fake.attempts == []
    assert fake.config_calls == []
