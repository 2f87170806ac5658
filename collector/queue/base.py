"""The queue's interface: what the app, the relay and the tools need from any queue."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..enrich import Record
from ..limits import ip_bucket
from ..logs import Repeats, counted


@dataclass(frozen=True, slots=True)
class Claimed:
    """An event reserved for one delivery attempt."""

    id: int
    record: Record
    attempts: int
    received_at: float
    identified: bool = False  # Outbound has had an identify for this user (kept across restarts)


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int
    oldest_received_at: float | None  # of the event first in line
    dead_letters: int


class QueueUnavailable(Exception):
    """The queue could not commit; nothing of the failed operation was stored."""


class QueueFull(QueueUnavailable):
    """The queue holds as many events or bytes as it may (for this sender); nothing was stored.

    `limit` names the setting that refused: queue_max_events, queue_max_bytes (on disk),
    queue_browser_share (the room kept for server tokens) or queue_share_per_ip.
    """

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class QueueRefused(Exception):
    """The queue file cannot be opened as it is: one line naming the file and what is wrong."""


class QueueDamaged(QueueRefused):
    """The queue file (or its log) is empty, truncated, foreign, unreadable or corrupt."""


class QueueLocked(QueueRefused):
    """Another process serves from this queue file."""


class Queue(Protocol):
    """What the app and the relay need from a queue; SQLite is the embedded implementation.

    `put` returns only after the records are durable, and stores a message id seen
    within the dedupe window only once. `claim` hands out each user's line from its oldest
    waiting event (`depth` events of it at most), so events of one user are delivered in
    order, and leases them until each is acked, retried, released or dead-lettered (or the
    lease runs out). Due lines go in the order they became due. Its cost depends on `limit`, not on
    how many events wait, nor on how many lines are leased or in backoff.
    """

    depth: int  # events waiting, as the queue last counted them (no I/O to read it)

    async def put(self, records: Sequence[Record]) -> int:
        """Store the records; returns how many were duplicates of recent message ids."""

    async def claim(self, limit: int, *, now: float, lease: float, depth: int = 1) -> list[Claimed]:
        """Lease up to `limit` due lines, oldest due first: each line's events from its head,
        `depth` at most, in the line's order (a user's events follow each other).

        After a process that owned the queue died, a line's next claim goes no further than
        its last event that process still held leased (leased and not retried, released,
        acked or dead-lettered, whether or not the lease had run out): the calls whose
        answers were lost go again as the same events, under the same X-Outbound-GUID.
        """

    async def ack(self, event_id: int, *, identified: bool = False) -> None:
        """Remove a delivered event; `identified`: its user's identify went through, which
        later claims of that user's events say (also after a restart)."""

    async def ack_all(self, acked: Sequence[tuple[int, bool]]) -> None:
        """`ack` for each (event id, identified), in one commit."""

    async def retry(self, event_id: int, *, available_at: float, error: str) -> None: ...

    async def release(self, event_id: int) -> None: ...

    async def reset_backoff(self, now: float) -> None:
        """Make every line due now (Outbound is back): its head's backoff goes.

        An event behind the head keeps its own (only a batch that failed gives it one); a
        claim several deep takes it with its head, whatever its backoff, as the same batch.
        """

    async def dead_letter(
        self, event_id: int, *, reason: str, status: int | None, response: str, now: float
    ) -> None: ...

    async def stats(self) -> QueueStats: ...

    async def probe(self, now: float) -> bool:
        """Try a real write of a realistic size; True when the queue can store events again."""

    async def note(self, key: str, value: object) -> None:
        """Keep a small fact (like the relay's state) for tools that read the data directory."""

    @property
    def healthy(self) -> bool: ...

    @property
    def damaged(self) -> str | None:
        """What is wrong when the queue found its storage corrupt (it then refuses puts)."""


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operation concerns; every given criterion must hold."""

    ids: tuple[int, ...] = ()
    reason: str | None = None  # a part of the reason, like "400" or "still failing"
    status: int | None = None
    event: str | None = None

    @property
    def empty(self) -> bool:
        return self == DeadLetterFilter()


def dedupe_key(record: Record) -> str:
    """What a resend is known by: the key ingest scoped to its sender (identity.stamp_ids),
    else the message id (records of other writers, and server tokens' events)."""
    return str(record.get("dedupe_key") or record["message_id"])


@functools.lru_cache(maxsize=4096)
def client_key(ip: str | None, browser: bool, ipv6_prefix: int) -> str | None:
    """The client a queued event counts against for its share: a browser's IP as stored,
    in the rate limits' bucket (limits.ip_bucket); None for a server token's event."""
    return ip_bucket(ip, ipv6_prefix) if browser else None


def share_key(record: Record, ipv6_prefix: int) -> str | None:
    """`client_key` of a record: browsers' records carry a dedupe_key (identity.stamp_ids)."""
    return client_key(record.get("ip"), "dedupe_key" in record, ipv6_prefix)


def one_sender(records: Sequence[Record]) -> bool:
    """Whether `share_key` is the same for all the records (it is for a request's)."""
    if not records:
        return True
    first = records[0]
    ip, browser = first.get("ip"), "dedupe_key" in first
    for record in records:
        if record.get("ip") != ip or ("dedupe_key" in record) is not browser:
            return False
    return True


def user_key(record: Record) -> str:
    return str(record.get("user_id") or record.get("anonymous_id") or "")


class DroppedLetters:
    """Counts the dead letters retention drops (dead_letter_days, dead_letters_max) and says
    so in the log: the first line of each kind, then a count per minute (logs.Repeats)."""

    def __init__(
        self,
        log: logging.Logger,
        on_dropped: Callable[[int], object],
        *,
        days: float,
        kept: int,
    ) -> None:
        self.count = 0
        self._on_dropped = on_dropped
        self._repeats = Repeats(log)
        self._days = days
        self._kept = kept

    def dropped(self, expired: int, over: int) -> None:
        """Count and log `expired` letters past their retention and `over` past the cap."""
        if expired:
            days = f"{self._days:g} day" + ("" if self._days == 1 else "s")
            self._drop(expired, "expired", f"older than {days} (dead_letter_days)")
        if over:
            kept = self._kept
            self._drop(over, "over", f"the oldest: {kept} are kept at most (dead_letters_max)")

    def _drop(self, count: int, key: str, why: str) -> None:
        self.count += count
        self._on_dropped(count)
        dropped = counted(count, "dead letter")
        self._repeats.log(logging.WARNING, key, "dropped %s, %s", dropped, why)
