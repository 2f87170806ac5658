"""Typed keys of what the application holds, shared by the app factory and the handlers."""

from __future__ import annotations

from aiohttp import web

from .config import Secret, Settings
from .limits import RateLimiter
from .live import DebugHub
from .logs import Repeats
from .metrics import Metrics
from .queue import Queue
from .relay import Relay
from .schema import EventValidator
from .script import Script

SETTINGS = web.AppKey("settings", Settings)
IDS_KEY = web.AppKey("ids_key", Secret)  # of derived ids: identity.ids_key
VALIDATOR = web.AppKey("validator", EventValidator)
SCRIPT = web.AppKey("script", Script)
QUEUE = web.AppKey("queue", Queue)
RELAY = web.AppKey("relay", Relay)
IP_LIMITER = web.AppKey("ip_limiter", RateLimiter)
USER_LIMITER = web.AppKey("user_limiter", RateLimiter)
METRICS = web.AppKey("metrics", Metrics)
DEBUG_HUB = web.AppKey("debug_hub", DebugHub)
INGEST_LOG = web.AppKey("ingest_log", Repeats)  # refusals: the first line, then counts
EVENT_PATHS: web.AppKey[frozenset[str]] = web.AppKey("event_paths")
