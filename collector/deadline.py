"""Deadline: close connections whose request headers trickle in (slow clients, slowloris).

aiohttp has no header timeout, so each connection's protocol is wrapped: from the first
byte of a request, its headers must be complete within the deadline. Bodies are timed by
the handler (body_timeout) and idle connections by aiohttp (keepalive_timeout).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_END = b"\r\n\r\n"
_MAX_HEADER_BYTES = 64 * 1024


class HeaderDeadline(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol, watching only where headers start and end."""

    def __init__(self, inner: asyncio.Protocol, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._headers = b""  # the request head seen so far, while in one
        self._body_left = 0  # bytes of the current body still to come
        self._watching = True  # False after a chunked body: its end is not tracked here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._watching:
            self._watch(data)
        self._inner.data_received(data)

    def _watch(self, data: bytes) -> None:
        while data and self._watching:
            if self._body_left:
                taken = min(self._body_left, len(data))
                self._body_left -= taken
                data = data[taken:]
                continue
            seen = self._headers + data if self._headers else data
            end = seen.find(_END)
            if end < 0:
                if self._timer is None:  # a head that came whole needs no timer at all
                    self._arm()
                self._headers = seen[-_MAX_HEADER_BYTES:]
                return
            head, data = seen[: end + len(_END)], seen[end + len(_END) :]
            self._headers = b""
            self._disarm()
            if _CHUNKED.search(head):
                self._watching = False
            elif match := _CONTENT_LENGTH.search(head):
                self._body_left = int(match.group(1))

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def with_header_deadline(
    factory: Callable[[], asyncio.Protocol], seconds: float
) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for `loop.create_server` that adds the header deadline."""
    return lambda: HeaderDeadline(factory(), seconds)
