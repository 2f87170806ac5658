"""Queue: durable storage of accepted events until Outbound has them.

`base` is the interface the app, the relay and the tools use; `sqlite` is the embedded
implementation (one file in the data directory), `redis_streams` the shared one (Redis
Streams, for several collectors). `open_queue` picks one from the settings.
"""

from collections.abc import Callable
from typing import Any

from ..config import Settings
from .base import (
    Claimed,
    DeadLetterFilter,
    Queue,
    QueueDamaged,
    QueueFull,
    QueueLocked,
    QueueRefused,
    QueueStats,
    QueueUnavailable,
    client_key,
    dedupe_key,
    share_key,
    user_key,
)
from .redis_streams import RedisQueue
from .sqlite import SQLiteQueue

QUEUE_FILE = "queue.sqlite3"  # in data_dir, when queue_url is unset


def make_queue(
    settings: Settings,
    *,
    owner: bool = True,
    on_dropped: Callable[[int], object] = lambda count: None,
) -> SQLiteQueue | RedisQueue:
    """The queue the settings name (SQLite in data_dir unless queue_url is set), not opened.
    `owner=False`: for a tool, which neither relays nor holds the SQLite file's lock."""
    # What both queues take alike: the bounds, the dedupe window and dead letters' retention.
    common: dict[str, Any] = {
        "dedupe_window": settings.dedupe_window,
        "max_events": settings.queue_max_events,
        "max_bytes": settings.queue_max_bytes,
        "share_per_ip": settings.queue_share_per_ip,
        "browser_share": settings.queue_browser_share,
        "ipv6_prefix": settings.ipv6_bucket_prefix,
        "dead_letters_max": settings.dead_letters_max,
        "dead_letter_days": settings.dead_letter_days,
        "on_dropped": on_dropped,
        "owner": owner,
    }
    if settings.queue_url is not None:
        return RedisQueue(
            settings.queue_url.reveal(),
            prefix=settings.redis_prefix,
            partitions=settings.redis_partitions,
            lease=settings.redis_lease,
            durability=settings.durability,
            **common,
        )
    return SQLiteQueue(settings.data_dir / QUEUE_FILE, synchronous=settings.durability, **common)


async def open_queue(
    settings: Settings,
    *,
    owner: bool = True,
    on_dropped: Callable[[int], object] = lambda count: None,
) -> SQLiteQueue | RedisQueue:
    """`make_queue`, opened: QueueRefused when it cannot be used as it is."""
    queue = make_queue(settings, owner=owner, on_dropped=on_dropped)
    await queue.open()
    return queue


__all__ = [
    "QUEUE_FILE",
    "Claimed",
    "DeadLetterFilter",
    "Queue",
    "QueueDamaged",
    "QueueFull",
    "QueueLocked",
    "QueueRefused",
    "QueueStats",
    "QueueUnavailable",
    "RedisQueue",
    "SQLiteQueue",
    "client_key",
    "dedupe_key",
    "make_queue",
    "open_queue",
    "share_key",
    "user_key",
]
