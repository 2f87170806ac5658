"""SDK config: the answer to Outbound's mobile SDKs' `GET /i/config/sdk/<platform>/<version>`.

Each SDK asks for it at start: Android 0.4.0 sends nothing at all until it is answered 2xx
(its RequestHandler is ready only then), the others go on without it. They read two things
from it (zendesk/connect-android-sdk and zendesk/connect-ios-sdk at their tags):
`enabled`, false switching the SDK off (Outbound's "remote kill"; iOS 1.2.0 and Android
1.0.0 read it as false when absent), and `account`, the account's push permission prompt
(`prompt`, `prompt_event`, `pre_prompt`; iOS only). The prompt is a setting of the Outbound
account, so with a key the collector asks Outbound for the same path with the relay's key
and passes its config on; without one, or when Outbound gives none, it answers a config
that keeps the SDKs on and prompts for nothing (the app asks for permission itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from . import ingest
from .keys import METRICS, SETTINGS
from .outbound import HttpOutbound

log = logging.getLogger("collector.sdk_config")

# The SDKs' platforms are "android" and "ios", their versions like "0.4.0" or "1.2.0".
PATH = "/i/config/sdk/{platform:[a-z]{1,16}}/{version:[0-9A-Za-z][0-9A-Za-z._+-]{0,31}}"
# What keeps every SDK on, in the shape of Connect's own test answer
# (ConnectTestApp/src/androidTest/assets/config_enabled_response.json at v1.0.0).
LOCAL_CONFIG = orjson.dumps({"enabled": True, "account": {}, "sdk": {}})
# Outbound's answer is waited for this long: an app's start waits on it.
FETCH_TIMEOUT = 2.0
MAX_CONFIG_BYTES = 64 * 1024
# Outbound's config is reused this long (iOS 1.1.1 asks again after 600 s, the Connect
# SDKs hourly); after Outbound gave none, the local answer stands for RETRY_AFTER_FAILURE.
FRESH_FOR = 600.0
RETRY_AFTER_FAILURE = 60.0
# Paths remembered at most; the oldest answer is forgotten first.
MAX_PATHS = 64


@dataclass(frozen=True, slots=True)
class _Answer:
    body: bytes
    expires: float


class SdkConfig:
    """The config answered for each path: Outbound's, fetched once a while, else the local one."""

    def __init__(
        self,
        outbound: HttpOutbound | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._outbound = outbound
        self._clock = clock
        self._answers: dict[str, _Answer] = {}
        # One fetch per path at a time: a burst of app starts makes one call to Outbound.
        self._fetching: dict[str, asyncio.Task[bytes]] = {}

    async def answer(self, endpoint: str) -> bytes:
        """The config to answer for this path (`/i/config/sdk/android/0.4.0`)."""
        if self._outbound is None:
            return LOCAL_CONFIG
        answer = self._answers.get(endpoint)
        if answer is not None and answer.expires > self._clock():
            return answer.body
        task = self._fetching.get(endpoint)
        if task is None:
            task = asyncio.create_task(self._fetch(self._outbound, endpoint))
            self._fetching[endpoint] = task
            task.add_done_callback(lambda _: self._fetching.pop(endpoint, None))
        # Shielded: a client that goes away does not cancel the fetch the others wait for.
        return await asyncio.shield(task)

    async def _fetch(self, outbound: HttpOutbound, endpoint: str) -> bytes:
        got = await outbound.get(endpoint, limit=MAX_CONFIG_BYTES)
        problem: str | None
        if isinstance(got, str):
            problem, body = got, b""
        else:
            status, body = got
            problem = _problem(status, body)
        lifetime = FRESH_FOR
        if problem is not None:
            log.warning(
                "Outbound gave no config for %s (%s): answering one that keeps the SDK on for %g s",
                endpoint,
                problem,
                RETRY_AFTER_FAILURE,
            )
            body, lifetime = LOCAL_CONFIG, RETRY_AFTER_FAILURE
        self._answers.pop(endpoint, None)
        self._answers[endpoint] = _Answer(body, self._clock() + lifetime)
        while len(self._answers) > MAX_PATHS:
            del self._answers[next(iter(self._answers))]
        return body

    async def close(self) -> None:
        """Stop fetches under way and close the client."""
        for task in list(self._fetching.values()):
            task.cancel()
        await asyncio.gather(*self._fetching.values(), return_exceptions=True)
        if self._outbound is not None:
            await self._outbound.close()


def _problem(status: int, body: bytes) -> str | None:
    """Why Outbound's answer is not a config to pass on, or None when it is one."""
    if not 200 <= status < 300:
        return f"it answered {status}"
    try:
        config = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "the answer is not JSON"
    # Android 1.0.0's Gson and iOS 1.2.0's decoder fail on any other `enabled`, and iOS
    # 1.1.1 reads the answer as a dictionary.
    if not isinstance(config, dict) or not isinstance(config.get("enabled"), bool):
        return 'the answer is not an object with "enabled" true or false'
    return None


SDK_CONFIG = web.AppKey("sdk_config", SdkConfig)


async def sdk_config_context(app: web.Application) -> AsyncIterator[None]:
    """Open the config's own client to Outbound (none in a dry run), close it after."""
    settings = app[SETTINGS]
    outbound = None
    if settings.outbound_api_key is not None:
        # A client of its own, not the relay's: a backlog holding the relay's connections
        # must not hold an app's start, and its timeout is the short one.
        outbound = HttpOutbound(
            settings.outbound_url, settings.outbound_api_key, FETCH_TIMEOUT, concurrency=4
        )
    app[SDK_CONFIG] = config = SdkConfig(outbound)
    yield
    await config.close()


async def get_sdk_config(request: web.Request) -> web.Response:
    """`GET /i/config/sdk/<platform>/<version>` with a server token: the SDK's config."""
    app = request.app
    try:
        server = ingest.is_server(request, app[SETTINGS])
    except ingest.RequestError as error:
        app[METRICS].refused_requests.labels(str(error.status)).inc()
        return ingest.error_response(error.status, error.message)
    if not server:
        app[METRICS].refused_requests.labels("401").inc()
        return ingest.error_response(
            401, f"{request.path} takes a server token (X-Outbound-Key or Authorization: Bearer)"
        )
    platform, version = request.match_info["platform"], request.match_info["version"]
    body = await app[SDK_CONFIG].answer(f"/i/config/sdk/{platform}/{version}")
    return web.Response(body=body, content_type="application/json")
