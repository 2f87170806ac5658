"""A queue file that turns malformed while the collector runs (issue 15, item 2): nothing more
is acknowledged, ingest answers 503, and /readyz says what is wrong."""

from __future__ import annotations

import sqlite3

from conftest import SEED_EVENT, Collector


def break_the_events_table(path: str) -> None:
    """Point the events table at the dedupe table's root page from another connection, as a
    stray write could: SQLite itself then finds the file malformed (SQLITE_CORRUPT)."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA writable_schema = ON")
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_schema WHERE name = 'received'"
        ).fetchone()
        connection.execute("UPDATE sqlite_schema SET rootpage = ? WHERE name = 'events'", (root,))
        (version,) = connection.execute("PRAGMA schema_version").fetchone()
        connection.execute(f"PRAGMA schema_version = {version + 1}")
        connection.commit()
    finally:
        connection.close()


async def test_a_queue_that_turns_malformed_refuses_events_and_is_not_ready(
    collector: Collector,
) -> None:
    assert (await collector.post("/e", SEED_EVENT))[0] == 202
    break_the_events_table(str(collector.queue.path))
    statuses = []
    for n in range(3):
        status, answer, _ = await collector.post("/e", {**SEED_EVENT, "message_id": f"after-{n}"})
        statuses.append((status, answer))
    assert all(status == 503 for status, _ in statuses), statuses
    status, ready, _ = await collector.get("/readyz")
    assert status == 503
    assert any("damaged" in problem for problem in ready["problems"]), ready
