"""Logs: one line per notable thing, for people or as JSON lines, with the request id."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

# Request-scoped, as contextvars are: each request's task sees its own id.
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Ids unique to this process and cheap to make: a random prefix and a counter.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being handled (or "-") on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


# What a client sends may reach a log line (a key, an origin, an event name, a message id):
# escaped, so that it cannot start a line of its own, and cut short, so that a few bytes of
# gzip cannot write a megabyte. Whole lines are held to the same, whatever wrote them.
CLIP = 120
MAX_LINE = 2000
MAX_LINES_PER_REQUEST = 20
REPEAT_INTERVAL = 60.0  # seconds between the counts of a line that repeats
_LINES: ContextVar[list[int] | None] = ContextVar("lines_of_request", default=None)


def clip(value: object, limit: int = CLIP) -> str:
    """A client-supplied value as a log line may show it: control and other unprintable
    characters escaped (`\\n`, `\\x1b`), at most `limit` characters before escaping, with
    its full length when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class BoundedLines(logging.Filter):
    """Every line one line, of at most MAX_LINE characters, and at most
    MAX_LINES_PER_REQUEST lines for one request (one more says that the rest were dropped).
    Tracebacks, which the formatter adds, are left whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        counter = _LINES.get()
        if counter is not None:
            counter[0] += 1
            if counter[0] > MAX_LINES_PER_REQUEST + 1:
                return False
            if counter[0] == MAX_LINES_PER_REQUEST + 1:
                record.msg, record.args = "further lines of this request are dropped", None
                record.exc_info = record.exc_text = None
                return True
        message = record.getMessage()
        if len(message) > MAX_LINE or not message.isprintable():
            record.msg, record.args = clip(message, MAX_LINE), None
        return True


@dataclass(slots=True)
class _Window:
    ends: float
    count: int = 0  # lines held back since the window began
    level: int = logging.INFO
    latest: str = ""  # the last of them, as it would have been written


class Repeats:
    """A line that can repeat many times a second (every request refused on a full disk,
    every poll of a relay that cannot claim): the first is written, then at most one line
    an `interval` says how many more there were, so that the log does not fill the disk
    that is already full. Lines with a different `key` are counted apart."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = REPEAT_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        """Write `message % args` unless a line of this `key` was written within the interval."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now >= window.ends:
            self._flush(key, window)  # no event loop ran its timer
            window = self._windows.get(key)
        if window is None:
            self._logger.log(level, message, *args)
            self._open(key, now)
            return
        window.count += 1
        window.level, window.latest = level, message % args if args else message

    def _open(self, key: str, now: float) -> None:
        window = self._windows[key] = _Window(now + self._interval)
        with contextlib.suppress(RuntimeError):  # outside an event loop, the next line flushes
            asyncio.get_running_loop().call_later(self._interval, self._flush, key, window)

    def _flush(self, key: str, window: _Window) -> None:
        """`window` of `key` is over: say how many lines it held back, if any."""
        if self._windows.get(key) is not window:
            return  # flushed already
        del self._windows[key]
        if window.count:
            self._logger.log(
                window.level,
                "%s (and %d more like it in the last %g s)",
                window.latest,
                window.count,
                self._interval,
            )
            self._open(key, self._clock())  # while they go on, one count an interval


class JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(level: str, style: str) -> None:
    """Send the collector's and aiohttp's logs to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(BoundedLines())
    formatter: logging.Formatter = (
        JsonLines() if style == "json" else logging.Formatter(TEXT_FORMAT)
    )
    if style == "json":
        formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Gives each request an id (the client's X-Request-ID when it is sane), logs it and
    answers it, so that a line in the log can be found from a response and back."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if _SAFE_ID.fullmatch(given) else f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
    token = REQUEST_ID.set(request_id)
    lines = _LINES.set([0])
    try:
        response = await handler(request)
    except web.HTTPException as error:
        error.headers["X-Request-ID"] = request_id
        raise
    finally:
        REQUEST_ID.reset(token)
        _LINES.reset(lines)
    response.headers["X-Request-ID"] = request_id
    return response


def counted(number: int, noun: str) -> str:
    """A count with its noun, singular for one: `1 event`, `2 events` (nouns here take -s)."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"
