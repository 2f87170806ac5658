"""Debug: the live event view (/debug, behind the admin token) and the demo page (/demo)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import time
from http.cookies import SimpleCookie
from typing import Any

import orjson
from aiohttp import web

from .config import Settings
from .ingest import BROKEN_STREAM, client_address, from_loopback
from .keys import DEBUG_HUB, QUEUE, SETTINGS
from .limits import RateLimiter, retry_after
from .live import CLOSE, ViewersFull, Wanted
from .logs import clip
from .queue import Queue
from .script import static_file

log = logging.getLogger("collector.debug")

COOKIE = "collector_admin"
# Comments every so often keep proxies from closing a quiet stream; between them the
# stream looks every POLL seconds whether its client is still there.
HEARTBEAT = 15.0
POLL = 1.0
NOTICE_MARK = b"{{NOTICE}}"
# Shown after a failed try (the redirect adds ?wrong=1); never with what was typed.
WRONG_TOKEN = (
    b'<p class="error" role="alert">That is not the admin token. Check '
    b"<code>COLLECTOR_ADMIN_TOKEN</code> on the server and try again.</p>"
)
# Wrong tries of the admin token per client address: 5 at once, then one every 6 seconds.
LOGIN_RATE, LOGIN_BURST = 1 / 6, 5
LOGIN_LIMITER = web.AppKey("login_limiter", RateLimiter)
# The debugger and the demo are never framed (clickjacking) and run only their own scripts;
# the demo's page has inline scripts and handlers of its own, and loads the collector's script.
NOT_FRAMED = {"X-Frame-Options": "DENY"}
DEBUG_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
DEMO_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def _page(name: str) -> bytes:
    return static_file(name)


def _html(page: bytes, csp: str) -> web.Response:
    return web.Response(
        body=page,
        content_type="text/html",
        charset="utf-8",
        headers={**NOT_FRAMED, "Content-Security-Policy": csp, "Cache-Control": "no-store"},
    )


def cookie_value(token: str) -> str:
    """What the admin cookie holds: derived from the token, so that a cookie seen (in a
    browser's storage, a proxy's log) is not the token itself, which also opens the
    debugger by header and may be used elsewhere."""
    return hmac.new(token.encode(), b"outbound-collector admin cookie", hashlib.sha256).hexdigest()


def _admin(request: web.Request, settings: Settings) -> bool:
    token = settings.admin_token
    if token is None:
        raise web.HTTPNotFound()
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return hmac.compare_digest(token.reveal().encode(), header[7:].strip().encode())
    presented = request.cookies.get(COOKIE, "")
    return hmac.compare_digest(cookie_value(token.reveal()).encode(), presented.encode())


def _over_https(request: web.Request, settings: Settings) -> bool:
    """Whether the browser reached this over https: directly, or through a trusted proxy
    that says so (X-Forwarded-Proto), as nginx terminating TLS does."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip().lower()
    try:
        peer = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    trusted = any(peer.version == net.version and peer in net for net in settings.trusted_proxies)
    return trusted and proto == "https"


async def get_debug(request: web.Request) -> web.Response:
    """The live view, or the form that asks for the admin token (saying so after a wrong one)."""
    if _admin(request, request.app[SETTINGS]):
        page = _page("debug.html")
    else:
        notice = WRONG_TOKEN if "wrong" in request.query else b""
        page = _page("login.html").replace(NOTICE_MARK, notice)
    return _html(page, DEBUG_CSP)


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
    address = client_address(request, settings)
    tries, now = request.app[LOGIN_LIMITER], time.monotonic()
    wait = tries.wait({str(address): 1}, now)
    if wait:
        raise web.HTTPTooManyRequests(
            text="too many tries of the admin token; wait and try again",
            headers={"Retry-After": retry_after(wait)},
        )
    # Relative, so that behind a path prefix (/c/debug/login) it leads back to /c/debug.
    if not hmac.compare_digest(token.reveal().encode(), str(form.get("token", "")).encode()):
        tries.take({str(address): 1}, now)
        log.warning("debugger: a wrong admin token was tried from %s", clip(address))
        raise web.HTTPFound("../debug?wrong=1")
    response = web.HTTPFound("../debug")
    # No Path: the browser scopes the cookie to this URL's directory, /debug, or /c/debug
    # behind a prefix, whichever the browser sees. SameSite=Strict always, Secure over https.
    cookie: SimpleCookie = SimpleCookie()
    cookie[COOKIE] = cookie_value(token.reveal())
    cookie[COOKIE]["httponly"] = True
    cookie[COOKIE]["samesite"] = "Strict"
    cookie[COOKIE]["secure"] = _over_https(request, settings)
    response.headers.add("Set-Cookie", cookie[COOKIE].OutputString())
    raise response


async def get_debug_events(request: web.Request) -> web.StreamResponse:
    if not _admin(request, request.app[SETTINGS]):
        raise web.HTTPUnauthorized(text="the admin token is required")
    return await _stream(request, lambda item: True, "debug", depth=request.app[QUEUE])


def _demo_shown(request: web.Request) -> None:
    """With `demo = "auto"` the demo answers loopback clients only (as resolved through
    trusted_proxies: behind nginx every socket peer is loopback); `"on"`: everyone."""
    settings = request.app[SETTINGS]
    if settings.demo != "on" and not from_loopback(request, settings):
        raise web.HTTPForbidden(
            text='the demo answers this machine only; set demo = "on" to show it to others'
        )


async def get_demo(request: web.Request) -> web.Response:
    _demo_shown(request)
    page = _page("demo.html").replace(
        b"{{SCRIPT_PATH}}", request.app[SETTINGS].script_path.encode()
    )
    return _html(page, DEMO_CSP)


async def get_demo_events(request: web.Request) -> web.StreamResponse:
    """The demo's live view: only the events of the viewer's own anonymous id."""
    _demo_shown(request)
    aid = request.query.get("aid", "")
    if not aid:
        raise web.HTTPBadRequest(text="aid is required")
    # Events carry the id as the page sent it; the relay's calls, as Outbound gets it.
    mine = {aid, request.app[SETTINGS].anonymous_id_prefix + aid}
    return await _stream(request, lambda item: item.get("anonymous_id") in mine, "demo")


async def _stream(
    request: web.Request, wanted: Wanted, kind: str, depth: Queue | None = None
) -> web.StreamResponse:
    """Server-sent events of the hub's items that `wanted` says yes to, and the depth of
    `depth` each second when given; 503 when as many viewers of this kind watch as may."""
    hub = request.app[DEBUG_HUB]
    try:
        with hub.viewer(wanted, kind=kind) as viewer:
            return await _events(request, viewer, depth)
    except ViewersFull:
        raise web.HTTPServiceUnavailable(
            text=f"{hub.max_viewers} live views are open already; try again later",
            headers={"Retry-After": "30"},
        ) from None


async def _events(
    request: web.Request, viewer: asyncio.Queue[dict[str, Any]], depth: Queue | None
) -> web.StreamResponse:
    """One JSON object an event, with heartbeats; it ends within POLL seconds of its client
    leaving, and a write to a client that has left ends it quietly."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
    )
    await response.prepare(request)
    quiet_since = ticked = time.monotonic()
    while _connected(request):
        if depth is not None and time.monotonic() - ticked >= POLL:
            # The chart's queue line: the depth the queue keeps in memory, no query.
            ticked = time.monotonic()
            tick = {"kind": "queue", "at": time.time(), "depth": depth.depth}
            if not await _sent(response, b"data: " + orjson.dumps(tick) + b"\n\n"):
                break
        try:
            item: dict[str, Any] | None = await asyncio.wait_for(viewer.get(), POLL)
        except TimeoutError:
            if time.monotonic() - quiet_since < HEARTBEAT:
                continue
            item = None
        if item is CLOSE:
            break
        data = b": heartbeat\n\n" if item is None else b"data: " + orjson.dumps(item) + b"\n\n"
        if not await _sent(response, data):
            break
        quiet_since = time.monotonic()
    return response


def _connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def _sent(response: web.StreamResponse, data: bytes) -> bool:
    """Write to a stream; False when its client has gone (which is no error of ours)."""
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        return False
    return True


def demo_enabled(settings: Settings) -> bool:
    """The demo is on for a fresh start (no allowed origins), unless said otherwise."""
    if settings.demo == "auto":
        return not settings.allowed_origins
    return settings.demo == "on"


def add_routes(app: web.Application, settings: Settings) -> None:
    """The debugger's routes when an admin token is set, the demo's when it is on."""
    if settings.admin_token is not None:
        app[LOGIN_LIMITER] = RateLimiter(LOGIN_RATE, LOGIN_BURST)
        app.router.add_get("/debug", get_debug)
        app.router.add_post("/debug/login", post_debug_login)
        app.router.add_get("/debug/events", get_debug_events)
    if demo_enabled(settings):
        app.router.add_get("/demo", get_demo)
        app.router.add_get("/demo/events", get_demo_events)
