"""Hostile clients and the live views, loopback-only pages and the admin login (issue 17,
items 5, 12 and 15), against real collectors on loopback. Another client address is played
through X-Forwarded-For with 127.0.0.1 as the trusted proxy."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Collector, StartCollector, eventually

from collector import debug
from collector.app import create_app
from collector.config import Secret, Settings, SettingsError, load_settings
from collector.keys import DEBUG_HUB
from collector.live import DebugHub

LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
OUTSIDER = {"X-Forwarded-For": "203.0.113.7"}
ADMIN = "admin-token-for-hostile-tests-1"


Served = Callable[..., Awaitable[tuple[DebugHub, str]]]


@pytest.fixture
async def serve(settings: Settings) -> AsyncIterator[Served]:
    """Collectors run as `serve` runs them: aiohttp's test server cancels a handler whose
    client has left, `serve` (like aiohttp's default) does not, and a live view must notice
    by itself. Yields a starter: (the hub, the base URL)."""
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> tuple[DebugHub, str]:
        app = create_app(dataclasses.replace(settings, **overrides))
        runner = web.AppRunner(app, handler_cancellation=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return app[DEBUG_HUB], f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def hub_of(collector: Collector) -> DebugHub:
    assert collector.app is not None
    return collector.app[DEBUG_HUB]


async def open_stream(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    """A stream, its headers read and its body left open."""
    return await session.get(url, headers=headers)


# Item 5: live viewers.


async def test_viewers_are_capped_per_kind(start_collector: StartCollector) -> None:
    collector = await start_collector(max_live_viewers=2, admin_token=Secret(ADMIN))
    async with aiohttp.ClientSession() as session:
        streams = [
            await open_stream(session, collector.url(f"/demo/events?aid=v{i}")) for i in range(2)
        ]
        assert [s.status for s in streams] == [200, 200]
        third = await open_stream(session, collector.url("/demo/events?aid=v3"))
        assert third.status == 503
        assert third.headers["Retry-After"] == "30"
        third.release()
        # The demo's viewers do not crowd out the debugger's.
        auth = {"Authorization": f"Bearer {ADMIN}"}
        admin = await open_stream(session, collector.url("/debug/events"), auth)
        assert admin.status == 200
        for stream in [*streams, admin]:
            stream.close()


async def test_a_viewer_that_left_is_noticed_within_seconds_without_a_traceback(
    serve: Served, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Heartbeats every 0.2 s: one is written to the closed connection, which must be quiet.
    monkeypatch.setattr(debug, "HEARTBEAT", 0.2)
    caplog.set_level(logging.DEBUG)
    hub, base = await serve()
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, base + "/demo/events?aid=nobody")
        assert stream.status == 200
        await eventually(lambda: hub.watched)
        stream.close()  # the client goes; its aid matches nothing, so no event is written
    await eventually(lambda: not hub.watched, within=3)
    await asyncio.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r for r in caplog.records if r.exc_info] == []


async def test_a_quiet_viewer_that_left_is_noticed_before_any_heartbeat(serve: Served) -> None:
    assert debug.HEARTBEAT >= 15  # the default: nothing is written for 15 s
    hub, base = await serve()
    async with aiohttp.ClientSession() as session:
        stream = await open_stream(session, base + "/demo/events?aid=nobody")
        await eventually(lambda: hub.watched)
        stream.close()
    await eventually(lambda: not hub.watched, within=3)


def test_events_are_filtered_before_they_are_queued() -> None:
    hub = DebugHub()
    with (
        hub.viewer(lambda item: item.get("anonymous_id") == "me") as mine,
        hub.viewer() as everything,
    ):
        for n in range(2000):
            hub.publish({"kind": "event", "anonymous_id": "someone else", "n": n})
        hub.publish({"kind": "event", "anonymous_id": "me"})
        assert mine.qsize() == 1  # not 1,000 items it would drop one by one
        assert everything.qsize() == 1000  # a viewer that falls behind misses items


@pytest.mark.parametrize("path", ["/demo", "/demo/events?aid=a1"])
async def test_the_demo_answers_loopback_clients_only_by_default(
    start_collector: StartCollector, path: str
) -> None:
    collector = await start_collector(trusted_proxies=LOOPBACK)  # demo = "auto"
    status, body, _ = await collector.get(path, headers=OUTSIDER)
    assert status == 403
    assert b'demo = "on"' in body
    if path == "/demo":  # (a stream would not end)
        status, _, _ = await collector.get(path)  # this machine, no proxy in between
        assert status == 200
        shown = await start_collector(
            trusted_proxies=LOOPBACK, demo="on", data_dir=collector.settings.data_dir / "on"
        )
        status, _, _ = await shown.get(path, headers=OUTSIDER)
        assert status == 200


@pytest.mark.parametrize("path", ["/demo", "/debug"])
async def test_pages_are_not_framed_and_run_only_their_scripts(
    start_collector: StartCollector, path: str
) -> None:
    collector = await start_collector(admin_token=Secret(ADMIN))
    status, _, response = await collector.get(path)
    assert status == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    policy = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy
    assert "script-src 'self'" in policy


# Item 12: "loopback only" as resolved through trusted_proxies.


async def test_metrics_go_by_the_resolved_client(start_collector: StartCollector) -> None:
    collector = await start_collector(trusted_proxies=LOOPBACK)
    status, _, _ = await collector.get("/metrics")
    assert status == 200
    status, _, _ = await collector.get("/metrics", headers=OUTSIDER)
    assert status == 403  # behind nginx, the socket peer is loopback for everyone
    # A client that is not a trusted proxy cannot pass for loopback by writing the header.
    direct = await start_collector(data_dir=collector.settings.data_dir / "direct")
    status, _, _ = await direct.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"})
    assert status == 200  # (it is loopback itself here; the header is simply not read)


# Item 15: the admin cookie, the login's throttle, token lengths.


async def login(
    collector: Collector, token: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    assert collector.session is not None
    async with collector.session.post(
        collector.url("/debug/login"),
        data={"token": token},
        headers=headers,
        allow_redirects=False,
    ) as response:
        await response.read()
        return response


async def test_the_cookie_holds_a_derived_value(start_collector: StartCollector) -> None:
    collector = await start_collector(admin_token=Secret(ADMIN))
    response = await login(collector, ADMIN)
    assert response.status == 302
    assert response.headers["Location"] == "../debug"  # relative: right behind a prefix too
    cookie = response.cookies[debug.COOKIE]
    assert cookie.value != ADMIN
    assert ADMIN not in response.headers["Set-Cookie"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert not cookie["path"]  # the browser scopes it to /debug, or /c/debug behind a prefix
    assert not cookie["secure"]  # plain http here
    async with aiohttp.ClientSession() as session:
        headers = {"Cookie": f"{debug.COOKIE}={cookie.value}"}
        async with session.get(collector.url("/debug"), headers=headers) as page:
            assert b'name="token"' not in await page.read()  # the live view
        headers = {"Cookie": f"{debug.COOKIE}={ADMIN}"}  # the raw token is no cookie
        async with session.get(collector.url("/debug"), headers=headers) as page:
            assert b'name="token"' in await page.read()


async def test_the_cookie_is_secure_over_https_through_a_trusted_proxy(
    start_collector: StartCollector,
) -> None:
    collector = await start_collector(admin_token=Secret(ADMIN), trusted_proxies=LOOPBACK)
    https = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.4"}
    response = await login(collector, ADMIN, https)
    assert response.cookies[debug.COOKIE]["secure"]
    untrusted = await start_collector(
        admin_token=Secret(ADMIN), data_dir=collector.settings.data_dir / "untrusted"
    )
    response = await login(untrusted, ADMIN, {"X-Forwarded-Proto": "https"})
    assert not response.cookies[debug.COOKIE]["secure"]  # anyone can write that header


async def test_the_login_is_throttled_per_client(
    start_collector: StartCollector, caplog: pytest.LogCaptureFixture
) -> None:
    collector = await start_collector(admin_token=Secret(ADMIN), trusted_proxies=LOOPBACK)
    statuses = [(await login(collector, f"guess-{n}", OUTSIDER)).status for n in range(7)]
    assert statuses == [302] * 5 + [429] * 2
    refused = await login(collector, ADMIN, OUTSIDER)  # not even the right one, for now
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    other = await login(collector, ADMIN, {"X-Forwarded-For": "198.51.100.4"})
    assert other.status == 302
    # The warning names the client as resolved, not the proxy.
    assert "tried from 203.0.113.7" in caplog.text


@pytest.mark.parametrize("name", ["COLLECTOR_ADMIN_TOKEN", "COLLECTOR_METRICS_TOKEN"])
def test_tokens_have_a_minimum_length(name: str) -> None:
    with pytest.raises(SettingsError, match="at least 16 characters"):
        load_settings(environ={name: "short-token"})
    settings: Any = load_settings(environ={name: "a-token-of-sixteen"})
    assert settings.admin_token or settings.metrics_token
