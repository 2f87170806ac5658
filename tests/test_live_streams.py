"""The live views' streams over HTTP: the demo follows its visitor's events and calls, the
debugger also gets the queue's depth each second."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from conftest import Collector, StartCollector

from collector.config import Secret

ADMIN = "admin-token-for-live-streams"


async def items(response: aiohttp.ClientResponse, until: str, limit: int = 50) -> list[Any]:
    """The stream's JSON items, up to the first of kind `until` (within 10 s)."""
    found: list[Any] = []
    while len(found) < limit:
        async with asyncio.timeout(10):
            line = await response.content.readline()
        assert line, "the stream ended"
        if line.startswith(b"data: "):
            found.append(orjson.loads(line[6:]))
            if found[-1].get("kind") == until:
                return found
    raise AssertionError(f"no {until!r} item in {found}")


async def test_the_demo_follows_its_visitors_event_and_its_calls(collector: Collector) -> None:
    assert collector.session is not None
    async with collector.session.get(collector.url("/demo/events?aid=visitor-1")) as stream:
        assert stream.status == 200
        event = {"event": "demoClick", "anonymous_id": "visitor-1"}
        assert (await collector.post("/e", event))[0] == 202
        calls = [i for i in await items(stream, until="call") if i["kind"] == "call"]
    # Outbound gets the visitor's id in the anonymous namespace; the demo still shows it.
    assert calls[0]["anonymous_id"] == "anon:visitor-1"
    assert calls[0]["body"]["user_id"] == "anon:visitor-1"


async def test_the_debugger_gets_the_queue_depth_each_second(
    start_collector: StartCollector,
) -> None:
    collector = await start_collector(admin_token=Secret(ADMIN), outbound_api_key=None)
    assert collector.session is not None
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with collector.session.get(collector.url("/debug/events"), headers=headers) as stream:
        assert stream.status == 200
        [tick] = await items(stream, until="queue")
    assert tick["depth"] == collector.queue.depth
    assert set(tick) == {"kind", "at", "depth"}
