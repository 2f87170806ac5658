"""A stand-in for Outbound's API: a real HTTP server on loopback with injectable faults."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

KEY = "test-outbound-key-5f2d"


@dataclass(frozen=True)
class Fault:
    """How to answer one request instead of accepting it."""

    status: int = 503
    retry_after: str | None = None
    delay: float = 0.0
    drop: bool = False
    body: str = ""
    # Take the call (it counts as received), then close the connection without answering:
    # the caller cannot tell whether Outbound has it.
    drop_after: bool = False
    # Take the call, then answer `status` after `delay`: Outbound had it, and its answer says
    # it failed or comes too late for the caller.
    taken: bool = False
    # Hold the request until this is set (its attempt is recorded at once): the test does
    # something while the call is in flight.
    hold: asyncio.Event | None = None


@dataclass(frozen=True)
class Received:
    endpoint: str
    body: dict[str, Any]
    headers: dict[str, str]
    at: float
    batch: int = 0  # the size of the batch call that carried it; 0: a single call


@dataclass
class FakeOutbound:
    """Checks the key, answers as Outbound does, records what it accepted and every attempt."""

    key: str = KEY
    received: list[Received] = field(default_factory=list)
    attempts: list[tuple[str, float, int]] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    always: Fault | None = None
    latency: float = 0.0  # seconds before every answer, faults or not
    tls: ssl.SSLContext | None = None  # serve https with this context's certificate
    every: tuple[int, Fault] | None = None  # (n, fault): every n-th request gets the fault
    # An event (a single call's body, a batch's item) this returns True for is refused with
    # a 400, and so is a batch holding it: Outbound takes a batch whole or not at all.
    refuse: Callable[[dict[str, Any]], bool] | None = None
    batches: bool = True  # False: the batch endpoints answer 404, as an Outbound without them
    # The mobile SDKs' GET /i/config/sdk/<platform>/<version>: the account's config (its
    # shape as ConnectTestApp's config_enabled_response.json, with iOS's prompt settings),
    # the fault to answer instead, and each call's path and headers.
    config: dict[str, Any] = field(
        default_factory=lambda: {
            "enabled": True,
            "account": {"prompt": True, "prompt_event": "checkedOut"},
            "sdk": {},
        }
    )
    config_fault: Fault | None = None
    config_calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    _server: TestServer | None = None
    _taking: set[asyncio.Task[web.StreamResponse]] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_next(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    @property
    def url(self) -> str:
        assert self._server is not None
        return str(self._server.make_url("")).rstrip("/")

    async def start(self, port: int | None = None) -> None:
        """Listen on loopback; pass the old port to come back where the collector expects it."""
        app = web.Application()
        app.router.add_post(
            "/v2/{endpoint:track|identify|(?:apns|gcm)/(?:register|disable)"
            "|(?:subscribe|unsubscribe)/(?:all|campaigns)}",
            self._handle,
        )
        app.router.add_post("/v2/{endpoint:track|identify}/batch", self._handle)
        app.router.add_get("/i/config/sdk/{platform}/{version}", self._config)
        self._server = TestServer(app, host="127.0.0.1", port=port)
        await self._server.start_server(ssl=self.tls)

    @property
    def port(self) -> int:
        assert self._server is not None
        port = self._server.port
        assert port is not None
        return port

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    def tracks(self) -> list[Received]:
        return [r for r in self.received if r.endpoint == "track"]

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` calls were accepted; fail loudly if they never come."""
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} calls at the fake Outbound, got {len(self.received)}: "
                    f"{[(r.endpoint, r.body.get('event')) for r in self.received]}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        return list(self.received)

    async def _config(self, request: web.Request) -> web.StreamResponse:
        self.config_calls.append((request.path, dict(request.headers)))
        self._changed.set()
        fault = self.config_fault
        if fault is not None and fault.hold is not None:
            await fault.hold.wait()
        if request.headers.get("X-Outbound-Key") != self.key:
            return web.Response(status=401, text="invalid api key")
        if fault is not None:
            return web.Response(status=fault.status, text=fault.body)
        return web.json_response(self.config)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.match_info["endpoint"]
        batch = request.path.endswith("/batch")
        if batch and not self.batches:
            self.attempts.append((f"{endpoint}/batch", time.time(), 404))
            return web.Response(status=404, text="not found")
        fault = self.faults.popleft() if self.faults else self.always
        if (
            fault is None
            and self.every is not None
            and (len(self.attempts) + 1) % self.every[0] == 0
        ):
            fault = self.every[1]
        status = fault.status if fault else 200
        self.attempts.append((f"{endpoint}/batch" if batch else endpoint, time.time(), status))
        self._changed.set()
        if fault is not None and fault.hold is not None:
            # Outbound takes a call it has whole whether or not its caller is still there;
            # aiohttp would cancel this handler when the connection is lost meanwhile.
            await request.read()
            taking = asyncio.create_task(self._answer(request, endpoint, batch, fault))
            self._taking.add(taking)
            taking.add_done_callback(self._taking.discard)
            return await asyncio.shield(taking)
        return await self._answer(request, endpoint, batch, fault)

    async def _answer(
        self, request: web.Request, endpoint: str, batch: bool, fault: Fault | None
    ) -> web.StreamResponse:
        if fault is not None and fault.hold is not None:
            await fault.hold.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        if request.headers.get("X-Outbound-Key") != self.key:
            return web.Response(status=401, text="invalid api key")
        if fault is not None and not (fault.drop_after or fault.taken):
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.drop:
                assert request.transport is not None
                request.transport.abort()
                return web.Response(status=500)
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            return web.Response(status=fault.status, text=fault.body, headers=headers)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return web.Response(status=500)  # what Outbound answers to malformed JSON
        items = body if batch else [body]
        if batch and not isinstance(body, list):
            return web.Response(status=400, text="a batch is an array")
        if batch and not 1 <= len(items) <= 100:
            return web.Response(status=400, text="a batch holds 1 to 100 items")
        for item in items:
            if not isinstance(item, dict) or not item.get("user_id"):
                return web.Response(status=400, text="user_id is required")
            if endpoint == "track" and not item.get("event"):
                return web.Response(status=400, text="event is required")
            if self.refuse is not None and self.refuse(item):
                return web.Response(status=400, text="event refused")
        headers, at = dict(request.headers), time.time()
        self.received += [
            Received(endpoint, item, headers, at, len(items) if batch else 0) for item in items
        ]
        self._changed.set()
        if fault is not None and fault.drop_after:
            assert request.transport is not None
            request.transport.abort()
        if fault is not None and fault.taken:
            await asyncio.sleep(fault.delay)
            return web.Response(status=fault.status, text=fault.body)
        return web.Response(status=200)
