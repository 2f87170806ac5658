"""Damaged and shared data directories, with real files and real processes: `serve`, `stats`
and `dead-letters` refuse a queue file they cannot trust with exit 2 and one line naming the
file and what is wrong; a second `serve` on one data directory is refused while the tools
keep working beside the first."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from serve_process import ServeProcess

from collector.queue import SQLiteQueue

NOW = 1_700_000_000.0
COMMANDS = {
    "serve": ["serve", "--port", "0"],
    "stats": ["stats"],
    "dead-letters": ["dead-letters", "list"],
}


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("COLLECTOR_", "OUTBOUND_"))}


def run(command: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *COMMANDS[command], "--data-dir", str(data_dir)],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def queue_with_events(path: Path, users: str = "abc", per_user: int = 500) -> None:
    async def fill() -> None:
        queue = SQLiteQueue(path)
        await queue.open()
        records = [
            {"message_id": f"{u}-{n}", "user_id": u, "received_at": NOW, "event": "e"}
            for n in range(per_user)
            for u in users
        ]
        await queue.put(records)
        await queue.close()

    asyncio.run(fill())


def empty(data_dir: Path) -> str:
    (data_dir / "queue.sqlite3").write_bytes(b"")
    return "is empty (0 bytes)"


def truncated(data_dir: Path) -> str:
    path = data_dir / "queue.sqlite3"
    queue_with_events(path)
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size // 2)
    return "is truncated"


def foreign(data_dir: Path) -> str:
    (data_dir / "queue.sqlite3").write_text("events, one a line\n" * 50)
    return "is not a SQLite database"


def unreadable(data_dir: Path) -> str:
    # Tests may run as root, whom no file mode stops: a directory cannot be read as a file.
    (data_dir / "queue.sqlite3").mkdir()
    return "cannot be read"


def foreign_log(data_dir: Path) -> str:
    """A restored queue file beside the log of another database (a stale -wal)."""
    path = data_dir / "queue.sqlite3"
    queue_with_events(path, "abc", 2000)
    other = data_dir.parent / f"{data_dir.name}-other" / "queue.sqlite3"
    queue_with_events(other, "xyz", 500)
    connection = sqlite3.connect(other, isolation_level=None)
    connection.execute("PRAGMA wal_autocheckpoint=0")  # its changes stay in its log
    connection.execute("BEGIN")
    connection.execute("DELETE FROM events WHERE id % 3 = 0")
    connection.execute("COMMIT")
    shutil.copy(other.with_name("queue.sqlite3-wal"), path.with_name("queue.sqlite3-wal"))
    connection.close()
    return "is damaged"


CASES: dict[str, Callable[[Path], str]] = {
    "empty": empty,
    "truncated": truncated,
    "foreign": foreign,
    "unreadable": unreadable,
    "foreign log": foreign_log,
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES)
def test_a_queue_file_that_cannot_be_trusted_is_refused_in_one_line(
    tmp_path: Path, case: str, command: str
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    said = CASES[case](data_dir)
    done = run(command, data_dir)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert str(data_dir / "queue.sqlite3") in lines[0]
    assert said in lines[0]


def test_a_second_serve_on_one_data_directory_is_refused_and_the_tools_work_beside(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    first = ServeProcess(["--data-dir", str(data_dir)], env={}, log=tmp_path / "first.log")
    try:
        second = run("serve", data_dir)
        assert second.returncode == 2, second.stderr
        [line] = second.stderr.strip().splitlines()
        assert str(data_dir / "queue.sqlite3") in line
        assert f"another collector (pid {first.process.pid})" in line
        for tool in ("stats", "dead-letters"):
            done = run(tool, data_dir)
            assert done.returncode == 0, done.stderr
        assert first.process.poll() is None
        assert "being sent by a collector that stopped" not in first.output()
    finally:
        assert first.stop() == 0
    # Once the first has stopped, another may serve there.
    again = ServeProcess(["--data-dir", str(data_dir)], env={}, log=tmp_path / "again.log")
    assert again.stop() == 0
