"""App: `create_app(settings)` wires the stages into one aiohttp application."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from . import __version__, cors, debug, ingest, sdk_config
from .config import Secret, Settings
from .identity import bearer_token, ids_key, token_matches
from .keys import (
    DEBUG_HUB,
    IDS_KEY,
    INGEST_LOG,
    IP_LIMITER,
    METRICS,
    QUEUE,
    RELAY,
    SCRIPT,
    SETTINGS,
    USER_LIMITER,
    VALIDATOR,
)
from .limits import RateLimiter
from .live import DebugHub
from .logs import Repeats, counted, request_ids
from .metrics import Metrics
from .outbound import DryRunOutbound, HttpOutbound, Outbound
from .queue import QUEUE_FILE as QUEUE_FILE  # where it always was, for tests and tools
from .queue import QueueRefused, QueueUnavailable, RedisQueue, open_queue
from .relay import Relay
from .schema import EventValidator, Shape, load_event_schemas
from .script import Script, static_file

log = logging.getLogger("collector.app")
STOP_STATS_TIMEOUT = 1.0  # seconds the stop waits for the queue's figures for its last line


async def ids_key_context(app: web.Application) -> AsyncIterator[None]:
    app[IDS_KEY] = ids_key(app[SETTINGS].data_dir)
    yield


async def queue_context(app: web.Application) -> AsyncIterator[None]:
    queue = await open_queue(app[SETTINGS], on_dropped=app[METRICS].dead_letters_dropped.inc)
    if isinstance(queue, RedisQueue):
        # Collectors sharing a queue must derive the same ids (a browser's dedupe scope, a
        # server token's GUIDs), whichever of them an event comes through: one key, in Redis.
        try:
            app[IDS_KEY] = Secret(await queue.shared_secret("ids"))
        except QueueUnavailable as error:
            await queue.close()
            raise QueueRefused(str(error)) from None
    if queue.interrupted:
        log.warning(
            "%s being sent by a collector that stopped (this one, or on a shared queue another);"
            " they go again, "
            "with the same X-Outbound-GUID so that Outbound can drop a resend",
            counted(queue.interrupted, "event") + (" was" if queue.interrupted == 1 else " were"),
        )
    app[QUEUE] = queue
    yield
    await queue.close()


async def relay_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    outbound: Outbound
    client: HttpOutbound | None = None
    key = settings.outbound_api_key
    if key is None:
        log.warning("OUTBOUND_API_KEY is not set: dry run, calls are logged instead of sent")
        outbound = DryRunOutbound()
    else:
        outbound = client = HttpOutbound(
            settings.outbound_url,
            key,
            settings.relay_timeout,
            concurrency=settings.relay_concurrency,
        )
    relay = Relay(
        app[QUEUE],
        outbound,
        settings,
        # The key ingest's ids were stamped with (one in Redis for collectors sharing it):
        # whichever collector relays an event derives the same identify GUID.
        ids_key=app[IDS_KEY],
        metrics=app[METRICS],
        hub=app[DEBUG_HUB],
    )
    app[RELAY] = relay
    relay.start()
    yield
    await relay.close()
    if client is not None:
        await client.close()
    try:
        # Only for the last line: a queue slow to answer (Redis stalled) must not hold the stop.
        stats = await asyncio.wait_for(app[QUEUE].stats(), STOP_STATS_TIMEOUT)
    except QueueUnavailable as error:  # a damaged or unreadable file: say so, stop cleanly
        log.error("stopped; the queue cannot be read: %s", error)
        return
    except TimeoutError:
        log.warning("stopped; the queue did not give its figures within %gs", STOP_STATS_TIMEOUT)
        return
    log.info(
        "stopped with %s queued, %s",
        counted(stats.depth, "event"),
        counted(stats.dead_letters, "dead letter"),
    )


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP (bad headers, an encoding it cannot decode) as
    an error with a traceback; it is the client's fault, so it becomes one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        # RequestPayloadError: a body that cannot be decoded, met while aiohttp reads what a
        # handler left unread (a POST to /healthz with broken gzip), after the answer.
        if isinstance(error, HttpProcessingError | RequestPayloadError):
            message = error.message if isinstance(error, HttpProcessingError) else error
            reason = " ".join(str(message).split())[:200]
            record.msg, record.args = (
                "refused a malformed request from %s: %s",
                (
                    record.args[0] if isinstance(record.args, tuple) and record.args else "?",
                    reason,
                ),
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


async def quiet_malformed_requests(app: web.Application) -> AsyncIterator[None]:
    server_log = logging.getLogger("aiohttp.server")
    quiet = MalformedRequestFilter()
    server_log.addFilter(quiet)
    yield
    server_log.removeFilter(quiet)


async def get_script(request: web.Request) -> web.Response:
    return request.app[SCRIPT].response(request)


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus' format; with a metrics token it is required, without one only loopback
    clients (a local agent) may scrape."""
    settings, metrics = request.app[SETTINGS], request.app[METRICS]
    if settings.metrics_token is not None:
        presented = bearer_token(request.headers.get("Authorization")) or ""
        if not token_matches((settings.metrics_token,), presented):
            raise web.HTTPUnauthorized(text="the metrics token is required")
    elif not ingest.from_loopback(request, settings):
        # The client as resolved through trusted_proxies: behind nginx, the socket peer is
        # loopback for everyone.
        raise web.HTTPForbidden(text="set metrics_token to scrape from another host")
    stats = await request.app[QUEUE].stats()
    metrics.queue_stats = (stats.depth, stats.oldest_received_at, stats.dead_letters)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def get_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    kind = {"live.js": "application/javascript", "live.css": "text/css"}[name]
    body = static_file(name)
    return web.Response(body=body, content_type=kind, charset="utf-8")


async def close_viewers(app: web.Application) -> None:
    app[DEBUG_HUB].close()


async def get_root(request: web.Request) -> web.Response:
    """`GET /`: the demo where it is on (a development set-up), else what this service is."""
    if debug.demo_enabled(request.app[SETTINGS]):
        raise web.HTTPFound("demo")  # relative: behind a path prefix it stays under it
    return ingest.json_response(
        {"service": "outbound-collector", "version": __version__, "health": "healthz"}
    )


async def get_healthz(request: web.Request) -> web.Response:
    return ingest.json_response({"status": "alive"})


async def get_readyz(request: web.Request) -> web.Response:
    """Ready when the queue commits and the relay is not paused."""
    queue, relay = request.app[QUEUE], request.app[RELAY]
    problems = []
    try:
        stats = await queue.stats()
    except Exception as error:
        problems.append(f"queue: {error}")
        stats = None
    if queue.damaged is not None:
        problems.append(f"queue: {queue.damaged}; stop the collector and restore the file")
    elif not queue.healthy and not await queue.probe(time.time()):
        problems.append("queue: cannot store events (the last write failed)")
    if relay.breaker.is_open:
        problems.append(f"relay circuit open: {relay.breaker.reason}")
    elif not relay.healthy:
        problems.append("relay: not running")
    body = {
        "status": "not ready" if problems else "ready",
        "problems": problems,
        "queue": None
        if stats is None
        else {
            "depth": stats.depth,
            "oldest_received_at": stats.oldest_received_at,
            "dead_letters": stats.dead_letters,
        },
        "dry_run": request.app[SETTINGS].dry_run,
    }
    return ingest.json_response(body, 503 if problems else 200)


def create_app(settings: Settings) -> web.Application:
    """The whole collector for these settings; resources open and close with the app."""
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[request_ids])
    app[SETTINGS] = settings
    shape = Shape(
        settings.max_property_depth, settings.max_property_keys, settings.max_string_length
    )
    app[VALIDATOR] = EventValidator(
        load_event_schemas(settings.schemas_dir), shape, page_event_name=settings.page_event_name
    )
    app[IP_LIMITER] = RateLimiter(settings.rate_limit_per_ip, settings.rate_burst_per_ip)
    app[USER_LIMITER] = RateLimiter(settings.rate_limit_per_user, settings.rate_burst_per_user)
    app[METRICS] = Metrics()
    app[DEBUG_HUB] = DebugHub(settings.max_live_viewers)
    app[INGEST_LOG] = Repeats(logging.getLogger("collector.ingest"))
    app[SCRIPT] = Script.packaged(settings.event_path, settings.script_path)
    app.cleanup_ctx.append(quiet_malformed_requests)
    app.cleanup_ctx.append(ids_key_context)
    app.cleanup_ctx.append(queue_context)
    app.cleanup_ctx.append(relay_context)
    app.cleanup_ctx.append(sdk_config.sdk_config_context)

    app.router.add_get(settings.script_path, get_script)
    app.router.add_get("/", get_root)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    app.router.add_get("/metrics", get_metrics)
    debug.add_routes(app, settings)
    if settings.admin_token is not None or debug.demo_enabled(settings):
        app.router.add_get("/_collector/{name:live\\.(?:js|css)}", get_asset)
    app.on_shutdown.append(close_viewers)
    # Every POST route that pages may call from another origin, the one list: a route added
    # here gets its preflight and CORS headers with the others.
    cors.add_browser_posts(
        app,
        settings,
        {
            settings.event_path: ingest.post_event,
            "/v2/track": ingest.post_outbound_track,
            "/v2/identify": ingest.post_outbound_identify,
        },
    )
    # Outbound's calls that only back-ends make: no CORS, so no page can make them.
    server_posts = {
        "/v2/track/batch": ingest.post_outbound_track_batch,
        "/v2/identify/batch": ingest.post_outbound_identify_batch,
        **ingest.outbound_call_handlers(),
    }
    for path, handler in server_posts.items():
        app.router.add_post(path, handler)
    # The mobile SDKs' config (Android 0.4.0 sends nothing until it has one): server-only too.
    app.router.add_get(sdk_config.PATH, sdk_config.get_sdk_config)
    app.on_response_prepare.append(_common_headers)
    return app


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
