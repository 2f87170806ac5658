"""CORS: the routes that pages on other sites may call, answered by aiohttp-cors, and the
little it leaves to the collector.

aiohttp-cors answers preflights and adds `Access-Control-*` to every answer of these routes
(errors too) for the allowed origins. It does not refuse an origin (it only withholds its
headers: `ingest.is_server` refuses), it adds no `Vary: Origin` (aiohttp-cors #351), and a
refused page could not read its 403, so its script would resend the batch forever. The
hook below adds the last two.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import aiohttp_cors
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp_cors.urldispatcher_router_adapter import ResourcesUrlDispatcherRouterAdapter

from .config import Settings
from .ingest import origin_allowed, own_hosts
from .keys import EVENT_PATHS

# What a page may read beyond the safelisted headers: when to retry after a 429 or a 503.
EXPOSED_HEADERS = ("Retry-After",)


def add_browser_posts(
    app: web.Application, settings: Settings, routes: Mapping[str, Handler]
) -> None:
    """Add the POST routes that pages on the allowed origins may call, with their CORS."""
    # aiohttp_cors.setup, with the adapter below (the router_adapter CorsConfig takes).
    cors = aiohttp_cors.CorsConfig(app, router_adapter=PlainResourcesAdapter(app.router, {}))
    options = origin_options(settings)
    for path, handler in routes.items():
        # The resource holds every method of its path before `cors.add`: a route added to
        # the path later lands on a resource of its own, which aiohttp-cors approves in the
        # preflight and then answers without CORS headers (aiohttp-cors #226).
        resource = app.router.add_resource(path)
        resource.add_route("POST", handler)
        cors.add(resource, options)
    app[EVENT_PATHS] = paths = frozenset(routes)
    # Bound to what it reads, which every answer of the app would otherwise look up again.
    app.on_response_prepare.append(functools.partial(_origin_headers, paths, settings))


class PlainResourcesAdapter(ResourcesUrlDispatcherRouterAdapter):
    """aiohttp-cors' own adapter for resources, with the three questions its hook asks of
    every answer answered from the resource alone, once each, for resources that hold a CORS
    config of their own and routes of plain handlers, as the collector's do. The library's
    answers resolve the route four times, check twice for a class-based view and look the
    origin up through a ChainMap of three configs twice, about 5% of a beacon's cost; other
    resources (with a route's own config, or a view) get the library's answers."""

    def __init__(self, router: web.UrlDispatcher, defaults: Mapping[str, Any]) -> None:
        super().__init__(router, defaults)
        self._defaults = defaults
        # A resource's config with the defaults under it, as one dict: resources configured
        # whole, whose routes are all plain handlers (a view answers preflights itself).
        self._plain: dict[web.AbstractResource | None, dict[str, Any]] = {}

    def set_config_for_routing_entity(self, routing_entity: Any, config: Any) -> None:
        super().set_config_for_routing_entity(routing_entity, config)
        if isinstance(routing_entity, web.Resource) and not any(
            isinstance(route.handler, type) for route in routing_entity
        ):
            self._plain[routing_entity] = {**self._defaults, **config}
        else:  # a route's own config (or a view): the library's answers for its resource
            resource = getattr(routing_entity, "resource", routing_entity)
            self._plain.pop(resource, None)

    def is_preflight_request(self, request: web.Request) -> bool:
        if request.match_info.route.resource in self._plain:
            # Its one OPTIONS route is the preflight handler (the library refuses another).
            return request.method == hdrs.METH_OPTIONS
        return super().is_preflight_request(request)

    def is_cors_enabled_on_request(self, request: web.Request) -> bool:
        return request.match_info.route.resource in self._plain or (
            super().is_cors_enabled_on_request(request)
        )

    def get_non_preflight_request_config(self, request: web.Request) -> Any:
        config = self._plain.get(request.match_info.route.resource)
        return config if config is not None else super().get_non_preflight_request_config(request)


def origin_options(settings: Settings) -> dict[str, aiohttp_cors.ResourceOptions]:
    """One `ResourceOptions` per allowed origin (`*`: any origin), never with credentials."""
    return {
        origin: aiohttp_cors.ResourceOptions(
            # The collector reads no cookie; and aiohttp-cors echoes the Origin for `*`,
            # which with credentials would hand every site the visitor's.
            allow_credentials=False,
            allow_methods=("POST",),
            allow_headers=("Content-Type",),
            expose_headers=EXPOSED_HEADERS,
            max_age=settings.cors_max_age,
        )
        for origin in settings.allowed_origins
    }


async def _origin_headers(
    paths: frozenset[str], settings: Settings, request: web.Request, response: web.StreamResponse
) -> None:
    """`Vary: Origin` on every answer of the browser routes (`paths`), and a refused origin's
    403 readable by that page, so that its script drops the batch instead of resending it."""
    if request.path not in paths:
        return
    _vary_on_origin(response)
    origin = request.headers.get("Origin")
    if (
        origin is not None
        and response.status == 403
        and request.method == "POST"
        and not origin_allowed(origin, settings.allowed_origins, own_hosts(request, settings))
    ):
        # Ingest answers 403 only to refuse an origin, so no other answer becomes readable;
        # aiohttp-cors leaves an origin it does not know alone, so the header is set once.
        response.headers["Access-Control-Allow-Origin"] = origin


def _vary_on_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in {name.strip().lower() for name in vary.split(",")}:
        response.headers["Vary"] = f"{vary}, Origin"
