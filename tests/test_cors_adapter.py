"""CORS: the collector's router adapter for aiohttp-cors answers as the library's own."""

from __future__ import annotations

import aiohttp
import aiohttp_cors
from aiohttp import web
from aiohttp.test_utils import TestServer

from collector.cors import PlainResourcesAdapter

PAGE = "https://page.example"
OTHER = "https://other.example"


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _options() -> aiohttp_cors.ResourceOptions:
    return aiohttp_cors.ResourceOptions(allow_methods=("POST",), expose_headers=("Retry-After",))


async def _answers(adapter: bool) -> list[tuple[int, str | None, str | None]]:
    """What a page on each origin reads from a resource configured whole (/whole) and from
    one whose POST route has a config of its own for a second origin (/route)."""
    app = web.Application()
    cors = (
        aiohttp_cors.CorsConfig(app, router_adapter=PlainResourcesAdapter(app.router, {}))
        if adapter
        else aiohttp_cors.CorsConfig(app)
    )
    whole = app.router.add_resource("/whole")
    whole.add_route("POST", _ok)
    cors.add(whole, {PAGE: _options()})
    by_route = app.router.add_resource("/route")
    cors.add(by_route, {PAGE: _options()})
    cors.add(by_route.add_route("POST", _ok), {OTHER: _options()})
    answers = []
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        for path in ("/whole", "/route"):
            for origin in (PAGE, OTHER):
                for method in ("OPTIONS", "POST"):
                    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
                    async with session.request(
                        method, server.make_url(path), headers=headers
                    ) as response:
                        answers.append(
                            (
                                response.status,
                                response.headers.get("Access-Control-Allow-Origin"),
                                response.headers.get("Access-Control-Expose-Headers"),
                            )
                        )
    return answers


async def test_the_adapter_answers_as_the_library_s_own() -> None:
    ours, library = await _answers(adapter=True), await _answers(adapter=False)
    assert ours == library
    # /whole: the page's origin only; /route: its route's own origin as well.
    assert [origin for _, origin, _ in ours] == [PAGE, PAGE, None, None, PAGE, PAGE, OTHER, OTHER]
