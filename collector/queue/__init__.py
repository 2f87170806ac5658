"""Queue: durable storage of accepted events until Outbound has them.

`base` is the interface the app, the relay and the tools use; `sqlite` is the embedded
implementation (one file in the data directory).
"""

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
from .sqlite import SQLiteQueue

__all__ = [
    "Claimed",
    "DeadLetterFilter",
    "Queue",
    "QueueDamaged",
    "QueueFull",
    "QueueLocked",
    "QueueRefused",
    "QueueStats",
    "QueueUnavailable",
    "SQLiteQueue",
    "client_key",
    "dedupe_key",
    "share_key",
    "user_key",
]
