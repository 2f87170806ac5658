"""Deadline: close connections whose request headers trickle in (slow clients, slowloris),
and connections beyond a cap per client address.

aiohttp has no header timeout, so each connection's protocol is wrapped: from the moment the
connection is accepted, and again from the first byte of each later request, its headers
must be complete within the deadline (a connection that says nothing is closed). Bodies are
timed by the handler (body_timeout) and idle connections between requests by aiohttp
(keepalive_timeout).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from .config import IPNetwork

log = logging.getLogger("collector.deadline")

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)[ \t]*\r\n", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_END = b"\r\n\r\n"
_MAX_HEADER_BYTES = 64 * 1024


class ConnectionCap:
    """Open connections per client address, at most `limit` each; trusted proxies (whose
    connections carry everyone's requests) are not capped. Refusals are logged at most
    once a minute, with how many there were."""

    def __init__(self, limit: int, exempt: Iterable[IPNetwork] = ()) -> None:
        self.limit = limit
        self._exempt = tuple(exempt)
        self._open: Counter[str] = Counter()
        self._refused = 0
        self._logged_at = float("-inf")

    def admit(self, address: str | None) -> bool:
        """Count a new connection from `address`; False (counting nothing) when at the cap."""
        if address is None or self._is_exempt(address):
            return True
        if self._open[address] >= self.limit:
            self._refused += 1
            now = time.monotonic()
            if now - self._logged_at >= 60:
                log.warning(
                    "closed %d connections over the cap of %d from one address (last: %s)",
                    self._refused,
                    self.limit,
                    address,
                )
                self._refused, self._logged_at = 0, now
            return False
        self._open[address] += 1
        return True

    def release(self, address: str | None) -> None:
        if address is not None and address in self._open:
            self._open[address] -= 1
            if not self._open[address]:
                del self._open[address]

    def open_from(self, address: str) -> int:
        return self._open[address]

    def _is_exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self._exempt)


# What accept() fails with when the process or the machine runs out of descriptors or memory.
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class AcceptFailures:
    """A loop exception handler: a failed accept (out of descriptors) is logged once a
    minute as one line with the count, not once a try with a traceback; everything else
    goes to the handler that was there before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 60.0) -> None:
        self._loop = loop
        self._before = loop.get_exception_handler()
        self._interval = interval
        self._count = 0
        self._logged_at = float("-inf")
        loop.set_exception_handler(self)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in ACCEPT_ERRNOS:
            self._count += 1
            now = time.monotonic()
            if now - self._logged_at >= self._interval:
                log.error(
                    "cannot accept connections: %s (%d times since the last such line); "
                    "raise LimitNOFILE or lower connections_per_ip",
                    error.strerror,
                    self._count,
                )
                self._count, self._logged_at = 0, now
            return
        if self._before is not None:
            self._before(loop, context)
        else:
            loop.default_exception_handler(context)


class HeaderDeadline(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol, watching only where headers start and end."""

    def __init__(
        self, inner: asyncio.Protocol, seconds: float, cap: ConnectionCap | None = None
    ) -> None:
        self._inner = inner
        self._seconds = seconds
        self._cap = cap
        self._peer: str | None = None
        self._admitted = False
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._headers = b""  # the request head seen so far, while in one
        self._body_left = 0  # bytes of the current body still to come
        self._watching = True  # False after a chunked body: its end is not tracked here

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else None
        if self._cap is not None and not self._cap.admit(self._peer):
            transport.close()  # aiohttp never sees it: nothing was read, nothing to answer
            return
        self._admitted = True
        self._inner.connection_made(transport)
        self._arm()  # from accept: a connection that sends nothing is closed too

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
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
        return self._inner.eof_received() if self._admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self._admitted:
            return
        if self._cap is not None:
            self._cap.release(self._peer)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._admitted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self._inner.resume_writing()


def with_header_deadline(
    factory: Callable[[], asyncio.Protocol], seconds: float, cap: ConnectionCap | None = None
) -> Callable[[], asyncio.Protocol]:
    """A protocol factory for `loop.create_server` that adds the header deadline (and the
    cap on connections per address, when given)."""
    return lambda: HeaderDeadline(factory(), seconds, cap)
