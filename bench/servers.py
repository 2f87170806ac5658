"""Processes the benchmark runs beside the collector: the baseline and a fake Outbound.

    python bench/servers.py baseline PORT
    python bench/servers.py outbound PORT DELAY_SECONDS

The baseline is the ceiling: a bare aiohttp app in the same Python, one process, access
log off, whose handler reads the body and answers 204. The fake Outbound answers every
call (after DELAY_SECONDS), counts them (and notes when the first and the latest came),
and fails on demand (POST /mode with a status).
"""

from __future__ import annotations

import asyncio
import sys
import time

from aiohttp import web


def baseline(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def outbound(port: int, delay: float) -> None:
    state = {"calls": 0, "tracks": 0, "status": 200}
    times = {"first": 0.0, "last": 0.0}

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        if state["status"] != 200:
            return web.Response(status=state["status"])
        state["calls"] += 1
        if request.match_info["endpoint"] == "track":
            state["tracks"] += 1
        # When the first and the latest call arrived: the relay's pace, without its startup.
        times["first"] = times["first"] or time.time()
        times["last"] = time.time()
        return web.Response(status=200)

    async def count(request: web.Request) -> web.Response:
        return web.json_response({**state, **times})

    async def mode(request: web.Request) -> web.Response:
        state["status"] = int(await request.text())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/v2/{endpoint}", handle)
    app.router.add_get("/count", count)
    app.router.add_post("/mode", mode)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    try:  # the same event loop as the collector's `serve`: uvloop when installed
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "baseline":
        baseline(port)
    else:
        outbound(port, float(sys.argv[3]))
