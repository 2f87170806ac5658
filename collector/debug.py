"""Debug: the live event view (/debug, behind the admin token) and the demo page (/demo)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

import orjson
from aiohttp import web

from .config import Settings
from .ingest import BROKEN_STREAM
from .keys import DEBUG_HUB, SETTINGS
from .live import CLOSE
from .script import static_file

log = logging.getLogger("collector.debug")

COOKIE = "collector_admin"
HEARTBEAT = 15.0
NOTICE_MARK = b"{{NOTICE}}"
# Shown after a failed try (the redirect adds ?wrong=1); never with what was typed.
WRONG_TOKEN = (
    b'<p class="error" role="alert">That is not the admin token. Check '
    b"<code>COLLECTOR_ADMIN_TOKEN</code> on the server and try again.</p>"
)


def _page(name: str) -> bytes:
    return static_file(name)


def _admin(request: web.Request, settings: Settings) -> bool:
    token = settings.admin_token
    if token is None:
        raise web.HTTPNotFound()
    presented = request.cookies.get(COOKIE, "")
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        presented = header[7:].strip()
    return hmac.compare_digest(token.reveal().encode(), presented.encode())


async def get_debug(request: web.Request) -> web.Response:
    """The live view, or the form that asks for the admin token (saying so after a wrong one)."""
    if _admin(request, request.app[SETTINGS]):
        page = _page("debug.html")
    else:
        notice = WRONG_TOKEN if "wrong" in request.query else b""
        page = _page("login.html").replace(NOTICE_MARK, notice)
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def post_debug_login(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    _admin(request, settings)  # 404 when the debugger is off
    try:
        # The whole body first, whatever its type: one that cannot be decoded is refused here
        # rather than met by aiohttp draining it after the answer.
        await request.read()
        form = await request.post()
    except (ValueError, *BROKEN_STREAM):  # a broken form, or a body that cannot be decoded
        request.content.feed_eof()
        refused = web.Response(status=400, text="the login form could not be read")
        refused.force_close()
        return refused
    token = settings.admin_token
    assert token is not None
    if not hmac.compare_digest(token.reveal().encode(), str(form.get("token", "")).encode()):
        log.warning("debugger: a wrong admin token was tried from %s", request.remote)
        raise web.HTTPFound("/debug?wrong=1")
    response = web.HTTPFound("/debug")
    response.set_cookie(COOKIE, token.reveal(), httponly=True, samesite="Strict", path="/debug")
    raise response


async def get_debug_events(request: web.Request) -> web.StreamResponse:
    if not _admin(request, request.app[SETTINGS]):
        raise web.HTTPUnauthorized(text="the admin token is required")
    return await _stream(request, lambda item: True)


async def get_demo(request: web.Request) -> web.Response:
    page = _page("demo.html").replace(
        b"{{SCRIPT_PATH}}", request.app[SETTINGS].script_path.encode()
    )
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def get_demo_events(request: web.Request) -> web.StreamResponse:
    """The demo's live view: only the events of the viewer's own anonymous id."""
    mine = request.query.get("aid", "")
    if not mine:
        raise web.HTTPBadRequest(text="aid is required")
    return await _stream(request, lambda item: item.get("anonymous_id") == mine)


async def _stream(request: web.Request, wanted: Any) -> web.StreamResponse:
    """Server-sent events of the hub, one JSON object each, with heartbeats."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    with request.app[DEBUG_HUB].viewer() as viewer:
        while True:
            try:
                item = await asyncio.wait_for(viewer.get(), HEARTBEAT)
            except TimeoutError:
                await response.write(b": heartbeat\n\n")
                continue
            if item is CLOSE:
                break
            if wanted(item):
                try:
                    await response.write(b"data: " + orjson.dumps(item) + b"\n\n")
                except ConnectionResetError:
                    break
    return response


def demo_enabled(settings: Settings) -> bool:
    """The demo is on for a fresh start (no allowed origins), unless said otherwise."""
    if settings.demo == "auto":
        return not settings.allowed_origins
    return settings.demo == "on"


def add_routes(app: web.Application, settings: Settings) -> None:
    if settings.admin_token is not None:
        app.router.add_get("/debug", get_debug)
        app.router.add_post("/debug/login", post_debug_login)
        app.router.add_get("/debug/events", get_debug_events)
    if demo_enabled(settings):
        app.router.add_get("/demo", get_demo)
        app.router.add_get("/demo/events", get_demo_events)
