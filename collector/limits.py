"""Limits: token buckets per client IP and per user, all-or-nothing for a request."""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import OrderedDict
from collections.abc import Mapping


def refill(tokens: float, elapsed: float, *, rate: float, burst: float) -> float:
    """A bucket's tokens after `elapsed` seconds: `rate` more a second, never above `burst`."""
    return min(burst, tokens + max(0.0, elapsed) * rate)


def wait_for(tokens: float, cost: float, *, rate: float) -> float:
    """Seconds until a bucket holding `tokens` can pay `cost`; 0 when it can now."""
    return 0.0 if tokens >= cost else (cost - tokens) / rate


class RateLimiter:
    """Token buckets by key (a client IP, a user id), holding at most `max_keys` of them.

    A bucket forgotten for want of room starts full again, which errs towards letting
    events through rather than refusing them.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return refill(tokens, now - at, rate=self.rate, burst=self.burst)

    def wait(self, costs: Mapping[str, float], now: float) -> float:
        """Seconds until every key can pay its cost; 0 when all can now. Takes nothing."""
        if not self.rate:
            return 0.0
        return max(
            (
                wait_for(self._tokens(key, now), min(cost, self.burst), rate=self.rate)
                for key, cost in costs.items()
            ),
            default=0.0,
        )

    def charge(self, key: str, cost: float, now: float) -> float:
        """Take `cost` from one bucket when it can pay now, and return 0; otherwise take
        nothing and return the seconds to wait (so that the retry is not charged twice)."""
        wait = self.wait({key: cost}, now)
        if not wait:
            self.take({key: cost}, now)
        return wait

    def take(self, costs: Mapping[str, float], now: float) -> None:
        """Take each key's cost from its bucket, which may go below zero."""
        if not self.rate:
            return
        for key, cost in costs.items():
            self._buckets[key] = (self._tokens(key, now) - cost, now)
            self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)


def request_cost(events: int, size: int, bytes_per_event: int) -> float:
    """What a request costs the sender's IP bucket: one token per event received, or one per
    `bytes_per_event` bytes of body when that is more; never nothing, even for a body that
    held no event at all, so that bytes the server had to read are paid for."""
    return max(1.0, float(events), size / bytes_per_event)


@functools.lru_cache(maxsize=4096)  # parsed once an address, not once a request
def ip_bucket(address: str | None, ipv6_prefix: int) -> str:
    """The bucket key of a client address: IPv4 whole, IPv6 by its first `ipv6_prefix` bits
    (one subscriber commonly holds a whole /64), without a scope id (`fe80::1%eth0`)."""
    if address is None:
        return "unknown"
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv4Address):
        return str(parsed)
    if parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    network = ipaddress.IPv6Network((int(parsed), ipv6_prefix), strict=False)
    return str(network) if ipv6_prefix < 128 else str(parsed)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
