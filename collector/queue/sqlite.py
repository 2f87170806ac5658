"""The embedded queue: accepted events in one SQLite file until Outbound has them (group commit)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from ..enrich import Record
from ..logs import Repeats, counted
from ..outbound import LEGACY_ANONYMOUS_PREFIX, anonymous
from .base import (
    Claimed,
    DeadLetterFilter,
    DroppedLetters,
    QueueDamaged,
    QueueFull,
    QueueLocked,
    QueueRefused,
    QueueStats,
    QueueUnavailable,
    client_key,
    dedupe_key,
    one_sender,
    share_key,
    user_key,
)

log = logging.getLogger("collector.queue")
T = TypeVar("T")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    user_key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    available_at REAL NOT NULL,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_key, id);
-- The leased events (a claim may lease a line several events deep): voiding the leases of
-- a process that died reads these few rows, not the backlog.
CREATE INDEX IF NOT EXISTS events_leased ON events (lease_until) WHERE lease_until > 0;
CREATE TABLE IF NOT EXISTS received (
    message_id TEXT PRIMARY KEY,
    received_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS received_by_time ON received (received_at);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
-- The head of each user's line (its oldest event), and when it may be claimed: the later
-- of its event's available_at (backoff) and lease_until. Kept in the same transactions as
-- the events, so that "the due heads" is one range of heads_by_due, whatever the backlog.
CREATE TABLE IF NOT EXISTS heads (
    user_key TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL,
    due_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS heads_by_due ON heads (due_at, event_id);
-- Users Outbound has had an identify for, so that a restart does not identify them again.
CREATE TABLE IF NOT EXISTS identified (user_key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    user_key TEXT NOT NULL,
    received_at REAL NOT NULL,
    failed_at REAL NOT NULL,
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER,
    response TEXT NOT NULL,
    body BLOB NOT NULL
);
-- Retention drops dead letters by age: a range of this index, not a scan of them all.
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (failed_at);
"""

# Schema versions (PRAGMA user_version): 0 had no heads table; 1 has it; 2 has no record
# left from before the anonymous namespace (see `_into_the_namespace`).
SCHEMA_VERSION = 2
# Every line whose head is due, in the order they became due: a range of heads_by_due, so
# a claim reads `limit` heads and their events, never the events waiting behind them.
_CLAIM = """
SELECT h.user_key, e.id, e.body, e.attempts, e.received_at,
    EXISTS (SELECT 1 FROM identified AS i WHERE i.user_key = h.user_key)
FROM heads AS h JOIN events AS e ON e.id = h.event_id
WHERE h.due_at <= :now ORDER BY h.due_at, h.event_id LIMIT :limit
"""
# The events behind a claimed head, in the line's order, up to an id (a range of
# events_by_user).
_BEHIND = (
    "SELECT id, body, attempts, received_at FROM events WHERE user_key = ? AND id > ?"
    " AND id <= ? ORDER BY id LIMIT ?"
)
_LAST_ID = (1 << 63) - 1
# The last event of each line that a process which died had leased (events_leased): a claim
# writes its lease on the head and the last event it took of each line (see claim).
_LEASED_LINES = (
    "SELECT user_key, MAX(id) AS last FROM events WHERE lease_until > 0 GROUP BY user_key"
)
# How many events those lines hold up to their last leased one.
_INTERRUPTED = (
    f"SELECT COUNT(*) FROM events AS e JOIN ({_LEASED_LINES}) AS leased"
    " ON e.user_key = leased.user_key AND e.id <= leased.last"
)
# The head of one user's line as the events table has it (none when the line is empty).
_HEAD_OF = (
    "INSERT INTO heads (user_key, event_id, due_at)"
    " SELECT user_key, id, MAX(available_at, lease_until) FROM events"
    " WHERE user_key = ? ORDER BY id LIMIT 1"
)
# Heads for lines that had none, from events stored after `id`: SQLite takes the bare
# column `available_at` from the row with the MIN(id) (its documented min/max rule). NOT
# INDEXED keeps it to the new rows (a rowid range): grouping along events_by_user instead
# would read the whole backlog on every put.
_NEW_HEADS = (
    "INSERT OR IGNORE INTO heads (user_key, event_id, due_at)"
    " SELECT user_key, MIN(id), available_at FROM events NOT INDEXED WHERE id > ?"
    " GROUP BY user_key"
)
# The same, for the `?` events the put just inserted: SQLite gives a new row the rowid one past
# the largest, so theirs follow each other up to last_insert_rowid().
_NEW_HEADS_OF_THE_LAST = _NEW_HEADS.replace("id > ?", "id > last_insert_rowid() - ?")
# Records queued before anonymous ids had a namespace: an anonymous id, no mark (a rowid
# range from `id`, so that the migration reads the table once, in chunks).
_BEFORE_THE_NAMESPACE = (
    "SELECT id, user_key, body FROM {table} WHERE id > ?"
    " AND json_extract(CAST(body AS TEXT), '$.anonymous_id') IS NOT NULL"
    " AND json_type(CAST(body AS TEXT), '$.anonymous_prefix') IS NULL ORDER BY id LIMIT ?"
)
# Building the heads of a file made before there was a heads table.
_ALL_HEADS = """
INSERT INTO heads (user_key, event_id, due_at)
SELECT e.user_key, e.id, MAX(e.available_at, e.lease_until) FROM events AS e
WHERE e.id = (SELECT MIN(id) FROM events WHERE user_key = e.user_key)
"""


_INSERT_EVENT = (
    "INSERT INTO events (user_key, message_id, received_at, available_at, body)"
    " VALUES (?1, ?2, ?3, ?3, ?4)"
)
_REMEMBER = "INSERT OR IGNORE INTO received (message_id, received_at) VALUES (?, ?)"
BUSY_TIMEOUT = 5.0  # seconds to wait for another connection's write lock
LOCK_POLL = 0.001  # seconds between tries while a connection that does not say when holds it
# The least a probe writes: a full batch of the script (under its 64 KiB keepalive quota).
PROBE_BYTES = 64 * 1024
_ID_CHUNK = 500  # message ids looked up per statement, well below SQLite's variable limit
# user, message id, received_at, body, dedupe key, client (share_key)
Row = tuple[str, str, float, bytes, str, str | None]
# What rows add to each client's share (share_key): [events, bytes]. A request has one
# sender, so a put from ingest has one entry, or none (a server token's).
Shares = dict[str, list[int]]
# What a commit may add to the log at most, counted so that the log's file is measured only
# when the commits since its last measure may have filled the room it had: several times
# what they write (a put of one event about 7 pages, of 20 events about 36; test_wal_bound),
# plus the bodies stored.
LOG_PAGES_A_COMMIT = 16
LOG_PAGES_A_CHANGE = 8  # a row inserted, updated or deleted (connection.total_changes)
DISK_CHECK_INTERVAL = 1.0  # seconds between measures of the queue's files (not one a put)
RETENTION_INTERVAL = 60.0  # seconds between drops of dead letters past their retention
# A record's client for the per-IP share: its IP as stored, and whether a browser sent it.
_SENDER = (
    "json_extract(CAST(body AS TEXT), '$.ip'),"
    " json_extract(CAST(body AS TEXT), '$.dedupe_key') IS NOT NULL"
)


SQLITE_MAGIC = b"SQLite format 3\x00"
WAL_MAGICS = (0x377F0682, 0x377F0683)


def check_file(path: Path) -> None:
    """Refuse, before SQLite opens it, a queue file that is not a whole SQLite database, or
    a log beside it that cannot be its own; a missing file is fine (it is created)."""
    try:
        with path.open("rb") as file:
            header = file.read(100)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return
    except OSError as error:
        raise QueueDamaged(f"{path}: cannot be read ({error.strerror})") from None
    if size == 0:
        raise QueueDamaged(f"{path}: is empty (0 bytes), not a queue; move it away to start anew")
    if len(header) < 100 or not header.startswith(SQLITE_MAGIC):
        raise QueueDamaged(f"{path}: is not a SQLite database")
    (page_size,) = struct.unpack(">H", header[16:18])
    page_size = 65536 if page_size == 1 else page_size
    changes, pages = struct.unpack(">II", header[24:32])
    (valid_for,) = struct.unpack(">I", header[92:96])
    if valid_for == changes and size < pages * page_size:
        raise QueueDamaged(
            f"{path}: is truncated ({size} bytes; its header says {pages * page_size})"
        )
    wal = path.with_name(path.name + "-wal")
    try:
        with wal.open("rb") as file:
            wal_header = file.read(32)
    except FileNotFoundError:
        return
    except OSError as error:
        raise QueueDamaged(f"{wal}: cannot be read ({error.strerror})") from None
    if not wal_header:
        return  # an empty log: nothing to apply
    magic, _, wal_page_size = (
        struct.unpack(">III", wal_header[:12]) if len(wal_header) >= 12 else (0, 0, 0)
    )
    if magic not in WAL_MAGICS or wal_page_size != page_size:
        raise QueueDamaged(
            f"{wal}: is not the log of {path.name} (a log from another database or a copy);"
            " move it away only if the queue file is whole without it"
        )


def check_integrity(connection: sqlite3.Connection, path: Path) -> None:
    """Refuse a database that SQLite finds damaged (PRAGMA quick_check)."""
    rows = connection.execute("PRAGMA quick_check(1)").fetchall()
    if rows != [("ok",)]:
        said = " ".join(str(rows[0][0]).split()) if rows else "no answer"  # one line
        raise QueueDamaged(f"{path}: is damaged ({said})")


def damage(error: BaseException) -> bool:
    """Whether an SQLite error says the file is corrupt or not a database."""
    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
    return code in {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def log_bytes(frames: int, page_size: int = 4096) -> int:
    """The size of a write-ahead log file of `frames` pages: a header, then a header a page."""
    return 32 + frames * (24 + page_size)


Operation = Callable[[sqlite3.Connection], Any]


def shares_of(rows: Iterable[Row]) -> Shares:
    """What `rows` add to each client's share (a server token's rows: nothing)."""
    shares: Shares = {}
    for row in rows:
        if row[5] is not None:
            counts = shares.setdefault(row[5], [0, 0])
            counts[0] += 1
            counts[1] += len(row[3])
    return shares


PendingPut = tuple[list[Row], int, Shares, "asyncio.Future[int]"]
Acked = tuple[int, bool]  # an event id, and whether its user's identify went through
LeasedEvent = tuple[str, int, str | None]  # its line, its body's size, its client (share_key)
Progress = Callable[[int], None]
_LETTER_KEYS = ("id", "message_id", "reason", "status", "response", "attempts", "failed_at")


class Checkpointer:
    """Copies SQLite's write-ahead log into the database file on a thread of its own, so
    that the event loop, which commits, does not wait for that copy and its fsync.

    A passive checkpoint never holds up a commit, but under steady load it leaves the
    newest commits in the log, which would only grow. Past `restart_frames` pages, a
    restart checkpoint takes a gap between commits to copy the little that is left, and
    the next commit writes the log from its start again (meanwhile, commits wait without
    stopping the event loop, and `released` tells them the moment the restart is over).
    Under ingest that leaves no gap, the queue holds its commits once the log is past its
    bound and asks for a restart at once (`restart_soon`): the restart then finds its gap,
    and `released` lets the commits go.
    """

    def __init__(
        self,
        path: Path,
        *,
        interval: float,
        restart_frames: int,
        commits: Callable[[], int],
        released: Callable[[], object] = lambda: None,
    ) -> None:
        self._path = path
        self._interval = interval
        self._restart_frames = restart_frames
        self._commits = commits  # the committer's count: nothing new, nothing to copy
        self._released = released  # called on this thread once a restart lets go of the lock
        self._stopping = threading.Event()
        self._wake = threading.Event()  # the interval is over early: stopping, or restart_soon
        self._wanted = threading.Event()  # commits are held until the next restart
        self._thread = threading.Thread(target=self._run, name="queue-checkpoint", daemon=True)
        self.checkpoints = 0
        self.restarts = 0  # restarts that went through: the next commit writes the log anew
        self.frames = 0  # the log's length in pages at the last checkpoint (0 after a restart)
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join()

    def restart_soon(self) -> None:
        """Restart the log now rather than at the next interval; `released` says when it is over."""
        self._wanted.set()
        self._wake.set()

    def _run(self) -> None:
        connection = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            # No waiting in SQLite: a restart that finds a commit under way is a passive
            # checkpoint, tried again at the next interval; commits that wait for a restart
            # leave the lock free for it.
            connection.execute("PRAGMA busy_timeout=0")
            done = None  # the committer's count when a checkpoint last went through
            while True:
                self._wake.wait(self._interval)
                self._wake.clear()
                if self._stopping.is_set():
                    break
                wanted = self._wanted.is_set()
                self._wanted.clear()
                commits = self._commits()
                if commits == done and not wanted:
                    continue  # nothing new in the log since
                try:
                    self.checkpoint(connection, restart=wanted)
                except sqlite3.Error as error:  # a full disk, say: the log waits for the next
                    self.last_error = f"{type(error).__name__}: {error}"
                else:
                    done = commits
        finally:
            connection.close()

    def checkpoint(self, connection: sqlite3.Connection, *, restart: bool = False) -> None:
        """A passive checkpoint, then a restart when the log is past `restart_frames` pages
        or `restart` asks for one; `released` is called after every restart tried."""
        tried = restart
        try:
            _, frames, _ = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames >= 0:  # -1: another connection was checkpointing
                self.frames = frames
            if restart or frames >= self._restart_frames:
                tried = True
                busy, _, _ = connection.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                if not busy:
                    self.restarts += 1
                    self.frames = 0
        finally:
            if tried:  # also when it failed: held commits go on, and try again if need be
                self._released()
        self.checkpoints += 1
        self.last_error = None


def dead_letter_where(which: DeadLetterFilter) -> tuple[str, list[Any]]:
    """The WHERE clause and parameters that select the dead letters `which` names."""
    clauses: list[str] = ["1"]
    params: list[Any] = []
    if which.ids:
        clauses.append(f"id IN ({','.join('?' * len(which.ids))})")
        params.extend(which.ids)
    if which.reason is not None:
        clauses.append("instr(reason, ?) > 0")
        params.append(which.reason)
    if which.status is not None:
        clauses.append("status = ?")
        params.append(which.status)
    if which.event is not None:
        clauses.append("json_extract(CAST(body AS TEXT), '$.event') = ?")
        params.append(which.event)
    return " AND ".join(clauses), params


class SQLiteQueue:
    """The queue in one SQLite file (WAL); operations run one after another, in group commits.

    Operations that arrive while a commit is running wait and share the next one, so
    many concurrent requests cost one commit rather than one each. With synchronous=NORMAL
    a commit only writes to the log, in microseconds: it runs on the event loop, since
    handing it to a thread and back costs more than the commit. With FULL each commit waits
    for the disk, so commits run on a thread of their own while the loop goes on.
    """

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "normal",
        dedupe_window: float = 3600.0,
        max_events: int = 2_000_000,
        max_bytes: int = 1 << 30,
        owner: bool = True,
        checkpoint_interval: float = 0.02,
        wal_frames_limit: int = 1000,
        share_per_ip: float = 1.0,
        browser_share: float = 1.0,
        ipv6_prefix: int = 64,
        dead_letters_max: int = 0,
        dead_letter_days: float = 0.0,
        on_dropped: Callable[[int], object] = lambda count: None,
    ) -> None:
        self.path = path
        self._checkpoint_interval = checkpoint_interval
        # SQLite's log: restarted past half of wal_frames_limit pages, brought back to that
        # many after a restart (journal_size_limit), and commits held past twice as many.
        self._wal_frames_limit = wal_frames_limit
        self._wal_path = path.with_name(path.name + "-wal")
        self._wal_hold_bytes = log_bytes(2 * wal_frames_limit)  # page size: see _prepare
        self._owner = owner
        self._max_events = max_events
        self._max_bytes = max_bytes
        self.depth = 0  # events waiting, kept by the writer thread
        self.bytes = 0
        self.interrupted = 0  # events whose delivery a previous process did not finish
        # Per line, the last event the process before had claimed, while it is not claimed
        # again: that claim goes no further (see _prepare).
        self._redo: dict[str, int] = {}
        # What a claim read of each event it leased and an ack needs (its line, its body's
        # size, its client for the share), so that the ack's DELETE returns only the ids
        # rather than the bodies; an entry goes with the event's outcome (see _delete).
        self._leased: dict[int, LeasedEvent] = {}
        # Per line claimed several events deep, the last event claimed and the lease: the
        # claim writes the lease on the line's head and that last event only, and the events
        # between have it here rather than in their rows (see claim and _follow_leases).
        self._ranges: dict[str, tuple[int, float]] = {}
        self._counted_at = 0.0  # when depth and bytes were last counted from the table
        # Dead letters, kept like depth: counted at open, then in the transactions that add
        # or remove them, and recounted when another process (`dead-letters`) changed them.
        self.dead_count = 0
        self._dead_counted_at = 0.0
        # No browser client may hold more than its share of the bounds, and browsers
        # together leave a reserve for server tokens: events and body bytes per client
        # (share_key), kept in memory like depth and counted from the records at open.
        self._share_per_ip = share_per_ip
        self._browser_share = browser_share
        self._ipv6_prefix = ipv6_prefix
        self.clients: dict[str, tuple[int, int]] = {}
        self.browser_events = 0
        self.browser_bytes = 0
        self._undo: list[tuple[str, int, int]] = []  # this transaction's share changes
        # The bytes bound is on what the files hold, measured at most once a DISK_CHECK_INTERVAL
        # and grown by what was stored in between.
        self.disk_bytes = 0
        self._disk_measured_at = -DISK_CHECK_INTERVAL
        self._dead_letters_max = dead_letters_max  # 0: no cap
        self._dead_letter_days = dead_letter_days  # 0: kept until purged
        self._retained_at = 0.0
        self._drops = DroppedLetters(log, on_dropped, days=dead_letter_days, kept=dead_letters_max)
        self._synchronous = synchronous.upper()
        self._dedupe_window = dedupe_window
        self._pruned_at = 0.0
        # What waits for the next group commit, each with its future last.
        self._pending: list[tuple[Operation, bool, asyncio.Future[Any]]] = []
        self._puts: list[PendingPut] = []
        self._acks: list[tuple[int, bool, asyncio.Future[None]]] = []
        self._work = asyncio.Event()
        self._lock_free = asyncio.Event()  # set by the checkpointer when a restart is over
        self._executor: ThreadPoolExecutor | None = None
        self._connection: sqlite3.Connection | None = None
        self._checkpointer: Checkpointer | None = None
        self._writer: asyncio.Task[None] | None = None
        self._healthy = True  # the last commit that stored something went through
        self._failed_bytes = 0  # what the puts of the last failed commit held
        self._lock_descriptor: int | None = None
        self.damaged: str | None = None  # what SQLite said when it found the file corrupt
        self.commits = 0
        self.log_holds = 0  # commits held until a restart because the log was past its bound
        # What the log may still grow by before it can be past that bound: the room left at
        # its last measure, less what each commit since may have written (0: measure it).
        self._log_room = 0
        self.stored = 0
        self.duplicates = 0
        self.last_error: str | None = None
        self._refusals = Repeats(log)

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def open(self) -> None:
        """Open (and create) the queue; QueueRefused when the file cannot be used as it is."""
        if self._owner:
            self._lock()
        try:
            await self._open()
        except QueueRefused:
            self._unlock()
            raise
        except sqlite3.DatabaseError as error:
            self._unlock()
            raise QueueDamaged(f"{self.path}: {error}") from None

    def _lock(self) -> None:
        """One owner a queue file: a second `serve` would void the first's leases and count
        depths wrong. The lock goes with the process, however it ends."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 32).decode(errors="replace").strip() or "?"
            os.close(descriptor)
            raise QueueLocked(
                f"{self.path}: another collector (pid {holder}) serves from this data"
                " directory; one serve per data directory"
            ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        self._lock_descriptor = descriptor

    def _unlock(self) -> None:
        if self._lock_descriptor is not None:
            os.close(self._lock_descriptor)  # closing lets go of the lock
            self._lock_descriptor = None

    async def _open(self) -> None:
        if self._synchronous == "FULL":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue")
            loop = asyncio.get_running_loop()
            self._connection = await loop.run_in_executor(self._executor, self._connect)
        else:
            self._connection = self._connect()
            self._connection.execute(f"PRAGMA wal_autocheckpoint={self._wal_frames_limit}")
            self._connection.execute("PRAGMA busy_timeout=0")  # _on_the_loop waits instead
            loop = asyncio.get_running_loop()
            self._checkpointer = Checkpointer(
                self.path,
                interval=self._checkpoint_interval,
                restart_frames=self._wal_frames_limit // 2,
                commits=lambda: self.commits,
                released=lambda: loop.call_soon_threadsafe(self._lock_free.set),
            )
            self._checkpointer.start()
        self._writer = asyncio.create_task(self._write_loop(), name="queue-writer")

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_file(self.path)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            return self._prepare(connection)
        except BaseException:
            connection.close()
            raise

    def _prepare(self, connection: sqlite3.Connection) -> sqlite3.Connection:
        check_integrity(connection, self.path)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA synchronous={self._synchronous}")
        connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000:.0f}")
        # The first commit after a restart brings the write-ahead log back to this size
        # rather than leaving it at its largest, which matters on a disk that runs full; and
        # beyond it, the file's size is the log's length, which the commits go by.
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        connection.execute(
            f"PRAGMA journal_size_limit={log_bytes(self._wal_frames_limit, page_size)}"
        )
        self._wal_hold_bytes = log_bytes(2 * self._wal_frames_limit, page_size)
        connection.execute("BEGIN IMMEDIATE")
        try:
            self._migrate(connection)
            if self._owner:
                # This process owns the file: leases held by a process that died are void.
                # Those events may have reached Outbound already; they go again with the
                # same GUID. The next claim of their line goes as far as the one before and
                # no further, so that the relay makes the calls it had made: the same
                # batches, under the same GUIDs, not batches joined by the events that came
                # meanwhile. A claim leases lines from their heads (events_leased).
                self._redo = dict(connection.execute(_LEASED_LINES).fetchall())
                (self.interrupted,) = connection.execute(_INTERRUPTED).fetchone()
                connection.execute("UPDATE events SET lease_until = 0 WHERE lease_until > 0")
                connection.execute(
                    "UPDATE heads SET due_at ="
                    " (SELECT available_at FROM events WHERE id = heads.event_id)"
                )
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._count_events(connection)
        self._count_dead_letters(connection)
        return connection

    def _count_events(self, connection: sqlite3.Connection) -> None:
        """Count the events, and each client's, from the records (at open, after a replay)."""
        self.depth = self.bytes = self.browser_events = self.browser_bytes = 0
        self.clients = {}
        for ip, browser, events, size in connection.execute(
            f"SELECT {_SENDER}, COUNT(*), SUM(LENGTH(body)) FROM events GROUP BY 1, 2"
        ):
            self._counted(events, size)
            self._share(client_key(ip, bool(browser), self._ipv6_prefix), events, size)
        self._undo.clear()
        self._counted_at = time.time()

    def _share(self, key: str | None, events: int, size: int, *, undo: bool = True) -> None:
        """Count events of a client (None: a server token's, which have no share)."""
        if key is None:
            return
        held_events, held_bytes = self.clients.get(key, (0, 0))
        held_events, held_bytes = held_events + events, held_bytes + size
        if held_events > 0:
            self.clients[key] = (held_events, held_bytes)
        else:
            self.clients.pop(key, None)
        self.browser_events += events
        self.browser_bytes += size
        if undo:
            self._undo.append((key, events, size))

    def _undo_shares(self) -> None:
        """Take back the share changes of a transaction that was rolled back."""
        for key, events, size in reversed(self._undo):
            self._share(key, -events, -size, undo=False)
        self._undo.clear()

    def _count_dead_letters(self, connection: sqlite3.Connection) -> None:
        """Count the dead letters from their table (at open, and after another process)."""
        (self.dead_count,) = connection.execute("SELECT COUNT(*) FROM dead_letters").fetchone()
        self._dead_counted_at = time.time()

    @classmethod
    def _migrate(cls, connection: sqlite3.Connection) -> None:
        """Bring a file of any earlier schema to this one, inside the caller's transaction
        (a crash in the middle leaves the file as it was, to be migrated again)."""
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        if version < 1:
            connection.execute("DELETE FROM heads")
            connection.execute(_ALL_HEADS)
        if version < 2:
            cls._into_the_namespace(connection)
        if version < SCHEMA_VERSION:
            connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @classmethod
    def _into_the_namespace(cls, connection: sqlite3.Connection) -> None:
        """Stamp the records queued before anonymous ids had a namespace as the relay reads
        them (`outbound.anonymous`: the default prefix), and move them to their lines.

        Unstamped, such a record's anonymous line kept the bare id as its key, apart from the
        line of the same visitor's newer events, and its user's identified mark could not be
        believed, so each of its tracks went with an identify and could not join a batch.
        Its line joins the visitor's line in the namespace (older events first, by id); the
        bare key's identified mark is dropped, since the relay wrote it for an identify of
        the prefixed id as well as for the bare one: at worst one more identify. Dead letters
        are stamped too, so that a replay joins the right line.
        """
        moved = 0
        left: set[str] = set()  # keys lines moved from, and to: their heads are rebuilt
        joined: set[str] = set()
        for table in ("events", "dead_letters"):
            last = 0
            while rows := connection.execute(
                _BEFORE_THE_NAMESPACE.format(table=table), (last, _ID_CHUNK)
            ).fetchall():
                stamped = []
                for row_id, key, body in rows:
                    record = orjson.loads(body)
                    record["anonymous_id"] = anonymous(record)
                    record["anonymous_prefix"] = LEGACY_ANONYMOUS_PREFIX
                    new_key = user_key(record)
                    if new_key != key:
                        left.add(key)
                        joined.add(new_key)
                    stamped.append((new_key, orjson.dumps(record), row_id))
                connection.executemany(
                    f"UPDATE {table} SET user_key = ?, body = ? WHERE id = ?", stamped
                )
                moved += len(rows)
                last = rows[-1][0]
        cls._refresh_heads(connection, left | joined)
        connection.executemany("DELETE FROM identified WHERE user_key = ?", [(k,) for k in left])
        if moved:
            log.info(
                "queue: %s queued before the anonymous namespace moved into it (%s)",
                counted(moved, "record"),
                LEGACY_ANONYMOUS_PREFIX,
            )

    async def close(self) -> None:
        if self._writer is not None:
            # Operations commit in order: once this one is done, all earlier ones are.
            await self._submit(lambda connection: None)
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        connection, self._connection = self._connection, None
        if self._executor is not None:
            if connection is not None:
                await asyncio.get_running_loop().run_in_executor(self._executor, connection.close)
            self._executor.shutdown(wait=True)
            self._executor = None
        elif connection is not None:
            connection.close()
        self._unlock()

    async def _submit(self, operation: Operation, *, stores: bool = False) -> Any:
        """Run `operation` in the next group commit. `stores`: it writes new data, so its
        success proves the queue can store again (reads succeed on a full disk too)."""
        return await self._next_commit(self._pending, operation, stores)

    def _next_commit(self, pending: list[Any], *item: object) -> asyncio.Future[Any]:
        """A future for `item`'s part in the next group commit, which `pending` feeds."""
        if self._writer is None:
            raise QueueUnavailable("the queue is closed")
        if self.damaged is not None and pending is self._puts:
            # Stored in a damaged file, an event could be lost or sent again forever.
            raise QueueUnavailable(self.damaged)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending.append((*item, future))
        self._work.set()
        return future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            self._work.clear()
            await self._wait_for_a_short_log()
            batch, self._pending = self._pending, []
            puts, self._puts = self._puts, []
            acks, self._acks = self._acks, []
            if not batch and not puts and not acks:
                continue
            # Most commits are a put or two and nothing else: no lists for what is not there.
            operations = [operation for operation, _, _ in batch] if batch else []
            acked = [(event_id, identified) for event_id, identified, _ in acks] if acks else []
            # In the order of the results: the acks', the operations', the puts'.
            futures: list[asyncio.Future[Any]] = [future for _, _, future in acks] if acks else []
            if batch:
                futures += [future for _, _, future in batch]
            futures += [future for _, _, _, future in puts]
            try:
                if self._executor is None:
                    results, stored = await self._on_the_loop(acked, operations, puts)
                else:
                    results, stored = await loop.run_in_executor(
                        self._executor, self._transaction, acked, operations, puts
                    )
            except Exception as error:
                self._healthy, self.last_error = False, f"{type(error).__name__}: {error}"
                if puts:  # what a probe must be able to write before it says "healthy"
                    self._failed_bytes = sum(size for _, size, _, _ in puts)
                if damage(error):
                    self.damaged = f"{self.path} is damaged ({error})"
                failure = QueueUnavailable(self.last_error)
                for future in futures:
                    if not future.done():
                        future.set_exception(failure)
                continue
            if (puts or any(stores for _, stores, _ in batch)) and self.damaged is None:
                self._healthy, self.last_error = True, None
            self.commits += 1
            outcomes: list[Any] = stored
            if acks or batch:
                outcomes = [*([None] * len(acks)), *results, *stored]
            for future, result in zip(futures, outcomes, strict=True):
                if not future.done():
                    future.set_result(result)

    async def _wait_for_a_short_log(self) -> None:
        """Hold the next commit while SQLite's log is past its bound, until the checkpointer
        has restarted it (or tried to). Commits that leave no gap between them would keep the
        checkpointer from ever restarting the log, which would then grow by hundreds of MB;
        puts that arrive meanwhile join the commit that follows."""
        checkpointer = self._checkpointer
        if checkpointer is None or self._log_room > 0:
            return
        self._log_room = self._wal_hold_bytes - self._log_size()
        if self._log_room >= 0:
            return
        self.log_holds += 1
        self._lock_free.clear()
        checkpointer.restart_soon()
        # Bounded: a checkpointer that cannot restart (a reader in the log, a full disk)
        # slows commits down to its pace and does not stop them.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BUSY_TIMEOUT):
                await self._lock_free.wait()

    def _log_size(self) -> int:
        try:
            return os.stat(self._wal_path).st_size
        except FileNotFoundError:
            return 0

    async def _on_the_loop(
        self, acked: list[Acked], operations: list[Operation], puts: list[PendingPut]
    ) -> tuple[list[Any], list[int | str]]:
        """The transaction, on the event loop. While another connection holds the write lock
        (the checkpointer restarting the log, a dead-letters command) it waits here rather
        than in SQLite, so that the loop goes on reading and checking requests meanwhile:
        until the checkpointer says its restart is over, or for `LOCK_POLL` (others)."""
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            self._lock_free.clear()  # before trying: a release from now on ends the wait
            try:
                return self._transaction(acked, operations, puts)
            except sqlite3.OperationalError as error:
                busy = error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                if not busy or time.monotonic() > deadline:
                    raise
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOCK_POLL):
                    await self._lock_free.wait()

    def _transaction(
        self, acked: list[Acked], operations: list[Operation], puts: list[PendingPut]
    ) -> tuple[list[Any], list[int | str]]:
        connection = self._connection
        assert connection is not None
        depth, size, dead = self.depth, self.bytes, self.dead_count
        self._undo.clear()
        changes = connection.total_changes
        cursor = connection.cursor()  # one for the commit's own statements, not one each
        cursor.execute("BEGIN IMMEDIATE")
        try:
            if acked:  # first: a claim in the same commit must see those users' next events
                self._remember_identified(connection, [i for i, identified in acked if identified])
                self._delete(connection, [event_id for event_id, _ in acked])
            results = [operation(connection) for operation in operations] if operations else []
            stored = self._store(cursor, puts) if puts else []
            cursor.execute("COMMIT")
        except BaseException:
            self._log_room = 0  # what a failed commit wrote: measure it
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            self.depth, self.bytes, self.dead_count = depth, size, dead  # none of it happened
            self._undo_shares()
            raise
        changes = connection.total_changes - changes
        if operations:
            self._log_room = 0  # an operation may write anything: measure
        else:
            self._log_room -= log_bytes(LOG_PAGES_A_COMMIT + LOG_PAGES_A_CHANGE * changes)
        return results, stored

    async def put(self, records: Sequence[Record]) -> int:
        # Everything per event happens here; the writer stores all the puts of a group
        # commit with a few statements, so that it hardly needs the interpreter.
        kept = records
        if self._dedupe_window > 0 and len(records) > 1:  # a message id twice: keep the first
            kept = list(reversed({dedupe_key(r): r for r in reversed(records)}.values()))
        prefix = self._ipv6_prefix
        # The records of a request count against one client: looked up once.
        one = one_sender(kept)
        client = share_key(kept[0], prefix) if one and kept else None
        rows = [
            (
                user_key(r),
                r["message_id"],
                r["received_at"],
                orjson.dumps(r),
                dedupe_key(r),
                client if one else share_key(r, prefix),
            )
            for r in kept
        ]
        size = sum(len(row[3]) for row in rows)
        shares: Shares = {} if client is None else {client: [len(rows), size]}
        if not one:
            shares = shares_of(rows)
        try:
            duplicates: int | str = await self._next_commit(self._puts, rows, size, shares)
        except QueueUnavailable as error:
            # Every request is refused alike (a full disk): counted, not a line each.
            self._refusals.log(
                logging.ERROR,
                "unavailable",
                "queue refused %s: %s",
                counted(len(records), "event"),
                error,
            )
            raise
        if isinstance(duplicates, str):  # the limit that refused
            full = QueueFull(self._full_message(duplicates, rows[0][5]), duplicates)
            self._refusals.log(
                logging.WARNING,
                duplicates,
                "queue refused %s: %s",
                counted(len(records), "event"),
                full,
            )
            raise full
        duplicates += len(records) - len(rows)
        self.stored += len(records) - duplicates
        self.duplicates += duplicates
        return duplicates

    def _full_message(self, limit: str, client: str | None) -> str:
        """Why a put did not fit, for logs (no client address: it is the client's to know)."""
        if limit == "queue_share_per_ip":
            held = self.clients.get(client or "", (0, 0))
            return f"one client holds its share of the queue ({held[0]} events, {held[1]} bytes)"
        if limit == "queue_browser_share":
            return (
                f"browsers hold their share of the queue ({self.browser_events} events,"
                f" {self.browser_bytes} bytes); the rest is kept for server tokens"
            )
        return f"the queue is full ({self.depth} events, {self.disk_bytes} bytes on disk)"

    def _measure_disk(self, cursor: sqlite3.Cursor) -> None:
        """What the queue's files hold: the database's pages in use, and its log."""
        (pages,) = cursor.execute("PRAGMA page_count").fetchone()
        (free,) = cursor.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = cursor.execute("PRAGMA page_size").fetchone()
        try:
            log_size = os.stat(self.path.with_name(self.path.name + "-wal")).st_size
        except FileNotFoundError:
            log_size = 0
        self.disk_bytes = (pages - free) * page_size + log_size
        self._disk_measured_at = time.monotonic()

    def _refusal(
        self, events: int, put_size: int, shares: Shares, depth: int, disk: int, taken: Shares
    ) -> str | None:
        """The limit a put would go over, given what this commit took before it; None: it fits."""
        if depth + events > self._max_events:
            return "queue_max_events"
        if disk + put_size > self._max_bytes:
            return "queue_max_bytes"
        if not shares:
            return None  # a server token's: only the bounds apply
        browsers = taken[""]
        events = self.browser_events + browsers[0] + sum(c[0] for c in shares.values())
        size = self.browser_bytes + browsers[1] + sum(c[1] for c in shares.values())
        share = self._browser_share
        if events > share * self._max_events or size > share * self._max_bytes:
            return "queue_browser_share"
        share = self._share_per_ip
        for key, (more_events, more_bytes) in shares.items():
            held_events, held_bytes = self.clients.get(key, (0, 0))
            before = taken.get(key, [0, 0])
            if (
                held_events + before[0] + more_events > share * self._max_events
                or held_bytes + before[1] + more_bytes > share * self._max_bytes
            ):
                return "queue_share_per_ip"
        for key, (more_events, more_bytes) in shares.items():
            for counts in (taken.setdefault(key, [0, 0]), browsers):
                counts[0] += more_events
                counts[1] += more_bytes
        return None

    @staticmethod
    def _remember(rows: list[Row], cursor: sqlite3.Cursor) -> set[str] | None:
        """Remember the rows' dedupe keys. None: each was new, and once among the rows
        (nearly always; one statement). Otherwise the keys seen before within the window,
        and none of the rows is remembered: the caller remembers those it stores."""
        if len(rows) == 1:  # the insert says whether the key was there
            row = rows[0]
            return None if cursor.execute(_REMEMBER, (row[4], row[2])).rowcount else {row[4]}
        # A point to roll back to, so that the keys seen before are looked up in the table as
        # it was (a savepoint within the commit ends with it).
        cursor.execute("SAVEPOINT remember")
        if cursor.executemany(_REMEMBER, [(row[4], row[2]) for row in rows]).rowcount == len(rows):
            return None
        cursor.execute("ROLLBACK TO remember")
        seen: set[str] = set()
        ids = [row[4] for row in rows]
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            seen.update(
                m
                for (m,) in cursor.execute(
                    f"SELECT message_id FROM received WHERE message_id IN ({marks})", chunk
                )
            )
        return seen

    def _store(self, cursor: sqlite3.Cursor, puts: list[PendingPut]) -> list[int | str]:
        """All the puts of one group commit: per put, its duplicates, or the name of the limit
        that it would have gone over (then nothing of it is stored)."""
        outcomes: list[int | str] = []
        if time.monotonic() - self._disk_measured_at >= DISK_CHECK_INTERVAL:
            self._measure_disk(cursor)
        depth, disk = self.depth, self.disk_bytes
        taken: Shares = {"": [0, 0]}  # per client, and "" for all browsers
        fitting: list[tuple[int, list[Row], Shares]] = []
        for rows, put_size, shares, _ in puts:
            limit = self._refusal(len(rows), put_size, shares, depth, disk, taken)
            if limit is not None:
                outcomes.append(limit)
                continue
            depth, disk = depth + len(rows), disk + put_size
            fitting.append((len(outcomes), rows, shares))
            outcomes.append(0)
        dedupe = self._dedupe_window > 0
        seen: set[str] | None = None  # none: every row is new, and remembered already
        if dedupe and fitting:
            seen = self._remember([row for _, rows, _ in fitting for row in rows], cursor)
        fresh: list[Row] = []
        for index, rows, shares in fitting:
            if seen is None:
                fresh += rows
            else:
                first = len(fresh)
                for row in rows:
                    if row[4] in seen:
                        outcomes[index] = int(outcomes[index]) + 1
                    else:
                        seen.add(row[4])
                        fresh.append(row)
                if outcomes[index]:  # a duplicate takes no share
                    shares = shares_of(fresh[first:])
            for client, (events, size) in shares.items():
                self._share(client, events, size)
        if fresh:
            cursor.executemany(_INSERT_EVENT, [row[:4] for row in fresh])
            cursor.execute(_NEW_HEADS_OF_THE_LAST, (len(fresh),))
            if seen is not None:
                cursor.executemany(_REMEMBER, [(row[4], row[2]) for row in fresh])
            size = sum(len(row[3]) for row in fresh)
            self._counted(len(fresh), size)
            self.disk_bytes += size  # till it is measured again
            self._log_room -= size
        now = max((row[2] for row in fresh), default=0.0)
        if dedupe and now - self._pruned_at > min(self._dedupe_window, 60.0):
            self._pruned_at = now
            cursor.execute(
                "DELETE FROM received WHERE received_at < ?", (now - self._dedupe_window,)
            )
        return outcomes

    async def claim(self, limit: int, *, now: float, lease: float, depth: int = 1) -> list[Claimed]:
        leased, prefix = self._leased, self._ipv6_prefix

        def keep(user: str, event_id: int, body: bytes, record: Record) -> Record:
            """`record`, with what its ack will need kept by its id."""
            ip = record.get("ip")
            if ip is None or isinstance(ip, str):  # as _SENDER reads it from the body
                browser = record.get("dedupe_key") is not None
                leased[event_id] = (user, len(body), client_key(ip, browser, prefix))
            return record

        # The lines' ranges as they were before this claim: put back if its commit fails.
        replaced: dict[str, tuple[int, float] | None] = {}

        def select_and_lease(connection: sqlite3.Connection) -> list[Claimed]:
            heads = connection.execute(_CLAIM, {"now": now, "limit": limit}).fetchall()
            until = now + lease
            claimed: list[Claimed] = []
            users: list[str] = []
            marks: list[tuple[float, int]] = []  # (lease, event id): the rows that carry it
            for user, event_id, body, attempts, received_at, identified in heads:
                users.append(user)
                record = keep(user, event_id, body, orjson.loads(body))
                claimed.append(Claimed(event_id, record, attempts, received_at, bool(identified)))
                marks.append((until, event_id))
                last = event_id
                if depth > 1:
                    redo = self._redo.get(user, _LAST_ID)
                    claimed.extend(
                        Claimed(i, keep(user, i, b, orjson.loads(b)), a, r, bool(identified))
                        for i, b, a, r in connection.execute(
                            _BEHIND, (user, event_id, redo, depth - 1)
                        )
                    )
                    last = claimed[-1].id
                    if last != event_id:
                        marks.append((until, last))
                self._lease_range(connection, user, event_id, last, until, replaced)
            connection.executemany("UPDATE events SET lease_until = ? WHERE id = ?", marks)
            connection.executemany(
                "UPDATE heads SET due_at = ? WHERE user_key = ?",
                [(until, user) for user in users],
            )
            return claimed

        try:
            claimed: list[Claimed] = await self._submit(select_and_lease)
        except QueueUnavailable:
            for user, before in replaced.items():
                if before is None:
                    self._ranges.pop(user, None)
                else:
                    self._ranges[user] = before
            raise
        if self._redo:
            for item in claimed:  # claimed again, as far as before: their leases are new
                self._redo.pop(user_key(item.record), None)
        return claimed

    def _lease_range(
        self,
        connection: sqlite3.Connection,
        user: str,
        head: int,
        last: int,
        until: float,
        replaced: dict[str, tuple[int, float] | None],
    ) -> None:
        """Lease a line's events from its head to `last` (the rows of both are the caller's
        to write), keeping in `replaced` the line's range as it was."""
        before = self._ranges.get(user)
        replaced.setdefault(user, before)
        if before is not None and before[0] > last:
            # A claim less deep than the one before (a probe): the events past this one's
            # keep the lease they had, in their rows now.
            old_last, old_until = before
            connection.execute(
                "UPDATE events SET lease_until = ? WHERE user_key = ? AND id > ? AND id < ?",
                (old_until, user, last, old_last),
            )
        if last == head:
            self._ranges.pop(user, None)
        else:
            self._ranges[user] = (last, until)

    def _follow_leases(self, connection: sqlite3.Connection, gone: dict[str, list[int]]) -> None:
        """After events were deleted (`gone`: by line), keep the leases of the lines claimed
        several events deep as a lease on each event would have been: the line's next event
        becomes its head still leased, and the last event claimed (which tells a restart how
        far the claim went) is the last one left."""
        for user, deleted in gone.items():
            claimed = self._ranges.get(user)
            if claimed is None:
                continue
            last, until = claimed
            row = connection.execute(
                "SELECT event_id FROM heads WHERE user_key = ?", (user,)
            ).fetchone()
            if row is None or row[0] > last:
                del self._ranges[user]  # none of the claimed events is left
                continue
            head = row[0]
            if min(deleted) < head:  # the head went: the next one is under the same lease
                connection.execute("UPDATE events SET lease_until = ? WHERE id = ?", (until, head))
                connection.execute(
                    "UPDATE heads SET due_at = MAX(due_at, ?) WHERE user_key = ?", (until, user)
                )
            if last in deleted:
                (last,) = connection.execute(
                    "SELECT MAX(id) FROM events WHERE user_key = ? AND id < ?", (user, last)
                ).fetchone()
                connection.execute("UPDATE events SET lease_until = ? WHERE id = ?", (until, last))
                self._ranges[user] = (last, until)

    def _spell_out_lease(self, connection: sqlite3.Connection, user: str, event_id: int) -> None:
        """Before an outcome of one event inside a line's range other than its head: the other
        events of the range get the lease in their rows, and the range goes."""
        claimed = self._ranges.get(user)
        if claimed is None or event_id > claimed[0]:
            return
        last, until = claimed
        row = connection.execute(
            "SELECT event_id FROM heads WHERE user_key = ?", (user,)
        ).fetchone()
        if row is None or row[0] == event_id:
            return  # the head's lease is in its row; the others keep the range's
        connection.execute(
            "UPDATE events SET lease_until = ? WHERE user_key = ? AND id > ? AND id <= ?"
            " AND id != ?",
            (until, user, row[0], last, event_id),
        )
        del self._ranges[user]

    def _counted(self, events: int, size: int) -> None:
        """Keep depth and bytes in step with the table; run inside the writer's transaction."""
        self.depth += events
        self.bytes += size

    def _delete(self, connection: sqlite3.Connection, event_ids: Sequence[int]) -> None:
        gone: dict[str, list[int]] = {}  # the ids deleted, by line
        leased = self._leased
        # The events a claim of this process read: their line, size and client are known, and
        # the DELETE returns only which of them it found (returning a body's length and the
        # fields of its JSON, as for the others, costs more than the delete itself).
        known: list[int] = []
        others: list[int] = []
        for event_id in event_ids:
            (known if event_id in leased else others).append(event_id)
        for start in range(0, len(known), _ID_CHUNK):
            chunk = known[start : start + _ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            deleted = [
                event_id
                for (event_id,) in connection.execute(
                    f"DELETE FROM events WHERE id IN ({marks}) RETURNING id", chunk
                )
            ]
            size = 0
            for event_id in deleted:
                user, event_size, client = leased[event_id]
                self._share(client, -1, -event_size)
                size += event_size
                gone.setdefault(user, []).append(event_id)
            self._counted(-len(deleted), -size)
        for event_id in known:
            # Gone, or never there: an id SQLite gives again later is another event's.
            del leased[event_id]
        for start in range(0, len(others), _ID_CHUNK):
            chunk = others[start : start + _ID_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = connection.execute(
                f"DELETE FROM events WHERE id IN ({marks})"
                f" RETURNING id, user_key, LENGTH(body), {_SENDER}",
                chunk,
            ).fetchall()
            self._counted(-len(rows), -sum(row[2] for row in rows))
            for event_id, user, size, ip, browser in rows:
                self._share(client_key(ip, bool(browser), self._ipv6_prefix), -1, -size)
                gone.setdefault(user, []).append(event_id)
        self._refresh_heads(connection, gone)
        if self._ranges:
            self._follow_leases(connection, gone)

    @staticmethod
    def _refresh_heads(connection: sqlite3.Connection, users: Iterable[str]) -> None:
        """Make these users' heads what their events say (each a probe of events_by_user)."""
        keys = [(user,) for user in users]
        connection.executemany("DELETE FROM heads WHERE user_key = ?", keys)
        connection.executemany(_HEAD_OF, keys)

    def _update_head_event(
        self, connection: sqlite3.Connection, sql: str, params: Sequence[Any]
    ) -> None:
        """Run an UPDATE of one event that ends `RETURNING user_key, id`, and refresh that head."""
        rows = connection.execute(sql, params).fetchall()
        for user, event_id in rows:
            self._spell_out_lease(connection, user, event_id)
        self._refresh_heads(connection, [user for user, _ in rows])

    async def ack(self, event_id: int, *, identified: bool = False) -> None:
        # Acks of one commit go together into one statement, as puts do.
        await self._next_commit(self._acks, event_id, identified)

    async def ack_all(self, acked: Sequence[tuple[int, bool]]) -> None:
        if not acked:
            return
        # One future for them all: a batch's events are acked without a task each.
        future = self._next_commit(self._acks, *acked[0])
        self._acks.extend((event_id, identified, future) for event_id, identified in acked[1:])
        await future

    @staticmethod
    def _remember_identified(connection: sqlite3.Connection, event_ids: list[int]) -> None:
        for start in range(0, len(event_ids), _ID_CHUNK):
            chunk = event_ids[start : start + _ID_CHUNK]
            connection.execute(
                "INSERT OR IGNORE INTO identified (user_key) SELECT user_key FROM events"
                f" WHERE id IN ({','.join('?' * len(chunk))})",
                chunk,
            )

    async def retry(self, event_id: int, *, available_at: float, error: str) -> None:
        self._leased.pop(event_id, None)  # kept again by the claim that takes it next
        await self._submit(
            lambda c: self._update_head_event(
                c,
                "UPDATE events SET attempts = attempts + 1, available_at = ?, lease_until = 0,"
                " last_error = ? WHERE id = ? RETURNING user_key, id",
                (available_at, error, event_id),
            )
        )

    async def release(self, event_id: int) -> None:
        self._leased.pop(event_id, None)
        await self._submit(
            lambda c: self._update_head_event(
                c,
                "UPDATE events SET lease_until = 0 WHERE id = ? RETURNING user_key, id",
                (event_id,),
            )
        )

    async def dead_letter(
        self, event_id: int, *, reason: str, status: int | None, response: str, now: float
    ) -> None:
        def move(connection: sqlite3.Connection) -> None:
            self.dead_count += connection.execute(
                "INSERT INTO dead_letters (message_id, user_key, received_at, failed_at,"
                " attempts, reason, status, response, body)"
                " SELECT message_id, user_key, received_at, ?, attempts + 1, ?, ?, ?, body"
                " FROM events WHERE id = ?",
                (now, reason, status, response, event_id),
            ).rowcount
            self._delete(connection, [event_id])
            self._drop_dead_letters(connection, now)

        await self._submit(move)

    def _drop_dead_letters(self, connection: sqlite3.Connection, now: float) -> None:
        """Drop the dead letters past their retention (at most once a RETENTION_INTERVAL) and
        the oldest beyond the cap, with a line (counted while it repeats) and the metric."""
        expired = over = 0
        if self._dead_letter_days and now - self._retained_at >= RETENTION_INTERVAL:
            self._retained_at = now
            expired = connection.execute(
                "DELETE FROM dead_letters WHERE failed_at < ?",
                (now - self._dead_letter_days * 86400,),
            ).rowcount
            self.dead_count -= expired
        if self._dead_letters_max and self.dead_count > self._dead_letters_max:
            over = connection.execute(
                "DELETE FROM dead_letters WHERE id IN"
                " (SELECT id FROM dead_letters ORDER BY id LIMIT ?)",
                (self.dead_count - self._dead_letters_max,),
            ).rowcount
            self.dead_count -= over
        self._drops.dropped(expired, over)

    @property
    def dead_letters_dropped(self) -> int:
        """Dead letters retention dropped since open."""
        return self._drops.count

    async def probe(self, now: float) -> bool:
        """Try a real write as large as the puts that last failed (PROBE_BYTES at least);
        True when the queue can store events again."""
        # A failed transaction leaves room behind it (log frames past the last commit, pages
        # it had allocated): a small write fits there on a disk that is still full.
        size = max(PROBE_BYTES, self._failed_bytes)
        with contextlib.suppress(QueueUnavailable):
            await self._submit(
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('probe', randomblob(?))",
                    (size,),
                ),
                stores=True,
            )
            # Committed apart: deleted in the same transaction, its pages need not be written.
            await self._submit(lambda c: c.execute("DELETE FROM meta WHERE key = 'probe'"))
        return self._healthy

    async def note(self, key: str, value: object) -> None:
        await self._submit(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (key, orjson.dumps(value).decode()),
            )
        )

    async def notes(self) -> dict[str, Any]:
        rows = await self._submit(
            lambda c: c.execute("SELECT key, value FROM meta WHERE key != 'probe'").fetchall()
        )
        return {key: orjson.loads(value) for key, value in rows}

    async def reset_backoff(self, now: float) -> None:
        def reset(connection: sqlite3.Connection) -> None:
            # Only heads are ever retried, so only heads are in backoff: this reads the lines
            # not yet due, not the backlog.
            connection.execute(
                "UPDATE events SET available_at = received_at WHERE available_at > :now"
                " AND id IN (SELECT event_id FROM heads WHERE due_at > :now)",
                {"now": now},
            )
            connection.execute(
                "UPDATE heads SET due_at = (SELECT MAX(available_at, lease_until) FROM events"
                " WHERE id = heads.event_id) WHERE due_at > ?",
                (now,),
            )

        await self._submit(reset)

    async def stats(self) -> QueueStats:
        def read(connection: sqlite3.Connection) -> QueueStats:
            # Cheap enough for every /readyz and scrape: counters, the head of the line, and
            # a recount only after another process (`dead-letters`) changed the table.
            changed = dict(
                connection.execute(
                    "SELECT key, value FROM meta"
                    " WHERE key IN ('events_changed_at', 'dead_letters_changed_at')"
                ).fetchall()
            )
            events_at = orjson.loads(changed.get("events_changed_at", "0"))
            if events_at > self._counted_at:
                self._count_events(connection)
                self._counted_at = events_at
            if orjson.loads(changed.get("dead_letters_changed_at", "0")) > self._dead_counted_at:
                self._count_dead_letters(connection)
            if self._owner:
                self._drop_dead_letters(connection, time.time())  # retention, without new ones
            head = connection.execute(
                "SELECT received_at FROM events ORDER BY id LIMIT 1"
            ).fetchone()
            return QueueStats(self.depth, None if head is None else head[0], self.dead_count)

        stats: QueueStats = await self._submit(read)
        return stats

    async def dead_letters(
        self, which: DeadLetterFilter | None = None, *, limit: int = -1
    ) -> list[dict[str, Any]]:
        """Dead letters (all or those matching), oldest first, with reason and Outbound's answer."""
        where, params = dead_letter_where(which or DeadLetterFilter())

        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = connection.execute(
                "SELECT id, message_id, reason, status, response, attempts, failed_at, body"
                f" FROM dead_letters WHERE {where} ORDER BY id LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [
                {**dict(zip(_LETTER_KEYS, r[:7], strict=True)), "record": orjson.loads(r[7])}
                for r in rows
            ]

        letters: list[dict[str, Any]] = await self._submit(read)
        return letters

    async def dead_letter_reasons(self) -> list[tuple[str, int]]:
        """How many dead letters there are for each reason, most first."""
        counts: list[tuple[str, int]] = await self._submit(
            lambda c: c.execute(
                "SELECT reason, COUNT(*) FROM dead_letters GROUP BY reason ORDER BY 2 DESC, 1"
            ).fetchall()
        )
        return counts

    async def replay_dead_letters(
        self, which: DeadLetterFilter, *, chunk: int = 1000, progress: Progress | None = None
    ) -> int:
        """Put matching dead letters back in the queue, with their original message ids."""

        def move(connection: sqlite3.Connection) -> int:
            where, params = dead_letter_where(which)
            ids = [
                row[0]
                for row in connection.execute(
                    f"SELECT id FROM dead_letters WHERE {where} ORDER BY id LIMIT ?",
                    (*params, chunk),
                )
            ]
            marks = ",".join("?" * len(ids))
            (last,) = connection.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
            sizes = connection.execute(
                "INSERT INTO events (user_key, message_id, received_at, available_at, body)"
                " SELECT user_key, message_id, received_at, 0, body FROM dead_letters"
                f" WHERE id IN ({marks}) ORDER BY id RETURNING LENGTH(body), {_SENDER}",
                ids,
            ).fetchall()
            connection.execute(_NEW_HEADS, (last,))
            connection.execute(f"DELETE FROM dead_letters WHERE id IN ({marks})", ids)
            self._counted(len(sizes), sum(row[0] for row in sizes))
            for size, ip, browser in sizes:
                self._share(client_key(ip, bool(browser), self._ipv6_prefix), 1, size)
            self.dead_count -= len(ids)
            return len(ids)

        moved = await self._in_chunks(move, progress)
        if moved:
            # A serving collector keeps its own counts; this tells it to recount.
            await self.note("events_changed_at", time.time())
            await self.note("dead_letters_changed_at", time.time())
        return moved

    async def purge_dead_letters(
        self, which: DeadLetterFilter, *, chunk: int = 1000, progress: Progress | None = None
    ) -> int:
        """Delete matching dead letters for good."""

        def delete(connection: sqlite3.Connection) -> int:
            where, params = dead_letter_where(which)
            deleted: int = connection.execute(
                "DELETE FROM dead_letters WHERE id IN"
                f" (SELECT id FROM dead_letters WHERE {where} ORDER BY id LIMIT ?)",
                (*params, chunk),
            ).rowcount
            self.dead_count -= deleted
            return deleted

        purged = await self._in_chunks(delete, progress)
        if purged:
            await self.note("dead_letters_changed_at", time.time())  # for a serving collector
        return purged

    async def _in_chunks(
        self, operation: Callable[[sqlite3.Connection], int], progress: Progress | None
    ) -> int:
        # One transaction a chunk, so that ingest keeps committing during a long replay.
        done = 0
        while moved := await self._submit(operation):
            done += moved
            if progress is not None:
                progress(done)
        return done
