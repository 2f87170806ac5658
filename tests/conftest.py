"""Fixtures: a fake Outbound and real collectors on loopback, each with its own data directory."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler
from fake_outbound import KEY, FakeOutbound
from playwright.async_api import Browser, async_playwright
from redis_server import RedisServer

from collector.app import create_app
from collector.config import Secret, Settings
from collector.keys import QUEUE, RELAY
from collector.queue import SQLiteQueue
from collector.relay import Relay

SEED_EVENT = {
    "event": "renewMembership",
    "user_id": "u123",
    "properties": {"membership_valid": True, "membership_renewalDate": "2018-06-12"},
    "timestamp": 1529366403,
}


@pytest.fixture(autouse=True, scope="session")
def loopback_bypasses_proxies() -> Iterator[None]:
    """Tests talk to loopback: a proxy the machine sets (HTTP_PROXY, HTTPS_PROXY) must not
    carry those calls, since the relay's client honours it (test_proxy sets its own).
    NO_PROXY rather than unsetting them: a pip install in a test may need the proxy."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("no_proxy", "NO_PROXY"):
            hosts = [host for host in os.environ.get(name, "").split(",") if host.strip()]
            if "*" not in hosts:
                patch.setenv(name, ",".join([*hosts, "127.0.0.1", "localhost", "::1"]))
        yield


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    """Wait until `check()` holds, polling; fail when it has not within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {within} s: {check}")
        await asyncio.sleep(0.02)


class Collector:
    """One running collector: a real server on 127.0.0.1 and an HTTP client to it."""

    def __init__(self, settings: Settings, port: int | None = None) -> None:
        self.settings = settings
        self.port = port
        self.app: web.Application | None = None
        self._server: TestServer | None = None
        self.session: aiohttp.ClientSession | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers

    async def start(self) -> Collector:
        self.app = create_app(self.settings)
        self.app.middlewares.append(self._record)
        self._server = TestServer(self.app, host="127.0.0.1", port=self.port)
        await self._server.start_server()
        self.port = self._server.port
        self.session = aiohttp.ClientSession()
        return self

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path, dict(request.headers)))
        return await handler(request)

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._server is not None:
            await self._server.close()
        self._server = self.session = None

    def url(self, path: str) -> str:
        assert self._server is not None
        return str(self._server.make_url(path))

    @property
    def queue(self) -> SQLiteQueue:
        assert self.app is not None
        queue = self.app[QUEUE]
        assert isinstance(queue, SQLiteQueue)
        return queue

    @property
    def relay(self) -> Relay:
        assert self.app is not None
        return self.app[RELAY]

    async def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        assert self.session is not None
        async with self.session.get(self.url(path), headers=headers) as response:
            raw = await response.read()
            parsed = orjson.loads(raw) if raw and response.content_type.endswith("json") else raw
            return response.status, parsed, response

    async def post(
        self,
        path: str,
        body: object = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """POST JSON (as text/plain, like the browser script) or raw bytes; status and JSON."""
        assert self.session is not None
        if data is None:
            data = orjson.dumps(body)
            headers = {"Content-Type": "text/plain;charset=UTF-8", **(headers or {})}
        headers = headers or {}
        # Send no Content-Type at all when the test names none, as bare server clients do.
        skip = () if "Content-Type" in headers else ("Content-Type",)
        async with self.session.post(
            self.url(path), data=data, headers=headers, skip_auto_headers=skip
        ) as response:
            raw = await response.read()
            parsed = orjson.loads(raw) if raw and response.content_type.endswith("json") else raw
            return response.status, parsed, response


@pytest.fixture
async def fake() -> AsyncIterator[FakeOutbound]:
    outbound = FakeOutbound()
    await outbound.start()
    yield outbound
    await outbound.close()


@pytest.fixture
def settings(tmp_path: Path, fake: FakeOutbound) -> Settings:
    """Settings for a collector relaying to the fake, with retries fast enough for tests."""
    return Settings(
        data_dir=tmp_path / "data",
        outbound_url=fake.url,
        outbound_api_key=Secret(KEY),
        retry_base=0.05,
        retry_cap=0.5,
        relay_timeout=2.0,
        lease_seconds=10.0,
        probe_interval=0.3,
        # Tests send far faster than people do; the rate-limit tests turn limits back on.
        rate_limit_per_ip=0.0,
        rate_limit_per_user=0.0,
    )


StartCollector = Callable[..., Awaitable[Collector]]


@pytest.fixture
async def start_collector(settings: Settings) -> AsyncIterator[StartCollector]:
    """Start collectors (with setting overrides); every one still running is stopped after."""
    running: list[Collector] = []

    async def start(**overrides: Any) -> Collector:
        collector = await Collector(dataclasses.replace(settings, **overrides)).start()
        running.append(collector)
        return collector

    yield start
    for collector in running:
        await collector.stop()


@pytest.fixture
async def collector(start_collector: StartCollector) -> Collector:
    return await start_collector()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on a loopback port (AOF on, in tmp_path), killed after.

    Per test rather than one per session with FLUSHALL: it starts in ~25 ms, and a test may
    kill, restart or reconfigure it without touching any other.
    """
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.kill()


# Debian's Chromium (Playwright's own download does not work on these machines), without
# the background traffic that a closed network refuses.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A headless Chromium for the test, closed after it."""
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        await chromium.close()
