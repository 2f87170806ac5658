"""Records queued before anonymous ids had a namespace (`anonymous_id_prefix`), in a queue file
of schema version 1 written as those collectors wrote it: opening it moves them into the
namespace (schema version 2), so that their visitor gets one identify and its events go as
one batch, in order, nothing lost; a crash in the middle of that leaves a file that migrates
again."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson
from conftest import Collector, StartCollector, eventually
from fake_outbound import FakeOutbound

from collector.queue import DeadLetterFilter, SQLiteQueue

NOW = 1_700_000_000.0
QUEUE_FILE = "queue.sqlite3"  # in the data directory

# The schema of version 1 (the heads table; identified marks; no record of it says whether its
# anonymous id is in the namespace), as collectors up to ac7314b created it.
VERSION_1 = """
CREATE TABLE events (
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
CREATE INDEX events_by_user ON events (user_key, id);
CREATE INDEX events_leased ON events (lease_until) WHERE lease_until > 0;
CREATE TABLE received (message_id TEXT PRIMARY KEY, received_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX received_by_time ON received (received_at);
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE heads (
    user_key TEXT PRIMARY KEY,
    event_id INTEGER NOT NULL,
    due_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX heads_by_due ON heads (due_at, event_id);
CREATE TABLE identified (user_key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE dead_letters (
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
CREATE INDEX dead_letters_by_time ON dead_letters (failed_at);
PRAGMA user_version = 1;
"""


def legacy(name: str, anonymous_id: str | None = "v1", **fields: Any) -> dict[str, Any]:
    """A record as ingest stored it before the namespace: the anonymous id bare, no mark."""
    return {
        "type": "track",
        "message_id": f"m-{name}",
        "user_id": None,
        "anonymous_id": anonymous_id,
        "event": name,
        "properties": {},
        "traits": {},
        "timestamp": NOW,
        "received_at": NOW,
        "context": {},
        "ip": None,
        "user_agent": None,
        "origin": None,
        **fields,
    }


def stamped(name: str, anonymous_id: str = "v1") -> dict[str, Any]:
    """A record of the same visitor as ingest stores it since (in the namespace, marked)."""
    record = legacy(name, f"anon:{anonymous_id}", anonymous_prefix="anon:")
    record["dedupe_key"] = f"m-{name}#0123"
    return record


def line_key(record: dict[str, Any]) -> str:
    """The key a version-1 queue gave a record's line: the user id, else the anonymous id."""
    return str(record.get("user_id") or record.get("anonymous_id"))


def version_1_queue(
    path: Path,
    events: list[dict[str, Any]],
    *,
    identified: tuple[str, ...] = (),
    dead_letters: tuple[dict[str, Any], ...] = (),
) -> None:
    """Write a queue file as a version-1 collector left it: events in order, each line's head
    with its due time, identified marks under the line keys, dead letters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(VERSION_1)
        old.executemany(
            "INSERT INTO events (user_key, message_id, received_at, available_at, body)"
            " VALUES (?, ?, ?, ?, ?)",
            [(line_key(r), r["message_id"], NOW, NOW, orjson.dumps(r)) for r in events],
        )
        old.execute(
            "INSERT INTO heads (user_key, event_id, due_at)"
            " SELECT user_key, MIN(id), available_at FROM events GROUP BY user_key"
        )
        old.executemany("INSERT INTO identified (user_key) VALUES (?)", [(k,) for k in identified])
        old.executemany(
            "INSERT INTO dead_letters (message_id, user_key, received_at, failed_at, attempts,"
            " reason, status, response, body) VALUES (?, ?, ?, ?, 1, 'Outbound answered 400',"
            " 400, '', ?)",
            [(r["message_id"], line_key(r), NOW, NOW, orjson.dumps(r)) for r in dead_letters],
        )
    old.close()


# A visitor with five events queued before the namespace and two since (two lines in a
# version-1 file: `v1` and `anon:v1`), a known user who also had an anonymous id, and an
# alias from an anonymous id.
LEGACY_V1 = [legacy(f"L{n}") for n in range(5)]
EVENTS = [
    LEGACY_V1[0],
    legacy("U0", anonymous_id="v2", user_id="u1"),
    *LEGACY_V1[1:3],
    legacy("A0", anonymous_id="v3", user_id="u2", type="identify", event=None),
    *LEGACY_V1[3:],
    stamped("N0"),
    stamped("N1"),
]
DEAD = legacy("D0")


def heads_as_the_events_say(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """The heads table, and the heads its events make (each line's oldest event)."""
    with sqlite3.connect(path) as connection:
        kept = connection.execute("SELECT user_key, event_id FROM heads ORDER BY 1").fetchall()
        made = connection.execute(
            "SELECT user_key, MIN(id) FROM events GROUP BY user_key ORDER BY 1"
        ).fetchall()
    connection.close()
    return kept, made


async def test_a_visitor_queued_before_the_namespace_gets_one_identify_then_one_batch(
    start_collector: StartCollector, fake: FakeOutbound, tmp_path: Path
) -> None:
    version_1_queue(tmp_path / "data" / QUEUE_FILE, EVENTS, identified=("v1",))
    collector = await start_collector()
    await fake.wait_for(1 + 7 + 2 + 1)
    await drained(collector)

    visitor = [
        (r.endpoint, r.batch, r.body) for r in fake.received if r.body["user_id"] == "anon:v1"
    ]
    assert [(endpoint, batch) for endpoint, batch, _ in visitor] == [("identify", 0)] + [
        ("track", 7)
    ] * 7
    assert [body["event"] for _, _, body in visitor[1:]] == [
        "L0",
        "L1",
        "L2",
        "L3",
        "L4",
        "N0",
        "N1",
    ]
    assert [(r.endpoint, r.body) for r in fake.received if r.body["user_id"] == "u2"] == [
        ("identify", {"user_id": "u2", "previous_id": "anon:v3"})
    ]
    assert [r.endpoint for r in fake.received if r.body["user_id"] == "u1"] == [
        "identify",
        "track",
    ]
    # Nothing lost, nothing twice, and no bare anonymous id reached Outbound.
    assert len(fake.received) == 1 + 7 + 1 + 2
    assert not {"v1", "v2", "v3"} & {r.body["user_id"] for r in fake.received}


async def drained(collector: Collector) -> None:
    async def empty() -> bool:
        return (await collector.queue.stats()).depth == 0

    await eventually(empty)


async def test_the_migrated_file_holds_whole_lines_in_order_with_consistent_heads(
    tmp_path: Path,
) -> None:
    path = tmp_path / QUEUE_FILE
    version_1_queue(path, EVENTS, identified=("v1", "u1"), dead_letters=(DEAD,))
    queue = SQLiteQueue(path, dedupe_window=0)
    await queue.open()
    try:
        kept, made = heads_as_the_events_say(path)
        assert kept == made
        assert [key for key, _ in kept] == ["anon:v1", "u1", "u2"]
        claimed = await queue.claim(10, now=NOW, lease=60, depth=10)
        lines = [(c.record["message_id"], user_of(c.record), c.identified) for c in claimed]
        assert lines == [
            *[(f"m-L{n}", "anon:v1", False) for n in range(5)],
            ("m-N0", "anon:v1", False),
            ("m-N1", "anon:v1", False),
            ("m-U0", "u1", True),
            ("m-A0", "u2", False),
        ]
        records = {c.record["message_id"]: c.record for c in claimed}
        assert records["m-L0"]["anonymous_id"] == "anon:v1"
        assert records["m-L0"]["anonymous_prefix"] == "anon:"
        assert records["m-U0"]["anonymous_id"] == "anon:v2"
        assert records["m-A0"]["anonymous_id"] == "anon:v3"
        assert (await queue.stats()).depth == len(EVENTS)
        # A dead letter of that visitor replayed joins its line, behind what waits there.
        for item in claimed:
            await queue.release(item.id)
        assert await queue.replay_dead_letters(DeadLetterFilter()) == 1
        claimed = await queue.claim(1, now=NOW, lease=60, depth=10)
        assert [c.record["message_id"] for c in claimed][-1] == "m-D0"
        assert {user_of(c.record) for c in claimed} == {"anon:v1"}
    finally:
        await queue.close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone() == (2,)
        assert connection.execute("SELECT user_key FROM identified ORDER BY 1").fetchall() == [
            ("u1",)
        ]
    connection.close()


def user_of(record: dict[str, Any]) -> str:
    return str(record.get("user_id") or record["anonymous_id"])


# Run in a process of its own: opens the queue and is killed by SIGKILL in the middle of the
# migration, when it has rewritten `kill_at` events in its (uncommitted) transaction. A tiny
# page cache spills those pages into the log before the kill.
CRASHING = """
import asyncio, os, signal, sqlite3, sys
from pathlib import Path
from collector.queue import DeadLetterFilter, SQLiteQueue

real_connect, kill_at, updates = sqlite3.connect, int(sys.argv[2]), 0

def trace(statement):
    global updates
    if statement.startswith("UPDATE events SET"):
        updates += 1
        if updates == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

def connect(*args, **kwargs):
    connection = real_connect(*args, **kwargs)
    connection.execute("PRAGMA cache_size=2")
    connection.set_trace_callback(trace)
    return connection

sqlite3.connect = connect
asyncio.run(SQLiteQueue(Path(sys.argv[1])).open())
"""


async def test_a_crash_in_the_middle_of_the_migration_leaves_a_file_that_migrates_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / QUEUE_FILE
    many = [legacy(f"L{n}", anonymous_id=f"v{n % 7}") for n in range(1200)]
    version_1_queue(path, many, identified=("v1",))
    crashing = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING, str(path), "700", stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await crashing.communicate()
    assert crashing.returncode == -signal.SIGKILL, stderr.decode()
    assert path.with_name(QUEUE_FILE + "-wal").stat().st_size > 0  # it had written
    with sqlite3.connect(path) as connection:  # as it was
        assert connection.execute("PRAGMA user_version").fetchone() == (1,)
        assert connection.execute(
            "SELECT COUNT(*) FROM events WHERE user_key LIKE 'anon:%'"
        ).fetchone() == (0,)
    connection.close()

    queue = SQLiteQueue(path, dedupe_window=0)
    await queue.open()
    try:
        kept, made = heads_as_the_events_say(path)
        assert kept == made
        assert [key for key, _ in kept] == [f"anon:v{n}" for n in range(7)]
        claimed = await queue.claim(10, now=NOW, lease=60, depth=1000)
        assert len(claimed) == len(many)
        for n in range(7):
            line = [c.record for c in claimed if c.record["anonymous_id"] == f"anon:v{n}"]
            assert [r["event"] for r in line] == [f"L{i}" for i in range(n, 1200, 7)]
            assert all(r["anonymous_prefix"] == "anon:" for r in line)
        assert not any(c.identified for c in claimed)
    finally:
        await queue.close()
